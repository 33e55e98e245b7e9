"""`CrossedEffectsRegressor`: linear mixed models with K crossed (or nested) factors.

    y = x^T beta + sum_k z_k^T u_k[level_k] + eps,  u_kl ~ N(0, Sigma_k),  eps ~ N(0, sigma^2)

z_k = 1 (random intercepts, Sigma_k = sigma_k^2) unless `Z[k]` gives factor
k's design (random slopes, e.g. [1, t]). Fitted by maximum likelihood or REML,
with exact sparse EM (`method='em'`, PX-EM step, optionally SQUAREM for
intercepts) or L-BFGS on the exact (restricted) marginal (`method='nll'`).
The maths is in `crossed_em`, `crossed_nll` and `crossed_posterior`.

Prediction rule, for each factor independently: a level seen in `fit` adds
z_k^T E[u_k | y_train]; an unseen level adds 0 (the prior mean).

`MixedEffectsRegressor.fit(X, y, clusters=[g1, g2, ...])` dispatches here
through `fit_crossed` when given K >= 2 grouping factors.
"""
from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg as sla
import tensorflow as tf
from sklearn.base import BaseEstimator, RegressorMixin

from models import crossed_effects as ce
from tfp_em.engine import ConvergenceWarning, fit_em
from tfp_em.engine import inputs as val
from tfp_em.mixed_effects.crossed_em import CrossedEffectsEM, fit_em_large, matching_columns
from tfp_em.mixed_effects.crossed_networks import fit_estimator
from tfp_em.mixed_effects.crossed_nll import ProfiledObjective, fit_nll, maximize
from tfp_em.mixed_effects.crossed_posterior import (MAX_DENSE, covariance_matrices, exact_limit_ok,
                                                    profiled_posterior)
from tfp_em.mixed_effects.crossed_predictions import CrossedPredictions, PosteriorPrecision
from tfp_em.mixed_effects.labels import encode_factors
from tfp_em.mixed_effects.linear_fit import POLISH_MAX_ITER, Polish, fit_converged
from tfp_em.mixed_effects.names import crossed_random_names
from tfp_em.mixed_effects.singular import warn_if_singular

METHODS = ("em", "nll")


