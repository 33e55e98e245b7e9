"""MeNets' Gamma(X) random effects against random intercepts and the true design (issue #22).

Clusters with a random intercept and a random slope; f(x) = 2 sin(x0) + x1^2 - x2.
Test MSE (80/20 split, every cluster seen in training), sigma^2 (truth 0.25) and
the training marginal l for each random-effects design and method, on four designs:
the issue's (25 points per cluster, slope on x0), a slope on x4 (an input f does
not use, so Gamma cannot carry it), and clusters of 5 and of 100 points.

    python validation/menets_random_slopes.py            # all four designs (~10 min on 2 cores)
    python validation/menets_random_slopes.py --design issue
"""
import argparse
import time

import numpy as np

from tfp_em import MixedEffectsRegressor

DESIGNS = {"issue": dict(num_clusters=200, n_per=25, slope_on=0),
           "slope-on-x4": dict(num_clusters=200, n_per=25, slope_on=4),
           "5-per-cluster": dict(num_clusters=1000, n_per=5, slope_on=0),
           "100-per-cluster": dict(num_clusters=50, n_per=100, slope_on=0)}
RUNS = [("custom", "em"), ("custom", "nll"), ("intercept", "em"), ("intercept", "nll"),
        ("features", "em"), ("features", "nll")]


def simulate(num_clusters, n_per, slope_on, seed=0):
  rng = np.random.default_rng(seed)
  g = np.repeat(np.arange(num_clusters), n_per)
  x = rng.normal(size=(g.size, 5))
  f = np.sin(x[:, 0]) * 2 + x[:, 1] ** 2 - x[:, 2]
  b0, b1 = rng.normal(0, 1., num_clusters), rng.normal(0, .5, num_clusters)
  y = f + b0[g] + b1[g] * x[:, slope_on] + rng.normal(0, .5, g.size)
  idx = rng.permutation(g.size)
  cut = int(0.8 * g.size)
  true_z = np.column_stack([np.ones(g.size), x[:, slope_on]])
  return x, y, g, true_z, idx[:cut], idx[cut:]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--design", choices=list(DESIGNS), action="append")
  for name in parser.parse_args().design or list(DESIGNS):
    x, y, g, true_z, tr, te = simulate(**DESIGNS[name])
    print(f"\n## {name}: {len(tr)} training rows, {len(np.unique(g))} clusters\n")
    print("| random effects | method | test MSE | sigma^2 | l (train) | seconds |")
    print("|---|---|---|---|---|---|")
    for design, method in RUNS:
      custom = design == "custom"
      start = time.perf_counter()
      est = MixedEffectsRegressor(random_effects=design, f="mlp", method=method, seed=0)
      est.fit(x[tr], y[tr], g[tr], Z=true_z[tr] if custom else None)
      pred = est.predict(x[te], g[te], Z=true_z[te] if custom else None)
      label = "custom [1, x_slope] (true)" if custom else design
      print(f"| {label} | {method} | {np.mean((pred - y[te]) ** 2):.3f} | {est.sigma2_:.3f} | "
            f"{est.log_likelihood_:.1f} | {time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
  main()
