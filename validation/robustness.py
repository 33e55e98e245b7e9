"""Runs every bad-input case of `tests/robustness_cases.py` and prints a table.

    python validation/robustness.py [--filter TEXT] [--json OUT.json]

Each case is one bad input to an estimator, the CSV loader or the `tfp-em`
command; its outcome is 'clear error' (a ValueError / exit code 2 with one
line naming the problem, nothing written), 'handled' (not an error; the fit
finished with finite output) or 'crash' (anything else). The table ends with
the counts; the exit code is 1 if any case crashed.
"""
from __future__ import annotations

import argparse
import collections
import os
import pathlib
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))

from tfp_em.engine import outputs# noqa: E402
from robustness_cases import all_cases, run_case  # noqa: E402


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--filter", default="", help="only cases whose name contains this")
  parser.add_argument("--json", default=None, help="also write the table as JSON")
  args = parser.parse_args(argv)
  cases = [c for c in all_cases() if args.filter in c.name]
  rows, counts = [], collections.Counter()
  width = max(len(c.name) for c in cases)
  start = time.perf_counter()
  print(f"{'case':<{width}}  {'outcome':<11}  detail")
  print("-" * (width + 80))
  for case in cases:
    with tempfile.TemporaryDirectory() as tmp:
      outcome = run_case(case, tmp)
    counts[outcome.kind] += 1
    rows.append(dict(case=case.name, target=case.target, outcome=outcome.kind,
                     detail=outcome.detail))
    print(f"{case.name:<{width}}  {outcome.kind:<11}  {outcome.detail[:110]}", flush=True)
  seconds = time.perf_counter() - start
  print("-" * (width + 80))
  targets = collections.Counter(c.target for c in cases)
  print("cases per target: " + ", ".join(f"{t} {n}" for t, n in sorted(targets.items())))
  print(f"{len(cases)} tried, {counts['clear error']} clear errors, {counts['handled']} handled, "
        f"{counts['crash']} crashes ({seconds:.1f} s)")
  if args.json:
    outputs.write_json(args.json, dict(rows=rows, tried=len(cases), clear=counts["clear error"],
                                  handled=counts["handled"], crashes=counts["crash"],
                                  seconds=seconds))
  return 1 if counts["crash"] else 0


if __name__ == "__main__":
  sys.exit(main())
