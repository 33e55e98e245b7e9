"""Gaussian mixtures: closed-form E/M steps, initialization, re-seeding, estimator."""
from tfp_em.mixture.em import GaussianMixtureEM, GaussianMixtureStats, MixtureData
from tfp_em.mixture.estimator import GaussianMixture
from tfp_em.mixture.reseed import EmptyComponentWarning

__all__ = ["EmptyComponentWarning", "GaussianMixture", "GaussianMixtureEM", "GaussianMixtureStats",
           "MixtureData"]
