"""Diagnostics figures for the Old Faithful GMM (standardized, K=2, full).

Fits the mixture, then measures and prints:
  * SE agreement: Hessian vs Louis (max relative difference) and Hessian vs
    a parametric bootstrap (ratio range);
  * the NUTS cross-check: max R-hat, min bulk ESS, runtime, and the distance
    of the posterior mode / mean from the EM estimate in SEs;
and writes the HTML report to validation/out/old_faithful_report/.

    python validation/diagnostics_old_faithful.py [--n-boot 400] [--draws 1000]
"""
import argparse
import time
from pathlib import Path

import numpy as np

from tfp_em import GaussianMixture
from tfp_em.cli import readers
from tfp_em.diagnostics.hmc import compare_with_em, sample_posterior
from tfp_em.diagnostics.report import write_report
from tfp_em.diagnostics.standard_errors import bootstrap_standard_errors, standard_errors


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--n-boot", type=int, default=400)
  parser.add_argument("--draws", type=int, default=1000)
  parser.add_argument("--out", default=str(Path(__file__).parent / "out" / "old_faithful_report"))
  args = parser.parse_args()

  x, names = readers.load_old_faithful()
  x = (x - x.mean(0)) / x.std(0)
  fitted = GaussianMixture(2, n_init=4, seed=0, tol=1e-8).fit(x)
  print(f"log-likelihood {fitted.log_likelihood_:.6f}, n_iter {fitted.n_iter_}")

  t = time.perf_counter()
  hess = standard_errors(fitted, x)
  t_hess = time.perf_counter() - t
  t = time.perf_counter()
  louis = standard_errors(fitted, x, method="louis")
  t_louis = time.perf_counter() - t
  t = time.perf_counter()
  boot = bootstrap_standard_errors(fitted, x, n_boot=args.n_boot, seed=0)
  t_boot = time.perf_counter() - t
  rel = np.abs(louis.se - hess.se) / hess.se
  ratio = boot.se / hess.se
  print(f"SE Hessian vs Louis: max relative difference {rel.max():.2e} "
        f"({t_hess:.2f} s, {t_louis:.2f} s)")
  print(f"SE bootstrap ({args.n_boot}) / Hessian: min {ratio.min():.3f}, median "
        f"{np.median(ratio):.3f}, max {ratio.max():.3f} ({t_boot:.1f} s)")

  t = time.perf_counter()
  hmc = sample_posterior(fitted, x, num_chains=4, num_results=args.draws,
                         num_burnin=args.draws, seed=0)
  t_hmc = time.perf_counter() - t
  table = compare_with_em(fitted, hmc, x)
  stats = hmc.sample_stats
  print(f"NUTS 4 x ({args.draws} warm-up + {args.draws}) draws: {t_hmc:.1f} s including XLA "
        f"compilation; acceptance {float(stats['acceptance_rate'].mean()):.2f}, "
        f"leapfrog steps {float(stats['n_steps'].mean()):.1f}, divergences "
        f"{int(stats['diverging'].sum())}")
  print(f"max R-hat {table['r_hat'].max():.4f}, min bulk ESS {table['ess_bulk'].min():.0f}, "
        f"min tail ESS {table['ess_tail'].min():.0f}")
  print(f"|MAP - EM| / SE: max {np.abs(table['z_map']).max():.2e}; "
        f"|posterior mean - EM| / SE: max {np.abs(table['z_mean']).max():.2f}; "
        f"posterior sd / SE: {np.min(table['post_sd'] / table['em_se']):.3f}.."
        f"{np.max(table['post_sd'] / table['em_se']):.3f}")
  path = write_report(fitted, x, args.out, hmc=hmc, n_boot=100,
                      feature_names=[f"{n} (standardized)" for n in names])
  print(f"report: {path}")


if __name__ == "__main__":
  main()
