"""Gaussian mixtures: closed-form E/M steps, initialization, re-seeding, estimator."""
from tfp_em.mixture.em import GaussianMixtureEM, GaussianMixtureStats, MixtureData
from tfp_em.mixture.estimator import GaussianMixture
from tfp_em.mixture.reseed import EmptyComponentWarning
from tfp_em.mixture.spurious import SpuriousSolutionWarning
from tfp_em.mixture import adapter as _adapter  # registers the diagnostics adapter

__all__ = ["EmptyComponentWarning", "GaussianMixture", "GaussianMixtureEM", "GaussianMixtureStats",
           "MixtureData", "SpuriousSolutionWarning"]
