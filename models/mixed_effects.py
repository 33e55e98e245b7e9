"""Linear mixed model with one grouping factor, as a TFP JointDistribution.

    u_i ~ MVN(0, Sigma_u)                                  i = 1..G clusters
    y_j | u ~ N(f(x_j) + z_j^T u_{c(j)}, sigma^2)          j = 1..N points

`f` is the fixed effect: `x_j^T beta` for a linear model (the params below),
or any mean vector `loc` (for instance a neural network's output) passed to the
functions that accept one. `z_j` [q] is the random-effects design of point j
(see the `*_design` builders) and `c(j)` its cluster.

The marginal is y_i ~ N(f(X_i), Z_i Sigma_u Z_i^T + sigma^2 I) per cluster. It
is evaluated exactly from the per-cluster sums Z_i^T Z_i, Z_i^T r_i, r_i^T r_i
and n_i (r = y - f), with the matrix determinant lemma and Woodbury:

    P_i = Sigma_u^-1 + Z_i^T Z_i / sigma^2                          [q, q]
    log|V_i| = log|Sigma_u| + log|P_i| + n_i log sigma^2
    r_i^T V_i^-1 r_i = (r_i^T r_i - r_i^T Z_i P_i^-1 Z_i^T r_i / sigma^2) / sigma^2

(computed as P_i^-1 = L M_i^-1 L^T, M_i = I + L^T Z_i^T Z_i L / sigma^2,
Sigma_u = L L^T, so that Sigma_u itself is never inverted)

so the cost is O(N q^2 + G q^3) and no n_i x n_i matrix is ever built. The
same P_i gives the posterior u_i | y ~ N(m_i, P_i^-1), m_i = P_i^-1 Z_i^T r_i /
sigma^2.

`covariance` has shape [q, q] for covariance type 'full' and [q] (the
variances) for 'diag'.

#### References

[1] N. M. Laird and J. H. Ware. Random-effects models for longitudinal data.
    Biometrics, 38(4):963-974, 1982.
[2] Y. Xiong, H. J. Kim and V. Singh. Mixed effects neural networks (MeNets)
    with applications to gaze estimation. CVPR, 2019.
[3] G. Simchoni and S. Rosset. Using random effects to account for
    high-cardinality categorical features and repeated measures in deep neural
    networks. NeurIPS, 2021.
"""
import math
import functools
from typing import NamedTuple

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from models.specs import ParamSpec

tfd = tfp.distributions
tfb = tfp.bijectors

COVARIANCE_TYPES = ("full", "diag")


class MixedEffectsParams(NamedTuple):
  beta: tf.Tensor            # [p] fixed-effect coefficients (p = 0 when f is not linear)
  covariance: tf.Tensor      # [q, q] ('full') or [q] ('diag'): Sigma_u
  noise_variance: tf.Tensor  # [] sigma^2


class MixedEffectsData(NamedTuple):
  """One data set, as a tuple of tensors.

  Attributes:
    x: [N, p] fixed-effects design (for linear f; [N, 0] otherwise).
    y: [N] responses.
    z: [N, q] random-effects design.
    cluster: [N] int32 cluster index in [0, num_clusters).
    num_clusters: [] int32, G.
  """
  x: tf.Tensor
  y: tf.Tensor
  z: tf.Tensor
  cluster: tf.Tensor
  num_clusters: tf.Tensor


