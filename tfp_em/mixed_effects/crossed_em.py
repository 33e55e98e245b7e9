"""Exact EM and marginal-likelihood fits for crossed random intercepts.

The model is `models.crossed_effects`: y = X beta + sum_k Z_k u_k + eps; the
posterior of u and the marginal come from `crossed_posterior` (sparse, exact
up to `max_dense` levels outside the largest factor).

EM M-step (argmax of Q):

    beta      = (X^T X)^-1 X^T (y - Z m)
    sigma^2   = (||y - X beta - Z m||^2 + tr(Z^T Z P^-1)) / N
    sigma_k^2 = (||m_k||^2 + tr(P^-1)_kk) / q_k

with tr(Z^T Z P^-1) = sigma^2 (sum_k q_k - sum_k tr(P^-1)_kk / sigma_k^2). The
same E-step gives the exact gradient of the marginal (Fisher identity), which
the NLL path (`fit_nll`, LMMNN with linear f) feeds to L-BFGS over the log
variances with beta profiled out by GLS.

#### References

[1] N. M. Laird and J. H. Ware. Random-effects models for longitudinal data.
    Biometrics, 38(4):963-974, 1982.
[2] C. Liu, D. B. Rubin and Y. N. Wu. Parameter expansion to accelerate EM:
    the PX-EM algorithm. Biometrika, 85(4):755-770, 1998.
[3] G. Simchoni and S. Rosset. Using random effects to account for
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
from tfp_em.engine.unconstrained import Flattener, minimize_lbfgs
from tfp_em.mixed_effects.crossed_posterior import (MAX_DENSE, Posterior, design_matrix,
                                                    posterior, profiled_posterior)
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
  trace: tf.Tensor          # []     tr(Z^T Z P^-1)
  second_moment: tf.Tensor  # [K]    ||m_k||^2 + tr(P^-1)_kk
  mean_sum: tf.Tensor       # [K]    sum of m_k (for the PX-EM step)
  num_levels: tf.Tensor     # [K]    q_k
  num_obs: tf.Tensor        # []     N
  beta_ref: tf.Tensor       # [p]    shared


def update_variances(second_moment, num_levels):
  """sigma_k^2 = (||m_k||^2 + tr(P^-1)_kk) / q_k."""
  return second_moment / num_levels


def expected_log_joint(params: ce.CrossedParams, stats: CrossedStats):
  """Q(params | params_old) = E[log p(y, u | params)] under u | y, params_old."""
  d = params.beta - stats.beta_ref
  expected_ss = (stats.ete - 2. * tf.reduce_sum(d * stats.xte)
                 + tf.reduce_sum(d * tf.linalg.matvec(stats.xtx, d)) + stats.trace)
  log2pi = math.log(2. * math.pi)
  lik = -0.5 * (stats.num_obs * (log2pi + tf.math.log(params.noise_variance))
                + expected_ss / params.noise_variance)
  prior = -0.5 * tf.reduce_sum(stats.num_levels * (log2pi + tf.math.log(params.variances))
                               + stats.second_moment / params.variances)
  return lik + prior


def intercept_column(x) -> int | None:
  """Index of a column of x that is all ones, or None."""
  x = np.asarray(x)
  hits = np.flatnonzero(np.all(x == 1., axis=0)) if x.shape[0] else []
  return int(hits[0]) if len(hits) else None


class CrossedEffectsEM(EMModel):
  """EM for the linear mixed model with K crossed random intercepts.

  `data` is a `models.crossed_effects.CrossedData`. The E-step is sparse
  numpy/scipy work, so `compile` is 'eager'.

  Args:
    expand: add the PX-EM step (default True): the M-step also fits a mean
      mu_k of each u_k and moves sum_k mu_k into the intercept, which must be
      column `intercept` of x (ignored when `intercept` is None). Plain EM
      moves a common offset between the intercept and the u_k only by the
      shrinkage fraction per iteration.
    intercept: index of the all-ones column of x, or None (default).
    max_dense: exact-factorization limit on the levels outside the largest
      factor (default 8,000); beyond it the E-step uses CG and Hutchinson
      traces and the log-likelihood is NaN.
    num_probes: Hutchinson probes on that path (default 64).
  """
  name = "CrossedEffectsEM"
  compile = "eager"
  failure_hint = ("Check X for collinear columns and every grouping factor for at least "
                  "two levels; a variance that goes to 0 means the factor explains nothing.")

  def __init__(self, expand: bool = True, intercept: int | None = None,
               max_dense: int = MAX_DENSE, num_probes: int = 64):
    self.expand = bool(expand)
    self.intercept = intercept
    self.max_dense = int(max_dense)
    self.num_probes = int(num_probes)

  @property
  def param_specs(self) -> ce.CrossedParams:
    return ce.param_specs()

  def num_observations(self, data) -> float:
    return float(data.y.shape[0])

  def initialize(self, data: ce.CrossedData, seed: int) -> ce.CrossedParams:
    """OLS beta; the residual variance split equally between noise and factors.

    Each share is jittered by a factor in [0.5, 2] drawn from `seed`.
    """
    x, y = np.asarray(data.x), np.asarray(data.y)
    num_factors = int(data.num_levels.shape[0])
    beta = np.linalg.lstsq(x, y, rcond=None)[0] if x.shape[1] else np.zeros([0], y.dtype)
    var = max(float(np.var(y - x @ beta)), 1e-12)
    jitter = np.exp(np.random.default_rng(seed).uniform(-math.log(2.), math.log(2.),
                                                        num_factors + 1))
    share = var / (num_factors + 1)
    return ce.CrossedParams(beta=tf.constant(beta, y.dtype),
                            variances=tf.constant(share * jitter[:-1], y.dtype),
                            noise_variance=tf.constant(share * jitter[-1], y.dtype))

  def arrays(self, data):
    """(x, y float64, Z sparse [N, Q], Z^T Z csr, num_levels) of `data`."""
    x = np.asarray(data.x, np.float64)
    y = np.asarray(data.y, np.float64)
    num_levels = np.asarray(data.num_levels)
    z = design_matrix(np.asarray(data.codes), num_levels)
    return x, y, z, (z.T @ z).tocsr(), num_levels

  def posterior(self, params, data) -> Posterior:
    x, y, z, ztz, num_levels = self.arrays(data)
    return posterior(x, y, z, ztz, num_levels, np.asarray(params.beta, np.float64),
                     np.asarray(params.variances, np.float64),
                     float(params.noise_variance), self.max_dense, self.num_probes)

  def e_step(self, params, data):
    x, y, z, ztz, num_levels = self.arrays(data)
    variances = np.asarray(params.variances, np.float64)
    sigma2 = float(params.noise_variance)
    post = posterior(x, y, z, ztz, num_levels, np.asarray(params.beta, np.float64),
                     variances, sigma2, self.max_dense, self.num_probes)
    return self.stats_from(post, x, z, num_levels, variances, sigma2, params.beta)

  @staticmethod
  def stats_from(post: Posterior, x, z, num_levels, variances, sigma2, beta_ref):
    """(CrossedStats, loglik) from a posterior; tensors in beta_ref's dtype."""
    dtype = beta_ref.dtype
    factor_of = np.repeat(np.arange(len(num_levels)), num_levels)
    e = post.residual - z @ post.mean                                   # [N]
    trace = sigma2 * (float(np.sum(num_levels)) - float(np.sum(post.traces / variances)))
    t = lambda v: tf.constant(v, dtype)
    stats = CrossedStats(
        xtx=t(x.T @ x), xte=t(x.T @ e), ete=t(e @ e), trace=t(trace),
        second_moment=t(np.bincount(factor_of, post.mean ** 2, len(num_levels)) + post.traces),
        mean_sum=t(np.bincount(factor_of, post.mean, len(num_levels))),
        num_levels=t(num_levels.astype(np.float64)), num_obs=t(float(len(e))),
        beta_ref=beta_ref)
    return stats, t(post.log_prob)

  def m_step(self, params, stats: CrossedStats) -> ce.CrossedParams:
    beta, residual_ss = stats.beta_ref, stats.ete
    if stats.beta_ref.shape[0]:
      delta, drop = solve_beta(stats.xtx, stats.xte)
      beta, residual_ss = stats.beta_ref + delta, stats.ete - drop
    noise_variance = update_noise_variance(residual_ss, stats.trace, stats.num_obs)
    second_moment = stats.second_moment
    if self.expand and self.intercept is not None:
      mu = stats.mean_sum / stats.num_levels                             # [K]
      beta = tf.tensor_scatter_nd_add(beta, [[self.intercept]], [tf.reduce_sum(mu)])
      second_moment = second_moment - stats.num_levels * tf.square(mu)
    return ce.CrossedParams(beta=beta, variances=update_variances(second_moment, stats.num_levels),
                            noise_variance=noise_variance)

  def expected_log_joint(self, params, stats):
    return expected_log_joint(params, stats)

  def marginal_log_prob(self, params, data):
    return tf.constant(self.posterior(params, data).log_prob, data.y.dtype)

  def joint_distribution(self, params, data):
    return ce.joint_distribution(params, data)


