"""LMMNN's two-factor random-intercepts simulation, fitted with linear f.

Protocol (Simchoni & Rosset 2021, the several-factors extension of section
5.1): N = 100,000 points, p = 10 features X ~ U(-1, 1),
f(X) = Xb cos(Xb) + 2 X1 X2 with Xb = 1 + sum_k X_k; two crossed factors
with q levels each, level probabilities proportional to Poisson(3) + 1 drawn
independently per factor; y = f(X) + b1[g1] + b2[g2] + eps, b_k ~ N(0,
sigma_b^2), eps ~ N(0, 1); 80/20 train/test split.

f is fitted as LINEAR here (the paper fits a network), so the test MSE carries
the misspecification of f: compare methods with each other and with OLS that
ignores the factors, not with the paper's LMMNN figures (1.12-1.49).
q = 1,000: exact EM (PX-EM + SQUAREM) and the NLL path. q = 10,000 (10,000
levels outside the largest factor > max_dense = 8,000): EM with CG means and
Hutchinson traces (`fit_em_large`); the NLL path needs the exact log-det and
is not run there.

    /work/venv/bin/python validation/lmmnn_crossed.py

writes validation/out/lmmnn_crossed.{json,md}.

#### References

[1] G. Simchoni and S. Rosset. Using random effects to account for
    high-cardinality categorical features and repeated measures in deep neural
    networks. NeurIPS, 2021.
"""
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see validation/insteval.py

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tfp_em.crossed_regressor import CrossedEffectsRegressor  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"


def simulate(n, q, sigma_b2, rng, p=10):
  X = rng.uniform(-1., 1., (n, p))
  xb = 1. + X.sum(1)
  y = xb * np.cos(xb) + 2. * X[:, 0] * X[:, 1] + rng.normal(0., 1., n)
  groups = []
  for _ in range(2):
    w = rng.poisson(3, q) + 1.
    g = rng.choice(q, size=n, p=w / w.sum())
    y += rng.normal(0., np.sqrt(sigma_b2), q)[g]
    groups.append(g)
  return X, y, groups


def run_cell(q, sigma_b2, seed=0):
  rng = np.random.default_rng(seed)
  X, y, groups = simulate(100_000, q, sigma_b2, rng)
  test = rng.permutation(len(y))[:len(y) // 5]
  train = np.setdiff1d(np.arange(len(y)), test)
  gtr, gte = [g[train] for g in groups], [g[test] for g in groups]
  coef = np.linalg.lstsq(np.column_stack([np.ones(len(train)), X[train]]), y[train], rcond=None)[0]
  ols = float(np.mean((y[test] - coef[0] - X[test] @ coef[1:]) ** 2))
  row = dict(q=q, sigma_b2=sigma_b2, mse_ols_ignoring_factors=ols)
  methods = [("em", dict(method="em", accelerate="squarem", tol=1e-10))]
  if q <= 8000:
    methods.append(("nll", dict(method="nll", tol=1e-12)))
  for name, kw in methods:
    t = time.perf_counter()
    est = CrossedEffectsRegressor(**kw).fit(X[train], y[train], gtr)
    row[name] = dict(seconds=round(time.perf_counter() - t, 1),
                     mse=float(np.mean((y[test] - est.predict(X[test], gte)) ** 2)),
                     sigma_b2_hat=[float(v) for v in est.variances_], sigma_e2_hat=est.sigma2_,
                     loglik=est.log_likelihood_, iterations=int(est.n_iter_),
                     trace_se=[float(v) for v in est.trace_se_])
  print(json.dumps(row), flush=True)
  return row


def main():
  rows = [run_cell(q, s) for q in (1000, 10000) for s in (0.5, 5.)]
  OUT.mkdir(exist_ok=True)
  (OUT / "lmmnn_crossed.json").write_text(json.dumps(rows, indent=1))
  lines = ["| q | sigma_b^2 | MSE OLS (no factors) | MSE EM | MSE NLL | sigma_b^2 hat (EM) | "
           "sigma_e^2 hat (EM) | s EM | s NLL |", "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    em, nll = r["em"], r.get("nll", {})
    lines.append(f"| {r['q']} | {r['sigma_b2']} | {r['mse_ols_ignoring_factors']:.3f} | {em['mse']:.3f} | "
                 f"{nll.get('mse', float('nan')):.3f} | "
                 f"{', '.join(f'{v:.3f}' for v in em['sigma_b2_hat'])} | {em['sigma_e2_hat']:.3f} | "
                 f"{em['seconds']} | {nll.get('seconds', '-')} |")
  table = "\n".join(lines)
  (OUT / "lmmnn_crossed.md").write_text("# LMMNN two-factor simulation, linear f\n\n" + table + "\n")
  print(table)


if __name__ == "__main__":
  main()
