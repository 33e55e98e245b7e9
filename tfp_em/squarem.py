"""SQUAREM acceleration of any EM map, with a monotonicity safeguard.

One cycle from theta_0 (whose stats and loglik are known):

    theta_1 = M(theta_0),  theta_2 = M(theta_1)
    r = u_1 - u_0,  v = (u_2 - u_1) - r        (u: unconstrained coordinates)
    alpha = min(-|r| / |v|, -1)                (scheme SqS3)
    u' = u_0 - 2 alpha r + alpha^2 v,  theta_next = M(theta')

If loglik(theta') < loglik(theta_0) (or is not finite), alpha is halved
towards -1 a few times; alpha = -1 gives theta_2, the plain double EM step,
so a cycle never does worse than two EM iterations. Extrapolating in the
unconstrained coordinates of `model.param_specs` keeps every candidate valid
(weights on the simplex, covariances positive definite).

#### References

[1] R. Varadhan and C. Roland. Simple and globally convergent methods for
    accelerating the convergence of any EM algorithm. Scandinavian Journal
    of Statistics, 35(2):335-353, 2008.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from models.specs import constrain, unconstrain

MAX_BACKTRACKS = 4


class SquaremStepper:
  """Callable `(params, stats, loglik) -> (next_params, e_steps_used)`."""

  def __init__(self, model, e_pass, m_step):
    specs = getattr(model, "param_specs", None)
    if specs is None:
      raise ValueError(f"{model.name}: SQUAREM needs `param_specs` (bijectors to "
                       "unconstrained space) on the model")
    self.specs = specs
    self.e_pass = e_pass
    self.m_step = m_step
    self._directions = tf.function(self._directions_impl, reduce_retracing=True)
    self._candidate = tf.function(self._candidate_impl, reduce_retracing=True)

  def _flat(self, params):
    u = unconstrain(params, self.specs)
    return tf.concat([tf.reshape(t, [-1]) for t, s in zip(u, self.specs) if s.trainable], 0)

  def _directions_impl(self, params0, params1, params2):
    u0, u1, u2 = self._flat(params0), self._flat(params1), self._flat(params2)
    r = u1 - u0
    v = u2 - 2 * u1 + u0
    return u0, r, v, tf.norm(r), tf.norm(v)

  def _candidate_impl(self, template, u0, r, v, alpha):
    flat = u0 - 2 * alpha * r + alpha ** 2 * v
    u = unconstrain(template, self.specs)
    out, offset = [], 0
    for t, s in zip(u, self.specs):
      if s.trainable:
        size = tf.size(t)
        out.append(tf.reshape(flat[offset:offset + size], tf.shape(t)))
        offset += size
      else:
        out.append(t)
    return constrain(type(u)(*out), self.specs)

  def _loglik(self, params):
    try:
      stats, ll = self.e_pass(params)
    except tf.errors.InvalidArgumentError:  # e.g. a failed Cholesky of an extreme candidate
      return None, -np.inf
    ll = float(ll)
    return stats, (ll if np.isfinite(ll) else -np.inf)

  def __call__(self, params0, stats0, ll0):
    params1 = self.m_step(params0, stats0)
    stats1, ll1 = self._loglik(params1)
    if stats1 is None or not np.isfinite(ll1):
      return params1, 1
    params2 = self.m_step(params1, stats1)
    u0, r, v, r_norm, v_norm = self._directions(params0, params1, params2)
    r_norm, v_norm = float(r_norm), float(v_norm)
    if not (v_norm > 0 and np.isfinite(r_norm) and np.isfinite(v_norm)):
      return params2, 1
    alpha = min(-r_norm / v_norm, -1.0)
    e_steps = 1
    for _ in range(MAX_BACKTRACKS + 1):
      if alpha >= -1.0:
        break
      candidate = self._candidate(params0, u0, r, v, tf.constant(alpha, u0.dtype))
      stats_c, ll_c = self._loglik(candidate)
      e_steps += 1
      if stats_c is not None and ll_c >= ll0:
        return self.m_step(candidate, stats_c), e_steps
      alpha = (alpha - 1.0) / 2.0
    return params2, e_steps
