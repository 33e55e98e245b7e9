"""Linear mixed models and mixed-effects networks (MeNets EM, LMMNN NLL).

One factor with any random-effects design (intercept, slopes, Γ(X)), or K
crossed random intercepts; f linear or a network.
"""
from tfp_em.mixed_effects.crossed_em import CrossedEffectsEM
from tfp_em.mixed_effects.crossed_estimator import CrossedEffectsRegressor
from tfp_em.mixed_effects.em import MixedEffectsEM, MixedEffectsStats
from tfp_em.mixed_effects.estimator import MixedEffectsRegressor
from tfp_em.mixed_effects import adapter as _adapter  # registers the diagnostics adapter

__all__ = ["CrossedEffectsEM", "CrossedEffectsRegressor", "MixedEffectsEM", "MixedEffectsRegressor",
           "MixedEffectsStats"]
