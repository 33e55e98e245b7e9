"""SQUAREM acceleration of any EM map, with a monotonicity safeguard.

One cycle from theta_0 (whose loglik l_0 is known):

    theta_1 = M(theta_0),  theta_2 = M(theta_1)
    r = u_1 - u_0,  v = (u_2 - u_1) - r        (u: unconstrained coordinates)
    alpha = min(-|r| / |v|, -1)                (scheme SqS3; -1 when |v| = 0)
    u' = u_0 - 2 alpha r + alpha^2 v,  theta_next = M(theta')

The candidate theta' is accepted when l(theta') >= l_0 (and is finite).
Otherwise alpha is halved towards -1 a few times; if no candidate is
accepted the cycle returns theta_2, the plain double EM step, so a cycle
never does worse than two EM iterations. alpha = -1 gives u' = u_2.
Extrapolating in the unconstrained coordinates of `model.param_specs` keeps
every candidate valid (weights on the simplex, covariances positive definite).

Two ways to run a cycle, with the same maths (`extrapolate`, `candidate`):

  * fused (`fused_cycle`, data in memory): one compiled call
    E(theta_0) -> M -> E(theta_1) -> M -> extrapolate -> E(theta') -> M, three
    E-steps and no Python in between; Python then accepts M(theta') or, when
    l(theta') < l_0, goes on backtracking from the next alpha.
  * unfused (`SquaremStepper.__call__`, streamed or distributed data, or a
    model with `fuse_steps = False`): one compiled call per step.

Each backtracking trial (candidate, E-step, M-step) is one compiled call too
when the data are in memory.

Both give the same iterates.

#### References

[1] R. Varadhan and C. Roland. Simple and globally convergent methods for
    accelerating the convergence of any EM algorithm. Scandinavian Journal
    of Statistics, 35(2):335-353, 2008.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import numpy as np
import tensorflow as tf

from tfp_em.engine.compiling import compiled
from tfp_em.engine.unconstrained import Flattener

MAX_BACKTRACKS = 4
FUSED_E_STEPS = 3  # E(theta_0), E(theta_1), E(theta')


class Extrapolation(NamedTuple):
  """The SQUAREM line u(alpha) = u_0 - 2 alpha r + alpha^2 v and its first alpha."""
  u0: tf.Tensor     # [P] trainable params of theta_0, unconstrained, flattened
  r: tf.Tensor      # [P] u_1 - u_0
  v: tf.Tensor      # [P] u_2 - 2 u_1 + u_0
  alpha: tf.Tensor  # []  min(-|r| / |v|, -1); -1 when |v| = 0 or the ratio is not finite


class Cycle(NamedTuple):
  """What one fused cycle computed, from theta_0."""
  loglik0: tf.Tensor           # [] l(theta_0)
  params1: Any                 # M(theta_0)
  loglik1: tf.Tensor           # [] l(theta_1)
  params2: Any                 # M(theta_1)
  extrapolation: Extrapolation
  loglik_candidate: tf.Tensor  # [] l(theta') at alpha = extrapolation.alpha
  next_params: Any             # M(theta')


def sqs3_alpha(r, v):
  """Step length of scheme SqS3, min(-|r| / |v|, -1), and -1 when it is undefined."""
  r_norm, v_norm = tf.norm(r), tf.norm(v)
  ratio = -r_norm / tf.where(v_norm > 0, v_norm, tf.ones_like(v_norm))
  ok = (v_norm > 0) & tf.math.is_finite(ratio)
  return tf.where(ok, tf.minimum(ratio, -1.), -tf.ones_like(ratio))


def backtracking_alphas(alpha0: float) -> list[float]:
  """alpha_0, then halved towards -1: at most MAX_BACKTRACKS + 1 values, ending at -1 if reached."""
  alphas = [alpha0]
  while len(alphas) <= MAX_BACKTRACKS and alphas[-1] < -1.:
    alphas.append((alphas[-1] - 1.) / 2.)
  return alphas


def accept(loglik_candidate: float, loglik0: float) -> bool:
  """The monotonicity safeguard: l(theta') finite and >= l(theta_0)."""
  return bool(np.isfinite(loglik_candidate) and loglik_candidate >= loglik0)


def extrapolate(specs, params0, params1, params2) -> Extrapolation:
  """The SQUAREM line through theta_0, theta_1 = M(theta_0), theta_2 = M(theta_1)."""
  flat = Flattener(params0, specs)
  u0, u1, u2 = (flat.flatten(p) for p in (params0, params1, params2))
  r = u1 - u0
  v = u2 - 2. * u1 + u0
  return Extrapolation(u0, r, v, sqs3_alpha(r, v))


def candidate(specs, template, extrapolation: Extrapolation, alpha):
  """theta' at u_0 - 2 alpha r + alpha^2 v; untrained fields come from `template`."""
  u0, r, v = extrapolation.u0, extrapolation.r, extrapolation.v
  return Flattener(template, specs).unflatten(u0 - 2. * alpha * r + alpha ** 2 * v)


def fused_trial(model):
  """`(params0, line, alpha, data) -> (l(theta'), M(theta'))` at one alpha, to be compiled."""
  specs = model.param_specs

  def trial(params0, line, alpha, data):
    theta = candidate(specs, params0, line, alpha)
    stats, loglik = model.e_step(theta, data)
    return loglik, model.m_step(theta, stats)
  return trial


def fused_cycle(model):
  """`(params0, data) -> Cycle`: three E-steps and three M-steps, to be compiled."""
  specs = model.param_specs
  trial = fused_trial(model)

  def cycle(params0, data):
    stats0, loglik0 = model.e_step(params0, data)
    params1 = model.m_step(params0, stats0)
    stats1, loglik1 = model.e_step(params1, data)
    params2 = model.m_step(params1, stats1)
    line = extrapolate(specs, params0, params1, params2)
    return Cycle(loglik0, params1, loglik1, params2, line, *trial(params0, line, line.alpha, data))
  return cycle


class SquaremStepper:
  """Callable `(params, stats, loglik) -> (next_params, e_steps_used)`.

  Args:
    model: an `EMModel` with `param_specs`.
    e_pass: `params -> (stats, loglik)` over all the data (`tfp_em.engine.passes`).
    m_step: the (compiled) M-step.
    fuse: None (default), or the compile mode of one call per backtracking
      trial (candidate, E-step, M-step) over `e_pass.data`, held in memory.
  """

  def __init__(self, model, e_pass, m_step, fuse: str | None = None):
    specs = model.param_specs
    if specs is None:
      raise ValueError(f"{model.name}: SQUAREM needs `param_specs` (bijectors to "
                       "unconstrained space) on the model")
    self.e_pass = e_pass
    self.m_step = m_step
    self._extrapolate = compiled(model, "squarem_extrapolate",
                                 lambda m: functools.partial(extrapolate, specs), "graph")
    self._candidate = compiled(model, "squarem_candidate",
                               lambda m: functools.partial(candidate, specs), "graph")
    self._trial = (None if fuse is None else
                   compiled(model, "squarem_trial", fused_trial, fuse,
                            data_arg=-1))

  def finish(self, params0, loglik0: float, cycle: Cycle):
    """(next params, E-steps used beyond the fused cycle's) for a fused `cycle`."""
    if not np.isfinite(float(cycle.loglik1)):
      return cycle.params1, 0
    if accept(float(cycle.loglik_candidate), loglik0):
      return cycle.next_params, 0
    alphas = backtracking_alphas(float(cycle.extrapolation.alpha))[1:]
    return self._search(params0, loglik0, cycle.params2, cycle.extrapolation, alphas)

  def _loglik(self, params):
    try:
      stats, ll = self.e_pass(params)
    except tf.errors.InvalidArgumentError:  # e.g. a failed Cholesky of an extreme candidate
      return None, -np.inf
    ll = float(ll)
    return stats, (ll if np.isfinite(ll) else -np.inf)

  def _try(self, params0, line, alpha: float):
    """(l(theta') or -inf, a function giving M(theta')) at `alpha`."""
    alpha = tf.constant(alpha, line.u0.dtype)
    if self._trial is not None:
      try:
        loglik, next_params = self._trial(params0, line, alpha, self.e_pass.data)
      except tf.errors.InvalidArgumentError:
        return -np.inf, None
      loglik = float(loglik)
      return (loglik if np.isfinite(loglik) else -np.inf), lambda: next_params
    theta = self._candidate(params0, line, alpha)
    stats, loglik = self._loglik(theta)
    return loglik, lambda: self.m_step(theta, stats)

  def _search(self, params0, loglik0, params2, line, alphas, e_steps=0):
    """M(theta') for the first accepted alpha in `alphas`, else theta_2."""
    for alpha in alphas:
      loglik_c, next_params = self._try(params0, line, alpha)
      e_steps += 1
      if accept(loglik_c, loglik0):
        return next_params(), e_steps
    return params2, e_steps

  def __call__(self, params0, stats0, loglik0):
    params1 = self.m_step(params0, stats0)
    stats1, loglik1 = self._loglik(params1)
    if stats1 is None or not np.isfinite(loglik1):
      return params1, 1
    params2 = self.m_step(params1, stats1)
    line = self._extrapolate(params0, params1, params2)
    alphas = backtracking_alphas(float(line.alpha))
    return self._search(params0, loglik0, params2, line, alphas, e_steps=1)
