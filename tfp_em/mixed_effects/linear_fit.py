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
from tfp_em.engine.unconstrained import Flattener, newton_steps
from tfp_em.mixed_effects.em import (MixedEffectsEM, fit_marginal_lbfgs, marginal_log_prob,
                                     marginal_objective, unflattener)
from tfp_em.mixed_effects.reml import RestrictedMixedEffectsEM


POLISH_MAX_ITER = 200  # L-BFGS iterations after EM, whatever EM's max_iter
ROUND_OFF = 1e-12  # relative: a polished l this close below EM's is round-off (Newton's own rule)


class Polish(NamedTuple):
  """The polish after EM: L-BFGS iterations, then Newton steps (`finish_by_newton`);
  the ℓ gained (>= 0) and whether L-BFGS converged."""
  n_iter: int
  newton_steps: int
  gain: float
  converged: bool


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
  params, _, converged, n_iter = fit_marginal_lbfgs(model, train, result.params,
                                                    max_iter=POLISH_MAX_ITER, tol=tol)
  params, newton, ll, gradient = finish_by_newton(model, train, params)
  converged = converged or gradient <= tol
  before = marginal_log_prob(model, train, result.params)  # the same compiled l as ll's
  if ll >= before - ROUND_OFF * abs(before):  # l flat to round-off there: the smaller gradient wins
    result = result._replace(params=params, log_likelihood=ll)
  finish = Polish(n_iter=n_iter, newton_steps=newton, gain=max(ll - before, 0.),
                  converged=converged)
  _warn_once_per_kind([w for w in caught if not (issubclass(w.category, ConvergenceWarning)
                                                 and finish.converged)])
  return _with_gls_beta(model, train, result), finish


def _fit_lbfgs(model, train, *, max_iter, tol, seed) -> FitResult:
  start = time.perf_counter()
  init = model.initialize(train, seed)
  params, _, converged, n_iter = fit_marginal_lbfgs(model, train, init, max_iter=max_iter,
                                                    tol=tol)
  params, _, ll, gradient = finish_by_newton(model, train, params)
  converged = converged or gradient <= tol
  trace = RestartTrace(
      seed=seed, log_likelihood=np.array([float(model.marginal_log_prob(init, train)), ll]),
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


def finish_by_newton(model: MixedEffectsEM, data, params):
  """(params, number of steps taken, l there, max |grad l| / N there):
  `engine.unconstrained.newton_steps` on l over the unconstrained params, from
  a point L-BFGS has brought close."""
  flat = Flattener(params, model.param_specs)
  objective = marginal_objective(model)  # -l / N and its gradient
  n_obs = model.num_observations(data)

  def loglik(u):
    loss, grad = objective(tf.constant(u, flat.u_hat.dtype), params, data)
    return -float(loss) * n_obs, -grad.numpy() * n_obs

  u, ll, taken = newton_steps(loglik, flat.u_hat.numpy())
  gradient = float(np.max(np.abs(loglik(u)[1]), initial=0.)) / n_obs
  return unflattener(model)(tf.constant(u, flat.u_hat.dtype), params), taken, ll, gradient


def _warn_once_per_kind(caught) -> None:
  """Re-issues the first warning of each category, saying how many more there were."""
  for category in dict.fromkeys(w.category for w in caught):
    same = [w for w in caught if w.category is category]
    more = f" ({len(same) - 1} more like it in this fit)" if len(same) > 1 else ""
    warnings.warn_explicit(f"{same[0].message}{more}", category, same[0].filename,
                           same[0].lineno)
