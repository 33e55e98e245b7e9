"""Fitting the linear-f mixed model with one grouping factor: ML or REML, EM or L-BFGS.

`fit_linear` runs EM (`MixedEffectsEM` with the PX-EM step for ML,
`reml.RestrictedMixedEffectsEM` for REML) and ends it with an L-BFGS polish
on the exact (restricted) marginal from the EM point, then Newton steps:
EM gets ℓ close fast but crawls in flat directions, and a few quasi-Newton
and Newton steps take every parameter to the optimum. `method='nll'` is
L-BFGS from the initial point, then the same Newton steps.
After either, `singular.warn_if_singular` flags a boundary estimate.
"""
from __future__ import annotations

import time
import warnings
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from tfp_em.engine import ConvergenceWarning, FitResult, RestartTrace, fit_em, to_numpy
from tfp_em.mixed_effects.em import MixedEffectsEM, maximize_marginal
from tfp_em.mixed_effects.reml import RestrictedMixedEffectsEM


POLISH_MAX_ITER = 200  # L-BFGS iterations after EM, whatever EM's max_iter
ROUND_OFF = 1e-12  # relative: a polished l this close below EM's is round-off (Newton's own rule)


class Polish(NamedTuple):
  """The polish after EM: L-BFGS iterations, then Newton steps (`em.maximize_marginal`);
  the ℓ gained (>= 0) and whether L-BFGS converged."""
  n_iter: int
  newton_steps: int
  gain: float
  converged: bool


def fit_converged(converged: bool, polish: Polish | None) -> bool:
  """An estimator's converged_: its fit met its own stopping test, or the polish
  that finished EM converged (the returned point is then the optimum)."""
  return bool(converged) or (polish is not None and bool(polish.converged))


def linear_model(covariance_type: str, method: str, reml: bool) -> MixedEffectsEM:
  """The EM model whose `marginal_log_prob` is the fitted criterion (ℓ or ℓ_R)."""
  if reml:
    return RestrictedMixedEffectsEM(covariance_type, compile="graph")
  return MixedEffectsEM(covariance_type, compile="graph", expand=method == "em")


def fit_linear(model: MixedEffectsEM, train, column_scales, *, method: str, max_iter: int,
               tol: float, seed: int, on_decrease: str, strategy=None):
  """(FitResult, Polish or None): EM then the polish, or L-BFGS then Newton steps.

  The fit runs on x / column_scales ([p], powers of two from
  `degenerate.check_fixed_design`); the returned beta and l are those of
  the given x (the restarts' traces stay on the scaled x). A
  `ConvergenceWarning` of EM at `max_iter` is dropped when the polish
  converges (the returned point is then the optimum).
  """
  scales = np.asarray(column_scales, np.float64)
  scaled = train._replace(x=train.x / tf.constant(scales, train.x.dtype))
  result, finish = _fit_scaled(model, scaled, method=method, max_iter=max_iter, tol=tol,
                               seed=seed, on_decrease=on_decrease, strategy=strategy)
  beta = result.params.beta / tf.constant(scales, result.params.beta.dtype)
  ll = result.log_likelihood
  if isinstance(model, RestrictedMixedEffectsEM):  # l_R has -1/2 log|X^T V^-1 X|
    ll -= float(np.sum(np.log(scales)))
  return result._replace(params=result.params._replace(beta=beta), log_likelihood=ll), finish


def _fit_scaled(model, train, *, method, max_iter, tol, seed, on_decrease, strategy):
  if method == "nll":
    return _fit_lbfgs(model, train, max_iter=max_iter, tol=tol, seed=seed), None
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    result = fit_em(model, train, max_iter=max_iter, tol=tol, seed=seed,
                    on_decrease=on_decrease, progress=False, strategy=strategy)
  fit = maximize_marginal(model, train, result.params, max_iter=POLISH_MAX_ITER, tol=tol)
  before = fit.start_log_likelihood  # EM's l, by the same compiled function as fit's
  if fit.log_likelihood >= before - ROUND_OFF * abs(before):  # flat: the smaller gradient wins
    result = result._replace(params=fit.params, log_likelihood=fit.log_likelihood)
  finish = Polish(n_iter=fit.iterations, newton_steps=fit.newton_steps,
                  gain=max(fit.log_likelihood - before, 0.), converged=fit.converged)
  _warn_once_per_kind([w for w in caught if not (issubclass(w.category, ConvergenceWarning)
                                                 and finish.converged)])
  return _with_gls_beta(model, train, result), finish


def _fit_lbfgs(model, train, *, max_iter, tol, seed) -> FitResult:
  start = time.perf_counter()
  init = model.initialize(train, seed)
  fit = maximize_marginal(model, train, init, max_iter=max_iter, tol=tol)
  params, ll, converged, n_iter = fit.params, fit.log_likelihood, fit.converged, fit.iterations
  trace = RestartTrace(
      seed=seed, log_likelihood=np.array([fit.start_log_likelihood, ll]),
      params=[to_numpy(init), to_numpy(params)], converged=converged, n_iter=n_iter,
      stop_reason="converged" if converged else "max_iter",
      seconds=time.perf_counter() - start)
  result = FitResult(params=params, log_likelihood=ll, n_iter=n_iter, converged=converged,
                     best_restart=0, restarts=(trace,),
                     num_observations=model.num_observations(train))
  return _with_gls_beta(model, train, result)


def _with_gls_beta(model, train, result: FitResult) -> FitResult:
  """REML: beta is profiled, so it is set to beta_GLS at the returned variances."""
  if isinstance(model, RestrictedMixedEffectsEM):
    return result._replace(params=model.gls_params(result.params, train))
  return result

def _warn_once_per_kind(caught) -> None:
  """Re-issues the first warning of each category, saying how many more there were."""
  for category in dict.fromkeys(w.category for w in caught):
    same = [w for w in caught if w.category is category]
    more = f" ({len(same) - 1} more like it in this fit)" if len(same) > 1 else ""
    warnings.warn_explicit(f"{same[0].message}{more}", category, same[0].filename,
                           same[0].lineno)