def split_by_cluster(data: MixedEffectsData, num_shards: int) -> list:
  """`num_shards` MixedEffectsData of whole clusters, renumbered 0..G_s-1 in each.

  Clusters go in index order to contiguous shards with about equal numbers of
  rows; a shard may be empty when there are fewer clusters than shards.
  """
  cluster = np.asarray(data.cluster)
  counts = np.bincount(cluster, minlength=int(data.num_clusters))               # [G]
  ends = np.cumsum(counts)
  # shard of each cluster: where its first row falls among equal row blocks
  shard_of = np.minimum((ends - counts) * num_shards // max(len(cluster), 1), num_shards - 1)
  shards = []
  for s in range(num_shards):
    members = np.flatnonzero(shard_of == s)
    local = np.full(len(counts), -1)
    local[members] = np.arange(len(members))
    rows = np.flatnonzero(shard_of[cluster] == s)
    shards.append(MixedEffectsData(
        tf.gather(data.x, rows), tf.gather(data.y, rows), tf.gather(data.z, rows),
        tf.constant(local[cluster[rows]], data.cluster.dtype),
        tf.constant(len(members), data.num_clusters.dtype)))
  return shards


class ClusterStats(NamedTuple):
  """Per-cluster sufficient statistics of residuals r = y - f."""
  ztz: tf.Tensor     # [G, q, q] Z_i^T Z_i
  ztr: tf.Tensor     # [G, q]    Z_i^T r_i
  rtr: tf.Tensor     # [G]       r_i^T r_i
  counts: tf.Tensor  # [G]       n_i


class ClusterPosterior(NamedTuple):
  """u_i | y ~ N(mean_i, covariance_i) and the marginal log-likelihood."""
  mean: tf.Tensor        # [G, q]
  covariance: tf.Tensor  # [G, q, q] P_i^-1
  log_prob: tf.Tensor    # [G] log p(y_i | params)


def check_covariance_type(covariance_type: str) -> str:
  if covariance_type not in COVARIANCE_TYPES:
    raise ValueError(f"covariance must be one of {COVARIANCE_TYPES}, got {covariance_type!r}")
  return covariance_type


@functools.lru_cache(maxsize=None)  # bijectors built once per argument
def param_specs(covariance_type: str) -> MixedEffectsParams:
  """Specs with bijectors from unconstrained space for each parameter.

  'full' Sigma_u goes through its Cholesky factor (FillScaleTriL, positive
  diagonal via softplus); 'diag' variances and sigma^2 through softplus.
  """
  check_covariance_type(covariance_type)
  if covariance_type == "full":
    cov = tfb.Chain([tfb.CholeskyOuterProduct(), tfb.FillScaleTriL(diag_shift=None)])
  else:
    cov = tfb.Softplus()
  return MixedEffectsParams(
      beta=ParamSpec(True, tfb.Identity()),
      covariance=ParamSpec(True, cov),
      noise_variance=ParamSpec(True, tfb.Softplus()))


def covariance_matrix(covariance, covariance_type: str):
  """Sigma_u as a [q, q] matrix from the stored 'full' or 'diag' form."""
  if check_covariance_type(covariance_type) == "diag":
    return tf.linalg.diag(covariance)
  return covariance


# ---------------------------------------------------------------------------
# Random-effects designs z_j.

def intercept_design(num_points: int, dtype=np.float64) -> np.ndarray:
  """Random intercept: z_j = [1], shape [N, 1]."""
  return np.ones((num_points, 1), dtype=dtype)


def polynomial_design(time, degree: int) -> np.ndarray:
  """Random polynomial in time: z_j = [1, t_j, ..., t_j^degree], shape [N, degree+1]."""
  t = np.asarray(time)
  return np.stack([t ** k for k in range(degree + 1)], axis=-1)


def features_design(hidden):
  """MeNets design: z_j = [1, Gamma(x_j)], Gamma = a network's last hidden layer.

  Works on numpy arrays and tensors; shape [N, H] -> [N, H+1].
  """
  hidden = tf.convert_to_tensor(hidden)
  return tf.concat([tf.ones_like(hidden[:, :1]), hidden], axis=-1)


# ---------------------------------------------------------------------------
# Exact marginal and posterior from per-cluster sums.

def cluster_stats(z, residual, cluster, num_clusters) -> ClusterStats:
  """Segment sums of Z^T Z, Z^T r, r^T r and counts over clusters."""
  seg = lambda v: tf.math.unsorted_segment_sum(v, cluster, num_clusters)
  return ClusterStats(
      ztz=seg(z[:, :, tf.newaxis] * z[:, tf.newaxis, :]),
      ztr=seg(z * residual[:, tf.newaxis]),
      rtr=seg(tf.square(residual)),
      counts=seg(tf.ones_like(residual)))


def cluster_posterior(cov_u, noise_variance, stats: ClusterStats) -> ClusterPosterior:
  """Posterior of every u_i and log p(y_i) per cluster, batched over clusters.

  Args:
    cov_u: [q, q] Sigma_u.
    noise_variance: [] sigma^2.
    stats: `ClusterStats` of the residuals.

  Returns:
    A `ClusterPosterior`.
  """
  dtype = stats.ztr.dtype
  q = tf.shape(cov_u)[-1]
  eye = tf.eye(q, dtype=dtype)
  # In the relative form M_i = I + L^T Z_i^T Z_i L / sigma^2 (Sigma_u = L L^T), never
  # Sigma_u^-1: M_i has eigenvalues >= 1, so a nearly singular Sigma_u (a boundary fit)
  # costs no accuracy. P_i^-1 = L M_i^-1 L^T and |V_i| = sigma^(2 n_i) |M_i|.
  chol_u = tf.linalg.cholesky(cov_u)                                   # [q, q] L
  scaled = tf.matmul(tf.matmul(chol_u, stats.ztz, transpose_a=True), chol_u)  # [G, q, q]
  relative = eye + scaled / noise_variance                             # [G, q, q] M_i
  chol_m = tf.linalg.cholesky(relative)                                # [G, q, q]
  half = tf.linalg.triangular_solve(
      chol_m, tf.broadcast_to(tf.transpose(chol_u), tf.shape(relative)))  # [G, q, q] C^-1 L^T
  covariance = tf.matmul(half, half, transpose_a=True)                 # [G, q, q] L M^-1 L^T
  white = tf.linalg.matvec(half, stats.ztr)                            # [G, q] C^-1 L^T Z^T r
  mean = tf.linalg.matvec(half, white, transpose_a=True) / noise_variance  # [G, q]
  quad = (stats.rtr - tf.reduce_sum(tf.square(white), -1) / noise_variance) / noise_variance
  logdet_m = 2. * tf.reduce_sum(tf.math.log(tf.linalg.diag_part(chol_m)), -1)
  log_prob = -0.5 * (stats.counts * (math.log(2. * math.pi) + tf.math.log(noise_variance))
                     + logdet_m + quad)                                # [G]
  return ClusterPosterior(mean=mean, covariance=covariance, log_prob=log_prob)


def marginal_log_prob_per_cluster(params: MixedEffectsParams, data: MixedEffectsData,
                                  covariance_type: str, loc=None):
  """log p(y_i | params) for every cluster, shape [G].

  `loc` [N] overrides the linear mean `x @ beta` (e.g. a network's output).
  """
  loc = linear_loc(params, data) if loc is None else loc
  stats = cluster_stats(data.z, data.y - loc, data.cluster, data.num_clusters)
  cov_u = covariance_matrix(params.covariance, covariance_type)
  return cluster_posterior(cov_u, params.noise_variance, stats).log_prob


def marginal_log_prob(params, data, covariance_type: str, loc=None):
  """log p(y | params), summed over clusters (differentiable)."""
  return tf.reduce_sum(marginal_log_prob_per_cluster(params, data, covariance_type, loc))


class FixedEffectsPosterior(NamedTuple):
  """beta | y, theta under a flat prior: N(mean, A^-1), A = X^T V^-1 X (the GLS fit)."""
  mean: tf.Tensor              # [p] GLS beta
  information_chol: tf.Tensor  # [p, p] Cholesky factor of A
  xtx: tf.Tensor               # [G, p, p] X_i^T X_i
  xtz: tf.Tensor               # [G, p, q] X_i^T Z_i


def fixed_effects_posterior(params: MixedEffectsParams, data: MixedEffectsData,
                            covariance_type: str) -> FixedEffectsPosterior:
  """GLS beta and A = X^T V^-1 X = sum_i X_i^T V_i^-1 X_i from per-cluster sums.

  Woodbury per cluster: V_i^-1 = (I - Z_i P_i^-1 Z_i^T / sigma^2) / sigma^2,
  so A = sum_i (X_i^T X_i - X_i^T Z_i K_i) / sigma^2 with
  K_i = P_i^-1 Z_i^T X_i / sigma^2, and X^T V^-1 y likewise. `params.beta`
  is not used.
  """
  seg = lambda v: tf.math.unsorted_segment_sum(v, data.cluster, data.num_clusters)
  x, z = data.x, data.z
  xtx = seg(x[:, :, tf.newaxis] * x[:, tf.newaxis, :])                   # [G, p, p]
  xtz = seg(x[:, :, tf.newaxis] * z[:, tf.newaxis, :])                   # [G, p, q]
  xty = seg(x * data.y[:, tf.newaxis])                                   # [G, p]
  cov_u = covariance_matrix(params.covariance, covariance_type)
  post = cluster_posterior(cov_u, params.noise_variance,
                           cluster_stats(z, data.y, data.cluster, data.num_clusters))
  s2 = params.noise_variance
  k = tf.matmul(post.covariance, xtz, transpose_b=True) / s2            # [G, q, p]
  information = tf.reduce_sum(xtx - tf.matmul(xtz, k), axis=0) / s2      # [p, p]
  information = 0.5 * (information + tf.transpose(information))
  score = tf.reduce_sum(xty - tf.linalg.matvec(xtz, post.mean), axis=0) / s2  # [p]
  chol = tf.linalg.cholesky(information)
  mean = tf.linalg.cholesky_solve(chol, score[:, tf.newaxis])[:, 0]
  return FixedEffectsPosterior(mean=mean, information_chol=chol, xtx=xtx, xtz=xtz)


def restricted_log_prob(params: MixedEffectsParams, data: MixedEffectsData,
                        covariance_type: str):
  """The REML criterion / -2: log p(y | theta) with beta integrated out under a flat prior,

      l_R(theta) = l(theta, beta_GLS) - 1/2 log|X^T V^-1 X| + p/2 log(2 pi),

  lme4's and statsmodels' restricted log-likelihood. A function of the
  variances only: `params.beta` is not used (beta_GLS is profiled).

  #### References

  [1] D. A. Harville. Maximum likelihood approaches to variance component
      estimation and to related problems. JASA, 72(358):320-338, 1977.
  """
  fixed = fixed_effects_posterior(params, data, covariance_type)
  ml = marginal_log_prob(params._replace(beta=fixed.mean), data, covariance_type)
  p = tf.cast(tf.shape(fixed.mean)[0], ml.dtype)
  half_logdet = tf.reduce_sum(tf.math.log(tf.linalg.diag_part(fixed.information_chol)))
  return ml - half_logdet + 0.5 * p * math.log(2. * math.pi)


def linear_loc(params: MixedEffectsParams, data: MixedEffectsData):
  """x @ beta, shape [N]."""
  return tf.linalg.matvec(data.x, params.beta)


# ---------------------------------------------------------------------------
# The generative model, and a dense oracle for checks on small data.

def joint_distribution(params: MixedEffectsParams, data: MixedEffectsData,
                       covariance_type: str, loc=None):
  """JointDistribution over (u [G, q], y [N]) given the designs in `data`.

  `data.y` is not used: it is what the model generates.
  """
  loc = linear_loc(params, data) if loc is None else loc
  cov_u = covariance_matrix(params.covariance, covariance_type)
  scale = tf.sqrt(params.noise_variance)
  return tfd.JointDistributionNamed(dict(
      u=tfd.Sample(tfd.MultivariateNormalTriL(
          loc=tf.zeros_like(cov_u[0]), scale_tril=tf.linalg.cholesky(cov_u)),
          sample_shape=[data.num_clusters]),
      y=lambda u: tfd.Independent(tfd.Normal(
          loc=loc + tf.reduce_sum(data.z * tf.gather(u, data.cluster), -1),
          scale=scale), reinterpreted_batch_ndims=1)))


def dense_marginal(params: MixedEffectsParams, data: MixedEffectsData,
                   covariance_type: str, loc=None):
  """y ~ MVN(f, Z_blk Sigma_u Z_blk^T + sigma^2 I) with the full N x N covariance.

  An oracle for checks on small data only (O(N^3)).
  """
  loc = linear_loc(params, data) if loc is None else loc
  cov_u = covariance_matrix(params.covariance, covariance_type)
  same = tf.cast(tf.equal(data.cluster[:, tf.newaxis], data.cluster[tf.newaxis, :]),
                 data.z.dtype)                                           # [N, N]
  cov = same * tf.matmul(tf.matmul(data.z, cov_u), data.z, transpose_b=True)
  cov += params.noise_variance * tf.eye(tf.shape(data.y)[0], dtype=data.z.dtype)
  return tfd.MultivariateNormalFullCovariance(loc=loc, covariance_matrix=cov)
