"""The NLL path for crossed factors: L-BFGS on the exact (restricted) marginal.

beta is profiled out by GLS; the variances are optimized in unconstrained
coordinates theta (`CovarianceCoordinates`): sigma_k for an intercept or
each effect of a diagonal Sigma_k, the Cholesky factor of a full Sigma_k,
and log sigma^2. The gradient is exact, from
the E-step by the Fisher identity (Louis 1982):

    d l / d Sigma_k   = 1/2 Sigma_k^-1 (S_k - q_k Sigma_k) Sigma_k^-1,  S_k = sum_l m m^T + B_k
    d l / d log sigma^2 = (||e||^2 + tr) / (2 sigma^2) - N / 2,

and, for REML, the same with the moments of u | y with beta latent (flat
prior), `crossed_posterior.profiled_posterior(reml=True)`.

#### References

[1] T. A. Louis. Finding the observed information matrix when using the EM
    algorithm. JRSS B, 44(2):226-233, 1982.
[2] J. C. Pinheiro and D. M. Bates. Unconstrained parametrizations for
    variance-covariance matrices. Statistics and Computing, 6:289-296, 1996.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import tensorflow as tf

from models import crossed_effects as ce
from tfp_em.engine.unconstrained import minimize_lbfgs, newton_steps
from tfp_em.mixed_effects.crossed_em import CrossedEffectsEM
from tfp_em.mixed_effects.crossed_posterior import covariance_matrices, profiled_posterior


class CovarianceCoordinates:
  """theta <-> (K covariances, sigma^2), and the chain rule for the gradient.

  As lme4's theta, on the natural scale: a standard deviation (of either
  sign) for an intercept or each effect of a diagonal Sigma_k, the Cholesky
  factor's lower triangle (diagonal of either sign) of a full Sigma_k; then
  log sigma^2. A variance near 0 is then no flat ridge (in log coordinates
  the gradient shrinks with the variance and L-BFGS stops early there).
  """

  def __init__(self, num_effects, diagonal: bool):
    self.num_effects = tuple(num_effects)
    self.by_sd = [d == 1 or diagonal for d in self.num_effects]

  def theta(self, covariances, noise_variance) -> np.ndarray:
    parts = []
    for cov, by_sd in zip(covariances, self.by_sd):
      parts.append(np.sqrt(np.diag(cov)) if by_sd
                   else np.linalg.cholesky(cov)[np.tril_indices(len(cov))])
    return np.concatenate(parts + [[np.log(noise_variance)]])

  def covariances(self, theta) -> tuple:
    """(list of K Sigma_k, their Cholesky factors, sigma^2)."""
    covs, chols, start = [], [], 0
    for d, by_sd in zip(self.num_effects, self.by_sd):
      if by_sd:
        covs.append(np.diag(theta[start:start + d] ** 2))
        chols.append(None)
        start += d
      else:
        chol = np.zeros((d, d))
        chol[np.tril_indices(d)] = theta[start:start + d * (d + 1) // 2]
        covs.append(chol @ chol.T)
        chols.append(chol)
        start += d * (d + 1) // 2
    return covs, chols, float(np.exp(theta[-1]))

  def gradient(self, theta, seconds, num_levels, residual_ss, num_obs) -> np.ndarray:
    """d l / d theta from the E-step's S_k [d_k, d_k] and ||e||^2 + tr."""
    covs, chols, sigma2 = self.covariances(theta)
    parts, start = [], 0
    for cov, chol, second, q in zip(covs, chols, seconds, num_levels):
      inv = np.linalg.inv(cov)
      grad_cov = 0.5 * inv @ (second - q * cov) @ inv                    # d l / d Sigma_k
      if chol is None:                                                   # Sigma_ii = theta_i^2
        parts.append(2. * np.diag(grad_cov) * theta[start:start + len(cov)])
      else:                                                              # Sigma = L L^T
        parts.append((2. * grad_cov @ chol)[np.tril_indices(len(cov))])
      start += len(parts[-1])
    return np.concatenate(parts + [[0.5 * (residual_ss / sigma2 - num_obs)]])


