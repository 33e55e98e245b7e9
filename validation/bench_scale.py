"""Scale benchmarks: streaming from disk, SQUAREM, time to convergence.

    python validation/bench_scale.py stream   [--n 10000000]   # time per pass, peak RSS
    python validation/bench_scale.py squarem                   # SQUAREM vs plain EM (mixture)
    python validation/bench_scale.py converge                  # time to convergence vs sklearn
    python validation/bench_scale.py lmm                       # LMM vs statsmodels; EM/SQUAREM/PX-EM

Each measurement runs in its own subprocess (peak RSS is its own). Results go
to validation/out/bench_scale_<name>.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import warnings

import numpy as np

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")


def _rss_mb():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _subprocess(*args):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                       env=env, check=False)
  if out.returncode != 0:
    raise RuntimeError(f"{args} failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def _save(name, rows, header, fmt):
  os.makedirs(OUT, exist_ok=True)
  with open(os.path.join(OUT, f"bench_scale_{name}.json"), "w") as f:
    json.dump(rows, f, indent=2)
  with open(os.path.join(OUT, f"bench_scale_{name}.md"), "w") as f:
    f.write("| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n")
    for r in rows:
      f.write("| " + " | ".join(fmt(r)) + " |\n")


# ---------------------------------------------------------------- streaming
def write_parquet(path, n, d, k, seed=0, chunk=1_000_000):
  import pyarrow as pa
  import pyarrow.parquet as pq
  rng = np.random.default_rng(seed)
  centers = rng.normal(0, 4, (k, d))
  writer = None
  for start in range(0, n, chunk):
    m = min(chunk, n - start)
    x = centers[rng.integers(0, k, m)] + rng.normal(size=(m, d))
    table = pa.table({f"x{j}": x[:, j] for j in range(d)})
    writer = writer or pq.ParquetWriter(path, table.schema)
    writer.write_table(table)
  writer.close()


def stream_worker(path, k, passes, batch_size):
  import tensorflow as tf  # noqa: F401
  from tfp_em import GaussianMixture
  baseline = _rss_mb()
  start = time.perf_counter()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    est = GaussianMixture(k, max_iter=passes - 1, tol=0.0, verbose=False).fit(
        path, batch_size=batch_size)
  seconds = time.perf_counter() - start
  trace = est.fit_result_.restarts[0]
  return dict(passes=trace.e_steps, seconds=seconds, seconds_per_pass=seconds / trace.e_steps,
              peak_rss_mb=_rss_mb(), baseline_rss_mb=baseline,
              mean_loglik=est.log_likelihood_ / est.fit_result_.num_observations,
              n=est.fit_result_.num_observations)


def bench_stream(args):
  d, k = 16, 8
  path = os.path.join(OUT, f"stream_{args.n}.parquet")
  os.makedirs(OUT, exist_ok=True)
  if not os.path.exists(path):
    print(f"writing {args.n:,} x {d} points to {path} ...", flush=True)
    write_parquet(path, args.n, d, k)
  r = _subprocess("stream-worker", path, str(k), str(args.passes), str(args.batch_size))
  r.update(file_mb=os.path.getsize(path) / 2 ** 20, in_memory_mb=args.n * d * 8 / 2 ** 20,
           d=d, k=k, batch_size=args.batch_size)
  print(f"N={int(r['n']):,} D={d} K={k}: {r['seconds_per_pass']:.2f} s per pass "
        f"({r['passes']} passes, first includes tracing); peak RSS {r['peak_rss_mb']:.0f} MB "
        f"(TensorFlow baseline {r['baseline_rss_mb']:.0f} MB) vs data {r['in_memory_mb']:.0f} MB "
        f"in memory, {r['file_mb']:.0f} MB on disk")
  _save("stream", [r], ["N", "s/pass", "peak RSS MB", "baseline MB", "data MB"],
        lambda r: [f"{int(r['n']):,}", f"{r['seconds_per_pass']:.2f}", f"{r['peak_rss_mb']:.0f}",
                   f"{r['baseline_rss_mb']:.0f}", f"{r['in_memory_mb']:.0f}"])


# ---------------------------------------------------------------- SQUAREM
def mixture_problem(seed=5, n=20000):
  rng = np.random.default_rng(seed)
  x = np.concatenate([rng.normal(0, 1, (n // 2, 2)), rng.normal(1.2, 1, (n // 2, 2))])
  init = dict(weights_init=np.array([0.5, 0.5]), means_init=np.array([[-1.0, 0], [1.0, 1]]),
              precisions_init=np.stack([np.eye(2)] * 2))
  return x, init


def squarem_worker(accelerate, tol):
  from tfp_em import GaussianMixture
  x, init = mixture_problem()
  kw = dict(tol=float(tol), max_iter=100000, reg_covar=0.0, verbose=False, **init)
  accelerate = None if accelerate == "none" else accelerate
  GaussianMixture(2, accelerate=accelerate, **dict(kw, max_iter=3)).fit(x)  # warm-up tracing
  start = time.perf_counter()
  est = GaussianMixture(2, accelerate=accelerate, **kw).fit(x)
  seconds = time.perf_counter() - start
  trace = est.fit_result_.restarts[0]
  return dict(seconds=seconds, iterations=trace.n_iter, e_steps=trace.e_steps,
              loglik=est.log_likelihood_, converged=est.converged_)


def bench_squarem(args):
  rows = []
  print(f"{'method':>8} {'tol':>7} {'iters':>7} {'E-steps':>8} {'seconds':>8} {'loglik':>16}")
  for tol in ("1e-8", "1e-10", "1e-12"):
    res = {m: _subprocess("squarem-worker", m, tol) for m in ("none", "squarem")}
    for m, r in res.items():
      print(f"{m:>8} {tol:>7} {r['iterations']:>7} {r['e_steps']:>8} {r['seconds']:>8.2f} "
            f"{r['loglik']:>16.8f}")
    rows.append(dict(tol=tol, plain=res["none"], squarem=res["squarem"],
                     speedup=res["none"]["seconds"] / res["squarem"]["seconds"],
                     loglik_gain=res["squarem"]["loglik"] - res["none"]["loglik"]))
    print(f"{'':>8} speed-up {rows[-1]['speedup']:.2f}x, SQUAREM loglik higher by "
          f"{rows[-1]['loglik_gain']:.2e}")
  _save("squarem", rows, ["tol", "plain s", "SQUAREM s", "speed-up", "plain E-steps",
                          "SQUAREM E-steps", "loglik gain"],
        lambda r: [r["tol"], f"{r['plain']['seconds']:.2f}", f"{r['squarem']['seconds']:.2f}",
                   f"{r['speedup']:.2f}x", str(r["plain"]["e_steps"]),
                   str(r["squarem"]["e_steps"]), f"{r['loglik_gain']:.2e}"])


# ---------------------------------------------------------------- vs sklearn
def converge_worker(lib, n, d, k):
  rng = np.random.default_rng(0)
  centers = rng.normal(0, 1.5, (k, d))
  x = centers[rng.integers(0, k, n)] + rng.normal(size=(n, d))
  init = dict(weights_init=np.full(k, 1.0 / k), means_init=x[rng.choice(n, k, replace=False)],
              precisions_init=np.stack([np.eye(d)] * k))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    if lib == "sklearn":
      from sklearn.mixture import GaussianMixture
      make = lambda it: GaussianMixture(k, tol=1e-3, max_iter=it, init_params="random_from_data",
                                        random_state=0, **init)
    else:
      from tfp_em import GaussianMixture
      make = lambda it: GaussianMixture(k, tol=1e-4, max_iter=it, compile="xla", verbose=False,
                                        **init)
    make(2).fit(x)  # warm-up
    start = time.perf_counter()
    est = make(1000).fit(x)
    seconds = time.perf_counter() - start
  return dict(seconds=seconds, n_iter=int(est.n_iter_), mean_loglik=float(est.score(x)))


def bench_converge(args):
  rows = []
  for n, d, k in [(200_000, 8, 8)]:
    sk = _subprocess("converge-worker", "sklearn", str(n), str(d), str(k))
    ours = _subprocess("converge-worker", "tfp_em", str(n), str(d), str(k))
    rows.append(dict(n=n, d=d, k=k, sklearn=sk, tfp_em=ours,
                     speedup=sk["seconds"] / ours["seconds"]))
    print(f"N={n} D={d} K={k}: sklearn {sk['seconds']:.2f}s ({sk['n_iter']} it, mean ll "
          f"{sk['mean_loglik']:.6f}); tfp_em {ours['seconds']:.2f}s ({ours['n_iter']} it, "
          f"mean ll {ours['mean_loglik']:.6f}); speed-up {rows[-1]['speedup']:.2f}x")
  _save("converge", rows, ["N", "D", "K", "sklearn s (iters)", "tfp_em s (iters)", "speed-up"],
        lambda r: [str(r["n"]), str(r["d"]), str(r["k"]),
                   f"{r['sklearn']['seconds']:.2f} ({r['sklearn']['n_iter']})",
                   f"{r['tfp_em']['seconds']:.2f} ({r['tfp_em']['n_iter']})",
                   f"{r['speedup']:.2f}x"])


# ---------------------------------------------------------------- LMM
def lmm_problem(n=100_000, groups=1000, seed=0):
  rng = np.random.default_rng(seed)
  g = rng.choice(groups, size=n, p=rng.dirichlet(np.full(groups, 5.0)))
  t = rng.uniform(0, 9, n)
  x = rng.normal(size=(n, 2))
  b = rng.multivariate_normal([0, 0], [[1.0, 0.3], [0.3, 0.5]], size=groups)
  y = 1 + x @ [0.5, -0.3] + 0.8 * t + b[g, 0] + b[g, 1] * t + rng.normal(0, 1.0, n)
  return np.column_stack([x, t]), y, g, t


def lmm_worker(method):
  X, y, g, t = lmm_problem()
  if method == "statsmodels":
    import pandas as pd
    import statsmodels.formula.api as smf
    df = pd.DataFrame(dict(y=y, x1=X[:, 0], x2=X[:, 1], t=t, g=g))
    start = time.perf_counter()
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      fit = smf.mixedlm("y ~ x1 + x2 + t", df, groups=df["g"], re_formula="~t").fit(reml=False)
    return dict(seconds=time.perf_counter() - start, loglik=float(fit.llf), n_iter=None)
  from tfp_em import MixedEffectsRegressor
  from tfp_em.engine import fit_em
  from tfp_em.mixed_effects_em import MixedEffectsEM
  est = MixedEffectsRegressor("slopes", degree=1, tol=1e-12, max_iter=20000)
  if method == "px-em":
    est.fit(X[:2000], y[:2000], g[:2000], time=t[:2000])  # warm-up tracing
    start = time.perf_counter()
    est.fit(X, y, g, time=t)
    return dict(seconds=time.perf_counter() - start, loglik=est.log_likelihood_,
                n_iter=est.n_iter_ if hasattr(est, "n_iter_") else est.fit_result_.n_iter)
  _, codes = np.unique(g, return_inverse=True)
  est.network_ = None  # linear f: build the data exactly as the estimator does
  data = est._data(est._fixed_design(X), y, est._design(len(y), t, None, np.float64), codes,
                   int(codes.max()) + 1)
  model = MixedEffectsEM("full", compile="graph")
  accelerate = "squarem" if method == "squarem" else None
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    fit_em(model, data, max_iter=3, accelerate=accelerate, progress=False)  # warm-up
    start = time.perf_counter()
    res = fit_em(model, data, max_iter=20000, tol=1e-12, accelerate=accelerate, progress=False)
  return dict(seconds=time.perf_counter() - start, loglik=res.log_likelihood, n_iter=res.n_iter,
              e_steps=res.restarts[0].e_steps)


def bench_lmm(args):
  rows = {}
  for method in ("statsmodels", "em", "squarem", "px-em"):
    rows[method] = _subprocess("lmm-worker", method)
  ref = rows["statsmodels"]
  print(f"n=100,000 rows, 1,000 clusters, random intercept + slope; statsmodels MixedLM "
        f"(reml=False) loglik {ref['loglik']:.6f}")
  print(f"{'method':>12} {'seconds':>9} {'iters':>6} {'E-steps':>8} {'rel. loglik gap':>16} "
        f"{'speed-up':>9}")
  out = []
  for method, r in rows.items():
    gap = (r["loglik"] - ref["loglik"]) / abs(ref["loglik"])
    speedup = ref["seconds"] / r["seconds"]
    out.append(dict(method=method, gap=gap, speedup=speedup, **r))
    print(f"{method:>12} {r['seconds']:>9.2f} {str(r['n_iter']):>6} "
          f"{str(r.get('e_steps', '-')):>8} {gap:>16.2e} {speedup:>8.2f}x")
  _save("lmm", out, ["method", "seconds", "iterations", "E-steps", "rel. loglik gap vs statsmodels",
                     "speed-up vs statsmodels"],
        lambda r: [r["method"], f"{r['seconds']:.2f}", str(r["n_iter"]), str(r.get("e_steps", "-")),
                   f"{r['gap']:.2e}", f"{r['speedup']:.2f}x"])


def main():
  argv = sys.argv[1:]
  if argv and argv[0].endswith("-worker"):
    worker = {"stream-worker": lambda a: stream_worker(a[0], int(a[1]), int(a[2]), int(a[3])),
              "squarem-worker": lambda a: squarem_worker(a[0], a[1]),
              "converge-worker": lambda a: converge_worker(a[0], int(a[1]), int(a[2]), int(a[3])),
              "lmm-worker": lambda a: lmm_worker(a[0])}
    print(json.dumps(worker[argv[0]](argv[1:])))
    return
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("bench", choices=["stream", "squarem", "converge", "lmm"])
  parser.add_argument("--n", type=int, default=10_000_000)
  parser.add_argument("--passes", type=int, default=3)
  parser.add_argument("--batch-size", type=int, default=262_144)
  args = parser.parse_args()
  {"stream": bench_stream, "squarem": bench_squarem, "converge": bench_converge,
   "lmm": bench_lmm}[args.bench](args)


if __name__ == "__main__":
  main()
