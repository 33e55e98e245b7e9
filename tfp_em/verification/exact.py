"""Exact marginals and posteriors of a TFP JointDistribution, for the verifier.

These are the references the E-step is checked against. They use nothing but
the JointDistribution's `log_prob`, so they are independent of any hand-coded
update.

* `marginalize_discrete`: latents that are discrete and independent across
  data points given the parameters (mixture labels, Bernoulli hidden units).
  Either axis 0 of every latent indexes the data points, or the
  JointDistribution has batch shape [N]; the latents of one point are
  enumerated jointly (all `cardinality ** size` configurations).
* `marginalize_gaussian`: latents on which log p(observed, latents) is
  quadratic (linear-Gaussian models such as random effects). The posterior is
  Gaussian and one Newton step from anywhere lands on its mean, so
  conditioning needs only the gradient and Hessian of `log_prob`.

#### The enumeration trick

Let g_n(c) = log p(x_n, z_n = c | theta) (up to terms free of z_n), so that
log p(x, z) = sum_n g_n(z_n) + const when the latents factorize across points.
With the base configuration z = 0 everywhere and z^(n,c) equal to it except
z_n = c,

    Delta[n, c] = log p(x, z^(n,c)) - log p(x, 0) = g_n(c) - g_n(0),
    p(z_n = c | x) = softmax_c Delta[n, :],
    log p(x) = log p(x, 0) + sum_n logsumexp_c Delta[n, c].

All N * M evaluations run as one vectorized batch (`tf.vectorized_map`),
costing O(N^2 M) per call: use small data (a few hundred points) to verify.
The factorization is itself checked on a few pairs of points. A
JointDistribution with batch shape [N] gives g_n(c) directly, in M
evaluations.

#### References

[1] C. M. Bishop. Pattern Recognition and Machine Learning, sections 2.3.3
    (Gaussian conditioning) and 9.2 (mixtures). Springer, 2006.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import tensorflow as tf

GAUSSIAN = "gaussian"


class ExactPosterior(NamedTuple):
  """An exact reference computed from a JointDistribution.

  Attributes:
    log_prob: log p(observed | theta), a scalar tensor.
    posterior: dict of posterior quantities. Discrete latent `z`: `z` is
      [N, M] probabilities over the M configurations of one point (mixed
      radix, last element fastest) and `z_mean` is E[z | x], shape
      [N, *event]. Gaussian latent `u`: `u_mean` (shape of u) and `u_cov`
      ([size, size] over the flattened u).
    joint_cov: Gaussian latents: the covariance of all latents together,
      flattened and concatenated in order (None for discrete latents).
  """
  log_prob: tf.Tensor
  posterior: dict
  joint_cov: tf.Tensor | None = None


def _call_log_prob(jd, values):
  return jd.log_prob(**values)


def latent_shapes(jd, names):
  shapes = jd.event_shape
  if hasattr(shapes, "_asdict"):
    shapes = shapes._asdict()
  if not isinstance(shapes, dict):
    raise ValueError("the JointDistribution must name its variables (use "
                     "tfd.JointDistributionNamed or a named coroutine) so latents can be "
                     f"referred to by name; got event_shape {shapes}")
  missing = [n for n in names if n not in shapes]
  if missing:
    raise ValueError(f"latents {missing} are not variables of the JointDistribution "
                     f"(its variables: {sorted(shapes)})")
  out = {}
  for n in names:
    s = tf.TensorShape(shapes[n])
    if not s.is_fully_defined():
      raise ValueError(f"latent {n!r} must have a static event shape, got {s}")
    out[n] = s.as_list()
  return out


def latent_dtypes(jd, names):
  dtypes = jd.dtype
  if hasattr(dtypes, "_asdict"):
    dtypes = dtypes._asdict()
  return {n: dtypes[n] for n in names}


def configurations(latents, event_shapes):
  """Per-point configurations: {name: [M, *event] numpy}, M = prod of sizes."""
  sizes = {n: int(np.prod(event_shapes[n][1:], dtype=np.int64)) for n in latents}
  digits = [(n, latents[n]) for n in latents for _ in range(sizes[n])]
  total = int(np.prod([c for _, c in digits], dtype=np.int64)) if digits else 1
  if total > 4096:
    raise ValueError(f"enumerating {total} latent configurations per point is too many "
                     "for exact verification (limit 4096)")
  index = np.arange(total)
  columns = []
  for _, card in reversed(digits):          # mixed radix, last digit fastest
    columns.append(index % card)
    index = index // card
  columns = columns[::-1]
  out, start = {}, 0
  for n in latents:
    block = np.stack(columns[start:start + sizes[n]], axis=-1) if sizes[n] else np.zeros((total, 0))
    out[n] = block.reshape([total] + event_shapes[n][1:])
    start += sizes[n]
  return out, total


def one_point_batch(configs: dict, shapes: dict, n: int, m: int) -> dict:
  """{name: [N * M, *shape] numpy}: item (i, c) is zero except point i = configuration c."""
  eye = np.eye(n)
  batch = {}
  for k, cfg in configs.items():
    cfg = cfg.reshape(m, -1)                                         # [M, S]
    v = eye[:, None, :, None] * cfg[None, :, None, :]                # [N, M, N, S]
    batch[k] = v.reshape([n * m] + list(shapes[k]))
  return batch


def _enumeration(jd, latents, observed, check_factorization):
  """Returns (log p(x, 0) summed over points, Delta [N, M], configurations)."""
  names = list(latents)
  shapes = latent_shapes(jd, names)
  dtypes = latent_dtypes(jd, names)
  base = {k: tf.zeros(shapes[k], dtypes[k]) for k in names}
  lp_base = _call_log_prob(jd, {**base, **observed})
  if lp_base.shape.rank == 1:
    return _enumeration_batched(jd, latents, observed, shapes, dtypes, lp_base)
  n_points = {shapes[n][0] for n in names}
  if len(n_points) != 1:
    raise ValueError(f"all latents must share axis 0 (data points); shapes {shapes}")
  n = n_points.pop()
  configs, m = configurations(latents, {k: v for k, v in shapes.items()})

  batch = one_point_batch(configs, shapes, n, m)
  pairs = _factorization_probes(n, m) if (check_factorization and n > 1 and m > 1) else []
  for (i, ci, j, cj) in pairs:
    for k in names:
      cfg = configs[k].reshape(m, -1)
      v = np.zeros([1, n, cfg.shape[1]])
      v[0, i], v[0, j] = cfg[ci], cfg[cj]
      batch[k] = np.concatenate([batch[k], v.reshape([1] + shapes[k])], 0)
  batch = {k: tf.constant(v.astype(dtypes[k].as_numpy_dtype)) for k, v in batch.items()}

  def one(values):
    return _call_log_prob(jd, {**values, **observed})

  lp = tf.vectorized_map(one, batch, fallback_to_while_loop=True)    # [N*M + P]
  delta = tf.reshape(lp[:n * m], [n, m]) - lp_base                   # [N, M]
  if pairs:
    _check_factorization(lp[n * m:], delta, lp_base, pairs, n)
  return lp_base, delta, configs


def _enumeration_batched(jd, latents, observed, shapes, dtypes, lp_base):
  """JointDistributions with batch shape [N]: log_prob is already per point.

  Each configuration (the latent's whole event, e.g. all m hidden units) is
  broadcast over the points, so M evaluations give log p(x_n, z_n = c).
  """
  names = list(latents)
  configs, m = configurations(latents, {k: [1] + v for k, v in shapes.items()})
  batch = {k: tf.constant(configs[k].astype(dtypes[k].as_numpy_dtype)) for k in names}

  def one(values):
    return _call_log_prob(jd, {**values, **observed})

  lp = tf.transpose(tf.vectorized_map(one, batch, fallback_to_while_loop=True))  # [N, M]
  return tf.reduce_sum(lp_base), lp - lp_base[:, tf.newaxis], configs


def _factorization_probes(n, m):
  rng = np.random.default_rng(n * 7919 + m)
  probes = []
  for _ in range(2):
    i, j = rng.choice(n, 2, replace=False)
    probes.append((int(i), int(rng.integers(1, m)), int(j), int(rng.integers(1, m))))
  return probes


def _check_factorization(lp_pairs, delta, lp_base, pairs, n):
  if not tf.executing_eagerly():
    return
  for lp2, (i, ci, j, cj) in zip(lp_pairs.numpy(), pairs):
    expected = float(lp_base + delta[i, ci] + delta[j, cj])
    if not (np.isfinite(lp2) and np.isfinite(expected)):
      continue
    if abs(lp2 - expected) > 1e-8 * (abs(float(lp_base)) + n):
      raise ValueError(
          "the latents are not independent across data points given the parameters "
          f"(changing points {i} and {j} together is not the sum of changing each), so "
          "enumeration point by point is not exact; axis 0 of each latent must index "
          "independent data points")


def marginalize_discrete(joint, latents: dict, observed: dict,
                         check_factorization: bool = True) -> ExactPosterior:
  """Exact marginal log-prob and posterior of discrete latents by enumeration.

  Args:
    joint: a TFP JointDistribution with named variables, or a zero-argument
      callable returning one (e.g. `lambda: model(params)`).
    latents: {name: cardinality}; values in {0, ..., cardinality - 1}. Two
      layouts: (a) `log_prob` is a scalar and each latent's event shape is
      [N, *event], axis 0 indexing data points that are independent given the
      parameters; (b) the JointDistribution has batch shape [N] (`log_prob`
      returns [N]) and each latent's event is one point's latent. The latents
      of one point are enumerated jointly.
    observed: {name: value} for every other variable.
    check_factorization (default True): test on two pairs of points that the
      joint log-prob is additive across points, raising a `ValueError` if not.

  Returns:
    `ExactPosterior(log_prob, posterior)`; `posterior[name]` is [N, M]
    probabilities over per-point configurations and `posterior[name +
    '_mean']` is E[latent | observed].
  """
  jd = joint() if callable(joint) and not hasattr(joint, "log_prob") else joint
  if not latents:
    raise ValueError("latents must name at least one discrete latent variable")
  for k, c in latents.items():
    if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 2:
      raise ValueError(f"cardinality of latent {k!r} must be an integer >= 2, got {c!r}")
  lp_base, delta, configs = _enumeration(jd, latents, observed, check_factorization)
  log_norm = tf.reduce_logsumexp(delta, axis=-1)                     # [N]
  probs = tf.exp(delta - log_norm[:, tf.newaxis])                    # [N, M]
  posterior = {}
  for k in latents:
    posterior[k] = probs
    cfg = tf.constant(configs[k], probs.dtype)                       # [M, *event]
    posterior[k + "_mean"] = tf.tensordot(probs, cfg, axes=[[1], [0]])
  return ExactPosterior(lp_base + tf.reduce_sum(log_norm), posterior)


def expected_log_joint_discrete(joint, latents: dict, observed: dict, posterior):
  """Q = E_{z ~ posterior} log p(observed, z) for point-wise independent latents.

  `posterior` is [N, M] probabilities over configurations (the layout of
  `marginalize_discrete`). Differentiable in the parameters `joint` closes
  over; this is how the verifier derives Q when the user does not give one.
  """
  jd = joint() if callable(joint) and not hasattr(joint, "log_prob") else joint
  lp_base, delta, _ = _enumeration(jd, latents, observed, check_factorization=False)
  posterior = tf.cast(posterior, delta.dtype)
  return lp_base + tf.reduce_sum(posterior * delta)


# ----------------------------------------------------------------------------
# Gaussian latents.

def flat_latents(jd, names):
  shapes = latent_shapes(jd, names)
  sizes = [int(np.prod(shapes[n])) for n in names]
  return shapes, sizes


def split_latents(flat, names, shapes, sizes):
  parts = tf.split(flat, sizes)
  return {n: tf.reshape(p, shapes[n]) for n, p, in zip(names, parts)}


def log_prob_grad_hessian(jd, names, shapes, sizes, flat, observed):
  with tf.GradientTape() as outer:
    outer.watch(flat)
    with tf.GradientTape() as inner:
      inner.watch(flat)
      lp = _call_log_prob(jd, {**split_latents(flat, names, shapes, sizes), **observed})
    grad = inner.gradient(lp, flat)
  hess = outer.jacobian(grad, flat)
  return lp, grad, hess


def marginalize_gaussian(joint, latents, observed: dict) -> ExactPosterior:
  """Exact marginal and posterior for latents with a linear-Gaussian joint.

  When log p(y, u) is quadratic in u (Gaussian prior, observations linear in
  u with Gaussian noise), with H its (constant) Hessian in u:

      E[u | y] = u0 - H^{-1} grad(u0)   for any u0 (taken as 0),
      Cov[u | y] = -H^{-1},
      log p(y) = log p(y, E[u|y]) + (d/2) log(2 pi) - 0.5 log|-H|.

  Cost O(d^3) in the total latent size d: verify on a few clusters.

  Args:
    joint: JointDistribution with named variables, or a zero-argument callable.
    latents: the names of the Gaussian latents (a list, or a dict whose values
      are ignored).
    observed: {name: value} for every other variable.

  Returns:
    `ExactPosterior` with posterior `{u}_mean` (shape of u) and `{u}_cov`
    ([d_u, d_u] over the flattened u).
  """
  jd = joint() if callable(joint) and not hasattr(joint, "log_prob") else joint
  names = list(latents)
  shapes, sizes = flat_latents(jd, names)
  dtype = latent_dtypes(jd, names)[names[0]]
  zero = tf.zeros([sum(sizes)], dtype)
  _, grad, hess = log_prob_grad_hessian(jd, names, shapes, sizes, zero, observed)
  neg_h = -0.5 * (hess + tf.transpose(hess))
  chol = tf.linalg.cholesky(neg_h)
  mean = tf.linalg.cholesky_solve(chol, grad[:, tf.newaxis])[:, 0]  # u0 = 0
  cov = tf.linalg.cholesky_solve(chol, tf.eye(sum(sizes), dtype=dtype))
  lp_mode = _call_log_prob(jd, {**split_latents(mean, names, shapes, sizes), **observed})
  log_det = 2.0 * tf.reduce_sum(tf.math.log(tf.linalg.diag_part(chol)))
  d = float(sum(sizes))
  log_prob = lp_mode + 0.5 * d * math.log(2 * math.pi) - 0.5 * log_det
  posterior, start = {}, 0
  means = split_latents(mean, names, shapes, sizes)
  for n, s in zip(names, sizes):
    posterior[n + "_mean"] = means[n]
    posterior[n + "_cov"] = cov[start:start + s, start:start + s]
    start += s
  return ExactPosterior(log_prob, posterior, cov)


def expected_log_joint_gaussian(joint, latents, observed: dict, posterior: dict):
  """Q = E_{u ~ N(m, C)} log p(y, u) = log p(y, m) + 0.5 tr(H C), exact for quadratic log p.

  `posterior` holds `{u}_mean` and `{u}_cov` ([d_u, d_u] over flattened u,
  or [G, q, q] blocks when u has shape [G, q]) for each latent u.
  """
  jd = joint() if callable(joint) and not hasattr(joint, "log_prob") else joint
  names = list(latents)
  shapes, sizes = flat_latents(jd, names)
  dtype = latent_dtypes(jd, names)[names[0]]
  mean = tf.concat([tf.reshape(tf.cast(posterior[n + "_mean"], dtype), [-1]) for n in names], 0)
  lp, _, hess = log_prob_grad_hessian(jd, names, shapes, sizes, mean, observed)
  covs = [dense_covariance(tf.cast(posterior[n + "_cov"], dtype), s) for n, s in zip(names, sizes)]
  cov = tf.linalg.LinearOperatorBlockDiag(
      [tf.linalg.LinearOperatorFullMatrix(c) for c in covs]).to_dense()
  return lp + 0.5 * tf.linalg.trace(hess @ cov)


def dense_covariance(cov, size: int):
  """[size, size] from either a dense matrix or [G, q, q] diagonal blocks."""
  if cov.shape.rank == 3:
    return tf.linalg.LinearOperatorBlockDiag(
        [tf.linalg.LinearOperatorFullMatrix(c) for c in tf.unstack(cov)]).to_dense()
  return tf.reshape(cov, [size, size])
