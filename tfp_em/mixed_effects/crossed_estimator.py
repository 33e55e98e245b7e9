"""`CrossedEffectsRegressor`: linear mixed models with K crossed random intercepts.

    y = x^T beta + sum_k u_k[level_k] + eps,  u_k ~ N(0, sigma_k^2 I),  eps ~ N(0, sigma^2)

fitted by maximum likelihood, with exact sparse EM (`method='em'`, PX-EM
step, optionally SQUAREM) or L-BFGS on the exact marginal (`method='nll'`).
The maths is in `crossed_em` and `crossed_posterior`.

Prediction rule, for each factor independently: a level seen in `fit` adds
its BLUP E[u_k | y_train]; an unseen level adds 0 (the prior mean).

`MixedEffectsRegressor.fit(X, y, clusters=[g1, g2, ...])` dispatches here
through `fit_crossed` when given K >= 2 grouping factors.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf
from sklearn.base import BaseEstimator, RegressorMixin

from models import crossed_effects as ce
from tfp_em.engine import fit_em
from tfp_em.engine import inputs as val
from tfp_em.mixed_effects.crossed_em import CrossedEffectsEM, fit_em_large, fit_nll
from tfp_em.mixed_effects.crossed_networks import fit_estimator
from tfp_em.mixed_effects.crossed_posterior import (MAX_DENSE, CrossedPredictions,
                                                    PosteriorPrecision)
from tfp_em.mixed_effects.labels import blup_sum, encode_factors

METHODS = ("em", "nll")


class CrossedEffectsRegressor(RegressorMixin, CrossedPredictions, BaseEstimator):
  """Linear f with K crossed random-intercept grouping factors.

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

  Attributes (after fit):
    coef_, intercept_: fixed effects.
    variances_: [K] sigma_k^2.  sigma2_: noise variance.
    levels_: list of K arrays of labels seen in fit; blups_: list of K arrays
      of E[u_k | y] in the same order.
    log_likelihood_: marginal log-likelihood at the returned params.
    fit_result_: `engine.FitResult` (EM only; None for 'nll').
    n_iter_: EM iterations or L-BFGS function evaluations.
    trace_se_: [K] standard errors of the Hutchinson trace estimates of the
      last E-step (zeros when the factorization was exact).
  """

  def __init__(self, method: str = "em", fit_intercept: bool = True, max_iter: int = 1000,
               tol: float = 1e-10, seed: int = 0, dtype="float64", accelerate=None,
               max_dense: int = MAX_DENSE, on_decrease: str = "warn"):
    self.method = method
    self.fit_intercept = fit_intercept
    self.max_iter = max_iter
    self.tol = tol
    self.seed = seed
    self.dtype = dtype
    self.accelerate = accelerate
    self.max_dense = max_dense
    self.on_decrease = on_decrease

  def _design(self, X):
    if self.fit_intercept:
      return np.concatenate([np.ones((X.shape[0], 1), X.dtype), X], axis=1)
    return X

  def fit(self, X, y, clusters):
    """Fits the model. `clusters`: a list of K label arrays, one per factor, each [n]."""
    val.check_option("method", self.method, METHODS)
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
    data = ce.CrossedData(tf.constant(x), tf.constant(y), tf.constant(codes),
                          tf.constant([len(v) for v in levels], tf.int32))
    model = CrossedEffectsEM(intercept=0 if self.fit_intercept else None,
                             max_dense=self.max_dense)
    init = model.initialize(data, self.seed)
    self.fit_result_ = None
    self.trace_se_ = np.zeros(len(levels))
    sizes = [len(v) for v in levels]
    if sum(sizes) - max(sizes) > self.max_dense:  # beyond the exact factorization
      if self.method == "nll":
        raise ValueError(f"method='nll' needs the exact factorization: {sum(sizes) - max(sizes)} "
                         f"levels outside the largest factor exceed max_dense={self.max_dense}; "
                         "use method='em' (CG and Hutchinson traces) or raise max_dense")
      params, self.n_iter_, self.trace_se_ = fit_em_large(
          model, data, init, max_iter=self.max_iter, tol=max(self.tol, 1e-6))
      self.log_likelihood_ = float("nan")
    elif self.method == "em":
      result = fit_em(model, data, max_iter=self.max_iter, tol=self.tol, seed=self.seed,
                      init_params=init, on_decrease=self.on_decrease,
                      accelerate=self.accelerate, keep_trajectory=False)
      params, self.log_likelihood_, self.n_iter_ = result.params, result.log_likelihood, result.n_iter
      self.fit_result_ = result
    else:
      params, self.log_likelihood_, _, self.n_iter_ = fit_nll(
          model, data, init, max_iter=self.max_iter, tol=self.tol)
    post = model.posterior(params, data)
    offsets = np.concatenate([[0], np.cumsum([len(v) for v in levels])])
    self.levels_ = levels
    self.blups_ = [post.mean[offsets[k]:offsets[k + 1]].astype(dtype) for k in range(len(levels))]
    beta = np.asarray(params.beta, np.float64)
    self.intercept_ = float(beta[0]) if self.fit_intercept else 0.
    self.coef_ = beta[1:].astype(dtype) if self.fit_intercept else beta.astype(dtype)
    self.variances_ = np.asarray(params.variances, np.float64).astype(dtype)
    self.sigma2_ = float(params.noise_variance)
    self.precision_ = PosteriorPrecision(
        model.arrays(data)[3], np.array(sizes), np.asarray(params.variances, np.float64),
        self.sigma2_, self.max_dense)
    return self

  def predict(self, X, clusters=None):
    """x^T beta + sum_k BLUP_k(level) (0 for unseen levels or clusters=None)."""
    val.check_is_fitted(self, "blups_")
    X = val.check_features(self, X, reset=False, dtype=np.float64)
    return self.intercept_ + X @ np.asarray(self.coef_, np.float64) \
        + blup_sum(self.levels_, self.blups_, clusters, X.shape[0])


def fit_crossed(estimator, X, y, clusters, time=None, Z=None, valid=None):
  """`MixedEffectsRegressor.fit` with K >= 2 grouping factors.

  Linear f: fits a `CrossedEffectsRegressor` with the same options into
  `estimator.crossed_` and copies its results (coef_, intercept_, sigma2_,
  log_likelihood_, variances_, fit_result_) onto `estimator`. A network f
  (`network_` built, X and y checked, `valid` the checked validation data or
  None): `crossed_networks.fit_estimator` (MeNets EM or LMMNN NLL).
  """
  if estimator.random_effects != "intercept":
    raise ValueError("several grouping factors take random intercepts only "
                     f"(random_effects='intercept'), got {estimator.random_effects!r}")
  if estimator.reml:
    raise ValueError("reml=True is available for one grouping factor only: REML for several "
                     "(crossed) factors is not implemented; fit by maximum likelihood "
                     "(reml=False)")
  if time is not None or Z is not None or (valid is not None and (valid.time is not None
                                                                  or valid.Z is not None)):
    raise ValueError("time and Z are not used with several grouping factors")
  if estimator.f is not None:  # a network: MeNets EM or LMMNN NLL
    return fit_estimator(estimator, X, y, clusters, valid)
  crossed = CrossedEffectsRegressor(
      method=estimator.method, fit_intercept=estimator.fit_intercept,
      max_iter=estimator.max_iter, tol=estimator.tol, seed=estimator.seed,
      dtype=estimator.dtype, on_decrease=estimator.on_decrease).fit(X, y, clusters)
  estimator.crossed_ = crossed
  for name in ("coef_", "intercept_", "sigma2_", "log_likelihood_", "variances_",
               "fit_result_", "n_features_in_"):
    setattr(estimator, name, getattr(crossed, name))
  return estimator
