"""Linear mixed model with K crossed random-intercept factors.

    u_k ~ N(0, sigma_k^2 I_{q_k})                          k = 1..K factors
    y = X beta + sum_k Z_k u_k + eps,   eps ~ N(0, sigma^2 I_N)

Z_k [N, q_k] has a single 1 per row (the level of point j in factor k), so
Z = [Z_1 ... Z_K] is sparse and the levels of different factors are crossed
(students x instructors). D = diag(sigma_k^2 I_{q_k}) is diagonal across
factors, as in LMMNN.

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
import functools
from typing import NamedTuple

import tensorflow as tf
import tensorflow_probability as tfp

from models.specs import ParamSpec

tfd = tfp.distributions
tfb = tfp.bijectors


class CrossedParams(NamedTuple):
  beta: tf.Tensor            # [p] fixed-effect coefficients
  variances: tf.Tensor       # [K] sigma_k^2, one per grouping factor
  noise_variance: tf.Tensor  # [] sigma^2


class CrossedData(NamedTuple):
  """One data set, as a tuple of tensors.

  Attributes:
    x: [N, p] fixed-effects design (carry an intercept column if one is wanted).
    y: [N] responses.
    codes: [N, K] int32 level of each point in each factor, in [0, q_k).
    num_levels: [K] int32 q_k.
  """
  x: tf.Tensor
  y: tf.Tensor
  codes: tf.Tensor
  num_levels: tf.Tensor


@functools.lru_cache(maxsize=None)  # bijectors built once per argument
def param_specs() -> CrossedParams:
  """beta unconstrained; the variances through Exp (the NLL path optimizes logs)."""
  return CrossedParams(beta=ParamSpec(True, tfb.Identity()),
                       variances=ParamSpec(True, tfb.Exp()),
                       noise_variance=ParamSpec(True, tfb.Exp()))


def linear_loc(params: CrossedParams, data: CrossedData):
  """x @ beta, shape [N]."""
  return tf.linalg.matvec(data.x, params.beta)


def dense_design(data: CrossedData):
  """Z = [Z_1 ... Z_K] as a dense [N, sum_k q_k] one-hot matrix (small data only)."""
  num_levels = [int(q) for q in tf.unstack(data.num_levels)]
  parts = [tf.one_hot(data.codes[:, k], q, dtype=data.y.dtype) for k, q in enumerate(num_levels)]
  return tf.concat(parts, axis=1)


def prior_variances(params: CrossedParams, data: CrossedData):
  """diag(D): sigma_k^2 repeated q_k times, shape [sum_k q_k]."""
  return tf.repeat(params.variances, data.num_levels)


def joint_distribution(params: CrossedParams, data: CrossedData):
  """JointDistribution over (u [sum_k q_k], y [N]); `data.y` is not used."""
  z = dense_design(data)
  loc = linear_loc(params, data)
  return tfd.JointDistributionNamed(dict(
      u=tfd.Independent(tfd.Normal(tf.zeros_like(z[0]), tf.sqrt(prior_variances(params, data))),
                        reinterpreted_batch_ndims=1),
      y=lambda u: tfd.Independent(tfd.Normal(loc + tf.linalg.matvec(z, u),
                                             tf.sqrt(params.noise_variance)),
                                  reinterpreted_batch_ndims=1)))


def dense_marginal(params: CrossedParams, data: CrossedData):
  """y ~ MVN(X beta, Z D Z^T + sigma^2 I) with the full N x N covariance (O(N^3) oracle)."""
  z = dense_design(data)
  cov = tf.matmul(z * prior_variances(params, data), z, transpose_b=True)
  cov += params.noise_variance * tf.eye(tf.shape(data.y)[0], dtype=z.dtype)
  return tfd.MultivariateNormalFullCovariance(loc=linear_loc(params, data), covariance_matrix=cov)


def dense_posterior(params: CrossedParams, data: CrossedData):
  """(mean, covariance) of u | y by conditioning the dense joint MVN of (u, y).

  Cov[u, y] = D Z^T and Cov[y] = V, so E[u | y] = D Z^T V^-1 (y - X beta) and
  Cov[u | y] = D - D Z^T V^-1 Z D. An oracle for small problems.
  """
  z = dense_design(data)
  d = prior_variances(params, data)
  marginal = dense_marginal(params, data)
  v = marginal.covariance()
  chol = tf.linalg.cholesky(v)
  cross = tf.transpose(z * d)                                          # [Q, N] D Z^T
  r = data.y - marginal.mean()
  mean = tf.linalg.matvec(cross, tf.linalg.cholesky_solve(chol, r[:, None])[:, 0])
  cov = tf.linalg.diag(d) - tf.matmul(cross, tf.linalg.cholesky_solve(chol, tf.transpose(cross)))
  return mean, cov
