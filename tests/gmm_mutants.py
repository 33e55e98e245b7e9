"""Deliberately wrong Gaussian-mixture EM updates: the verifier's own test.

Each mutant subclasses `GaussianMixtureEM` and changes one thing, the way a
hand-written EM typically goes wrong. `tfp_em.verify` must flag every mutant
(for every covariance type it applies to) and pass the correct model.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import tensorflow as tf

from models.gaussian_mixture import GaussianMixtureParams
from tfp_em.mixture.em import (MIN_COUNT_EPS, GaussianMixtureEM, GaussianMixtureStats,
                               component_log_prob, estimate_covariances, estimate_means,
                               estimate_weights, scatter_about)

ALL_TYPES = ("full", "tied", "diag", "spherical")


def _counts(stats):
  return stats.counts + MIN_COUNT_EPS * np.finfo(stats.counts.dtype.as_numpy_dtype).eps


class CovarianceOverN(GaussianMixtureEM):
  """Sigma_k = scatter_k / N instead of / N_k (tied divides by N anyway)."""

  def m_step(self, params, stats):
    counts = _counts(stats)
    means = estimate_means(stats, counts)
    total = tf.reduce_sum(counts) * tf.ones_like(counts)
    return GaussianMixtureParams(estimate_weights(counts), means,
                                 estimate_covariances(stats, means, total, self.covariance_type, 0.0))


class _HardStats(NamedTuple):
  soft: GaussianMixtureStats
  hard_means: tf.Tensor  # [K, D]


class HardAssignmentMeans(GaussianMixtureEM):
  """mu_k = mean of the points whose most probable component is k."""

  def e_step(self, params, data):
    stats, ll = super().e_step(params, data)
    resp = self.posterior(params, data)["responsibilities"]
    hard = tf.one_hot(tf.argmax(resp, -1), resp.shape[-1], dtype=resp.dtype) * data.weights[:, None]
    hard_means = tf.math.divide_no_nan(tf.einsum("nk,nd->kd", hard, data.x),
                                       tf.reduce_sum(hard, 0)[:, None])
    return _HardStats(stats, hard_means), ll

  def m_step(self, params, stats):
    if not isinstance(stats, _HardStats):  # initialization from responsibilities
      return super().m_step(params, stats)
    counts = _counts(stats.soft)
    means = stats.hard_means
    return GaussianMixtureParams(
        estimate_weights(counts), means,
        estimate_covariances(stats.soft, means, counts, self.covariance_type, 0.0))

  def expected_log_joint(self, params, stats):
    return super().expected_log_joint(params, stats.soft)


class WeightsNotRenormalized(GaussianMixtureEM):
  """pi_k = N_k (the division by sum N forgotten)."""

  def m_step(self, params, stats):
    new = super().m_step(params, stats)
    return new._replace(weights=_counts(stats))


class ResponsibilitiesWrongAxis(GaussianMixtureEM):
  """r_nk normalized over the points n instead of the components k."""

  def _resp(self, params, x):
    return tf.nn.softmax(self.log_prob_components(params, x), axis=0)

  def posterior(self, params, data):
    return {"responsibilities": self._resp(params, data.x)}

  def _chunk_stats(self, params, prec_chol, x, weights):
    log_norm = tf.reduce_logsumexp(self.log_prob_components(params, x), axis=-1)
    stats = self._stats_from_resp(self._resp(params, x), x, weights, params.means)
    return stats, tf.reduce_sum(weights * log_norm)


class CovariancePrecisionConfused(GaussianMixtureEM):
  """Returns the precision Sigma^{-1} where the covariance belongs."""

  def m_step(self, params, stats):
    new = super().m_step(params, stats)
    cov = new.covariances
    inv = tf.linalg.inv(cov) if self.covariance_type in ("full", "tied") else 1.0 / cov
    return new._replace(covariances=inv)


class MissingOuterProduct(GaussianMixtureEM):
  """(x - mu)^T (x - mu) (a scalar) where (x - mu)(x - mu)^T was meant.

  Every covariance becomes (sum_n r_nk |x_n - mu_k|^2 / N_k) times the
  identity (all-ones for diag; no division by D for spherical).
  """

  def m_step(self, params, stats):
    counts = _counts(stats)
    means = estimate_means(stats, counts)
    full = self.covariance_type in ("full", "tied")
    scatter = scatter_about(stats, means, full)
    inner = tf.linalg.trace(scatter) if full else tf.reduce_sum(scatter, -1)      # [K]
    d = means.shape[-1]
    if self.covariance_type == "full":
      cov = (inner / counts)[:, None, None] * tf.eye(d, dtype=means.dtype)
    elif self.covariance_type == "tied":
      cov = tf.reduce_sum(inner) / tf.reduce_sum(counts) * tf.eye(d, dtype=means.dtype)
    elif self.covariance_type == "diag":
      cov = (inner / counts)[:, None] * tf.ones([1, d], means.dtype)
    else:
      cov = inner / counts
    return GaussianMixtureParams(estimate_weights(counts), means, cov)


class CovarianceAboutOldMeans(GaussianMixtureEM):
  """Scatter taken about the E-step's (old) means instead of the new ones.

  Subtle: this is a valid ECM step (loglik still increases, same fixed
  points) but it is not the M-step, which only checks 4b/4d can tell.
  """

  def m_step(self, params, stats):
    counts = _counts(stats)
    means = estimate_means(stats, counts)
    return GaussianMixtureParams(
        estimate_weights(counts), means,
        estimate_covariances(stats, stats.center, counts, self.covariance_type, 0.0))


class MeansMissingCenter(GaussianMixtureEM):
  """mu_k = dev_k / N_k: the centring point of the stats is forgotten."""

  def m_step(self, params, stats):
    new = super().m_step(params, stats)
    counts = _counts(stats)
    means = stats.dev / counts[:, None]
    return new._replace(means=means, covariances=estimate_covariances(
        stats, means, counts, self.covariance_type, 0.0))


class LoglikWithoutWeights(GaussianMixtureEM):
  """E-step loglik sum_n logsumexp_k log N(x_n | k), without log pi_k."""

  def _chunk_stats(self, params, prec_chol, x, weights):
    stats, _ = super()._chunk_stats(params, prec_chol, x, weights)
    comp = component_log_prob(x, params.means, prec_chol, self.covariance_type)
    return stats, tf.reduce_sum(weights * tf.reduce_logsumexp(comp, -1))


class TiedNotPooled(GaussianMixtureEM):
  """Tied Sigma = unweighted average of per-component covariances."""

  def m_step(self, params, stats):
    counts = _counts(stats)
    means = estimate_means(stats, counts)
    per_component = scatter_about(stats, means, True) / counts[:, None, None]
    return GaussianMixtureParams(estimate_weights(counts), means,
                                 tf.reduce_mean(per_component, 0))


class Mutant(NamedTuple):
  name: str
  cls: type
  covariance_types: tuple
  description: str


MUTANTS = (
    Mutant("covariance_over_N", CovarianceOverN, ("full", "diag", "spherical"),
           "covariance divided by N instead of N_k"),
    Mutant("hard_assignment_means", HardAssignmentMeans, ALL_TYPES,
           "means from hard assignments"),
    Mutant("weights_not_renormalized", WeightsNotRenormalized, ALL_TYPES,
           "weights N_k not divided by N"),
    Mutant("responsibilities_wrong_axis", ResponsibilitiesWrongAxis, ALL_TYPES,
           "responsibilities normalized over points instead of components"),
    Mutant("covariance_precision_confused", CovariancePrecisionConfused, ALL_TYPES,
           "precision returned as the covariance"),
    Mutant("missing_outer_product", MissingOuterProduct, ALL_TYPES,
           "inner product (x-mu)^T(x-mu) instead of the outer product"),
    Mutant("covariance_about_old_means", CovarianceAboutOldMeans, ALL_TYPES,
           "scatter about the old means (an ECM step, not the M-step)"),
    Mutant("means_missing_center", MeansMissingCenter, ALL_TYPES,
           "means without the stats' centring point"),
    Mutant("loglik_without_weights", LoglikWithoutWeights, ALL_TYPES,
           "E-step loglik without log pi"),
    Mutant("tied_not_pooled", TiedNotPooled, ("tied",),
           "tied covariance averaged over components, not pooled by N_k"),
)


def cases():
  """(mutant, covariance_type) pairs, every meaningful combination."""
  return [(m, t) for m in MUTANTS for t in m.covariance_types]


def make(mutant: Mutant, n_components: int, covariance_type: str, init):
  """The mutant model, exact (reg_covar=0) so the correct one is an exact M-step."""
  return mutant.cls(n_components, covariance_type, reg_covar=0.0, init=init, compile="graph")
