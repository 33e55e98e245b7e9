"""LMMNN's two-factor random-intercepts simulation: linear f and a network f.

Protocol (Simchoni & Rosset 2021, the several-factors extension of section
5.1): N = 100,000 points, p = 10 features X ~ U(-1, 1),
f(X) = Xb cos(Xb) + 2 X1 X2 with Xb = 1 + sum_k X_k; two crossed factors
with q levels each, level probabilities proportional to Poisson(3) + 1 drawn
independently per factor; y = f(X) + b1[g1] + b2[g2] + eps, b_k ~ N(0,
sigma_b^2), eps ~ N(0, 1); 80/20 random train/test split.

X, f, the first factor and eps come from `lmmnn_simulation.simulate` (the
single-factor generator); the second factor is drawn the same way and crossed
with the first at random.

Fits per cell:
* linear f (`CrossedEffectsRegressor`, on the whole 80%): exact EM (PX-EM +
  SQUAREM) and the NLL path at q = 1,000; at q = 10,000 (10,000 levels
  outside the largest factor > max_dense = 8,000) EM with CG means and
  Hutchinson traces only. Its test MSE carries the misspecification of f.
* a network f (`MixedEffectsRegressor(f='mlp', clusters=[g1, g2])`, the paper's
  MLP 100-50-25-12, dropout 0.25, Adam lr 1e-3, batch 100, patience 10; 10% of
  the training rows held out for early stopping): MeNets EM ('em') and LMMNN
  ('nll'), plus the same MLP ignoring the factors. The paper reports LMMNN at
  1.12-1.49 test MSE on this grid. At q = 10,000 the early-stopping criterion
  is the validation MSE (beyond the exact limit) and l is NaN.

    /work/venv/bin/python validation/lmmnn_crossed.py --quick   # q=1000, sigma_b^2=0.5
    /work/venv/bin/python validation/lmmnn_crossed.py           # the 2 x 2 grid, 1 repetition

writes validation/out/lmmnn_crossed{_quick}.{json,md}.

#### References

[1] G. Simchoni and S. Rosset. Using random effects to account for
    high-cardinality categorical features and repeated measures in deep neural
    networks. NeurIPS, 2021.
"""
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see validation/insteval.py

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import lmmnn_simulation  # noqa: E402
from tfp_em.mixed_effects.crossed_posterior import MAX_DENSE  # noqa: E402
from tfp_em.mixed_effects.crossed_estimator import CrossedEffectsRegressor  # noqa: E402
from tfp_em.mixed_effects.estimator import MixedEffectsRegressor  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"


def simulate(n, q, sigma_b2, rng, p=10):
  """X [n, p], y [n], [g1, g2]: `lmmnn_simulation.simulate` plus a crossed second factor."""
  X, y, g1 = lmmnn_simulation.simulate(n, q, sigma_b2, rng, p)
  w = rng.poisson(3, q) + 1.
  g2 = rng.choice(q, size=n, p=w / w.sum())
  return X, y + rng.normal(0., np.sqrt(sigma_b2), q)[g2], [g1, g2]


def fit_linear(X, y, groups, Xt, yt, gt, q):
  out = {}
  methods = [("em", dict(method="em", accelerate="squarem", tol=1e-10))]
  if q <= MAX_DENSE:  # levels outside the largest factor
    methods.append(("nll", dict(method="nll", tol=1e-12)))
  for name, kw in methods:
    t = time.perf_counter()
    est = CrossedEffectsRegressor(**kw).fit(X, y, groups)
    out[name] = dict(seconds=round(time.perf_counter() - t, 1),
                     mse=float(np.mean((yt - est.predict(Xt, gt)) ** 2)),
                     sigma_b2_hat=[float(v) for v in est.variances_], sigma_e2_hat=est.sigma2_,
                     loglik=est.log_likelihood_, iterations=int(est.n_iter_),
                     trace_se=[float(v) for v in est.trace_se_])
  return out


def fit_network(method, X, y, groups, Xv, yv, gv, Xt, yt, gt, seed, args):
  t = time.perf_counter()
  est = MixedEffectsRegressor(
      f="mlp", method=method, max_iter=args.max_epochs, batch_size=args.batch_size,
      learning_rate=args.learning_rate, patience=args.patience, seed=seed,
      epochs_per_step=args.epochs_per_step)
  est.fit(X, y, groups, validation_data=(Xv, yv, gv))
  return dict(seconds=round(time.perf_counter() - t, 1),
              mse=float(np.mean((yt - est.predict(Xt, gt)) ** 2)),
              sigma_b2_hat=[float(v) for v in est.variances_], sigma_e2_hat=est.sigma2_,
              loglik=est.log_likelihood_, best_iteration=int(est.history_["best_iteration"]),
              stop=est.history_["stop_reason"])