# ---------------------------------------------------------------------------
# The NLL path: L-BFGS on the exact marginal, beta profiled out by GLS.

def fit_nll(model: CrossedEffectsEM, data: ce.CrossedData, init_params: ce.CrossedParams,
            *, max_iter: int = 500, tol: float = 1e-12):
  """Maximizes the exact marginal over log(sigma_k^2), log(sigma^2) by L-BFGS.

  beta is profiled out (GLS) and the gradient is exact, from the E-step by the
  Fisher identity: d l / d log sigma_k^2 = (||m_k||^2 + tr_k) / (2 sigma_k^2) - q_k / 2,
  d l / d log sigma^2 = (||e||^2 + tr(Z^T Z P^-1)) / (2 sigma^2) - N / 2.
  (The variances map to unconstrained space through Exp, `ce.param_specs`.)

  Returns `(params, loglik, converged, num_evaluations)`.
  """
  x, y, z, ztz, num_levels = model.arrays(data)
  n = float(len(y))
  specs = model.param_specs
  flat = Flattener(init_params._replace(beta=tf.zeros([0], data.y.dtype)),
                   specs._replace(beta=specs.beta._replace(trainable=False)), tf.float64)

  def profiled(u):
    params = flat.unflatten(tf.constant(u))
    variances, sigma2 = params.variances.numpy(), float(params.noise_variance)
    beta, post = profiled_posterior(x, y, z, ztz, num_levels, variances, sigma2, model.max_dense)
    return beta, post, variances, sigma2

  def value_and_gradient(u):  # numpy and scipy inside: runs eagerly
    beta, post, variances, sigma2 = profiled(u.numpy())
    stats, ll = CrossedEffectsEM.stats_from(post, x, z, num_levels, variances, sigma2,
                                            tf.constant(beta, tf.float64))
    grad = np.concatenate([
        0.5 * (stats.second_moment.numpy() / variances - num_levels),
        [0.5 * ((stats.ete.numpy() + stats.trace.numpy()) / sigma2 - n)]])
    return tf.constant(-float(ll) / n, tf.float64), tf.constant(-grad / n)

  res = minimize_lbfgs(value_and_gradient, flat.u_hat, max_iterations=max_iter,
                       tolerance=tol * 1e-2, f_relative_tolerance=tol, num_correction_pairs=20)
  beta, post, variances, sigma2 = profiled(res.position.numpy())
  dtype = data.y.dtype
  params = ce.CrossedParams(beta=tf.constant(beta, dtype), variances=tf.constant(variances, dtype),
                            noise_variance=tf.constant(sigma2, dtype))
  return params, post.log_prob, bool(res.converged), int(res.num_objective_evaluations)


