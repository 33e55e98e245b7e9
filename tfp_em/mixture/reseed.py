"""Empty mixture components: detection and re-seeding.

A component whose responsibilities all underflow (N_k -> 0) cannot come back
under EM: its M-step keeps it where it was, with weight ~eps and covariance
`reg_covar * I` (with `reg_covar=0` the covariance is singular and the fit
stops with a `NumericalFailureError` naming reg_covar). `GaussianMixture.fit`
therefore checks the fitted weights: a component holding less than
`MIN_COUNT` of an average point's weight is re-seeded at the point the
mixture explains worst (lowest log p(x_n)), with the covariance of the whole
data set and one point's weight, and EM continues from there. This is
reported with an `EmptyComponentWarning`; the continued fit is kept only if
its log-likelihood is at least that of the fit with the empty component.

#### References

[1] G. J. McLachlan and D. Peel. Finite Mixture Models, section 2.11. Wiley,
    2000.
"""
from __future__ import annotations

import warnings

import numpy as np
import tensorflow as tf

from models.gaussian_mixture import GaussianMixtureParams
from tfp_em.engine import default_decrease_tol
from tfp_em.mixture.missing import fill_column_means

MIN_COUNT = 1e-3  # in units of an average point's weight


class EmptyComponentWarning(UserWarning):
  """A mixture component lost all its points during EM and was re-seeded."""


def empty_components(weights, sample_weight) -> np.ndarray:
  """[K] bool: pi_k * sum(w) < MIN_COUNT * mean(w)."""
  w = np.asarray(sample_weight, np.float64)
  return np.asarray(weights, np.float64) * w.sum() < MIN_COUNT * w.mean()


def data_covariance(x, sample_weight, covariance_type: str, reg_covar: float):
  """Weighted covariance of all the data in the shape of one component."""
  x = np.asarray(x, np.float64)
  w = np.asarray(sample_weight, np.float64)
  xc = x - np.average(x, axis=0, weights=w)
  cov = (w[:, None] * xc).T @ xc / w.sum() + reg_covar * np.eye(x.shape[1])  # [D, D]
  return {"full": cov, "diag": np.diag(cov), "spherical": np.mean(np.diag(cov)),
          "tied": None}[covariance_type]


def reseed(params: GaussianMixtureParams, log_prob_components, x, sample_weight, empty,
           covariance_type: str, reg_covar: float) -> GaussianMixtureParams:
  """Params with each empty component moved to one of the worst-fitted points.

  Args:
    params: fitted params.
    log_prob_components: `(params, x) -> [N, K]` log w_k + log N(x_n | k).
    x: [N, D] data; sample_weight: [N].
    empty: [K] bool, from `empty_components`.
    covariance_type, reg_covar: of the mixture.
  """
  dtype = params.means.dtype
  w = np.asarray(sample_weight, np.float64)
  lp = tf.reduce_logsumexp(log_prob_components(params, tf.constant(x, dtype)), -1).numpy()
  lp = np.where(w > 0, lp, np.inf)                      # only points that count
  worst = np.argsort(lp, kind="stable")[:int(empty.sum())]
  weights = np.array(params.weights, np.float64)
  means = np.array(params.means, np.float64)
  covariances = np.array(params.covariances, np.float64)
  cov = data_covariance(x, w, covariance_type, reg_covar)
  for k, n in zip(np.flatnonzero(empty), worst):
    means[k] = x[n]
    weights[k] = w[n] / w.sum()
    if cov is not None:
      covariances[k] = cov
  weights /= weights.sum()
  return GaussianMixtureParams(tf.constant(weights, dtype), tf.constant(means, dtype),
                               tf.constant(covariances, dtype))


def revive_empty(result, model, data, refit, n_components: int, covariance_type: str,
                 reg_covar: float):
  """`result` with each empty component re-seeded and EM continued, up to K times.

  Each continuation (`refit(model, data, params)`, a `FitResult`) is appended to
  `result.restarts` and kept if its log-likelihood is not lower; one
  `EmptyComponentWarning` per re-seeding says what happened.

  Args:
    result: the fit's `FitResult`. model, data: its EM model and in-memory
      `MixtureData`. covariance_type: the covariances' layout
      (`models.gaussian_mixture.covariance_layout`).
  """
  w = data.weights.numpy()
  x = fill_column_means(data.x.numpy(), w)  # a re-seeded mean must be finite
  for _ in range(n_components):
    empty = empty_components(result.params.weights, w)
    if not empty.any():
      break
    params = reseed(result.params, model.log_prob_components, x, w, empty, covariance_type,
                    reg_covar)
    more = refit(model, data, params)
    slack = default_decrease_tol(x.dtype) * (abs(result.log_likelihood) + w.sum())
    kept = more.log_likelihood >= result.log_likelihood - slack
    warnings.warn(
        f"GaussianMixture: component(s) {np.flatnonzero(empty).tolist()} lost all their "
        f"points (N_k below {MIN_COUNT} of a point); re-seeded at the worst-fitted "
        f"point(s) and EM continued: log-likelihood {result.log_likelihood:.8g} -> "
        f"{more.log_likelihood:.8g}" + ("" if kept else
                                        "; kept the fit with the empty component"),
        EmptyComponentWarning, stacklevel=4)
    if not kept:
      break
    result = result._replace(
        params=more.params, log_likelihood=more.log_likelihood,
        n_iter=result.n_iter + more.n_iter, converged=more.converged,
        best_restart=len(result.restarts), restarts=result.restarts + more.restarts)
  return result


def warn_empty_streamed(result) -> None:
  """Streamed fits are not re-seeded (that needs the data in memory): warn only."""
  weights = np.asarray(result.params.weights)
  empty = np.flatnonzero(weights * result.num_observations < MIN_COUNT)
  if empty.size:
    warnings.warn(f"GaussianMixture: component(s) {empty.tolist()} lost all their points; "
                  "streamed fits are not re-seeded: refit with another seed or fewer "
                  "components", EmptyComponentWarning, stacklevel=4)