def run_cell(q, sigma_b2, rep, args):
  seed = 1000 * rep + 17
  rng = np.random.default_rng(seed)
  X, y, groups = simulate(args.n, q, sigma_b2, rng)
  tr, va, te = lmmnn_simulation.split(rng, len(y))
  pick = lambda idx: (X[idx], y[idx], [g[idx] for g in groups])
  full = np.concatenate([tr, va])
  Xf, yf, gf = pick(full)
  coef = np.linalg.lstsq(np.column_stack([np.ones(len(full)), Xf]), yf, rcond=None)[0]
  row = dict(q=q, sigma_b2=sigma_b2, rep=rep, n_train=int(tr.size), n_val=int(va.size),
             n_test=int(te.size),
             mse_ols_ignoring_factors=float(np.mean((y[te] - coef[0] - X[te] @ coef[1:]) ** 2)))
  row["linear"] = fit_linear(Xf, yf, gf, *pick(te), q)
  keras.utils.set_random_seed(seed)
  if not args.skip_ignore:
    t = time.perf_counter()
    model = lmmnn_simulation.fit_ignore(X[tr], y[tr], X[va], y[va], seed, args)
    pred = model.predict(X[te].astype(np.float32), batch_size=4096, verbose=0)[:, 0]
    row["mlp_ignore"] = dict(mse=float(np.mean((pred - y[te]) ** 2)),
                             seconds=round(time.perf_counter() - t, 1))
  for method in args.methods:
    row[f"mlp_{method}"] = fit_network(method, *pick(tr), *pick(va), *pick(te), seed, args)
  print(json.dumps(row), flush=True)
  return row


def markdown(rows, args) -> str:
  methods = [f"mlp_{m}" for m in args.methods]
  head = ["q", "σb²", "MSE OLS", "MSE linear EM", "MSE MLP ignore"]
  head += [f"MSE {m}" for m in methods] + [f"σb² hat {m}" for m in methods]
  head += [f"σe² hat {m}" for m in methods] + [f"s {m}" for m in methods]
  head += [f"stop {m}" for m in methods]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    cells = [r["q"], r["sigma_b2"], f"{r['mse_ols_ignoring_factors']:.3f}",
             f"{r['linear']['em']['mse']:.3f}",
             f"{r['mlp_ignore']['mse']:.3f}" if "mlp_ignore" in r else "-"]
    cells += [f"{r[m]['mse']:.3f}" for m in methods]
    cells += [", ".join(f"{v:.3f}" for v in r[m]["sigma_b2_hat"]) for m in methods]
    cells += [f"{r[m]['sigma_e2_hat']:.3f}" for m in methods]
    cells += [r[m]["seconds"] for m in methods]
    cells += [f"{r[m]['stop']} @ {r[m]['best_iteration']}" for m in methods]
    lines.append("| " + " | ".join(str(c) for c in cells) + " |")
  lines.append("")
  lines.append(f"N={args.n}, true σe² = 1; MLP batch {args.batch_size}, lr {args.learning_rate}, "
               f"patience {args.patience}, max epochs {args.max_epochs}, MeNets epochs per "
               f"M-step {args.epochs_per_step}; {os.cpu_count()} CPUs. The paper's LMMNN: "
               "1.12-1.49 on this grid. Linear f (all 80%): see the json for NLL, variances, ℓ.")
  return "\n".join(lines) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="one cell: q=1000, sigma_b^2=0.5")
  parser.add_argument("--q", type=int, nargs="+", default=[1000, 10000])
  parser.add_argument("--sigma-b2", type=float, nargs="+", default=[0.5, 5.0])
  parser.add_argument("--reps", type=int, default=1)
  parser.add_argument("--n", type=int, default=100_000)
  parser.add_argument("--methods", nargs="+", default=["em", "nll"], choices=["em", "nll"])
  parser.add_argument("--max-epochs", type=int, default=200)
  parser.add_argument("--batch-size", type=int, default=100)
  parser.add_argument("--learning-rate", type=float, default=1e-3)
  parser.add_argument("--patience", type=int, default=10)
  parser.add_argument("--epochs-per-step", type=int, default=1)
  parser.add_argument("--skip-ignore", action="store_true", help="skip the factor-blind MLP")
  args = parser.parse_args(argv)
  if args.quick:
    args.q, args.sigma_b2, args.reps = [1000], [0.5], 1
  start = time.perf_counter()
  rows = [run_cell(q, s, rep, args) for q in args.q for s in args.sigma_b2
          for rep in range(args.reps)]
  table = markdown(rows, args)
  name = "lmmnn_crossed" + ("_quick" if args.quick else "")
  OUT.mkdir(exist_ok=True)
  (OUT / f"{name}.json").write_text(json.dumps(
      {"args": vars(args), "rows": rows, "seconds": time.perf_counter() - start}, indent=1))
  (OUT / f"{name}.md").write_text("# LMMNN two-factor simulation, linear and network f\n\n"
                                  + table)
  print(table)
  print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
  tf.get_logger().setLevel("ERROR")
  main()
