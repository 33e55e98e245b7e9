"""Exact EM for crossed (or nested) random-effect factors, ML or REML.

The model is `models.crossed_effects`: y = X beta + Z u + eps, factor k with
d_k effects per level (random intercepts: d_k = 1) and covariance Sigma_k;
the posterior of u and the marginal come from `crossed_posterior` (sparse,
exact up to `max_dense` positions outside the largest factor).

EM M-step (argmax of Q), with B_k the sum over levels of Cov[u_kl | y]:

    beta      = (X^T X)^-1 X^T (y - Z m)
    sigma^2   = (||y - X beta - Z m||^2 + tr(Z^T Z P^-1)) / N
    Sigma_k   = (sum_l m_kl m_kl^T + B_k) / q_k       (its diagonal for 'diag')

with tr(Z^T Z P^-1) = sigma^2 (Q - sum_k tr(Sigma_k^-1 B_k)). For REML
(`reml=True`) beta is latent under a flat prior: the E-step conditions on y
jointly over (beta, u), so m is taken at beta_GLS, B_k gains K A^-1 K^T
(`crossed_posterior.profiled_posterior`), the trace gains sigma^2 p, and the
objective is the restricted likelihood l_R. The NLL path is `crossed_nll`.

#### References

[1] N. M. Laird and J. H. Ware. Random-effects models for longitudinal data.
    Biometrics, 38(4):963-974, 1982.
[2] C. Liu, D. B. Rubin and Y. N. Wu. Parameter expansion to accelerate EM:
    the PX-EM algorithm. Biometrika, 85(4):755-770, 1998.
[3] N. M. Laird, N. Lange and D. Stram. Maximum likelihood computations with
    repeated measures: application of the EM algorithm. JASA,
    82(397):97-105, 1987.
[4] G. Simchoni and S. Rosset. Using random effects to account for
    high-cardinality categorical features and repeated measures in deep neural
    networks. NeurIPS, 2021.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from models import crossed_effects as ce
from tfp_em.engine import EMModel
from tfp_em.mixed_effects.crossed_posterior import (MAX_DENSE, Posterior, covariance_matrices,
                                                    design_matrix, factor_slices, posterior,
                                                    profiled_posterior)
from tfp_em.mixed_effects.em import solve_beta, update_noise_variance


# ---------------------------------------------------------------------------
# EM.

class CrossedStats(NamedTuple):
  """Expected sufficient statistics (sums over points and levels).

  `beta_ref` is shared: the beta at which e = y - X beta_ref - Z m was formed.
  """
  xtx: tf.Tensor            # [p, p] X^T X
  xte: tf.Tensor            # [p]    X^T e
  ete: tf.Tensor            # []     e^T e
  trace: tf.Tensor          # []     E tr of the fitted part's covariance: tr(Z^T Z P^-1) (ML)
  second_moment: tf.Tensor  # packed sum_l m_kl m_kl^T + B_k ([K] for intercepts)
  mean_sum: tf.Tensor       # [sum_k d_k] sum_l m_kl (for the PX-EM step)
  num_levels: tf.Tensor     # [K]    q_k
  num_obs: tf.Tensor        # []     N
  beta_ref: tf.Tensor       # [p]    shared


def diagonal_mask(num_effects) -> np.ndarray:
  """Packed 0/1 mask of the variances (the diagonals of the Sigma_k)."""
  return ce.pack_covariances([np.eye(d) for d in num_effects])


def update_variances(second_moment, num_levels, num_effects=None, diagonal: bool = False):
  """Sigma_k = (sum_l m_kl m_kl^T + B_k) / q_k, packed; `diagonal` keeps the variances only."""
  if num_effects is None:
    return second_moment / num_levels
  out = second_moment / tf.repeat(tf.cast(num_levels, second_moment.dtype),
                                  ce.packed_sizes(num_effects))
  return out * diagonal_mask(num_effects) if diagonal else out


def expected_log_joint(params: ce.CrossedParams, stats: CrossedStats, num_effects=None):
  """Q(params | params_old) = E[log p(y, u | params)] under u | y, params_old."""
  d = params.beta - stats.beta_ref
  expected_ss = (stats.ete - 2. * tf.reduce_sum(d * stats.xte)
                 + tf.reduce_sum(d * tf.linalg.matvec(stats.xtx, d)) + stats.trace)
  log2pi = math.log(2. * math.pi)
  lik = -0.5 * (stats.num_obs * (log2pi + tf.math.log(params.noise_variance))
                + expected_ss / params.noise_variance)
  num_effects = num_effects or (1,) * int(stats.num_levels.shape[0])
  covs = ce.covariance_blocks(params.variances, num_effects)
  seconds = ce.covariance_blocks(stats.second_moment, num_effects)
  prior = 0.
  for k, (cov, second) in enumerate(zip(covs, seconds)):
    prior -= 0.5 * (stats.num_levels[k] * (num_effects[k] * log2pi + tf.linalg.logdet(cov))
                    + tf.linalg.trace(tf.linalg.solve(cov, second)))
  return lik + prior


def intercept_column(x) -> int | None:
  """Index of a column of x that is all ones, or None."""
  x = np.asarray(x)
  hits = np.flatnonzero(np.all(x == 1., axis=0)) if x.shape[0] else []
  return int(hits[0]) if len(hits) else None


def matching_columns(x, effects, num_effects) -> tuple:
  """Per factor, the columns of x equal to its design's columns (a tuple of
  d_k indices), or None when one has no match: where PX-EM can move the
  mean of u_k into beta."""
  x, effects = np.asarray(x), np.asarray(effects)
  out, start = [], 0
  for d in num_effects:
    cols = []
    for j in range(start, start + d):
      hits = np.flatnonzero(np.all(x == effects[:, j:j + 1], axis=0))
      cols.append(int(hits[0]) if len(hits) else None)
    out.append(None if None in cols else tuple(cols))
    start += d
  return tuple(out)


class CrossedEffectsEM(EMModel):
  """EM for the linear mixed model with K crossed (or nested) grouping factors.

  `data` is a `models.crossed_effects.CrossedData`. The E-step is sparse
  numpy/scipy work, so `compile` is 'eager'.

  Args:
    expand: add the PX-EM step (default True): the M-step also fits a mean
      mu_k of each u_k and moves it into beta, where factor k's design
      columns are columns of x (`expand_columns`); plain EM moves a common
      offset between beta and the u_k only by the shrinkage fraction per
      iteration.
    intercept: index of the all-ones column of x, or None (default): for
      random-intercept factors when `expand_columns` is not given.
    max_dense: exact-factorization limit on the positions outside the
      largest factor (default 8,000); beyond it the E-step uses CG and
      Hutchinson traces and the log-likelihood is NaN.
    num_probes: Hutchinson probes on that path (default 64).
    num_effects: [K] d_k (default None: random intercepts).
    diagonal: Sigma_k diagonal (uncorrelated effects; default False).
    expand_columns: per factor, the columns of x matching its design
      (`matching_columns`), or None for a factor PX-EM leaves alone.
    reml: maximize the restricted likelihood (beta latent, flat prior).
  """
  name = "CrossedEffectsEM"
  compile = "eager"
  failure_hint = ("Check X for collinear columns and every grouping factor for at least "
                  "two levels; a variance that goes to 0 means the factor explains nothing.")

  def __init__(self, expand: bool = True, intercept: int | None = None,
               max_dense: int = MAX_DENSE, num_probes: int = 64, num_effects=None,
               diagonal: bool = False, expand_columns=None, reml: bool = False):
    self.expand = bool(expand)
    self.intercept = intercept
    self.max_dense = int(max_dense)
    self.num_probes = int(num_probes)
    self.num_effects = None if num_effects is None else tuple(int(d) for d in num_effects)
    self.diagonal = bool(diagonal)
    self.expand_columns = expand_columns
    self.reml = bool(reml)
    if reml:
      self.name = "CrossedEffectsREMLEM"

  @property
  def param_specs(self) -> ce.CrossedParams:
    return ce.param_specs(self.num_effects is None or max(self.num_effects) == 1)

  def effects_of(self, num_factors: int) -> tuple:
    """(d_1, ..., d_K)."""
    return self.num_effects or (1,) * num_factors

  def num_observations(self, data) -> float:
    return float(data.y.shape[0])

  def initialize(self, data: ce.CrossedData, seed: int) -> ce.CrossedParams:
    """OLS beta; the residual variance split equally between noise and factors
    (Sigma_k = share diag(1 / mean z_kj^2)).

    Each share is jittered by a factor in [0.5, 2] drawn from `seed`.
    """
    x, y = np.asarray(data.x), np.asarray(data.y)
    num_factors = int(data.num_levels.shape[0])
    beta = np.linalg.lstsq(x, y, rcond=None)[0] if x.shape[1] else np.zeros([0], y.dtype)
    var = max(float(np.var(y - x @ beta)), 1e-12)
    jitter = np.exp(np.random.default_rng(seed).uniform(-math.log(2.), math.log(2.),
                                                        num_factors + 1))
    share = var / (num_factors + 1)
    scale = np.mean(np.asarray(ce.effect_values(data), np.float64) ** 2, axis=0)  # [sum d]
    blocks, start = [], 0
    for k, d in enumerate(self.effects_of(num_factors)):
      blocks.append(np.diag(share * jitter[k] / np.maximum(scale[start:start + d], 1e-300)))
      start += d
    return ce.CrossedParams(beta=tf.constant(beta, y.dtype),
                            variances=tf.constant(ce.pack_covariances(blocks), y.dtype),
                            noise_variance=tf.constant(share * jitter[-1], y.dtype))

  def arrays(self, data):
    """(x, y float64, Z sparse [N, Q], Z^T Z csr, num_levels) of `data`."""
    x = np.asarray(data.x, np.float64)
    y = np.asarray(data.y, np.float64)
    num_levels = np.asarray(data.num_levels)
    effects = None if data.effects is None else np.asarray(data.effects, np.float64)
    z = design_matrix(np.asarray(data.codes), num_levels, effects, self.num_effects)
    return x, y, z, (z.T @ z).tocsr(), num_levels

  def posterior_at(self, params, arrays):
    """(Posterior, the beta it is conditioned at): params.beta (ML) or beta_GLS (REML)."""
    x, y, z, ztz, num_levels = arrays
    variances = np.asarray(params.variances, np.float64)
    sigma2 = float(params.noise_variance)
    if self.reml:
      beta, post = profiled_posterior(x, y, z, ztz, num_levels, variances, sigma2, self.max_dense,
                                      True, self.num_effects, self.num_probes)
      return post, tf.constant(beta, params.beta.dtype)
    post = posterior(x, y, z, ztz, num_levels, np.asarray(params.beta, np.float64), variances,
                     sigma2, self.max_dense, self.num_probes, num_effects=self.num_effects)
    return post, params.beta

  def posterior(self, params, data) -> Posterior:
    return self.posterior_at(params, self.arrays(data))[0]

  def e_step(self, params, data):
    arrays = self.arrays(data)
    post, beta_ref = self.posterior_at(params, arrays)
    x, _, z, _, num_levels = arrays
    return self.stats_from(post, x, z, num_levels, np.asarray(params.variances, np.float64),
                           float(params.noise_variance), beta_ref, self.num_effects)

  @staticmethod
  def stats_from(post: Posterior, x, z, num_levels, variances, sigma2, beta_ref,
                 num_effects=None):
    """(CrossedStats, loglik) from a posterior; tensors in beta_ref's dtype."""
    dtype = beta_ref.dtype
    e = post.residual - z @ post.mean                                   # [N]
    slices = factor_slices(num_levels, num_effects)
    covs = covariance_matrices(variances, num_levels, num_effects)
    precision_trace = sum(float(np.trace(np.linalg.solve(c, b))) for c, b in zip(covs, post.blocks))
    positions = sum(q * d for _, q, d in slices)
    trace = sigma2 * (post.num_latent_fixed + positions - precision_trace)
    means = [post.mean[start:start + q * d].reshape(q, d) for start, q, d in slices]
    t = lambda v: tf.constant(v, dtype)
    stats = CrossedStats(
        xtx=t(x.T @ x), xte=t(x.T @ e), ete=t(e @ e), trace=t(trace),
        second_moment=t(ce.pack_covariances([m.T @ m + b for m, b in zip(means, post.blocks)])),
        mean_sum=t(np.concatenate([m.sum(0) for m in means])),
        num_levels=t(np.asarray(num_levels, np.float64)), num_obs=t(float(len(e))),
        beta_ref=beta_ref)
    return stats, t(post.log_prob)

  def expansion(self, num_factors: int) -> tuple:
    """Per factor, the columns of x that PX-EM moves its mean into, or None."""
    if not self.expand:
      return (None,) * num_factors
    if self.expand_columns is not None:
      return tuple(self.expand_columns)
    return tuple((self.intercept,) if d == 1 and self.intercept is not None else None
                 for d in self.effects_of(num_factors))

  def m_step(self, params, stats: CrossedStats) -> ce.CrossedParams:
    beta, residual_ss = stats.beta_ref, stats.ete
    if stats.beta_ref.shape[0]:
      delta, drop = solve_beta(stats.xtx, stats.xte)
      beta, residual_ss = stats.beta_ref + delta, stats.ete - drop
    noise_variance = update_noise_variance(residual_ss, stats.trace, stats.num_obs)
    num_factors = int(stats.num_levels.shape[0])
    num_effects = self.effects_of(num_factors)
    seconds, start = [], 0
    blocks = ce.covariance_blocks(stats.second_moment, num_effects)
    for k, (d, cols, second) in enumerate(zip(num_effects, self.expansion(num_factors), blocks)):
      if cols is not None:
        mu = stats.mean_sum[start:start + d] / stats.num_levels[k]        # [d]
        beta = tf.tensor_scatter_nd_add(beta, [[c] for c in cols], mu)
        second = second - stats.num_levels[k] * mu[:, None] * mu[None, :]
      seconds.append(tf.gather_nd(second, np.stack(np.tril_indices(d), 1)))
      start += d
    variances = update_variances(tf.concat(seconds, 0), stats.num_levels, num_effects,
                                 self.diagonal)
    return ce.CrossedParams(beta=beta, variances=variances, noise_variance=noise_variance)

  def expected_log_joint(self, params, stats):
    return expected_log_joint(params, stats, self.num_effects)

  def marginal_log_prob(self, params, data):
    return tf.constant(self.posterior(params, data).log_prob, data.y.dtype)

  def joint_distribution(self, params, data):
    return ce.joint_distribution(params, data)


