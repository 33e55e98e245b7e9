"""Quadratic lower bounds on a hidden unit's Q, from sums over points.

A hidden unit's Q is sum_j t_j a_j - softplus(a_j) with a_j = x~_j^T w. Around
the E-step's weights w0 (logits xi_j) a step delta moves a_j by
e_j = x~_j^T delta, and the softplus rises by its tangent plus the remainder

    r(xi, e) = softplus(xi + e) - softplus(xi) - sigmoid(xi) e <= c(xi, R) e^2
    for |e| <= R,  with  c(xi, R) = sup_{|e| <= R} r(xi, e) / e^2.

The sup is reached at e* = -sign(xi) min(R, 2|xi|) (towards the curvature
peak at 0, at most to the mirror point -xi); R = inf gives the Jaakkola-Jordan
bound c = tanh(xi/2) / (4 xi) [1], tight at w0 and valid everywhere but loose
for saturated units; a small R gives about sigmoid'(xi) / 2, half the Newton
curvature. With ||delta|| <= rho, |e_j| <= rho ||x~_j|| (Cauchy-Schwarz), so

    Q(w0 + delta) - Q(w0) >= g^T delta - delta^T A(rho) delta,
    A(rho) = sum_j c(xi_j, rho ||x~_j||) x~_j x~_j^T,   g = sum_j (t_j - u_j) x~_j,

holds exactly for every delta with ||delta|| <= rho. The E-step sums A(rho)
for the radii `RADII` (the last is inf), so the M-step can certify a step's
gain in Q from sums alone, without a second pass over the data.

#### References

[1] T. S. Jaakkola and M. I. Jordan. Bayesian parameter estimation via
    variational methods. Statistics and Computing, 10(1):25-37, 2000.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

# Step norms (per hidden unit) at which the bound is summed; inf last.
RADII = tuple(float(r) for r in 4. ** np.arange(-5, 2)) + (float("inf"),)
SERIES_BELOW = 1e-2  # |e*| under which c comes from its Taylor series


def remainder_curvature(logits, reach):
  """c(xi, R) = sup_{|e| <= R} r(xi, e) / e^2, elementwise (R may be inf).

  r(xi, e) = r(-xi, -e), so the sup is taken at xi' = -|xi| <= 0 moving up by
  e = min(R, 2|xi|) >= 0. Below `SERIES_BELOW` the ratio comes from its Taylor
  series, with the next term bounded from above (so c never falls short).
  """
  dtype = logits.dtype
  xi = -tf.abs(logits)
  step = tf.minimum(reach, -2. * xi)
  s = tf.sigmoid(xi)
  d1 = s * (1. - s)                                    # sigmoid'
  d2 = d1 * (1. - 2. * s)                              # sigmoid''
  d3 = d1 * (1. - 6. * s + 6. * tf.square(s))          # sigmoid'''
  small = step < SERIES_BELOW
  e = tf.where(small, step, tf.zeros_like(step))      # each branch sees only its own steps
  # |sigmoid''''| <= sigmoid', and sigmoid' grows at most as exp(e) towards 0.
  series = d1 / 2. + d2 * e / 6. + d3 * tf.square(e) / 24. + d1 * tf.exp(e) * e ** 3 / 120.
  e = tf.where(small, tf.ones_like(step), step)
  exact = (tf.nn.softplus(xi + e) - tf.nn.softplus(xi) - s * e) / tf.square(e)
  return tf.where(small, series, tf.maximum(exact, tf.zeros([], dtype)))


def bound_index(step_norms, dtype) -> tf.Tensor:
  """Index into `RADII` of the smallest radius >= each step norm (int32)."""
  radii = tf.constant(RADII[:-1], dtype)
  norms = tf.stop_gradient(step_norms)[..., tf.newaxis]
  return tf.reduce_sum(tf.cast(radii < norms, tf.int32), -1)


def certified_gain(delta, gradient, bounds, l2_diag):
  """Lower bound on the gain in each unit's (penalized) Q from a step.

  Args:
    delta: [..., m, P] steps from the anchor w0.
    gradient: [m, P] g, the gradient of the penalized Q at w0.
    bounds: [R, m, P, P] A(rho) for the radii `RADII`.
    l2_diag: [P] l2 on non-bias entries, 0 on the bias.

  Returns:
    [..., m]: g^T delta - delta^T (A(rho) + diag(l2_diag) / 2) delta with rho
    the smallest radius >= ||delta||; exact lower bound of the gain.
  """
  index = bound_index(tf.norm(delta, axis=-1), delta.dtype)            # [..., m]
  units = tf.range(tf.shape(bounds)[1])
  units = tf.broadcast_to(units, tf.shape(index))
  curvature = tf.gather_nd(bounds, tf.stack([index, units], -1))       # [..., m, P, P]
  quad = tf.reduce_sum(delta * tf.linalg.matvec(curvature, delta), -1)
  return (tf.reduce_sum(gradient * delta, -1) - quad
          - 0.5 * tf.reduce_sum(l2_diag * tf.square(delta), -1))
