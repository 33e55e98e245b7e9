"""Per-iteration speed of tfp_em's GMM EM against scikit-learn.

Same data, same initial parameters, the same fixed number of iterations
(tol=0). Milliseconds per iteration are taken as
(t(T2) - t(T1)) / (T2 - T1), which removes the fixed costs of both sides
(tracing and XLA compilation here, k-means initialization there). Each
measurement runs in its own subprocess so that peak RSS is its own.

    python validation/bench_gmm.py            # N=200k D=8 K=8 and N=1M D=16 K=16
    python validation/bench_gmm.py --quick    # N=20k only

Writes validation/out/bench_gmm.json and .md.
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


def make_problem(n, d, k, seed=0):
  rng = np.random.default_rng(seed)
  centers = rng.normal(0, 1.0, (k, d))  # overlapping: EM keeps moving for many iterations
  labels = rng.integers(0, k, n)
  x = centers[labels] + rng.normal(size=(n, d))
  init_idx = rng.choice(n, k, replace=False)
  init = dict(weights_init=np.full(k, 1.0 / k), means_init=x[init_idx],
              precisions_init=np.stack([np.eye(d)] * k))
  return x, init


def time_fit(lib, n, d, k, dtype, iters, compile_mode):
  x, init = make_problem(n, d, k)
  x = x.astype(dtype)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    if lib == "sklearn":
      from sklearn.mixture import GaussianMixture
      est = GaussianMixture(k, tol=0.0, max_iter=iters, init_params="random_from_data",
                            random_state=0, **init)
    else:
      from tfp_em import GaussianMixture
      est = GaussianMixture(k, tol=0.0, max_iter=iters, dtype=dtype, compile=compile_mode,
                            verbose=False, **init)
    start = time.perf_counter()
    est.fit(x)
    seconds = time.perf_counter() - start
  return seconds, float(est.score(x)), int(est.n_iter_)


def worker(args):
  time_fit(args.worker, args.n, args.d, args.k, args.dtype, 2, args.compile)  # warm-up
  t1, _, n1 = time_fit(args.worker, args.n, args.d, args.k, args.dtype, args.t1, args.compile)
  t2, ll2, n2 = time_fit(args.worker, args.n, args.d, args.k, args.dtype, args.t2, args.compile)
  if n2 <= n1:
    raise RuntimeError(f"{args.worker} stopped after {n2} iterations; cannot time per iteration")
  peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(json.dumps(dict(ms_per_iter=1e3 * (t2 - t1) / (n2 - n1), iterations=[n1, n2],
                        mean_loglik=ll2, peak_rss_mb=peak_mb)))


def run_worker(lib, n, d, k, dtype, t1, t2, compile_mode):
  cmd = [sys.executable, __file__, "--worker", lib, "--n", str(n), "--d", str(d), "--k", str(k),
         "--dtype", dtype, "--t1", str(t1), "--t2", str(t2), "--compile", compile_mode]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
  if out.returncode != 0:
    raise RuntimeError(f"worker failed: {' '.join(cmd)}\n{out.stderr[-2000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--compile", default="xla", choices=["graph", "xla"])
  parser.add_argument("--worker", choices=["sklearn", "tfp_em"])
  for name, default in [("n", 0), ("d", 0), ("k", 0), ("t1", 5), ("t2", 25)]:
    parser.add_argument(f"--{name}", type=int, default=default)
  parser.add_argument("--dtype", default="float64")
  args = parser.parse_args()
  if args.worker:
    return worker(args)

  cases = [(20_000, 8, 8, "float64"), (20_000, 8, 8, "float32")] if args.quick else [
      (200_000, 8, 8, "float64"), (200_000, 8, 8, "float32"),
      (1_000_000, 16, 16, "float64"), (1_000_000, 16, 16, "float32")]
  t1, t2 = (3, 13) if not args.quick else (5, 25)
  rows = []
  print(f"{'N':>9} {'D':>3} {'K':>3} {'dtype':>8} {'sklearn ms/it':>14} {'tfp_em ms/it':>13} "
        f"{'speed-up':>9} {'sk RSS MB':>10} {'tfp RSS MB':>10} {'|dll|':>9}")
  for n, d, k, dtype in cases:
    sk = run_worker("sklearn", n, d, k, dtype, t1, t2, args.compile)
    ours = run_worker("tfp_em", n, d, k, dtype, t1, t2, args.compile)
    row = dict(n=n, d=d, k=k, dtype=dtype, compile=args.compile, sklearn=sk, tfp_em=ours,
               speedup=sk["ms_per_iter"] / ours["ms_per_iter"],
               loglik_gap=abs(sk["mean_loglik"] - ours["mean_loglik"]))
    rows.append(row)
    print(f"{n:>9} {d:>3} {k:>3} {dtype:>8} {sk['ms_per_iter']:>14.1f} "
          f"{ours['ms_per_iter']:>13.1f} {row['speedup']:>8.2f}x {sk['peak_rss_mb']:>10.0f} "
          f"{ours['peak_rss_mb']:>10.0f} {row['loglik_gap']:>9.2g}", flush=True)
  os.makedirs(OUT, exist_ok=True)
  with open(os.path.join(OUT, "bench_gmm.json"), "w") as f:
    json.dump(rows, f, indent=2)
  with open(os.path.join(OUT, "bench_gmm.md"), "w") as f:
    f.write("| N | D | K | dtype | sklearn ms/it | tfp_em ms/it | speed-up | peak RSS sk / tfp (MB) |\n")
    f.write("|---|---|---|---|---|---|---|---|\n")
    for r in rows:
      f.write(f"| {r['n']} | {r['d']} | {r['k']} | {r['dtype']} | "
              f"{r['sklearn']['ms_per_iter']:.1f} | {r['tfp_em']['ms_per_iter']:.1f} | "
              f"{r['speedup']:.2f}x | {r['sklearn']['peak_rss_mb']:.0f} / "
              f"{r['tfp_em']['peak_rss_mb']:.0f} |\n")


if __name__ == "__main__":
  main()