def fit_em_large(model: CrossedEffectsEM, data: ce.CrossedData, init_params: ce.CrossedParams,
                 *, max_iter: int = 200, tol: float = 1e-4):
  """EM beyond the exact limit: CG means, Hutchinson traces, no log-likelihood.

  Not `fit_em`: without log p(y) (log|P| needs the exact factorization) there
  is no objective for its convergence test and monotonicity guard.

  The probes are the same at every iteration (seed 0), so the update is a
  deterministic map; it stops when every variance and sigma^2 moves by less
  than `tol` (relative). Returns `(params, num_iterations, trace_se [K])`,
  the standard errors of the last trace estimates.
  """
  x, y, z, ztz, num_levels = model.arrays(data)
  params = init_params
  for it in range(1, max_iter + 1):
    variances = np.asarray(params.variances, np.float64)
    sigma2 = float(params.noise_variance)
    post = posterior(x, y, z, ztz, num_levels, np.asarray(params.beta, np.float64), variances,
                     sigma2, model.max_dense, model.num_probes)
    stats, _ = model.stats_from(post, x, z, num_levels, variances, sigma2, params.beta)
    new = model.m_step(params, stats)
    old = np.append(variances, sigma2)
    change = np.abs(np.append(new.variances.numpy(), float(new.noise_variance)) - old) / old
    params = new
    if np.all(change < tol):
      break
  return params, it, post.trace_se
