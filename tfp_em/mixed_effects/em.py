"""EM for the linear mixed model of `models.mixed_effects`.

E-step, per cluster and batched with segment sums (no loop over clusters):

    P_i = Sigma_u^-1 + Z_i^T Z_i / sigma^2,   m_i = P_i^-1 Z_i^T r_i / sigma^2.

M-step (exact: the beta update does not depend on sigma^2, so updating beta,
then sigma^2 with the new beta, then Sigma_u, maximizes Q jointly):

    beta     = (X^T X)^-1 X^T (y - Z m)
    sigma^2  = (1/n) sum_i [ ||y_i - X_i beta - Z_i m_i||^2 + tr(Z_i^T Z_i P_i^-1) ]
    Sigma_u  = (1/G) sum_i (m_i m_i^T + P_i^-1)          (an outer product)

The M-step maths are small pure functions (`solve_beta`, `update_noise_variance`,
`update_covariance`), reused by the neural-network trainers; the model class
calls them through methods so that a test can override one step.

#### References

[1] N. M. Laird and J. H. Ware. Random-effects models for longitudinal data.
    Biometrics, 38(4):963-974, 1982.
[2] G. J. McLachlan and T. Krishnan. The EM Algorithm and Extensions, 2nd ed.,
    section 5.9. Wiley, 2008.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from models import mixed_effects as me
from tfp_em.engine import EMModel
from tfp_em.engine.compiling import compiled
from tfp_em.engine.unconstrained import Flattener, minimize_lbfgs, newton_steps
from tfp_em.verification.exact import marginalize_gaussian


class MixedEffectsStats(NamedTuple):
  """Expected sufficient statistics; sums over points or clusters.

  `beta_ref` is shared, not summed: the beta at which the residuals
  e = y - x beta_ref - z m were formed (the E-step's beta).
  """
  xtx: tf.Tensor           # [p, p] sum_j x_j x_j^T
  xte: tf.Tensor           # [p]    sum_j x_j e_j
  ete: tf.Tensor           # []     sum_j e_j^2
  trace: tf.Tensor         # []     sum_i tr(Z_i^T Z_i P_i^-1)
  second_moment: tf.Tensor  # [q, q] sum_i (m_i m_i^T + P_i^-1)
  num_clusters: tf.Tensor  # []     G
  num_obs: tf.Tensor       # []     n
  xtz: tf.Tensor           # [p, q] sum_j x_j z_j^T   (for the PX-EM step)
  ztz: tf.Tensor           # [q, q] sum_j z_j z_j^T   (for the PX-EM step)
  mean_sum: tf.Tensor      # [q]    sum_i m_i         (for the PX-EM step)
  beta_ref: tf.Tensor      # [p]    shared


# ---------------------------------------------------------------------------
# M-step maths as pure functions.

def solve_beta(xtx, xte):
  """Least-squares step delta = (X^T X)^-1 X^T e and the RSS drop e^T X delta."""
  delta = tf.linalg.cholesky_solve(tf.linalg.cholesky(xtx), xte[:, tf.newaxis])[:, 0]
  return delta, tf.reduce_sum(delta * xte)


def update_noise_variance(residual_ss, trace, num_obs):
  """sigma^2 = (||r - Z m||^2 + sum_i tr(Z_i^T Z_i P_i^-1)) / n."""
  return (residual_ss + trace) / num_obs


def update_covariance(second_moment, num_clusters, covariance_type: str):
  """Sigma_u = sum_i (m_i m_i^T + P_i^-1) / G, or its diagonal for 'diag'."""
  cov = second_moment / num_clusters
  return tf.linalg.diag_part(cov) if covariance_type == "diag" else cov


def posterior_second_moment(mean, covariance):
  """sum_i (m_i m_i^T + P_i^-1): the outer product of each [q] mean with itself."""
  outer = mean[:, :, tf.newaxis] * mean[:, tf.newaxis, :]               # [G, q, q]
  return tf.reduce_sum(outer + covariance, axis=0)


def trace_term(ztz, covariance):
  """sum_i tr(Z_i^T Z_i P_i^-1)."""
  return tf.reduce_sum(ztz * covariance)  # both symmetric: tr(AB) = sum(A * B)


def expected_log_prior(cov_u, second_moment, num_clusters):
  """sum_i E log N(u_i | 0, Sigma_u) given sum_i E[u_i u_i^T]."""
  q = tf.cast(tf.shape(cov_u)[-1], cov_u.dtype)
  chol = tf.linalg.cholesky(cov_u)
  logdet = 2. * tf.reduce_sum(tf.math.log(tf.linalg.diag_part(chol)))
  tr = tf.linalg.trace(tf.linalg.cholesky_solve(chol, second_moment))
  return -0.5 * (num_clusters * (q * math.log(2. * math.pi) + logdet) + tr)


def expected_log_likelihood(noise_variance, expected_ss, num_obs):
  """sum_j E log N(y_j | f_j + z_j^T u, sigma^2) given E||y - f - Z u||^2."""
  return -0.5 * (num_obs * (math.log(2. * math.pi) + tf.math.log(noise_variance))
                 + expected_ss / noise_variance)


# ---------------------------------------------------------------------------

class MixedEffectsEM(EMModel):
  """EM for the linear-f mixed model.

  `data` is a `models.mixed_effects.MixedEffectsData`; the fixed-effects
  design `x` must carry an intercept column if one is wanted. The stats add
  up over batches (streams, replicas) that each hold whole clusters numbered
  0..G_b-1 within the batch; `beta_ref` is shared, not summed.

  Args:
    covariance_type: 'full' (default) or 'diag' Sigma_u.
    compile: how `fit_em` runs the steps: 'graph' (default), 'xla' or 'eager'.
    expand: add the parameter-expansion step of PX-EM (default False). The
      M-step then also fits a mean mu of u_i and moves it into beta:
      beta += A mu with Z = X A, Sigma_u centred. It applies when every
      column of Z lies in the span of X (a random intercept with a fixed
      intercept; random slopes whose time terms are also fixed effects).
      l stays monotone and the fixed point is the same, but the update is no
      longer argmax Q of the original model (the M-step stationarity check
      does not apply). Plain EM moves a common offset between the fixed
      intercept and the u_i only by the shrinkage fraction per iteration,
      which takes thousands of iterations when clusters are large.

  #### References

  [1] C. Liu, D. B. Rubin and Y. N. Wu. Parameter expansion to accelerate EM:
      the PX-EM algorithm. Biometrika, 85(4):755-770, 1998.
  """
  name = "MixedEffectsEM"
  failure_hint = ("Check X for collinear columns and Z for columns that are constant "
                  "zero; use covariance='diag' or float64 if the random-effects "
                  "covariance collapses.")

  shared_stats_fields = ("beta_ref",)
  autograph = False  # no Python control flow on tensors: trace without converting source
  split_data = staticmethod(me.split_by_cluster)  # shards of whole clusters for tf.distribute

  def __init__(self, covariance_type: str = "full", compile: str = "graph",
               expand: bool = False):
    self.covariance_type = me.check_covariance_type(covariance_type)
    self.compile = compile
    self.expand = bool(expand)
    if self.expand:
      self.name = "MixedEffectsPXEM"

  @property
  def param_specs(self) -> me.MixedEffectsParams:
    return me.param_specs(self.covariance_type)

  def num_observations(self, data) -> float:
    return float(tf.shape(data.y)[0])

  def initialize(self, data: me.MixedEffectsData, seed: int) -> me.MixedEffectsParams:
    """OLS beta; half of the residual variance to noise, half to the random effects.

    The split is jittered by a factor in [0.5, 2] drawn from `seed`.
    """
    x, y, z = (np.asarray(t) for t in (data.x, data.y, data.z))
    dtype = y.dtype
    if x.shape[1]:
      beta = np.linalg.lstsq(x, y, rcond=None)[0]
    else:
      beta = np.zeros([0], dtype)
    resid = y - x @ beta
    var = max(float(np.var(resid)), np.finfo(dtype).tiny ** 0.5)
    jitter = np.exp(np.random.default_rng(seed).uniform(-math.log(2.), math.log(2.), 2))
    scale = np.maximum(np.mean(z * z, axis=0), 1e-12)                   # [q]
    cov = 0.5 * var * jitter[0] / scale
    if self.covariance_type == "full":
      cov = np.diag(cov)
    return me.MixedEffectsParams(
        beta=tf.constant(beta, dtype), covariance=tf.constant(cov, dtype),
        noise_variance=tf.constant(0.5 * var * jitter[1], dtype))

  # -- E-step ---------------------------------------------------------------
  def cluster_posterior(self, params, data, loc=None):
    """(ClusterPosterior, ClusterStats) of r = y - loc (loc defaults to x beta)."""
    loc = me.linear_loc(params, data) if loc is None else loc
    stats = me.cluster_stats(data.z, data.y - loc, data.cluster, data.num_clusters)
    cov_u = me.covariance_matrix(params.covariance, self.covariance_type)
    return me.cluster_posterior(cov_u, params.noise_variance, stats), stats

  def posterior(self, params, data):
    """{'u_mean': [G, q], 'u_cov': [G, q, q]}: u_i | y as the E-step computes it.

    Keys follow the latent `u` of `joint_distribution`.
    """
    post, _ = self.cluster_posterior(params, data)
    return {"u_mean": post.mean, "u_cov": post.covariance}

  def e_step(self, params, data):
    post, stats = self.cluster_posterior(params, data)
    return self.posterior_stats(params, data, post, stats), tf.reduce_sum(post.log_prob)

  def posterior_stats(self, params, data, post: me.ClusterPosterior,
                      stats: me.ClusterStats) -> MixedEffectsStats:
    """The E-step's `MixedEffectsStats` from the u_i posterior at `params`."""
    e = (data.y - me.linear_loc(params, data)
         - tf.reduce_sum(data.z * tf.gather(post.mean, data.cluster), -1))   # [N]
    dtype = data.y.dtype
    return MixedEffectsStats(
        xtx=tf.matmul(data.x, data.x, transpose_a=True),
        xte=tf.linalg.matvec(data.x, e, transpose_a=True),
        ete=tf.reduce_sum(tf.square(e)),
        trace=self._trace_term(stats.ztz, post.covariance),
        second_moment=self._second_moment(post.mean, post.covariance),
        num_clusters=tf.cast(data.num_clusters, dtype),
        num_obs=tf.cast(tf.shape(data.y)[0], dtype),
        xtz=tf.matmul(data.x, data.z, transpose_a=True),
        ztz=tf.matmul(data.z, data.z, transpose_a=True),
        mean_sum=tf.reduce_sum(post.mean, axis=0),
        beta_ref=params.beta)

  def _second_moment(self, mean, covariance):
    return posterior_second_moment(mean, covariance)

  def _trace_term(self, ztz, covariance):
    return trace_term(ztz, covariance)

  # -- M-step ---------------------------------------------------------------
  def m_step(self, params, stats: MixedEffectsStats) -> me.MixedEffectsParams:
    beta, residual_ss = self._update_beta(stats)
    noise_variance = self._update_noise_variance(stats, residual_ss)
    if self.expand and stats.beta_ref.shape[0]:
      beta, stats = self._expansion(beta, stats)
    return me.MixedEffectsParams(
        beta=beta, covariance=self._update_covariance(stats),
        noise_variance=noise_variance)

  def _expansion(self, beta, stats):
    """PX-EM reduction: mu = mean_i m_i, moved into beta (Z = X A).

    Applied only when every column of Z lies in the span of X (then the
    expanded M-step is exact); otherwise the step is plain EM.
    """
    a = tf.linalg.cholesky_solve(tf.linalg.cholesky(stats.xtx), stats.xtz)       # [p, q]
    explained = tf.linalg.diag_part(tf.matmul(stats.xtz, a, transpose_a=True))  # [q]
    total = tf.linalg.diag_part(stats.ztz)
    eps = np.finfo(stats.ztz.dtype.as_numpy_dtype).eps
    in_span = tf.reduce_all(total - explained <= math.sqrt(eps) * total)
    mu = tf.cast(in_span, total.dtype) * stats.mean_sum / stats.num_clusters  # [q]
    centred = stats.second_moment - stats.num_clusters * mu[:, None] * mu[None, :]
    return beta + tf.linalg.matvec(a, mu), stats._replace(second_moment=centred)

  def _update_beta(self, stats):
    """New beta and ||y - X beta_new - Z m||^2."""
    if stats.beta_ref.shape[0] == 0:
      return stats.beta_ref, stats.ete
    delta, drop = solve_beta(stats.xtx, stats.xte)
    return stats.beta_ref + delta, stats.ete - drop

  def _update_noise_variance(self, stats, residual_ss):
    return update_noise_variance(residual_ss, stats.trace, stats.num_obs)

  def _update_covariance(self, stats):
    return update_covariance(stats.second_moment, stats.num_clusters, self.covariance_type)

  # -- checks -----------------------------------------------------------------
  def expected_log_joint(self, params, stats: MixedEffectsStats):
    """Q(params | params_old) from the E-step stats at params_old."""
    d = params.beta - stats.beta_ref
    expected_ss = (stats.ete - 2. * tf.reduce_sum(d * stats.xte)
                   + tf.reduce_sum(d * tf.linalg.matvec(stats.xtx, d)) + stats.trace)
    cov_u = me.covariance_matrix(params.covariance, self.covariance_type)
    return (expected_log_likelihood(params.noise_variance, expected_ss, stats.num_obs)
            + expected_log_prior(cov_u, stats.second_moment, stats.num_clusters))

  def marginal_log_prob(self, params, data):
    return me.marginal_log_prob(params, data, self.covariance_type)

  def joint_distribution(self, params, data):
    """The TFP JointDistribution over (u [G, q], y [N]) at `params`."""
    return me.joint_distribution(params, data, self.covariance_type)

  def verification_oracle(self, params, data):
    """Exact log p(y) and posterior of u from the JointDistribution alone
    (Gaussian conditioning by autodiff, O((Gq)^3): small data only)."""
    return marginalize_gaussian(self.joint_distribution(params, data), ["u"], {"y": data.y})


def marginal_objective(model: MixedEffectsEM):
  """The compiled (u, template, data) -> (-l / N, its gradient [P]) of `model`'s
  marginal over the unconstrained params u [P] (`Flattener` of `template`).

  Cached per configuration (`engine.compiling.compiled`), with the data's rows
  unknown in the trace, so a fresh estimator's L-BFGS does not trace again.
  """
  def value_and_gradient(u, template, data):
    flat = Flattener(template, model.param_specs)
    with tf.GradientTape() as tape:
      tape.watch(u)
      loss = -model.marginal_log_prob(flat.unflatten(u), data) / _rows(data)
    return loss, tape.gradient(loss, u)
  return compiled(model, "marginal_objective", lambda m: value_and_gradient, "graph", data_arg=-1)


def unflattener(model: MixedEffectsEM):
  """The compiled (u, template) -> params of `Flattener(template, model.param_specs)`."""
  def unflatten(u, template):
    return Flattener(template, model.param_specs).unflatten(u)
  return compiled(model, "unflatten", lambda m: unflatten, "graph")


def _rows(data):
  """N as a tensor of y's dtype (inside a trace N may be unknown)."""
  return tf.cast(tf.shape(data.y)[0], data.y.dtype)


class MarginalFit(NamedTuple):
  """`maximize_marginal`'s result: l at the start and at the end, and the work done."""
  params: me.MixedEffectsParams
  log_likelihood: float
  start_log_likelihood: float
  iterations: int    # L-BFGS
  newton_steps: int
  converged: bool    # L-BFGS converged, or max |grad l| / N <= tol after the Newton steps


def maximize_marginal(model: MixedEffectsEM, data, start, *, max_iter: int = 500,
                      tol: float = 1e-10) -> MarginalFit:
  """Maximizes the exact marginal l over the unconstrained params from `start`:
  L-BFGS (SciPy's driver on the compiled `marginal_objective`), then
  `engine.unconstrained.newton_steps`. The start is flattened once and the
  result unflattened once; every l is the same compiled function's.

  The linear-f `method='nll'` path, and the polish after EM.
  """
  flat = Flattener(start, model.param_specs)
  dtype = flat.u_hat.dtype
  objective = marginal_objective(model)
  n_obs = float(_rows(data))

  def loglik(u):  # (l, grad l) at u [P] (numpy)
    loss, grad = objective(tf.constant(u, dtype), start, data)
    return -float(loss) * n_obs, -grad.numpy() * n_obs

  start_ll = loglik(flat.u_hat.numpy())[0]
  lbfgs = minimize_lbfgs(lambda u: objective(u, start, data), flat.u_hat,
                         max_iterations=max_iter, tolerance=tol,
                         f_relative_tolerance=tol * 1e-3, driver="scipy")
  u, ll, grad, taken = newton_steps(loglik, lbfgs.position.numpy())
  gradient = float(np.max(np.abs(grad), initial=0.)) / n_obs
  return MarginalFit(unflattener(model)(tf.constant(u, dtype), start), ll, start_ll,
                     int(lbfgs.num_iterations), taken,
                     bool(lbfgs.converged) or gradient <= tol)