class ProfiledObjective:
  """theta -> l (ML or REML, `model.reml`) and its exact gradient, beta profiled by GLS."""

  def __init__(self, model: CrossedEffectsEM, data: ce.CrossedData):
    self.model = model
    self.x, self.y, self.z, self.ztz, self.num_levels = model.arrays(data)
    self.coords = CovarianceCoordinates(model.effects_of(len(self.num_levels)), model.diagonal)

  def theta(self, params: ce.CrossedParams) -> np.ndarray:
    covs = covariance_matrices(params.variances, self.num_levels, self.model.num_effects)
    return self.coords.theta(covs, float(params.noise_variance))

  def params(self, theta, dtype) -> ce.CrossedParams:
    """The variances at theta with beta_GLS."""
    beta, _, variances, sigma2 = self.profiled(theta)
    return ce.CrossedParams(beta=tf.constant(beta, dtype), variances=tf.constant(variances, dtype),
                            noise_variance=tf.constant(sigma2, dtype))

  def profiled(self, theta):
    """(beta_GLS, Posterior, packed variances, sigma^2) at theta.

    Raises:
      ValueError: beyond the exact factorization (log|P| is needed).
    """
    covs, _, sigma2 = self.coords.covariances(theta)
    variances = ce.pack_covariances(covs)
    beta, post = profiled_posterior(self.x, self.y, self.z, self.ztz, self.num_levels, variances,
                                    sigma2, self.model.max_dense, self.model.reml,
                                    self.model.num_effects)
    if not np.isfinite(post.log_prob):
      raise ValueError("the NLL path needs the exact factorization: more positions outside the "
                       f"largest factor than max_dense={self.model.max_dense}")
    return beta, post, variances, sigma2

  def __call__(self, theta):
    """(l, d l / d theta) at theta."""
    beta, post, variances, sigma2 = self.profiled(theta)
    stats, ll = CrossedEffectsEM.stats_from(post, self.x, self.z, self.num_levels, variances,
                                            sigma2, tf.constant(beta, tf.float64),
                                            self.model.num_effects)
    seconds = covariance_matrices(stats.second_moment.numpy(), self.num_levels,
                                  self.model.num_effects)
    grad = self.coords.gradient(theta, seconds, self.num_levels,
                                float(stats.ete) + float(stats.trace), float(len(self.y)))
    return float(ll), grad


def fit_nll(model: CrossedEffectsEM, data: ce.CrossedData, init_params: ce.CrossedParams,
            *, max_iter: int = 500, tol: float = 1e-12):
  """Maximizes the exact marginal (REML: l_R, for `model.reml`) by L-BFGS over
  theta, then `newton_steps`.

  Returns `(params, loglik, converged, num_evaluations)`; params.beta is GLS.

  Raises:
    ValueError: beyond the exact factorization (log|P| is needed).
  """
  objective = ProfiledObjective(model, data)
  result = maximize(objective, objective.theta(init_params), max_iter=max_iter, tol=tol)
  return (objective.params(result.theta, data.y.dtype), result.log_likelihood, result.converged,
          result.num_evaluations)


class Maximized(NamedTuple):
  theta: np.ndarray
  log_likelihood: float
  converged: bool          # L-BFGS's flag
  num_evaluations: int     # L-BFGS's objective evaluations
  num_iterations: int      # L-BFGS's iterations
  newton_steps: int


def maximize(objective: ProfiledObjective, theta0, *, max_iter: int = 500,
             tol: float = 1e-12, max_restarts: int = 3) -> Maximized:
  """L-BFGS from theta0 on -l / N, then `newton_steps`.

  L-BFGS stops on a small relative change of l, which along a flat ridge (a
  variance near 0 in log coordinates) can come early; it is restarted (a
  fresh curvature estimate) from where it stopped while that gains more than
  `tol` relative, at most `max_restarts` times.
  """
  n = float(len(objective.y))

  def value_and_gradient(u):  # numpy and scipy inside: runs eagerly
    ll, grad = objective(u.numpy())
    return tf.constant(-ll / n, tf.float64), tf.constant(-grad / n)

  theta, evaluations, iterations = np.asarray(theta0, np.float64), 0, 0
  for _ in range(max_restarts + 1):
    res = minimize_lbfgs(value_and_gradient, tf.constant(theta), max_iterations=max_iter,
                         tolerance=tol * 1e-2, f_relative_tolerance=tol, num_correction_pairs=20)
    evaluations += int(res.num_objective_evaluations)
    iterations += int(res.num_iterations)
    start_value = float(value_and_gradient(tf.constant(theta))[0])
    theta = res.position.numpy()
    if start_value - float(res.objective_value) <= tol * abs(float(res.objective_value)):
      break
  theta, ll, _, taken = newton_steps(objective, theta)
  return Maximized(theta, ll, bool(res.converged), evaluations, iterations, taken)
