"""Reproduces the LMMNN paper's random-intercepts simulation (Simchoni & Rosset 2021).

Protocol (paper section 5.1 and its code):
  N = 100,000 points, p = 10 features X ~ U(-1, 1);
  f(X) = Xb cos(Xb) + 2 X1 X2 with Xb = 1 + sum_k X_k (beta all ones);
  q levels with sizes ~ Multinomial(N, w / sum w), w ~ Poisson(3) + 1;
  y = f(X) + b[level] + eps, b ~ N(0, sigma_b^2), eps ~ N(0, 1);
  80/20 train/test split, 10% of train held out for early stopping;
  MLP 100-50-25-12 ReLU, dropout 0.25, Adam, batch 100, patience 10.

Compares test MSE of the network that ignores the clusters, our `method='nll'`
(LMMNN) and `method='em'` (MeNets EM with random intercepts), with the estimated
sigma_e^2 and sigma_b^2 and the runtimes, and the paper's LMMNN MSE.

Usage:
  python validation/lmmnn_simulation.py --quick          # sigma_b^2=1, q=1000, one run
  python validation/lmmnn_simulation.py --reps 5         # the full 3 x 3 grid

Writes validation/out/lmmnn_simulation.{json,md}.

#### References

[1] G. Simchoni and S. Rosset. Using random effects to account for
    high-cardinality categorical features and repeated measures in deep neural
    networks. NeurIPS, 2021. Table 1 (LMMNN and MeNets rows).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from tfp_em.mixed_effects.estimator import MixedEffectsRegressor, default_mlp  # noqa: E402

PAPER_LMMNN = {(0.1, 100): 1.14, (0.1, 1000): 1.14, (0.1, 10000): 1.17,
               (1.0, 100): 1.09, (1.0, 1000): 1.14, (1.0, 10000): 1.27,
               (10.0, 100): 1.10, (10.0, 1000): 1.12, (10.0, 10000): 1.32}
PAPER_MENETS_RANGE = (1.16, 2.80)


def simulate(n: int, q: int, sigma_b2: float, rng, p: int = 10):
  X = rng.uniform(-1., 1., (n, p))
  xb = 1. + X.sum(axis=1)
  f = xb * np.cos(xb) + 2. * X[:, 0] * X[:, 1]
  weights = rng.poisson(3, q) + 1
  sizes = rng.multinomial(n, weights / weights.sum())
  clusters = np.repeat(np.arange(q), sizes)
  b = rng.normal(0., np.sqrt(sigma_b2), q)
  y = f + b[clusters] + rng.normal(0., 1., n)
  return X, y, clusters


def split(rng, n: int, test_frac=0.2, val_frac=0.1):
  perm = rng.permutation(n)
  n_test = int(round(test_frac * n))
  test, train = perm[:n_test], perm[n_test:]
  n_val = int(round(val_frac * train.size))
  return train[n_val:], train[:n_val], test


def fit_ignore(X, y, Xv, yv, seed, args):
  """The network alone, clusters ignored: MSE loss, Keras fit with early stopping."""
  model = default_mlp(X.shape[1], seed=seed)
  model.compile(optimizer=keras.optimizers.Adam(args.learning_rate), loss="mse")
  stop = keras.callbacks.EarlyStopping(patience=args.patience, restore_best_weights=True)
  model.fit(X.astype(np.float32), y.astype(np.float32), batch_size=args.batch_size,
            epochs=args.max_epochs, validation_data=(Xv.astype(np.float32), yv.astype(np.float32)),
            callbacks=[stop], verbose=0)
  return model


def run_cell(sigma_b2: float, q: int, rep: int, args) -> dict:
  seed = 1000 * rep + 17
  rng = np.random.default_rng(seed)
  X, y, clusters = simulate(args.n, q, sigma_b2, rng)
  tr, va, te = split(rng, args.n)
  row = dict(sigma_b2=sigma_b2, q=q, rep=rep, n_train=int(tr.size), n_val=int(va.size),
             n_test=int(te.size), paper_lmmnn_mse=PAPER_LMMNN.get((sigma_b2, q)))
  keras.utils.set_random_seed(seed)
  start = time.perf_counter()
  if args.skip_ignore:
    row.update(mse_ignore=float("nan"), seconds_ignore=0.)
  else:
    model = fit_ignore(X[tr], y[tr], X[va], y[va], seed, args)
    pred = model.predict(X[te].astype(np.float32), batch_size=4096, verbose=0)[:, 0]
    row.update(mse_ignore=float(np.mean((pred - y[te]) ** 2)),
               seconds_ignore=time.perf_counter() - start)
  for method in args.methods:
    start = time.perf_counter()
    est = MixedEffectsRegressor(
        random_effects="intercept", f="mlp", method=method, max_iter=args.max_epochs,
        batch_size=args.batch_size, learning_rate=args.learning_rate, patience=args.patience,
        epochs_per_step=args.epochs_per_step, seed=seed, dtype=args.dtype)
    est.fit(X[tr], y[tr], clusters[tr], validation_data=(X[va], y[va], clusters[va]))
    pred = est.predict(X[te], clusters[te])
    row.update({
        f"mse_{method}": float(np.mean((pred - y[te]) ** 2)),
        f"sigma_e2_{method}": est.sigma2_,
        f"sigma_b2_{method}": float(est.cov_random_effects_[0, 0]),
        f"iterations_{method}": int(est.history_["best_iteration"]),
        f"stop_{method}": est.history_["stop_reason"],
        f"seconds_{method}": time.perf_counter() - start})
  return row


def markdown(rows, args) -> str:
  methods = args.methods
  head = ["σb²", "q", "rep", "MSE ignore"] + [f"MSE {m}" for m in methods] + ["paper LMMNN"]
  head += [f"σe² {m}" for m in methods] + [f"σb² {m}" for m in methods]
  head += ["s ignore"] + [f"s {m}" for m in methods]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    cells = [r["sigma_b2"], r["q"], r["rep"], f"{r['mse_ignore']:.3f}"]
    cells += [f"{r[f'mse_{m}']:.3f}" for m in methods] + [r["paper_lmmnn_mse"]]
    cells += [f"{r[f'sigma_e2_{m}']:.3f}" for m in methods]
    cells += [f"{r[f'sigma_b2_{m}']:.3f}" for m in methods]
    cells += [f"{r['seconds_ignore']:.0f}"] + [f"{r[f'seconds_{m}']:.0f}" for m in methods]
    lines.append("| " + " | ".join(str(c) for c in cells) + " |")
  lines.append("")
  lines.append(f"Paper's MeNets baseline MSE range: {PAPER_MENETS_RANGE}. N={args.n}, "
               f"batch {args.batch_size}, lr {args.learning_rate}, patience {args.patience}, "
               f"MeNets epochs per M-step {args.epochs_per_step}, dtype {args.dtype}, "
               f"{os.cpu_count()} CPUs.")
  return "\n".join(lines) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="sigma_b^2=1, q=1000, one repetition")
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--first-rep", type=int, default=0, help="index of the first repetition (seeds)")
  parser.add_argument("--sigma-b2", type=float, nargs="+", default=[0.1, 1.0, 10.0])
  parser.add_argument("--q", type=int, nargs="+", default=[100, 1000, 10000])
  parser.add_argument("--n", type=int, default=100_000)
  parser.add_argument("--methods", nargs="+", default=["nll", "em"], choices=["nll", "em"])
  parser.add_argument("--max-epochs", type=int, default=500)
  parser.add_argument("--batch-size", type=int, default=100)
  parser.add_argument("--learning-rate", type=float, default=1e-3)
  parser.add_argument("--patience", type=int, default=10)
  parser.add_argument("--epochs-per-step", type=int, default=1, help="MeNets EM: epochs per M-step")
  parser.add_argument("--skip-ignore", action="store_true", help="skip the cluster-blind network")
  parser.add_argument("--dtype", default="float64")
  parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "out"))
  parser.add_argument("--tag", default="")
  args = parser.parse_args(argv)
  if args.quick:
    args.sigma_b2, args.q, args.reps, args.first_rep = [1.0], [1000], 1, 0
  rows, start = [], time.perf_counter()
  for sigma_b2 in args.sigma_b2:
    for q in args.q:
      for rep in range(args.first_rep, args.first_rep + args.reps):
        row = run_cell(sigma_b2, q, rep, args)
        rows.append(row)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                          for k, v in row.items()}), flush=True)
  table = markdown(rows, args)
  print(table)
  print(f"total {time.perf_counter() - start:.0f} s")
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  name = "lmmnn_simulation" + ("_quick" if args.quick else "") + args.tag
  (out / f"{name}.json").write_text(json.dumps(
      {"args": vars(args), "rows": rows, "seconds": time.perf_counter() - start}, indent=1))
  (out / f"{name}.md").write_text(table)


if __name__ == "__main__":
  tf.get_logger().setLevel("ERROR")
  main()
