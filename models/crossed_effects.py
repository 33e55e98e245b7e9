"""Linear mixed model with K crossed (or nested) grouping factors.

    u_kl ~ N(0, Sigma_k)   [d_k]  level l = 1..q_k of factor k = 1..K
    y_n = x_n^T beta + sum_k z_kn^T u_{k, level_k(n)} + eps_n,   eps ~ N(0, sigma^2)

Factor k has d_k random effects with design z_k [N, d_k] (`CrossedData.effects`,
the K designs side by side; None: random intercepts, z_k = 1, d_k = 1) and
covariance Sigma_k [d_k, d_k]. Z = [Z_1 ... Z_K] is sparse: row n of Z_k holds
z_kn at the d_k columns of its level (u_k is level-major: position l d_k + j).
D = blockdiag_k(I_{q_k} (x) Sigma_k). With intercepts only, Sigma_k = sigma_k^2
and D is diagonal, as in LMMNN.

`CrossedParams.variances` packs the lower triangles of the Sigma_k row by row,
factor after factor (`pack_covariances`, `covariance_blocks`): the K variances
sigma_k^2 for intercepts.

This module holds the params, their specs and dense TFP oracles (the
JointDistribution over (u, y) and the N x N marginal MVN) for checks on small
problems. The sparse exact E-step and marginal are in
`tfp_em.crossed_effects`.

#### References

[1] D. Bates, M. Maechler, B. Bolker and S. Walker. Fitting linear
    mixed-effects models using lme4. J. Stat. Softw., 67(1), 2015.
[2] G. Simchoni and S. Rosset. Using random effects to account for
    high-cardinality categorical features and repeated measures in deep neural
    networks. NeurIPS, 2021.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np

import tensorflow as tf
import tensorflow_probability as tfp

from models.specs import ParamSpec

tfd = tfp.distributions
tfb = tfp.bijectors


class CrossedParams(NamedTuple):
  beta: tf.Tensor            # [p] fixed-effect coefficients
  variances: tf.Tensor       # [sum_k d_k (d_k + 1) / 2] packed Sigma_k ([K] sigma_k^2 for intercepts)
  noise_variance: tf.Tensor  # [] sigma^2


class CrossedData(NamedTuple):
  """One data set, as a tuple of tensors.

  Attributes:
    x: [N, p] fixed-effects design (carry an intercept column if one is wanted).
    y: [N] responses.
    codes: [N, K] int32 level of each point in each factor, in [0, q_k).
    num_levels: [K] int32 q_k.
    effects: [N, sum_k d_k] the K random-effects designs z_k side by side, or
      None (default) for random intercepts.
    num_effects: [K] int32 d_k, or None (default) for random intercepts.
  """
  x: tf.Tensor
  y: tf.Tensor
  codes: tf.Tensor
  num_levels: tf.Tensor
  effects: tf.Tensor | None = None
  num_effects: tf.Tensor | None = None


def effect_counts(data: CrossedData) -> tuple:
  """(d_1, ..., d_K) as Python ints."""
  if data.num_effects is None:
    return (1,) * int(data.num_levels.shape[0])
  return tuple(int(d) for d in np.asarray(data.num_effects))


def effect_values(data: CrossedData):
  """[N, sum_k d_k] the random-effects designs (ones for intercepts)."""
  if data.effects is None:
    return tf.ones([tf.shape(data.y)[0], int(data.num_levels.shape[0])], data.y.dtype)
  return data.effects


def symmetric_index(d: int) -> np.ndarray:
  """[d, d] position of Sigma[i, j] in its packed lower triangle (row by row)."""
  i, j = np.maximum.outer(np.arange(d), np.arange(d)), np.minimum.outer(np.arange(d), np.arange(d))
  return i * (i + 1) // 2 + j


def packed_sizes(num_effects) -> list:
  """[K] d_k (d_k + 1) / 2."""
  return [d * (d + 1) // 2 for d in num_effects]


def covariance_blocks(packed, num_effects) -> list:
  """The K covariances Sigma_k [d_k, d_k] from the packed vector (tensors)."""
  packed = tf.convert_to_tensor(packed)
  total, out, start = sum(packed_sizes(num_effects)), [], 0
  for d, size in zip(num_effects, packed_sizes(num_effects)):
    select = np.eye(total)[start + symmetric_index(d).reshape(-1)]           # [d * d, total]
    # A matvec, not tf.gather: its gradient is a dense tensor.
    out.append(tf.reshape(tf.linalg.matvec(tf.constant(select, packed.dtype), packed), [d, d]))
    start += size
  return out


def pack_covariances(blocks) -> np.ndarray:
  """Inverse of `covariance_blocks`: the lower triangles row by row (numpy)."""
  parts = [np.asarray(b, np.float64)[np.tril_indices(np.shape(b)[0])] for b in blocks]
  return np.concatenate(parts) if parts else np.zeros(0)


@functools.lru_cache(maxsize=None)  # bijectors built once per argument
def param_specs(intercepts_only: bool = True) -> CrossedParams:
  """beta unconstrained; the variances through Exp (the NLL path optimizes logs).

  With random slopes the packed covariances hold off-diagonal entries of any
  sign, so `variances` is Identity there (no SQUAREM in these coordinates).
  """
  return CrossedParams(beta=ParamSpec(True, tfb.Identity()),
                       variances=ParamSpec(True, tfb.Exp() if intercepts_only else tfb.Identity()),
                       noise_variance=ParamSpec(True, tfb.Exp()))


def linear_loc(params: CrossedParams, data: CrossedData):
  """x @ beta, shape [N]."""
  return tf.linalg.matvec(data.x, params.beta)


def dense_design(data: CrossedData):
  """Z = [Z_1 ... Z_K] as a dense [N, sum_k q_k d_k] matrix (small data only)."""
  num_levels = [int(q) for q in tf.unstack(data.num_levels)]
  values, parts, start = effect_values(data), [], 0
  for k, (q, d) in enumerate(zip(num_levels, effect_counts(data))):
    one_hot = tf.one_hot(data.codes[:, k], q, dtype=data.y.dtype)             # [N, q]
    block = one_hot[:, :, None] * values[:, None, start:start + d]            # [N, q, d]
    parts.append(tf.reshape(block, [-1, q * d]))
    start += d
  return tf.concat(parts, axis=1)


def prior_covariance(params: CrossedParams, data: CrossedData):
  """D = blockdiag_k(I_{q_k} (x) Sigma_k), dense [Q, Q] (small data only)."""
  blocks = covariance_blocks(params.variances, effect_counts(data))
  ops = [tf.linalg.LinearOperatorKronecker([
      tf.linalg.LinearOperatorIdentity(int(q), dtype=params.variances.dtype),
      tf.linalg.LinearOperatorFullMatrix(b)]) for q, b in zip(tf.unstack(data.num_levels), blocks)]
  return tf.linalg.LinearOperatorBlockDiag(ops).to_dense()


def joint_distribution(params: CrossedParams, data: CrossedData):
  """JointDistribution over (u [Q], y [N]); `data.y` is not used."""
  z = dense_design(data)
  loc = linear_loc(params, data)
  return tfd.JointDistributionNamed(dict(
      u=tfd.MultivariateNormalFullCovariance(tf.zeros_like(z[0]), prior_covariance(params, data)),
      y=lambda u: tfd.Independent(tfd.Normal(loc + tf.linalg.matvec(z, u),
                                             tf.sqrt(params.noise_variance)),
                                  reinterpreted_batch_ndims=1)))


def dense_marginal(params: CrossedParams, data: CrossedData):
  """y ~ MVN(X beta, Z D Z^T + sigma^2 I) with the full N x N covariance (O(N^3) oracle)."""
  z = dense_design(data)
  cov = tf.matmul(z, tf.matmul(prior_covariance(params, data), z, transpose_b=True))
  cov += params.noise_variance * tf.eye(tf.shape(data.y)[0], dtype=z.dtype)
  return tfd.MultivariateNormalFullCovariance(loc=linear_loc(params, data), covariance_matrix=cov)


def dense_restricted_log_prob(params: CrossedParams, data: CrossedData):
  """REML's l_R = log int p(y | beta) d beta (flat prior), from the dense V (oracle).

  l_R = log N(y; X beta_GLS, V) - 1/2 log|X^T V^-1 X| + (p/2) log 2 pi.
  """
  marginal = dense_marginal(params, data)
  chol = tf.linalg.cholesky(marginal.covariance())
  vx = tf.linalg.cholesky_solve(chol, data.x)                                   # [N, p]
  info = tf.matmul(data.x, vx, transpose_a=True)                               # [p, p]
  beta = tf.linalg.solve(info, tf.linalg.matvec(vx, data.y, adjoint_a=True)[:, None])[:, 0]
  at_gls = dense_marginal(params._replace(beta=beta), data).log_prob(data.y)
  p = int(data.x.shape[1])
  return at_gls - 0.5 * tf.linalg.logdet(info) + 0.5 * p * math.log(2. * math.pi)


def dense_posterior(params: CrossedParams, data: CrossedData):
  """(mean, covariance) of u | y by conditioning the dense joint MVN of (u, y).

  Cov[u, y] = D Z^T and Cov[y] = V, so E[u | y] = D Z^T V^-1 (y - X beta) and
  Cov[u | y] = D - D Z^T V^-1 Z D. An oracle for small problems.
  """
  z = dense_design(data)
  d = prior_covariance(params, data)                                   # [Q, Q]
  marginal = dense_marginal(params, data)
  v = marginal.covariance()
  chol = tf.linalg.cholesky(v)
  cross = tf.matmul(d, z, transpose_b=True)                            # [Q, N] D Z^T
  r = data.y - marginal.mean()
  mean = tf.linalg.matvec(cross, tf.linalg.cholesky_solve(chol, r[:, None])[:, 0])
  cov = d - tf.matmul(cross, tf.linalg.cholesky_solve(chol, tf.transpose(cross)))
  return mean, cov
