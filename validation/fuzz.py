"""Fuzzes the CSV loader and the `tfp-em` argument handling with hypothesis.

    python validation/fuzz.py [--seconds 60] [--json OUT.json]

Targets:
  csv  random text files (digits, separators, quotes, blank lines, nan/inf,
       letters, non-UTF-8 bytes) through `tfp_em.readers.load_csv`: the only
       allowed outcomes are a finite float array or a ValueError.
  cli  random, mostly valid option sets for `tfp-em fit gmm` (valid and
       invalid values, random CSV files as --data, stray tokens), and
       `tfp-em report` / `tfp-em verify` on random files, through
       `tfp_em.cli.main`: the only allowed outcomes are exit 0, or exit 2
       with one line on stderr, no traceback and no file written. Any
       escaping exception is a crash.

The time is split between the targets. Crashing inputs are printed (and
saved with --json) so that they can be added to
`tests/robustness_cases.py` as regression cases. Exit code 1 on a crash.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import io as _io
import os
import pathlib
import shutil
import sys
import tempfile
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tfp_em.engine import outputs
from tfp_em.cli import readers# noqa: E402
from tfp_em.cli.main import main as cli_main  # noqa: E402

OUTCOMES = collections.Counter()
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
    x, names = readers.load_csv(path, columns)
  except ValueError:
    OUTCOMES["csv: ValueError"] += 1
    return None
  OUTCOMES["csv: loaded"] += 1
  if not (isinstance(x, np.ndarray) and x.ndim == 2 and np.all(np.isfinite(x))
          and len(names) == x.shape[1]):
    return f"bad result {x!r} {names!r}"
  return None


def _files(folder) -> set:
  return {str(p) for p in pathlib.Path(folder).rglob("*")}


def _check_cli(argv, folder):
  out, err = _io.StringIO(), _io.StringIO()
  before = _files(folder)
  try:
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
        warnings.catch_warnings():
      warnings.simplefilter("ignore")
      rc = cli_main(argv)
  except BaseException as e:  # noqa: BLE001 - SystemExit included
    return f"{type(e).__name__}: {e}"
  lines = err.getvalue().strip().splitlines()
  OUTCOMES[f"cli: exit {rc}"] += 1
  if rc == 0:
    return None
  if rc != 2 or len(lines) != 1 or "Traceback" in err.getvalue():
    return f"rc={rc}, stderr={err.getvalue()[:300]!r}"
  written = sorted(_files(folder) - before)
  if written or out.getvalue().strip():
    return f"exit 2 but wrote {written[:3]} / printed {out.getvalue()[:100]!r}"
  return None


def _repeat_for(seconds, one, folder):
  """Calls `one()` until `seconds` have passed, then removes `folder`."""
  end = time.monotonic() + seconds
  try:
    while time.monotonic() < end:
      one()
  finally:
    shutil.rmtree(folder, ignore_errors=True)


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

  _repeat_for(seconds, one, folder)


def fuzz_cli(seconds, crashes, counter):
  folder = pathlib.Path(tempfile.mkdtemp())
  good = folder / "ok.csv"
  good.write_text("a,b\n" + "".join(f"{i % 7},{(i * 3) % 5}\n" for i in range(30)))
  (folder / "plain.txt").write_text("x")
  required = {  # mostly valid, so that fits run too
      "--data": st.sampled_from([str(good), str(good), "random", "random", str(folder),
                                 str(folder / "none.csv"), str(folder / "plain.txt"), ""]),
      "--components": st.sampled_from(["1", "2", "2", "0", "-1", "x", "1e3", "99", ""]),
      "--out": st.sampled_from(["fresh", "fresh", "fresh", str(folder / "plain.txt" / "o"),
                                str(folder / "plain.txt")]),
  }
  values = {
      "--covariance": st.sampled_from(["full", "tied", "diag", "spherical", "banana", ""]),
      "--columns": st.lists(st.sampled_from(["a", "b", "zz", "", "é"]), max_size=3),
      "--n-init": st.sampled_from(["1", "2", "0", "x"]),
      "--seed": st.sampled_from(["0", "7", "-1", "x", str(2 ** 70)]),
      "--checkpoint-every": st.sampled_from(["1", "5", "0", "-2"]),
  }
  extras = st.lists(st.sampled_from(["--resume", "--frob", "-", "--", "gmm", "fit", "1", "é",
                                     "--components", "--data"]), max_size=1)

  @settings(max_examples=30, deadline=None, database=None,
            suppress_health_check=list(HealthCheck))
  @given(head=st.sampled_from([["fit", "gmm"]] * 6 + [["fit"], [], ["gmm"]]),
         options=st.fixed_dictionaries(required, optional=values),
         max_iter=st.sampled_from(["0", "1", "3", "-1", "x"]), extra=extras,
         rows=ROWS, sep=SEPARATORS,
         other=st.sampled_from([None] * 6 + ["report", "verify"]), raw=st.binary(max_size=60))
  def one(head, options, max_iter, extra, rows, sep, other, raw):
    counter["cli"] += 1
    if other:  # `report FILE.nc` or `verify FILE.py` on a random file
      path = folder / f"r{counter['cli']}{'.nc' if other == 'report' else '.py'}"
      path.write_bytes(raw if counter["cli"] % 2 else csv_text(rows, sep, ["a"]).encode())
      argv = [other, str(path), *(["--no-hmc", "--out", str(folder / "rep")]
                                  if other == "report" else [])] + extra
      problem = _check_cli(argv, folder)
      if problem:
        crashes.append(dict(target="cli", input=argv, problem=problem))
      return
    argv = list(head)
    for flag, value in options.items():
      if value == "random":  # a random CSV file as --data
        value = str(folder / f"r{counter['cli']}.csv")
        pathlib.Path(value).write_text(csv_text(rows, sep, ["a", "b"]))
      if value == "fresh":
        value = str(folder / f"out{counter['cli']}")
      argv += [flag] + (value if isinstance(value, list) else [value])
    argv += ["--max-iter", max_iter] + (extra if counter["cli"] % 4 == 0 else [])
    problem = _check_cli(argv, folder)
    if problem:
      crashes.append(dict(target="cli", input=argv, problem=problem))

  _repeat_for(seconds, one, folder)


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
  print("outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(OUTCOMES.items())))
  if args.json:
    outputs.write_json(args.json, dict(seconds=seconds, cases=counter, outcomes=dict(OUTCOMES),
                                  crashes=crashes))
  return 1 if crashes else 0


if __name__ == "__main__":
  sys.exit(main())
