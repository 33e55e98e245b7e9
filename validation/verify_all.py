"""Runs `tfp_em.verify` on every shipped model and every mutant catalogue.

    python validation/verify_all.py            # everything
    python validation/verify_all.py --quick    # one covariance type per model

Writes validation/out/verify_all.json and verify_all.md and prints the kill
rate (mutants flagged by at least one check; must be 100%) and the false-alarm
rate (correct models failing a check; must be 0%). Exit status 1 otherwise.

Models and catalogues:
  * Gaussian mixtures (`GaussianMixtureEM`, all four covariance types) and
    `tests/gmm_mutants.py`;
  * the user-file examples `examples/gmm_em_correct.py` (correct) and
    `examples/gmm_em_buggy.py` (mutant), through `verify_file`;
  * the Bernoulli-hidden-unit MLP (`BernoulliMLPEM`) and `tests/mlp_mutants.py`;
  * the mixed model (`MixedEffectsEM`, each covariance type) and
    `tests/me_mutants.py`.
A model whose module is missing is reported as skipped. To add a model:
append a builder to `MODELS` returning `[(name, is_mutant, run)]`.
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
  examples = os.path.join(ROOT, "examples")
  cases.append(("examples/gmm_em_correct.py", False,
                lambda: verify_file(os.path.join(examples, "gmm_em_correct.py"))))
  cases.append(("examples/gmm_em_buggy.py", True,
                lambda: verify_file(os.path.join(examples, "gmm_em_buggy.py"))))
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


MODELS = (gmm_cases, mlp_cases, me_cases)


# ----------------------------------------------------------------------------

def run(quick: bool = False, only: str | None = None):
  rows, reports = [], {}
  for builder in MODELS:
    for name, is_mutant, fn in builder(quick):
      if only and only not in name:
        continue
      start = time.perf_counter()
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
          report = fn()
          error = None
        except Exception as e:  # a crash counts against the case
          report, error = None, f"{type(e).__name__}: {e}"
      seconds = time.perf_counter() - start
      failed = report.failed_checks if report is not None else ["error"]
      ok = (bool(failed) if is_mutant else not failed) and error is None
      rows.append(dict(case=name, mutant=is_mutant, failed_checks=failed, ok=ok,
                       seconds=round(seconds, 2), error=error))
      reports[name] = report.to_dict() if report is not None else {"error": error}
      verdict = ("killed" if ok else "SURVIVED") if is_mutant else ("pass" if ok else "FALSE ALARM")
      print(f"{name:55s} {verdict:11s} {','.join(failed) or '-':28s} {seconds:6.1f} s", flush=True)
  mutants = [r for r in rows if r["mutant"]]
  correct = [r for r in rows if not r["mutant"]]
  summary = dict(
      mutants=len(mutants), killed=sum(r["ok"] for r in mutants),
      correct=len(correct), false_alarms=sum(not r["ok"] for r in correct),
      kill_rate=(sum(r["ok"] for r in mutants) / len(mutants)) if mutants else float("nan"),
      false_alarm_rate=(sum(not r["ok"] for r in correct) / len(correct)) if correct else float("nan"),
      seconds=round(sum(r["seconds"] for r in rows), 1))
  return rows, reports, summary


def write(rows, reports, summary):
  os.makedirs(OUT, exist_ok=True)
  with open(os.path.join(OUT, "verify_all.json"), "w") as f:
    json.dump(dict(summary=summary, cases=rows, reports=reports), f, indent=1)
  lines = ["# tfp_em.verify on shipped models and mutants", "",
           f"Kill rate {summary['killed']}/{summary['mutants']} = {100 * summary['kill_rate']:.0f}%; "
           f"false alarms {summary['false_alarms']}/{summary['correct']} = "
           f"{100 * summary['false_alarm_rate']:.0f}%; {summary['seconds']} s in all.", "",
           "| case | kind | failed checks | verdict | seconds |", "|---|---|---|---|---|"]
  for r in rows:
    verdict = ("killed" if r["ok"] else "SURVIVED") if r["mutant"] else ("pass" if r["ok"] else "FALSE ALARM")
    lines.append(f"| {r['case']} | {'mutant' if r['mutant'] else 'correct'} | "
                 f"{', '.join(r['failed_checks']) or '-'} | {verdict} | {r['seconds']} |")
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
  with open(os.path.join(OUT, "verify_all.md"), "w") as f:
    f.write("\n".join(lines) + "\n")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="one covariance type per model")
  parser.add_argument("--only", default=None, help="run cases whose name contains this string")
  args = parser.parse_args(argv)
  rows, reports, summary = run(args.quick, args.only)
  write(rows, reports, summary)
  print(f"\nkill rate {summary['killed']}/{summary['mutants']} = {100 * summary['kill_rate']:.1f}%  "
        f"false-alarm rate {summary['false_alarms']}/{summary['correct']} = "
        f"{100 * summary['false_alarm_rate']:.1f}%  ({summary['seconds']} s)")
  print(f"report: {os.path.relpath(OUT, ROOT)}/verify_all.md, verify_all.json")
  ok = summary["kill_rate"] == 1.0 and summary["false_alarms"] == 0
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
