"""Deliberately wrong EM models for the mixed model: each overrides one step.

The verifier (and `tests/test_mixed_effects.py`) must flag every one of them
while the correct `MixedEffectsEM` passes. Each factory takes the same
arguments as `MixedEffectsEM`.
"""
import tensorflow as tf

from tfp_em.mixed_effects.em import MixedEffectsEM


class InnerProductSecondMoment(MixedEffectsEM):
  """`b @ b.T` on a 1-D vector b: the inner product b.b (a scalar, broadcast
  over [q, q]) instead of the outer product b b^T. Invisible when q = 1."""
  name = "mutant:inner_product_second_moment"

  def _second_moment(self, mean, covariance):
    inner = tf.reduce_sum(mean * mean, axis=-1)                      # [G]: b @ b.T with 1-D b
    return tf.reduce_sum(inner[:, tf.newaxis, tf.newaxis] + covariance, axis=0)


class NoTraceNoiseVariance(MixedEffectsEM):
  """sigma^2 = ||r - Z m||^2 / n: the tr(Z_i^T Z_i P_i^-1) term is dropped."""
  name = "mutant:no_trace_noise_variance"

  def _update_noise_variance(self, stats, residual_ss):
    return residual_ss / stats.num_obs


class PerObservationCovariance(MixedEffectsEM):
  """Sigma_u = sum_i (m_i m_i^T + P_i^-1) / n: averaged over observations,
  not over clusters."""
  name = "mutant:per_observation_covariance"

  def _update_covariance(self, stats):
    cov = stats.second_moment / stats.num_obs
    return tf.linalg.diag_part(cov) if self.covariance_type == "diag" else cov


MUTANTS = {
    "inner_product_second_moment": InnerProductSecondMoment,
    "no_trace_noise_variance": NoTraceNoiseVariance,
    "per_observation_covariance": PerObservationCovariance,
}
