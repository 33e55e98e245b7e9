"""The verifier's normalized input (`Target`) and its compiled computations (`Kernels`).

A `Target` is what every input (an EMModel, or a user's JointDistribution with
plain-function steps) is turned into: E-step, M-step, Q as a function of the
params and its evidence, a differentiable marginal log-likelihood, optionally
an exact posterior and the exact expectation of the E-step's statistics, and
parameter specs.

Gradients are taken in unconstrained coordinates u (the ParamSpec bijectors,
through the engine's `Flattener`) of the trainable fields, around the start,
so that every coordinate is free and a stationary point means a zero
gradient. Every reference computation is a `Compiled` function of u, traced
once per `verify` call and reused at every parameter point.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import numpy as np
import tensorflow as tf

from tfp_em.verification.compiling import Compiled, value_and_gradient
from tfp_em.verification.params import Coordinates, conform

# Random directions of check 4d (each taken with both signs).
N_DIRECTIONS = 3


class Target(NamedTuple):
  """Everything the checks need, whatever the input was.

  Attributes:
    name: shown in the report.
    data: passed to the steps.
    starts: list of parameter points (the first is the EM start of check 6).
    more_starts: i -> another perturbed start (replacing degenerate ones).
    specs: list of ParamSpec, parallel to the params' fields.
    e_step: (params, data) -> (stats, loglik).
    m_step: (params, stats) -> params.
    q: (params, evidence) -> Q(params), the evidence being what Q is built
      from: the E-step's statistics, or a posterior at the old params.
    fisher_evidence: (stats, posterior) -> the evidence of check 3, from the
      E-step's own output (its statistics, or the user's posterior at the
      old params), or None (no check 3).
    q_fisher_source: what check 3's Q is built from, for messages.
    m_evidence: (stats, posterior, exact_old) -> the evidence of the M-step
      checks, `stats` being what the M-step was given.
    statistics: (old_params, exact_old) -> the exact expectation of the
      E-step's statistics (check 2b; the M-step then gets these), or None.
    marginal: params -> differentiable log p(data | params), or None: the
      exact reference's log_prob.
    exact: params -> ExactPosterior, or None.
    exact_note: why there is no exact reference (when `exact` is None).
    posterior: params -> dict, the E-step's posterior, or None.
    log_prior: params -> log p(params) (MAP EM), or None.
    n_obs: the data's total weight N.
    component_axes: {field: axis} of fields permuted by label switching.
    generalized_fields: fields updated by a generalized (non-exact) M-step:
      checks 4b and 4d skip them, 4c still applies.
    compile: whether to compile the reference computations and the steps.
    notes: list of lines for the report (what ran eagerly, degenerate starts).
    unchecked_statistics: the M-step is handed the E-step's statistics, which
      no check reads (Q comes from the posterior: no `statistics`, no
      `expected_log_joint`), so a bug in them shows as an M-step failure.
  """
  name: str
  data: Any
  starts: list
  more_starts: Callable
  specs: list
  e_step: Callable
  m_step: Callable
  q: Callable
  fisher_evidence: Callable | None
  q_fisher_source: str
  m_evidence: Callable
  statistics: Callable | None
  marginal: Callable | None
  exact: Callable | None
  exact_note: str
  posterior: Callable | None
  log_prior: Callable | None
  n_obs: float
  component_axes: dict
  generalized_fields: tuple
  compile: bool
  notes: list
  unchecked_statistics: bool = False


class Kernels:
  """The target's computations, each compiled once (`Compiled`) for every point.

  Functions of u [P] work in the coordinates `coords` around the first start;
  fixed fields always come from it.
  """

  def __init__(self, target: Target):
    self.coords = c = Coordinates(target.specs, target.starts[0])
    self.cache = {}  # further compiled functions, by key
    on, notes = bool(target.compile), target.notes
    prior = target.log_prior or (lambda p: tf.constant(0.0, tf.float64))
    self.prior = prior
    self.e_step = Compiled(lambda p: target.e_step(p, target.data), on, "your e_step", notes)
    self.m_step = Compiled(target.m_step, on, "your m_step", notes)
    self.iterate = Compiled(self._iteration(target), on, "the EM iteration", notes)
    self.exact = Compiled(target.exact, on, "the exact reference", notes) if target.exact else None
    self.posterior = (Compiled(target.posterior, on, "your posterior", notes)
                      if target.posterior else None)
    self.statistics = (Compiled(target.statistics, on, "the expected statistics", notes)
                       if target.statistics else None)

    # Without a marginal of its own, loglik is the exact reference's log_prob:
    # vg then returns the whole reference too (one trace for both).
    self.exact_in_vg = target.marginal is None and target.exact is not None

    def vg(u):
      held = []

      def marginal(w):
        if not self.exact_in_vg:
          return target.marginal(c.unflatten(w))
        held.append(target.exact(c.unflatten(w)))
        return held[-1].log_prob
      value, g_marginal = value_and_gradient(marginal, u)
      log_prior, g_prior = value_and_gradient(lambda w: prior(c.unflatten(w)), u)
      return value, g_marginal, log_prior, g_prior, (held[0] if held else ())

    # loglik, its gradient, log prior, its gradient at u (and the exact
    # reference): one trace serves every check.
    self.vg = Compiled(vg, on, "the marginal log-likelihood", notes)
    # Q (+ log prior) and its gradient at u_eval, and Q at the `points` [R, P]
    # where `wanted` [R] (NaN elsewhere), from `evidence`: one trace serves
    # check 3 and the M-step checks (R = n_q_points always, so the trace is
    # reused; check 3 wants no points).
    def q_kernel(u_eval, points, wanted, evidence):
      q = lambda w: target.q(c.unflatten(w), evidence) + prior(c.unflatten(w))
      value, grad = value_and_gradient(q, u_eval)
      nan = tf.constant(np.nan, tf.float64)
      values = tf.map_fn(lambda x: tf.cond(x[1], lambda: q(x[0]), lambda: nan),
                         (points, wanted), fn_output_signature=tf.float64)         # [R]
      return value, grad, values
    self.q_kernel = Compiled(q_kernel, on, "Q", notes)
    self.exact_fields = [i for i, n in enumerate(c.names) if n not in target.generalized_fields]
    self.n_q_points = 1 + 2 * N_DIRECTIONS * bool(self.exact_fields)

  def objective_vg(self, u):
    """loglik + log prior at u, and its gradient."""
    marginal, g_marginal, log_prior, g_prior, _ = self.vg(u)
    return marginal + log_prior, g_marginal + g_prior

  def objective(self, params) -> float:
    """loglik + log prior at params (their trainable fields)."""
    return float(self.objective_vg(self.coords.flatten(params))[0])

  @staticmethod
  def _iteration(target):
    template = target.starts[0]

    def iteration(params):
      stats, ll = target.e_step(params, target.data)
      return conform(template, target.m_step(params, stats), "m_step"), tf.cast(ll, tf.float64)
    return iteration