class CrossedEffectsRegressor(RegressorMixin, CrossedPredictions, BaseEstimator):
  """Linear f with K crossed (or nested) grouping factors: random intercepts,
  or slopes given per factor by `fit(..., Z=[z_1, ..., z_K])`.

  Args:
    method: 'em' (default; exact EM with the PX-EM step) or 'nll' (L-BFGS
      on the exact marginal over the log variances, beta profiled by GLS).
    fit_intercept: add an intercept column (default True).
    max_iter: EM iterations or L-BFGS iterations (default 1000).
    tol: EM: relative tolerance on the mean log-likelihood; NLL: L-BFGS's
      relative tolerance on the objective (default 1e-10).
    seed: integer seed for the initial variance split (default 0).
    dtype: 'float64' (default) or 'float32' for the returned parameters (the
      sparse algebra runs in float64).
    accelerate: None (default) or 'squarem' (EM only).
    max_dense: exact-factorization limit (default 8,000 levels outside the
      largest factor; see `crossed_posterior`). Beyond it 'em' runs
      `fit_em_large` (CG means, Hutchinson traces; tol floored at 1e-6 on the
      relative change of the variances; log_likelihood_ is NaN) and 'nll'
      raises.
    on_decrease: `fit_em`'s guard: 'warn' (default), 'raise' or 'revert'.
    covariance: 'full' (default) or 'diag': Sigma_k of a factor with several
      effects, correlated or not.
    reml: fit by REML (beta latent under a flat prior; default False).

  Attributes (after fit):
    coef_, intercept_: fixed effects.
    covariances_: list of K Sigma_k [d_k, d_k], on the boundary (variance
      0, correlation +-1) where lme4's rule finds a singular fit
      (`singular_`, one `SingularFitWarning` naming the components; the
      other attributes stay at the interior point the fit reached).
    variances_: their diagonals side by side ([K] sigma_k^2 for intercepts).
    sigma2_: noise variance.
    levels_: list of K arrays of labels seen in fit; blups_: list of K arrays
      of E[u_k | y] in the same order ([q_k] for an intercept, [q_k, d_k]).
    log_likelihood_: marginal log-likelihood at the returned params (REML:
      the restricted log-likelihood l_R).
    num_effects_: (d_1, ..., d_K).  intercepts_: per factor, whether it
      was a random intercept (Z[k] None).
    fixed_effects_covariance_: [p, p] (X^T V^-1 X)^-1 at the fitted
      variances, intercept first (by CG solves beyond the exact limit).
    fit_result_: `engine.FitResult` (EM only; None for 'nll').
    polish_: `linear_fit.Polish` of the L-BFGS and Newton steps on the
      profiled marginal that finished EM (`crossed_nll.maximize`; EM's
      ConvergenceWarning is dropped when they converge); None for 'nll'
      (which is those steps) and beyond the exact limit.
    n_iter_: EM iterations or L-BFGS function evaluations.
    converged_: whether the fit met its stopping test: EM's tolerance or the
      polish's (`linear_fit.fit_converged`), L-BFGS's for 'nll', the change
      of the variances beyond the exact limit; False: it ran max_iter.
    trace_se_: [K] standard errors of the Hutchinson trace estimates of the
      last E-step (zeros when the factorization was exact).
  """

  def __init__(self, method: str = "em", fit_intercept: bool = True, max_iter: int = 1000,
               tol: float = 1e-10, seed: int = 0, dtype="float64", accelerate=None,
               max_dense: int = MAX_DENSE, on_decrease: str = "warn", covariance: str = "full",
               reml: bool = False):
    self.method = method
    self.fit_intercept = fit_intercept
    self.max_iter = max_iter
    self.tol = tol
    self.seed = seed
    self.dtype = dtype
    self.accelerate = accelerate
    self.max_dense = max_dense
    self.on_decrease = on_decrease
    self.covariance = covariance
    self.reml = reml

  def _design(self, X):
    if self.fit_intercept:
      return np.concatenate([np.ones((X.shape[0], 1), X.dtype), X], axis=1)
    return X

  def _boundary(self, covariances, dtype):
    """(the K Sigma_k with boundary components set on the boundary, whether any
    was): lme4's rule on the relative Cholesky factor (`singular.boundary_fit`)
    applied to blockdiag(Sigma_1, ..., Sigma_K), with one `SingularFitWarning`."""
    names = [f"clusters[{k}] {name}" for k, factor in enumerate(crossed_random_names(self))
             for name in factor]
    found, boundary = warn_if_singular(sla.block_diag(*covariances), self.sigma2_, names)
    out, start = [], 0
    for cov in covariances:
      out.append(boundary[start:start + len(cov), start:start + len(cov)].astype(dtype))
      start += len(cov)
    return out, bool(found)

  def fixed_part(self, X):
    """x^T beta, [n]."""
    X = val.check_features(self, X, reset=False, dtype=np.float64)
    return self.intercept_ + X @ np.asarray(self.coef_, np.float64)

  def effects_design(self, n: int, Z=None):
    """[n, sum_k d_k] the K random-effects designs of new rows (ones for intercepts)."""
    return checked_effects(Z, n, len(self.levels_), self.num_effects_)

  def fit(self, X, y, clusters, Z=None):
    """Fits the model.

    Args:
      X: [n, p] fixed-effects features.  y: [n] responses.
      clusters: a list of K label arrays, one per factor, each [n].
      Z: None (random intercepts) or a list of K random-effects designs, each
        [n, d_k] or None for an intercept: e.g. [np.column_stack([ones, t]), None]
        for (1 + t | g1) + (1 | g2).
    """
    val.check_option("method", self.method, METHODS)
    val.check_option("covariance", self.covariance, ("full", "diag"))
    if not isinstance(self.reml, (bool, np.bool_)):
      raise ValueError(f"reml must be True or False, got {self.reml!r}")
    val.check_int("max_iter", self.max_iter, minimum=0)
    val.check_float("tol", self.tol, minimum=0.)
    val.check_seed(self.seed)
    val.check_int("max_dense", self.max_dense, minimum=0)
    dtype = val.check_dtype(self.dtype)
    X = val.check_features(self, X, reset=True, dtype=np.float64)
    y = val.check_array(y, "y", ndim=1, dtype=np.float64)
    if y.shape[0] != X.shape[0]:
      raise ValueError(f"y has length {y.shape[0]} but X has {X.shape[0]} rows")
    levels, codes = encode_factors(clusters, X.shape[0])
    x = self._design(X)
    num_effects = design_widths(Z, len(levels))
    effects = checked_effects(Z, X.shape[0], len(levels), num_effects)
    slopes = max(num_effects) > 1
    if slopes and self.accelerate is not None:
      raise ValueError("accelerate='squarem' covers random intercepts on several factors; "
                       "with random slopes use accelerate=None")
    sizes = [len(v) for v in levels]
    data = ce.CrossedData(tf.constant(x), tf.constant(y), tf.constant(codes),
                          tf.constant(sizes, tf.int32),
                          tf.constant(effects) if slopes else None,
                          tf.constant(num_effects, tf.int32) if slopes else None)
    model = CrossedEffectsEM(
        intercept=0 if self.fit_intercept else None, max_dense=self.max_dense,
        num_effects=num_effects if slopes else None, diagonal=self.covariance == "diag",
        expand_columns=matching_columns(x, effects, num_effects), reml=bool(self.reml))
    init = model.initialize(data, self.seed)
    self.fit_result_, self.polish_ = None, None
    self.trace_se_ = np.zeros(len(levels))
    if not exact_limit_ok(sizes, self.max_dense, num_effects):  # beyond the exact factorization
      if self.method == "nll":
        raise ValueError("method='nll' needs the exact factorization: the levels (times effects) "
                         f"outside the largest factor exceed max_dense={self.max_dense}; "
                         "use method='em' (CG and Hutchinson traces) or raise max_dense")
      params, self.n_iter_, self.trace_se_, converged = fit_em_large(
          model, data, init, max_iter=self.max_iter, tol=max(self.tol, 1e-6))
      self.log_likelihood_ = float("nan")
    elif self.method == "em":
      with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fit_em(model, data, max_iter=self.max_iter, tol=self.tol, seed=self.seed,
                        init_params=init, on_decrease=self.on_decrease,
                        accelerate=self.accelerate, keep_trajectory=False)
      self.fit_result_, self.n_iter_ = result, result.n_iter
      # EM crawls in flat directions and towards a boundary: finish by L-BFGS and Newton steps
      objective = ProfiledObjective(model, data)
      polish = maximize(objective, objective.theta(result.params), max_iter=POLISH_MAX_ITER,
                        tol=self.tol)
      params = objective.params(polish.theta, data.y.dtype)
      self.log_likelihood_ = polish.log_likelihood
      self.polish_ = Polish(polish.num_iterations, polish.newton_steps,
                            max(polish.log_likelihood - result.log_likelihood, 0.),
                            polish.converged)
      converged = fit_converged(result.converged, self.polish_)
      for w in caught:  # EM's ConvergenceWarning is moot when the polish converged
        if not (issubclass(w.category, ConvergenceWarning) and polish.converged):
          warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    else:
      params, self.log_likelihood_, converged, self.n_iter_ = fit_nll(
          model, data, init, max_iter=self.max_iter, tol=self.tol)
    self.converged_ = bool(converged)
    packed = np.asarray(params.variances, np.float64)
    _, _, z, ztz, _ = model.arrays(data)
    beta, post = profiled_posterior(x, y, z, ztz, np.array(sizes), packed,  # beta_GLS, BLUPs
                                    float(params.noise_variance), self.max_dense, False,
                                    model.num_effects)
    params = params._replace(beta=tf.constant(beta, params.beta.dtype))
    self.fixed_effects_covariance_ = post.fixed_covariance
    self.num_effects_ = num_effects
    self.intercepts_ = tuple(Z is None or z is None for z in (Z or [None] * len(levels)))
    self.levels_ = levels
    self.blups_, start = [], 0
    for q, d in zip(sizes, num_effects):
      block = post.mean[start:start + q * d].astype(dtype)
      self.blups_.append(block if d == 1 else block.reshape(q, d))
      start += q * d
    beta = np.asarray(params.beta, np.float64)
    self.intercept_ = float(beta[0]) if self.fit_intercept else 0.
    self.coef_ = beta[1:].astype(dtype) if self.fit_intercept else beta.astype(dtype)
    self.sigma2_ = float(params.noise_variance)
    self.covariances_, self.singular_ = self._boundary(covariance_matrices(packed, sizes,
                                                                          num_effects), dtype)
    self.variances_ = np.concatenate([np.diag(c) for c in self.covariances_])
    self.precision_ = PosteriorPrecision(ztz, np.array(sizes), packed, self.sigma2_,
                                         self.max_dense, np.array(num_effects) if slopes else None)
    return self


