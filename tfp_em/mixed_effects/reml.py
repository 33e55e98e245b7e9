"""REML by EM for the linear mixed model with one grouping factor.

The fixed effects beta are latent with a flat prior, so the E-step
conditions on y jointly over (beta, u_1..u_G), and the EM objective is the
restricted log-likelihood `models.mixed_effects.restricted_log_prob`:

    beta | y ~ N(beta_GLS, A^-1),                 A = X^T V^-1 X
    u_i | beta, y ~ N(m_i(beta), P_i^-1),         m_i(beta) = m_i(beta_GLS) - K_i (beta - beta_GLS)
    K_i = P_i^-1 Z_i^T X_i / sigma^2                                        [q, p]

so u_i | y has mean m_i(beta_GLS) and covariance P_i^-1 + K_i A^-1 K_i^T, and
E||y_i - X_i beta - Z_i u_i||^2 gains tr(A^-1 W_i), with
W_i = (X_i - Z_i K_i)^T (X_i - Z_i K_i). The M-step is `MixedEffectsEM`'s
with these moments: its beta step is a no-op (X^T e = 0 at beta_GLS) and the
returned beta is E[beta | y] at the previous variances.

#### References

[1] N. M. Laird, N. Lange and D. Stram. Maximum likelihood computations with
    repeated measures: application of the EM algorithm. JASA,
    82(397):97-105, 1987.
[2] D. A. Harville. Maximum likelihood approaches to variance component
    estimation and to related problems. JASA, 72(358):320-338, 1977.
"""
from __future__ import annotations

import math

import tensorflow as tf

from models import mixed_effects as me
from tfp_em.mixed_effects.em import MixedEffectsEM


class RestrictedMixedEffectsEM(MixedEffectsEM):
  """EM on the restricted likelihood (REML); `marginal_log_prob` is l_R.

  Not for shards or replicas: beta_GLS needs every cluster, so the stats of
  a shard alone are not its share of the total.
  """
  name = "MixedEffectsREMLEM"

  def __init__(self, covariance_type: str = "full", compile: str = "graph"):
    super().__init__(covariance_type, compile, expand=False)

  def e_step(self, params, data):
    fixed = me.fixed_effects_posterior(params, data, self.covariance_type)
    at_gls = params._replace(beta=fixed.mean)
    post, stats = self.cluster_posterior(at_gls, data)
    out = self.posterior_stats(at_gls, data, post, stats)
    p = fixed.mean.shape[0]
    eye = tf.eye(p, dtype=fixed.mean.dtype)
    a_inv = tf.linalg.cholesky_solve(fixed.information_chol, eye)               # [p, p]
    k = tf.matmul(post.covariance, fixed.xtz, transpose_b=True) / params.noise_variance  # [G, q, p]
    beta_part = tf.reduce_sum(tf.matmul(tf.matmul(k, a_inv), k, transpose_b=True), 0)  # [q, q]
    xtzk = tf.matmul(fixed.xtz, k)                                                # [G, p, p]
    w = (fixed.xtx - xtzk - tf.linalg.matrix_transpose(xtzk)
         + tf.matmul(k, tf.matmul(stats.ztz, k), transpose_a=True))               # [G, p, p]
    out = out._replace(trace=out.trace + tf.reduce_sum(a_inv * tf.reduce_sum(w, 0)),
                       second_moment=out.second_moment + beta_part)
    half_logdet = tf.reduce_sum(tf.math.log(tf.linalg.diag_part(fixed.information_chol)))
    restricted = (tf.reduce_sum(post.log_prob) - half_logdet
                  + 0.5 * p * math.log(2. * math.pi))
    return out, restricted

  def marginal_log_prob(self, params, data):
    return me.restricted_log_prob(params, data, self.covariance_type)

  def gls_params(self, params, data) -> me.MixedEffectsParams:
    """`params` with beta = beta_GLS at their variances (the REML beta)."""
    return params._replace(beta=me.fixed_effects_posterior(params, data,
                                                           self.covariance_type).mean)