def fit_em_large(model: CrossedEffectsEM, data: ce.CrossedData, init_params: ce.CrossedParams,
                 *, max_iter: int = 200, tol: float = 1e-4):
  """EM beyond the exact limit: CG means, Hutchinson traces, no log-likelihood.

  Not `fit_em`: without log p(y) (log|P| needs the exact factorization) there
  is no objective for its convergence test and monotonicity guard.

  The probes are the same at every iteration (seed 0), so the update is a
  deterministic map; it stops when every variance and sigma^2 moves by less
  than `tol` (relative to the largest variance of its factor, so covariances
  near 0 do not stall it). Returns `(params, num_iterations, trace_se [K],
  converged)`, trace_se the standard errors of the last trace estimates.
  """
  arrays = model.arrays(data)
  x, _, z, _, num_levels = arrays
  num_effects = model.effects_of(len(num_levels))
  scale_of = np.repeat(np.arange(len(num_effects)), ce.packed_sizes(num_effects))
  params, converged, iterations, post = init_params, False, 0, None
  for iterations in range(1, max_iter + 1):
    variances = np.asarray(params.variances, np.float64)
    sigma2 = float(params.noise_variance)
    post, beta_ref = model.posterior_at(params, arrays)
    stats, _ = model.stats_from(post, x, z, num_levels, variances, sigma2, beta_ref,
                                model.num_effects)
    new = model.m_step(params, stats)
    scale = np.array([np.max(np.abs(variances[scale_of == k])) for k in range(len(num_effects))])
    change = np.append(np.abs(new.variances.numpy() - variances) / scale[scale_of],
                       abs(float(new.noise_variance) - sigma2) / sigma2)
    params, converged = new, bool(np.all(change < tol))
    if converged:
      break
  if post is None:  # max_iter=0: the start, with the trace errors there
    post, _ = model.posterior_at(params, arrays)
  return params, iterations, post.trace_se, converged