def design_widths(Z, num_factors: int) -> tuple:
  """(d_1, ..., d_K) of the designs Z (None, or a list with None for intercepts)."""
  if Z is None:
    return (1,) * num_factors
  if not isinstance(Z, (list, tuple)) or len(Z) != num_factors:
    raise ValueError(f"Z must be None or a list of {num_factors} random-effects designs, one per "
                     "grouping factor ([n, d_k] arrays, None for a random intercept)")
  return tuple(1 if z is None else (np.shape(z)[1] if np.ndim(z) == 2 else 1) for z in Z)


def checked_effects(Z, n: int, num_factors: int, num_effects) -> np.ndarray:
  """[n, sum_k d_k] the designs side by side (ones for intercepts), checked.

  Raises:
    ValueError: for a design of the wrong shape or width, or non-finite values.
  """
  if Z is None:
    if max(num_effects) > 1:
      raise ValueError(f"Z is needed: the fit had random slopes ({list(num_effects)} effects "
                       "per factor)")
    return np.ones((n, num_factors))
  if design_widths(Z, num_factors) != tuple(num_effects):
    raise ValueError(f"Z has {list(design_widths(Z, num_factors))} columns per factor; the fit "
                     f"had {list(num_effects)}")
  parts = []
  for k, z in enumerate(Z):
    if z is None:
      parts.append(np.ones((n, 1)))
      continue
    z = val.check_array(z, f"Z[{k}]", ndim=2, dtype=np.float64)
    if z.shape[0] != n:
      raise ValueError(f"Z[{k}] has {z.shape[0]} rows but X has {n}")
    parts.append(z)
  return np.concatenate(parts, axis=1)


