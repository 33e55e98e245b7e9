"""Deliberately wrong E-steps for Gaussian mixtures with missing entries.

Each mutant subclasses `MissingValuesGaussianMixtureEM` and changes one thing
in the conditioning of the missing coordinates, the way a hand-written EM with
missing data typically goes wrong. `tfp_em.verify` must flag every one and
pass the correct model (`tests/test_mixture_missing.py`,
`validation/verify_all.py`).
"""
from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from tfp_em.mixture.em import MixtureData
from tfp_em.mixture.initialization import Initializer
from tfp_em.mixture.missing_em import MissingValuesGaussianMixtureEM


class NoConditionalCovariance(MissingValuesGaussianMixtureEM):
  """Missing entries replaced by their conditional mean, C_mm left out of the scatter."""

  def conditional(self, means, covariances, x0, mask):
    cond = super().conditional(means, covariances, x0, mask)
    return cond._replace(cov=tf.zeros_like(cond.cov))


class UnconditionalFill(MissingValuesGaussianMixtureEM):
  """Missing entries filled with mu_k, ignoring their correlation with the observed ones."""

  def conditional(self, means, covariances, x0, mask):
    cond = super().conditional(means, covariances, x0, mask)
    observed = tf.repeat(mask, tf.shape(x0)[1], axis=0)[:, tf.newaxis] > 0   # [n, 1, D]
    return cond._replace(mean=tf.where(observed, cond.mean, means))


class NormalizerOverAllCoordinates(MissingValuesGaussianMixtureEM):
  """log N(x_o) with the (2 pi)^(-D/2) of all D coordinates instead of |o|."""

  def conditional(self, means, covariances, x0, mask):
    cond = super().conditional(means, covariances, x0, mask)
    n_missing = tf.repeat(tf.reduce_sum(1.0 - mask, -1), tf.shape(x0)[1])    # [n]
    return cond._replace(
        log_prob=cond.log_prob - 0.5 * math.log(2 * math.pi) * n_missing[:, tf.newaxis])


class ZeroFilled(MissingValuesGaussianMixtureEM):
  """Missing entries taken as observed zeros (the complete-data E-step on filled rows)."""

  def conditional(self, means, covariances, x0, mask):
    return super().conditional(means, covariances, x0, tf.ones_like(mask))


MUTANTS = (NoConditionalCovariance, UnconditionalFill, NormalizerOverAllCoordinates, ZeroFilled)


def verification_data(n=60, fraction=0.2, seed=2):
  """Three correlated 4-D clusters with `fraction` of the entries missing (MCAR);
  no row entirely missing."""
  rng = np.random.default_rng(seed)
  means = np.array([[0.0, 0.0, 0.0, 0.0], [4.0, 4.0, 0.0, -2.0], [-3.0, 4.0, 3.0, 2.0]])
  a = rng.normal(size=(3, 4, 4)) * 0.5
  covs = a @ np.swapaxes(a, 1, 2) + 0.5 * np.eye(4) + 0.5
  labels = rng.choice(3, size=n, p=[0.5, 0.3, 0.2])
  x = np.stack([rng.multivariate_normal(means[z], covs[z]) for z in labels])
  gaps = rng.random(x.shape) < fraction
  gaps[:, 0] &= ~gaps[:, 1:].all(axis=1)
  x[gaps] = np.nan
  return MixtureData(tf.constant(x), tf.ones(n, tf.float64))


def model(cls=MissingValuesGaussianMixtureEM, covariance_type="full", k=3):
  """A model of class `cls` as the verifier checks it (reg_covar=0, k-means++ start)."""
  return cls(k, covariance_type, reg_covar=0.0, init=Initializer("kmeans++", k))
