"""Seconds per EM iteration of the Bernoulli MLP at m = 4, 8, 12, 16 hidden units,
against the autodiff path's seconds per gradient.

Data: N points (10,000; --quick 1,000), D = 10 standard-normal inputs, C = 3
classes drawn from a random network of the same size; float64; weights from
`model.initialize(data, 0)`. Every timing is the median of `repeats` calls of a
compiled function (tf.function, traced and run once before timing):

  exact E-step    `BernoulliMLPEM.e_step`: the one-matmul log joint over the
                  2^m configurations, chunked under the 256 MiB budget.
  exact EM        E-step + exact M-step (damped Newton to convergence).
  summed EM       `BernoulliMLPSummedEM` E-step + certified one-step M-step.
  gradient        value and gradient of `marginal_log_prob` (the autodiff
                  path's objective, what L-BFGS evaluates per iteration),
                  over the E-step's row chunks (unchunked it would hold several
                  [N, 2^m] arrays: 5 GiB each at m = 16, N = 10k).

Then whole fits, exact against summed M-step, from the same start:
`BernoulliMLPClassifier(n_hidden=5, l2=0.1, max_iter=3000, tol=1e-6)` on
iris, wine and breast cancer (all rows): iterations, seconds and the
objective reached (the summed M-step takes one step per iteration where the
exact one runs Newton to convergence, so it needs more iterations).

Ratios are EM iteration / gradient. The stated bound: at m >= 12 a full
iteration (either M-step) costs at most `TARGET_RATIO` = 1.5 gradients; the
script prints the largest ratio there against it. At m <= 8 the M-steps'
O(N m P^2) Newton work outweighs the tiny E-step (a few hundredths of a second). The E-step and the gradient both cost
O(N 2^m (m + C)); the M-steps' cost does not grow with 2^m beyond the
output layer's [2^m, C] counts.

Usage:
  python validation/em_mlp_speed.py            # N = 10,000, m = 4, 8, 12, 16
  python validation/em_mlp_speed.py --quick    # N = 1,000
  python validation/em_mlp_speed.py --hidden 16 --n 2000 --repeats 1   # one cell

Writes validation/out/em_mlp_speed[_quick].json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from models import bernoulli_mlp as mlp  # noqa: E402
from tfp_em.bernoulli_mlp.em import BernoulliMLPEM  # noqa: E402
from tfp_em.bernoulli_mlp.summed import BernoulliMLPSummedEM  # noqa: E402
from tfp_em.engine.chunks import equal_chunks, in_chunks  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
HIDDEN = (4, 8, 12, 16)
TARGET_RATIO = 1.5
DIM, CLASSES = 10, 3


def problem(n: int, m: int):
  rng = np.random.default_rng(m)
  x = rng.normal(size=(n, DIM))
  params = mlp.BernoulliMLPParams(tf.constant(rng.normal(0., 1., (DIM + 1, m))),
                                  tf.constant(rng.normal(0., 2., (m + 1, CLASSES))))
  y = mlp.joint(params, tf.constant(x)).sample(seed=(m, 1))["y"]
  return tf.constant(x), tf.cast(y, tf.int32)


def chunked_gradient(model, data):
  """(params) -> (sum of marginal_log_prob, its gradient), looping over row chunks."""
  x, y = data
  rows = model.e_step_rows(x.dtype)  # the E-step's chunks: the same cache behaviour
  num_chunks, chunk = equal_chunks(tf.shape(x)[0], rows)
  xs, ys = in_chunks(x, num_chunks, chunk), in_chunks(y, num_chunks, chunk)
  ws = in_chunks(tf.ones_like(y, x.dtype), num_chunks, chunk)

  @tf.function
  def value_and_gradient(params):
    def body(i, value, grads):
      with tf.GradientTape() as tape:
        tape.watch(params)
        part = tf.reduce_sum(ws[i] * mlp.marginal_log_prob(params, xs[i], ys[i]))
      g = tape.gradient(part, params)
      return i + 1, value + part, [a + b for a, b in zip(grads, g)]
    _, value, grads = tf.while_loop(lambda i, *_: i < num_chunks, body,
                                    (tf.constant(0), tf.zeros([], x.dtype),
                                     [tf.zeros_like(p) for p in params]))
    return value, grads
  return value_and_gradient


def median_seconds(fn, args, repeats: int) -> float:
  tf.nest.map_structure(lambda t: t.numpy(), fn(*args))  # trace and warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    tf.nest.map_structure(lambda t: t.numpy(), fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def measure(n: int, m: int, repeats: int) -> dict:
  data = problem(n, m)
  exact, summed = BernoulliMLPEM(m, CLASSES), BernoulliMLPSummedEM(m, CLASSES)
  params = exact.initialize(data, 0)

  def em_iteration(model):
    @tf.function
    def step(params, data):
      stats, ll = model.e_step(params, data)
      return model.m_step(params, stats), ll
    return step

  row = dict(m=m, n=n, configurations=2 ** m,
             e_step=median_seconds(tf.function(exact.e_step), (params, data), repeats),
             exact_em=median_seconds(em_iteration(exact), (params, data), repeats),
             summed_em=median_seconds(em_iteration(summed), (params, data), repeats),
             gradient=median_seconds(chunked_gradient(exact, data), (params,), repeats))
  row["exact_em_per_gradient"] = row["exact_em"] / row["gradient"]
  row["summed_em_per_gradient"] = row["summed_em"] / row["gradient"]
  return row


def fit_rows(n_hidden: int = 5, l2: float = 0.1) -> list:
  import warnings
  from sklearn import datasets
  from tfp_em.bernoulli_mlp.estimator import BernoulliMLPClassifier
  rows = []
  for name in ("iris", "wine", "breast_cancer"):
    X, y = getattr(datasets, f"load_{name}")(return_X_y=True)
    for m_step in ("exact", "summed"):
      est = BernoulliMLPClassifier(n_hidden=n_hidden, l2=l2, max_iter=3000, tol=1e-6,
                                   m_step=m_step)
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est.fit(X, y)  # warm: traces are cached per configuration
        start = time.perf_counter()
        est.fit(X, y)
      rows.append(dict(data=name, m_step=m_step, n_iter=int(est.n_iter_),
                       converged=bool(est.converged_), seconds=time.perf_counter() - start,
                       objective=float(est.objective_)))
  return rows


def markdown(rows, meta, fits) -> str:
  lines = [f"# Bernoulli MLP: seconds per EM iteration vs per autodiff gradient "
           f"(N = {meta['n']:,}, D = {DIM}, C = {CLASSES})", "",
           f"{meta['machine']}; median of {meta['repeats']} calls.", "",
           "| m | 2^m | E-step s | exact EM s | summed EM s | gradient s | exact / grad "
           "| summed / grad |", "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['m']} | {r['configurations']:,} | {r['e_step']:.4g} | {r['exact_em']:.4g} "
                 f"| {r['summed_em']:.4g} | {r['gradient']:.4g} | "
                 f"{r['exact_em_per_gradient']:.2f} | {r['summed_em_per_gradient']:.2f} |")
  lines += ["", "Whole fits (n_hidden=5, l2=0.1, tol=1e-6), exact vs summed M-step:", "",
            "| data | M-step | iterations | converged | seconds | objective |",
            "|---|---|---|---|---|---|"]
  for f in fits:
    lines.append(f"| {f['data']} | {f['m_step']} | {f['n_iter']} | {f['converged']} "
                 f"| {f['seconds']:.3g} | {f['objective']:.6f} |")
  return "\n".join(lines) + "\n"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="N = 1,000 instead of 10,000")
  parser.add_argument("--repeats", type=int, default=None, help="timed calls per figure")
  parser.add_argument("--hidden", type=int, nargs="+", default=list(HIDDEN),
                      help="values of m (default 4 8 12 16)")
  parser.add_argument("--n", type=int, default=None, help="points (default 10,000; quick 1,000)")
  args = parser.parse_args()
  n = args.n or (1000 if args.quick else 10000)
  repeats = args.repeats or (2 if args.quick else 3)
  rows = []
  for m in args.hidden:
    rows.append(measure(n, m, repeats))
    r = rows[-1]
    print(f"m={m:2d}  E-step {r['e_step']:.4g}s  exact EM {r['exact_em']:.4g}s  "
          f"summed EM {r['summed_em']:.4g}s  gradient {r['gradient']:.4g}s  "
          f"exact/grad {r['exact_em_per_gradient']:.2f}  summed/grad "
          f"{r['summed_em_per_gradient']:.2f}", flush=True)
  large = [max(r["exact_em_per_gradient"], r["summed_em_per_gradient"]) for r in rows if r["m"] >= 12]
  if large:
    print(f"m >= 12: largest EM iteration / gradient = {max(large):.2f} (stated bound "
          f"{TARGET_RATIO}): {'within' if max(large) <= TARGET_RATIO else 'ABOVE'}", flush=True)
  fits = fit_rows()
  for f in fits:
    print(f"{f['data']:>13} {f['m_step']:>6}: {f['n_iter']} iterations, {f['seconds']:.3g}s, "
          f"objective {f['objective']:.6f}", flush=True)
  meta = dict(n=n, repeats=repeats, machine=f"{platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} CPUs, TensorFlow {tf.__version__}")
  os.makedirs(OUT, exist_ok=True)
  stem = os.path.join(OUT, "em_mlp_speed" + ("_quick" if args.quick else ""))
  with open(stem + ".json", "w") as f:
    json.dump(dict(meta=meta, rows=rows, fits=fits), f, indent=1)
  with open(stem + ".md", "w") as f:
    f.write(markdown(rows, meta, fits))
  print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
  main()
