"""Fuzzes the CSV loader and the `tfp-em` argument handling with hypothesis.

    python validation/fuzz.py [--seconds 60] [--json OUT.json]

Targets:
  csv  random text files (digits, separators, quotes, blank lines, nan/inf,
       letters, non-UTF-8 bytes) through `tfp_em.io.load_csv`: the only
       allowed outcomes are a finite float array or a ValueError.
  cli  random argument lists for `tfp-em fit gmm` through `tfp_em.cli.main`:
       the only allowed outcomes are exit 0, or exit 2 with one line on
       stderr and no traceback. Any escaping exception is a crash.

The time is split between the targets. Crashing inputs are printed (and
saved with --json) so that they can be added to
`tfp_em/_robustness_cases.py` as regression cases. Exit code 1 on a crash.
"""
from __future__ import annotations

import argparse
import contextlib
import io as _io
import os
import pathlib
import sys
import tempfile
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tfp_em import io  # noqa: E402
from tfp_em.cli import main as cli_main  # noqa: E402

CELLS = st.one_of(st.integers(-5, 5).map(str), st.floats(allow_nan=True).map(repr),
                  st.sampled_from(["", " ", "nan", "inf", "-inf", "x", "1e400", "\"1\"", "1,2",
                                   "a", "b", "é", "\x00", "1_0", "0x1"]))
ROWS = st.lists(st.lists(CELLS, min_size=0, max_size=4), min_size=0, max_size=6)
SEPARATORS = st.sampled_from([",", ";", "\t", ", "])


def csv_text(rows, sep, header):
  lines = ([sep.join(header)] if header else []) + [sep.join(r) for r in rows]
  return "\n".join(lines)


def _check_csv(folder, data: bytes, columns):
  path = os.path.join(folder, "f.csv")
  with open(path, "wb") as f:
    f.write(data)
  try:
    x, names = io.load_csv(path, columns)
  except ValueError:
    return None
  if not (isinstance(x, np.ndarray) and x.ndim == 2 and np.all(np.isfinite(x))
          and len(names) == x.shape[1]):
    return f"bad result {x!r} {names!r}"
  return None


def _check_cli(argv):
  out, err = _io.StringIO(), _io.StringIO()
  try:
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
        warnings.catch_warnings():
      warnings.simplefilter("ignore")
      rc = cli_main(argv)
  except BaseException as e:  # noqa: BLE001 - SystemExit included
    return f"{type(e).__name__}: {e}"
  lines = err.getvalue().strip().splitlines()
  if rc == 0:
    return None
  if rc != 2 or len(lines) != 1 or "Traceback" in err.getvalue():
    return f"rc={rc}, stderr={err.getvalue()[:300]!r}"
  return None


def fuzz_csv(seconds, crashes, counter):
  folder = tempfile.mkdtemp()
  header = st.lists(st.sampled_from(["a", "b", "c", "a ", "", "é"]), max_size=4)

  @settings(max_examples=200, deadline=None, database=None,
            suppress_health_check=list(HealthCheck))
  @given(rows=ROWS, sep=SEPARATORS, head=header, raw=st.binary(max_size=40),
         use_raw=st.booleans(),
         columns=st.sampled_from([None, ["a"], ["a", "b"], ["zz"]]))
  def one(rows, sep, head, raw, use_raw, columns):
    data = raw if use_raw else csv_text(rows, sep, head).encode("utf-8")
    counter["csv"] += 1
    problem = _check_csv(folder, data, columns)
    if problem:
      crashes.append(dict(target="csv", input=data.decode("latin-1"), columns=columns,
                          problem=problem))

  end = time.monotonic() + seconds
  while time.monotonic() < end:
    one()


def fuzz_cli(seconds, crashes, counter):
  folder = pathlib.Path(tempfile.mkdtemp())
  good = folder / "ok.csv"
  good.write_text("a,b\n" + "".join(f"{i % 7},{(i * 3) % 5}\n" for i in range(30)))
  (folder / "plain.txt").write_text("x")
  tokens = st.sampled_from([
      "--data", str(good), str(folder / "none.csv"), str(folder), "--components", "1", "2",
      "0", "-1", "x", "1e3", "--covariance", "full", "diag", "banana", "--columns", "a", "b",
      "zz", "--n-init", "--max-iter", "--seed", "--checkpoint-every", "--resume", "--out",
      str(folder / "plain.txt" / "o"), str(folder / "plain.txt"), "--frob", "-", "--", "",
      "fit", "gmm", "é"])

  @settings(max_examples=40, deadline=None, database=None,
            suppress_health_check=list(HealthCheck))
  @given(head=st.sampled_from([["fit", "gmm"], ["fit"], [], ["gmm"]]),
         rest=st.lists(tokens, max_size=8))
  def one(head, rest):
    out = str(folder / f"out{counter['cli']}")
    argv = head + rest + ["--max-iter", "3", "--out", out] if head == ["fit", "gmm"] \
        else head + rest
    counter["cli"] += 1
    problem = _check_cli(argv)
    if problem:
      crashes.append(dict(target="cli", input=argv, problem=problem))

  end = time.monotonic() + seconds
  while time.monotonic() < end:
    one()


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seconds", type=float, default=60.0)
  parser.add_argument("--json", default=None)
  args = parser.parse_args(argv)
  crashes, counter = [], {"csv": 0, "cli": 0}
  start = time.perf_counter()
  fuzz_csv(args.seconds / 2, crashes, counter)
  fuzz_cli(args.seconds / 2, crashes, counter)
  seconds = time.perf_counter() - start
  for c in crashes[:20]:
    print(f"CRASH [{c['target']}] {c['input']!r}: {c['problem']}")
  print(f"fuzzed {seconds:.0f} s: {counter['csv']} CSV files, {counter['cli']} command lines, "
        f"{len(crashes)} crashes")
  if args.json:
    io.write_json(args.json, dict(seconds=seconds, cases=counter, crashes=crashes))
  return 1 if crashes else 0


if __name__ == "__main__":
  sys.exit(main())
