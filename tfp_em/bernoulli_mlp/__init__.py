"""The MLP with Bernoulli hidden units: exact E-step, Newton M-step, estimator."""
from tfp_em.bernoulli_mlp.em import BernoulliMLPEM, BernoulliMLPStats, fit_autodiff
from tfp_em.bernoulli_mlp.estimator import BernoulliMLPClassifier
from tfp_em.bernoulli_mlp import adapter as _adapter  # registers the diagnostics adapter

__all__ = ["BernoulliMLPClassifier", "BernoulliMLPEM", "BernoulliMLPStats", "fit_autodiff"]
