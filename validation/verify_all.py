"""Runs `tfp_em.verify` on every shipped model, every user-file template and every mutant.

    python validation/verify_all.py            # everything
    python validation/verify_all.py --quick    # one covariance type per model
    python validation/verify_all.py --files    # only the user files (examples/ and their mutants)

Writes validation/out/verify_all.json and verify_all.md and prints four figures:
  * kill rate: mutants flagged by at least one check (must be 100%);
  * false alarms: correct models or files failing a check or crashing (must be 0);
  * attribution accuracy: among mutants whose buggy step is known (the user-file
    mutants and buggy twins), the share whose failed checks name that step and
    no other (checks 1, 2, 2b, 3: the E-step; 4a-4e: the M-step; 5 and 6 name
    no step);
  * seconds per file: mean wall time of `verify_file` per user file, in-process
    (and the process's CPU time, less sensitive to other load on the machine).
Exit status 1 unless the kill rate is 100% and there is no false alarm.

Models and catalogues:
  * Gaussian mixtures (`GaussianMixtureEM`, all four covariance types) and
    `tests/gmm_mutants.py`;
  * Gaussian mixtures with missing entries (`MissingValuesGaussianMixtureEM`)
    and `tests/missing_mutants.py`;
  * the user-file templates in examples/ (Gaussian, Poisson mixtures, MAP EM,
    random intercept, factor analysis, HMM), their buggy twins and the
    user-file mutants of `tests/example_mutants.py`, through `verify_file`;
  * the Bernoulli-hidden-unit MLP (`BernoulliMLPEM`) and `tests/mlp_mutants.py`;
  * the mixed model (`MixedEffectsEM`, each covariance type) and
    `tests/me_mutants.py`.
A model whose module is missing is reported as skipped. To add a model:
append a builder to `MODELS` returning `[(name, is_mutant, run)]` or
`[(name, is_mutant, run, expected_step)]`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from tfp_em.verification import verify, verify_file  # noqa: E402

OUT = os.path.join(ROOT, "validation", "out")


# ----------------------------------------------------------------------------
# Gaussian mixtures.

def gmm_data(seed=0, n_per_cluster=40):
  """Three overlapping 2-D clusters (overlap makes mutants visible)."""
  from tfp_em.mixture.em import MixtureData
  rng = np.random.default_rng(seed)
  centres = np.array([[0.0, 0.0], [2.0, 1.0], [0.0, 2.5]])
  x = np.concatenate([c + 0.8 * rng.standard_normal((n_per_cluster, 2)) for c in centres])
  return MixtureData(tf.constant(x), tf.ones(x.shape[0], tf.float64))


def gmm_init(k):
  from tfp_em.mixture.initialization import initial_responsibilities
  return lambda x, w, seed: initial_responsibilities("kmeans++", x, w, k, seed)


def gmm_cases(quick):
  import gmm_mutants
  from tfp_em.mixture.em import GaussianMixtureEM
  data, k = gmm_data(), 3
  types = ("full",) if quick else gmm_mutants.ALL_TYPES
  cases = [(f"GaussianMixtureEM[{t}]", False,
            lambda t=t: verify(GaussianMixtureEM(k, t, reg_covar=0.0, init=gmm_init(k)), data))
           for t in types]
  for mutant, t in gmm_mutants.cases():
    if t in types:
      cases.append((f"gmm_mutants.{mutant.name}[{t}]", True,
                    lambda m=mutant, t=t: verify(gmm_mutants.make(m, k, t, gmm_init(k)), data)))
  return cases


def missing_cases(quick):
  """Gaussian mixtures with missing entries (`MissingValuesGaussianMixtureEM`) and
  `tests/missing_mutants.py` (wrong E-steps)."""
  import missing_mutants as mm
  data = mm.verification_data()
  types = ("full",) if quick else ("full", "tied", "diag", "spherical")
  cases = [(f"MissingValuesGaussianMixtureEM[{t}]", False,
            lambda t=t: verify(mm.model(covariance_type=t), data)) for t in types]
  cases += [(f"missing_mutants.{m.__name__}", True, lambda m=m: verify(mm.model(m), data), "E")
            for m in mm.MUTANTS]
  return cases


# ----------------------------------------------------------------------------
# Bernoulli-hidden-unit MLP.

def mlp_data(n=60, d=3, m=2, c=3, seed=0):
  """Data sampled from the model itself, every class present (the tests' generator)."""
  from test_bernoulli_mlp import synthetic
  return synthetic(n=n, d=d, m=m, c=c, seed=seed)


def mlp_cases(quick):
  try:
    import mlp_mutants
  except ImportError:
    return []
  m, c = 2, 3
  data = mlp_data(m=m, c=c)
  cases = [("BernoulliMLPEM", False, lambda: verify(mlp_mutants.CORRECT(m, c), data))]
  for name, factory in mlp_mutants.MUTANTS.items():
    cases.append((f"mlp_mutants.{name}", True, lambda f=factory: verify(f(m, c), data)))
  return cases


# ----------------------------------------------------------------------------
# Mixed effects.

def me_data(seed=0, num_clusters=8, max_size=6):
  """Small LMM data, every cluster >= 2 rows (the tests' generator): a singleton
  cluster puts the optimum on the boundary Sigma_u -> 0, where checks 6a/6b
  do not apply."""
  from test_mixed_effects import _simulate
  return _simulate(seed, num_clusters=num_clusters, max_size=max_size, singleton=False)


def me_cases(quick):
  try:
    import me_mutants
    from models import mixed_effects as me
    from tfp_em.mixed_effects.em import MixedEffectsEM
  except ImportError:
    return []
  data = me_data()
  types = ("full",) if quick else me.COVARIANCE_TYPES
  cases = [(f"MixedEffectsEM[{t}]", False, lambda t=t: verify(MixedEffectsEM(t), data))
           for t in types]
  for name, factory in me_mutants.MUTANTS.items():
    for t in types:
      cases.append((f"me_mutants.{name}[{t}]", True, lambda f=factory, t=t: verify(f(t), data)))
  return cases


# ----------------------------------------------------------------------------
# User files: the templates in examples/, their buggy twins, the file mutants.

FILE_DIR = os.path.join(OUT, "mutant_files")


def file_cases(quick):
  import example_mutants as em
  os.makedirs(FILE_DIR, exist_ok=True)
  examples = os.path.join(ROOT, "examples")
  cases = []
  for m in em.CORRECT:
    cases.append((f"examples/{m.example}" + (f" [{m.name}]" if m.edits else ""), False,
                  lambda m=m: verify_file(em.write(m, FILE_DIR)), None))
  for name, step in em.BUGGY_TWINS.items():
    cases.append((f"examples/{name}", True, lambda name=name: verify_file(os.path.join(examples, name)),
                  step))
  for m in em.MUTANTS:
    cases.append((f"example_mutants.{os.path.splitext(m.example)[0]}.{m.name}", True,
                  lambda m=m: verify_file(em.write(m, FILE_DIR)), m.step))
  return cases


MODELS = (gmm_cases, missing_cases, file_cases, mlp_cases, me_cases)

# Which step a failed check blames (checks 5 and 6 follow the whole iteration).
STEP_OF_CHECK = {"1": "E", "2": "E", "2b": "E", "3": "E", "4a": "M", "4b": "M", "4c": "M",
                 "4d": "M", "4e": "M"}


def blamed_steps(failed_checks) -> list:
  return sorted({STEP_OF_CHECK[c] for c in failed_checks if c in STEP_OF_CHECK})


# ----------------------------------------------------------------------------

def run(quick: bool = False, only: str | None = None, files_only: bool = False):
  rows, reports = [], {}
  for builder in MODELS:
    if files_only and builder is not file_cases:
      continue
    for case in builder(quick):
      name, is_mutant, fn = case[:3]
      expected = case[3] if len(case) > 3 else None
      if only and only not in name:
        continue
      start, cpu_start = time.perf_counter(), time.process_time()
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
          report = fn()
          error = None
        except Exception as e:  # a crash counts against the case
          report, error = None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
      seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
      failed = report.failed_checks if report is not None else ["error"]
      ok = (bool(failed) if is_mutant else not failed) and error is None
      steps = blamed_steps(failed)
      attributed = None if expected is None else (ok and steps == [expected])
      rows.append(dict(case=name, mutant=is_mutant, failed_checks=failed, ok=ok,
                       expected_step=expected, blamed_steps=steps, attributed=attributed,
                       user_file=builder is file_cases, seconds=round(seconds, 2),
                       cpu_seconds=round(cpu, 2), error=error))
      reports[name] = report.to_dict() if report is not None else {"error": error}
      verdict = ("killed" if ok else "SURVIVED") if is_mutant else ("pass" if ok else "FALSE ALARM")
      blame = "" if expected is None else f" blames {'/'.join(steps) or '-'} ({expected} expected)"
      print(f"{name:62s} {verdict:11s} {','.join(failed) or '-':24s} {seconds:6.1f} s{blame}",
            flush=True)
  return rows, reports, summarize(rows)


def summarize(rows) -> dict:
  mutants = [r for r in rows if r["mutant"]]
  correct = [r for r in rows if not r["mutant"]]
  known = [r for r in rows if r["expected_step"] is not None]
  files = [r for r in rows if r["user_file"]]
  rate = lambda k, n: k / n if n else float("nan")
  return dict(
      mutants=len(mutants), killed=sum(r["ok"] for r in mutants),
      correct=len(correct), false_alarms=sum(not r["ok"] for r in correct),
      kill_rate=rate(sum(r["ok"] for r in mutants), len(mutants)),
      false_alarm_rate=rate(sum(not r["ok"] for r in correct), len(correct)),
      attributable=len(known), attributed=sum(bool(r["attributed"]) for r in known),
      attribution_accuracy=rate(sum(bool(r["attributed"]) for r in known), len(known)),
      user_files=len(files),
      seconds_per_file=round(rate(sum(r["seconds"] for r in files), len(files)), 2),
      max_seconds_per_file=max([r["seconds"] for r in files], default=float("nan")),
      cpu_seconds_per_file=round(rate(sum(r["cpu_seconds"] for r in files), len(files)), 2),
      seconds=round(sum(r["seconds"] for r in rows), 1))


def headline(summary) -> str:
  pct = lambda x: f"{100 * x:.1f}%"
  return (f"kill rate {summary['killed']}/{summary['mutants']} = {pct(summary['kill_rate'])}; "
          f"false alarms {summary['false_alarms']}/{summary['correct']} = "
          f"{pct(summary['false_alarm_rate'])}; attribution {summary['attributed']}/"
          f"{summary['attributable']} = {pct(summary['attribution_accuracy'])}; "
          f"{summary['seconds_per_file']} s per user file (max {summary['max_seconds_per_file']}, "
          f"{summary['user_files']} files; CPU {summary['cpu_seconds_per_file']} s per file); "
          f"{summary['seconds']} s in all")


def write(rows, reports, summary, out=OUT):
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "verify_all.json"), "w") as f:
    json.dump(dict(summary=summary, cases=rows, reports=reports), f, indent=1)
  lines = ["# tfp_em.verify on shipped models, user files and mutants", "",
           headline(summary) + ".", "",
           "| case | kind | failed checks | verdict | step blamed (expected) | seconds |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    verdict = ("killed" if r["ok"] else "SURVIVED") if r["mutant"] else ("pass" if r["ok"] else "FALSE ALARM")
    blame = "" if r["expected_step"] is None else \
        f"{'/'.join(r['blamed_steps']) or '-'} ({r['expected_step']})"
    lines.append(f"| {r['case']} | {'mutant' if r['mutant'] else 'correct'} | "
                 f"{', '.join(r['failed_checks']) or '-'} | {verdict} | {blame} | {r['seconds']} |")
  lines += ["", "## Per-check errors of the correct models", ""]
  for r in rows:
    rep = reports[r["case"]]
    if not r["mutant"] and "checks" in rep:
      lines += [f"### {r['case']}", "", "| check | name | max abs err | max rel err | tolerance | status |",
                "|---|---|---|---|---|---|"]
      for c in rep["checks"]:
        status = {True: "pass", False: "FAIL", None: "skipped"}[c["passed"]]
        lines.append(f"| {c['check']} | {c['name']} | {c['abs_error']:.2e} | {c['rel_error']:.2e} | "
                     f"{c['tolerance']:.2e} | {status} |")
      lines.append("")
  with open(os.path.join(out, "verify_all.md"), "w") as f:
    f.write("\n".join(lines) + "\n")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="one covariance type per model")
  parser.add_argument("--files", action="store_true",
                      help="only the user files: examples/ and their mutants")
  parser.add_argument("--only", default=None, help="run cases whose name contains this string")
  parser.add_argument("--out", default=OUT, help="directory for verify_all.json and .md")
  args = parser.parse_args(argv)
  rows, reports, summary = run(args.quick, args.only, args.files)
  write(rows, reports, summary, args.out)
  print("\n" + headline(summary))
  print(f"report: {os.path.relpath(args.out, ROOT)}/verify_all.md, verify_all.json")
  ok = summary["kill_rate"] == 1.0 and summary["false_alarms"] == 0
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