def fit_crossed(estimator, X, y, clusters, time=None, Z=None, valid=None):
  """`MixedEffectsRegressor.fit` with K >= 2 grouping factors.

  Linear f: fits a `CrossedEffectsRegressor` with the same options into
  `estimator.crossed_` and copies its results (coef_, intercept_, sigma2_,
  log_likelihood_, variances_, covariances_, fit_result_, n_iter_,
  converged_) onto `estimator`;
  random_effects='custom' takes Z as a list of K designs (None for an
  intercept). A network f (`network_` built, X and y checked, `valid` the
  checked validation data or None): `crossed_networks.fit_estimator` (MeNets
  EM or LMMNN NLL), random intercepts only.
  """
  network = estimator.f is not None
  if network and estimator.random_effects != "intercept":
    raise ValueError("a network f with several grouping factors takes random intercepts only "
                     f"(random_effects='intercept'), got {estimator.random_effects!r}")
  if estimator.random_effects not in ("intercept", "custom"):
    raise ValueError("several grouping factors take random_effects='intercept', or 'custom' "
                     "with Z a list of K designs (one per factor, None for an intercept), "
                     f"got {estimator.random_effects!r}")
  if network and estimator.reml:
    raise ValueError("reml=True applies to linear f (f=None)")
  valid_extra = valid is not None and (valid.time is not None or valid.Z is not None)
  if network and (time is not None or Z is not None or valid_extra):
    raise ValueError("time and Z are not used with a network f and several grouping factors")
  if time is not None:
    raise ValueError("time is not used with several grouping factors: give each factor's "
                     "random-effects design in Z (random_effects='custom')")
  if (estimator.random_effects == "intercept") != (Z is None):
    raise ValueError("several grouping factors: Z (a list of K designs) goes with "
                     "random_effects='custom', and random_effects='intercept' takes no Z")
  if network:  # MeNets EM or LMMNN NLL
    return fit_estimator(estimator, X, y, clusters, valid)
  crossed = CrossedEffectsRegressor(
      method=estimator.method, fit_intercept=estimator.fit_intercept,
      max_iter=estimator.max_iter, tol=estimator.tol, seed=estimator.seed,
      dtype=estimator.dtype, on_decrease=estimator.on_decrease,
      covariance=estimator.covariance, reml=estimator.reml).fit(X, y, clusters, Z)
  estimator.crossed_ = crossed
  for name in ("coef_", "intercept_", "sigma2_", "log_likelihood_", "variances_", "covariances_",
               "fit_result_", "n_features_in_", "polish_", "singular_", "n_iter_", "converged_"):
    setattr(estimator, name, getattr(crossed, name))
  return estimator
