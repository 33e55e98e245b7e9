"""The E-step's statistics checked field by field; linear-Gaussian structure.

A user file may define `statistics(params, data, latent_values)`: the
statistics of one complete data set (the latents set to `latent_values`).
The E-step must return their expectation under the exact posterior. This
module computes that expectation from the JointDistribution alone:

* discrete latents, independent across points: the statistics are a sum over
  points (as every EM statistic is), so with the base configuration z = 0 and
  z^(n,c) equal to it except z_n = c,
      E[T(z)] = T(0) + sum_{n,c} p(z_n = c | x) (T(z^(n,c)) - T(0)),
  all N * M evaluations in one `tf.vectorized_map`;
* Gaussian latents: the statistics are at most quadratic in the latents, so
      E[T(u)] = T(m) + 0.5 sum_ij C_ij d^2 T / du_i du_j,
  with m, C the exact posterior mean and covariance.

`linear_gaussian_defect` checks that latents declared Gaussian make
log p(observed, latents) quadratic (the exact path's assumption).
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from tfp_em.verification.exact import (configurations, flat_latents, latent_dtypes, latent_shapes,
                                       one_point_batch, split_latents)


def _floating(x) -> bool:
  return tf.convert_to_tensor(x).dtype.is_floating


def expected_statistics_discrete(statistics, jd, latents: dict, observed: dict, probs):
  """E[statistics(z)] under per-point posteriors `probs` [N, M] over configurations.

  Args:
    statistics: {latent name: value} -> nest of tensors, a sum over points.
    jd: the JointDistribution (for the latents' shapes and dtypes).
    latents: {name: cardinality}.
    observed: {name: value} of the other variables.
    probs: [N, M] posterior probabilities of each point's configurations
      (the layout of `marginalize_discrete`).

  Returns:
    The statistics' nest of expectations (non-floating leaves as at z = 0).
  """
  names = list(latents)
  shapes = latent_shapes(jd, names)
  dtypes = latent_dtypes(jd, names)
  base_lp = jd.log_prob(**{**{k: tf.zeros(shapes[k], dtypes[k]) for k in names}, **observed})
  if base_lp.shape.rank == 1:  # batch shape [N]: each latent's event is one point's
    shapes = {k: [int(base_lp.shape[0])] + v for k, v in shapes.items()}
  n = shapes[names[0]][0]
  configs, m = configurations(latents, shapes)
  batch = {k: tf.constant(v.astype(dtypes[k].as_numpy_dtype))
           for k, v in one_point_batch(configs, shapes, n, m).items()}
  base = statistics({k: tf.zeros(shapes[k], dtypes[k]) for k in names})
  every = tf.vectorized_map(statistics, batch, fallback_to_while_loop=True)
  probs = tf.cast(probs, tf.float64)

  def expect(b, a):
    b = tf.convert_to_tensor(b)
    if not b.dtype.is_floating:
      return b
    a = tf.reshape(tf.cast(a, b.dtype), [n, m] + b.shape.as_list())          # [N, M, ...]
    return b + tf.tensordot(tf.cast(probs, b.dtype), a - b, axes=[[0, 1], [0, 1]])
  return tf.nest.map_structure(expect, base, every)


def expected_statistics_gaussian(statistics, jd, latents, mean: dict, joint_cov):
  """E[statistics(u)] for u ~ N(mean, joint_cov), exact for statistics quadratic in u.

  Args:
    statistics: {latent name: value} -> nest of tensors.
    jd: the JointDistribution (for the latents' shapes).
    latents: the Gaussian latents' names.
    mean: {name: posterior mean} ('{name}_mean' of the exact posterior).
    joint_cov: [d, d] covariance of all latents, flattened in order.

  Returns:
    The statistics' nest of expectations.
  """
  names = list(latents)
  shapes, sizes = flat_latents(jd, names)
  flat = tf.concat([tf.reshape(tf.cast(mean[n], tf.float64), [-1]) for n in names], 0)
  with tf.GradientTape(persistent=True) as outer:
    outer.watch(flat)
    with tf.GradientTape(persistent=True) as inner:
      inner.watch(flat)
      value = statistics(split_latents(flat, names, shapes, sizes))
      leaves = [tf.convert_to_tensor(v) for v in tf.nest.flatten(value)]
      floats = [tf.reshape(v, [-1]) for v in leaves if v.dtype.is_floating]
      stacked = tf.concat(floats, 0) if floats else tf.zeros([0], tf.float64)       # [S]
    jac = inner.jacobian(stacked, flat, unconnected_gradients="zero")                # [S, d]
  hess = outer.jacobian(jac, flat, unconnected_gradients="zero")                     # [S, d, d]
  correction = 0.5 * tf.einsum("sij,ij->s", hess, tf.cast(joint_cov, hess.dtype))   # [S]
  out, start = [], 0
  for v in leaves:
    if v.dtype.is_floating:
      size = int(np.prod(v.shape.as_list()))
      out.append(v + tf.reshape(tf.cast(correction[start:start + size], v.dtype), v.shape))
      start += size
    else:
      out.append(v)
  return tf.nest.pack_sequence_as(value, out)


def linear_gaussian_defect(jd, latents, observed: dict, n_directions: int = 3) -> float:
  """How far log p(observed, latents) is from quadratic in the latents.

  A function f is quadratic iff its second differences
  f(u + h) - 2 f(u) + f(u - h) = h^T H h do not depend on u. They are
  compared at u = 0 and at a random u1, along random directions h (2 + 4 n_directions
  evaluations of `log_prob`, no Hessian); returns
  max_h |D(0, h) - D(u1, h)| / max_h |D(0, h)| (0 for a linear-Gaussian
  model, up to round-off).
  """
  names = list(latents)
  shapes, sizes = flat_latents(jd, names)
  dtype = latent_dtypes(jd, names)[names[0]]
  rng = np.random.default_rng(0)
  d = sum(sizes)
  f = lambda u: float(jd.log_prob(**split_latents(tf.constant(u, dtype), names, shapes, sizes),
                                  **observed))
  points = [(u, f(u)) for u in (np.zeros(d), rng.standard_normal(d))]
  diffs = []
  for _ in range(n_directions):
    h = rng.standard_normal(d)
    diffs.append([f(u + h) - 2.0 * f_u + f(u - h) for u, f_u in points])
  diffs = np.array(diffs)                                          # [n_directions, 2]
  scale = float(np.max(np.abs(diffs[:, 0])))
  diff = float(np.max(np.abs(diffs[:, 0] - diffs[:, 1])))
  if not np.isfinite(diff):
    return float("inf")
  return diff / scale if scale > 0 else diff
