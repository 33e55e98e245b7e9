"""Checks 5 and 6 of `tfp_em.verify` (EM runs), degenerate starts, and `run_checks`.

A start from which correct EM runs into a singularity of the likelihood (a
component collapsing onto a point, a variance going to 0: the objective rises
and then becomes non-finite, with the parameters at the edge of their
support) says nothing about the user's code. Such a start is reported as
degenerate and replaced by another, instead of failing check 5 or 6.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import tensorflow as tf
from scipy.optimize import linear_sum_assignment

from tfp_em.engine.unconstrained import minimize_lbfgs
from tfp_em.verification.checks import Acc, Tolerances, check_point, describe_exception, guard
from tfp_em.verification.kernels import Kernels, Target
from tfp_em.verification.params import field_names, field_values, max_abs, pack

# |u| beyond which a parameter sits at the edge of its support (a variance or
# weight of e^-15 ~ 3e-7 of its unit scale).
EDGE = 15.0
# L-BFGS stops at |grad(loglik / N)|_inf <= 1e-7: a parameter error ~1e-6, far
# inside check 6b's 1e-3; tighter, its line search fails on round-off.
LBFGS_GTOL = 1e-7


class Degenerate(Exception):
  """EM from this start ran into a singularity of the likelihood."""


def _edge(k: Kernels, params) -> str | None:
  """The trainable field at (or past) the edge of its support, or None."""
  try:
    u = k.coords.flatten(params).numpy()
  except Exception:  # noqa: BLE001 - e.g. a Cholesky of a singular matrix
    return k.coords.names[0] if k.coords.names else "params"
  if u.size == 0:
    return None
  bad = ~np.isfinite(u) | (np.abs(u) > EDGE)
  if not np.any(bad):
    return None
  return k.coords.worst_field(np.where(bad, 1.0, 0.0))[0]


def em_path(target: Target, k: Kernels, params, n_steps: int, slack: float, where: str):
  """Objective values along n_steps EM iterations; raises Degenerate on a singularity.

  Returns:
    (values, drops): the objective at each iterate, and the worst decrease
    (abs, scale, detail) or None.
  """
  values, worst = [], None
  for t in range(n_steps + 1):
    try:
      value = k.objective(params)
    except Exception:  # noqa: BLE001 - e.g. a Cholesky of a singular covariance
      value = float("nan")
    if not np.isfinite(value) or value == np.inf:
      edge = _edge(k, params)
      if edge is not None and worst is None and t > 0:
        raise Degenerate(f"{where}: the objective became {value} at iteration {t}, with "
                         f"{edge!r} at the edge of its support")
      raise FloatingPointError(f"the objective became {value} at {where}, iteration {t} "
                               "(the EM iteration produced invalid parameters)")
    if values and values[-1] - value > slack * (abs(values[-1]) + target.n_obs):
      drop = values[-1] - value
      if worst is None or drop > worst[0]:
        worst = (drop, abs(values[-1]) + target.n_obs,
                 f"the objective fell by {drop:.3g} at {where}, iteration {t} "
                 f"({values[-1]:.12g} -> {value:.12g})")
    values.append(value)
    if t == n_steps:
      break
    try:
      params, _ = k.iterate(params)
    except Exception:
      edge = _edge(k, params)
      if edge is not None and worst is None and t > 0:
        raise Degenerate(f"{where}: the EM iteration failed at iteration {t + 1}, with "
                         f"{edge!r} at the edge of its support")
      raise
  return values, worst


def check_monotone(target: Target, k: Kernels, n_steps: int, tol: Tolerances, acc: dict,
                   info: dict):
  """Check 5: the objective never decreases along n_steps EM iterations per start."""
  starts, replaced, i = list(target.starts), 0, 0
  while i < len(starts):
    where = f"point {i}"
    try:
      _, worst = em_path(target, k, starts[i], n_steps, tol.q_slack, where)
      acc["5"].add(worst[0] if worst else 0.0, worst[1] if worst else 1.0,
                   worst[2] if worst else "")
    except Degenerate as e:
      info.setdefault("degenerate_starts", []).append(str(e))
      target.notes.append(f"degenerate start (a singularity of the likelihood, not a bug): {e}; "
                          "replaced by another start")
      if replaced < len(target.starts):
        replaced += 1
        starts.append(target.more_starts(len(starts)))
    except Exception as e:  # noqa: BLE001 - the user's steps raised: check 5 fails
      acc["5"].fail(f"{where}: {describe_exception(e)}")
    i += 1
  if not acc["5"].seen:
    acc["5"].skip = "every start was degenerate"


def run_em(k: Kernels, params, n_obs: float, max_iter: int, rtol: float, slack: float):
  """EM from `params` until the loglik change is below rtol (|ll| + N).

  Raises Degenerate when the loglik, never decreasing (beyond `slack`), ends
  non-finite with the parameters at the edge of their support.
  """
  prev, monotone = None, True
  for it in range(max_iter):
    try:
      new, ll = k.iterate(params)
      ll = float(ll)
    except Exception:
      if not monotone or it == 0 or _edge(k, params) is None:
        raise
      ll = np.nan
    if not np.isfinite(ll):
      edge = _edge(k, params)
      if edge is not None and it > 0 and monotone:
        raise Degenerate(f"EM to convergence: the loglik became {ll} at iteration {it}, with "
                         f"{edge!r} at the edge of its support")
      return params, it, False
    if prev is not None and abs(ll - prev) <= rtol * (abs(ll) + n_obs):
      return params, it, True
    if prev is not None and prev - ll > slack * (abs(prev) + n_obs):
      monotone = False
    prev, params = ll, new
  return params, max_iter, False


class Optimum(NamedTuple):
  """An L-BFGS optimum of the objective (check 6b)."""
  position: tf.Tensor     # u [P]
  objective: float        # loglik + log prior there
  iterations: int
  converged: bool


def lbfgs_optimum(k: Kernels, n_obs: float, u0, max_iter: int) -> Optimum:
  """L-BFGS optimum of -objective / N in unconstrained trainable coordinates.

  SciPy's L-BFGS-B (`minimize_lbfgs(driver='scipy')`) drives the loop in
  NumPy; each step costs one call of the compiled value and gradient
  (`Kernels.objective_vg`, traced once per file), so no optimizer is traced
  or run op by op. A trial point where the
  objective is not finite or the user's code raises (a solve() of a singular
  matrix) gets a large finite value, so the line search backs off from it.
  """
  u0 = np.asarray(u0, np.float64)
  penalty = [None]

  def value_and_gradient(u):
    try:
      value, grad = k.objective_vg(tf.constant(u))
      value, grad = -float(value) / n_obs, -grad.numpy() / n_obs
    except Exception:  # noqa: BLE001 - the user's code at a singular trial point
      value, grad = np.nan, None
    if penalty[0] is None:
      penalty[0] = (value if np.isfinite(value) else 0.0) + 1e6 * (1.0 + abs(np.nan_to_num(value)))
    if not np.isfinite(value) or grad is None or not np.all(np.isfinite(grad)):
      return penalty[0], np.zeros(int(u.shape[0]))
    return value, grad

  result = minimize_lbfgs(value_and_gradient, u0, max_iterations=max_iter, tolerance=LBFGS_GTOL,
                          f_relative_tolerance=1e-13, num_correction_pairs=20, driver="scipy")
  return Optimum(result.position, -float(result.objective_value) * n_obs,
                 result.num_iterations, result.converged)


def match_labels(target: Target, reference, other):
  """Permutes `other`'s components to best match `reference` (Hungarian)."""
  axes = target.component_axes
  if not axes:
    return other
  names = field_names(reference)
  ref_vals = dict(zip(names, [np.asarray(v) for v in field_values(reference)]))
  oth_vals = dict(zip(names, [np.asarray(v) for v in field_values(other)]))
  k = {ref_vals[f].shape[a] for f, a in axes.items()}
  if len(k) != 1:
    raise ValueError(f"component_axes {axes} give different numbers of components {k}")
  k = k.pop()
  cost = np.zeros((k, k))
  for f, a in axes.items():
    r = np.moveaxis(ref_vals[f], a, 0).reshape(k, -1)
    o = np.moveaxis(oth_vals[f], a, 0).reshape(k, -1)
    spread = np.max(np.abs(r)) + 1e-300
    cost += np.sum((r[:, None, :] - o[None, :, :]) ** 2, -1) / spread ** 2
  _, perm = linear_sum_assignment(cost)
  values = [tf.constant(np.take(oth_vals[n], perm, axis=axes[n])) if n in axes else v
            for n, v in zip(names, field_values(other))]
  return pack(other, values)


def check_fixed_point(target: Target, k: Kernels, gscale: float, tol: Tolerances,
                      max_iter: int, acc: dict, info: dict):
  """Check 6: EM to convergence, zero gradient, and agreement with L-BFGS."""
  theta = None
  for i, start in enumerate(list(target.starts) + [target.more_starts(len(target.starts))]):
    try:
      theta, n_iter, converged = run_em(k, start, target.n_obs, max_iter, rtol=1e-14,
                                        slack=tol.q_slack)
      break
    except Degenerate as e:
      info.setdefault("degenerate_starts", []).append(str(e))
      target.notes.append(f"degenerate start {i} for check 6 (a singularity of the "
                          f"likelihood): {e}; the next start is used")
  if theta is None:
    acc["6a"].skip = acc["6b"].skip = "EM degenerated from every start"
    return
  info["em_iterations"], info["em_converged"] = n_iter, converged
  info["em_start"] = i
  u_em = k.coords.flatten(theta)
  value, grad = k.objective_vg(u_em)
  ll_em = float(value)
  field, err = k.coords.worst_field(grad.numpy())
  if not np.isfinite(ll_em):
    note = f"; the objective became {ll_em} after {n_iter} iterations"
  else:
    note = "" if converged else f"; EM had not converged after {n_iter} iterations"
  acc["6a"].add(err, gscale, f"|{err:.3g}|_inf in {field!r} after {n_iter} EM iterations "
                f"(gradient scale {gscale:.3g}{note})")
  stationary = np.isfinite(err) and err <= tol.stationary * gscale

  scale = 1.0 + max_abs([u_em.numpy()])
  info["loglik_em"] = ll_em
  # 6b passes when theta_EM is a local optimum (L-BFGS started there stays), or,
  # theta_EM being stationary (6a), when L-BFGS from the same start reaches it:
  # another local optimum from the start is no error. The first test is the
  # cheaper one (a few iterations from a converged EM), so it runs first; a
  # point that is not stationary and that L-BFGS leaves fails without the
  # second.
  if not np.isfinite(ll_em):
    acc["6b"].add(np.inf, scale, f"the objective at EM's end point is {ll_em}: not an optimum")
    return
  polish = lbfgs_optimum(k, target.n_obs, u_em, max_iter)
  err2, field2 = _distance(k, u_em, polish.position)
  info["lbfgs_from_em_iterations"] = polish.iterations
  info["lbfgs_converged"], info["loglik_lbfgs"] = polish.converged, polish.objective
  if np.isfinite(err2) and err2 <= tol.lbfgs * scale:
    acc["6b"].add(err2, scale, f"L-BFGS from theta_EM moves by max |du| = {err2:.3g} in "
                  f"{field2!r}; objective EM {ll_em:.12g}, L-BFGS {polish.objective:.12g}")
    return
  if not stationary:
    acc["6b"].add(err2, scale, f"EM stopped at a point that is not stationary (check 6a): "
                  f"L-BFGS from theta_EM moves by max |du| = {err2:.3g} in {field2!r} "
                  f"(objective EM {ll_em:.12g}, L-BFGS {polish.objective:.12g})")
    return
  optimum = lbfgs_optimum(k, target.n_obs, k.coords.flatten(start), max_iter)
  theta_bfgs = k.coords.unflatten(optimum.position)
  info["lbfgs_iterations"] = optimum.iterations
  info["lbfgs_converged"], info["loglik_lbfgs"] = optimum.converged, optimum.objective
  u_matched = k.coords.flatten(match_labels(target, theta, theta_bfgs))
  err, field = _distance(k, u_em, u_matched)
  if np.isfinite(err) and err <= tol.lbfgs * scale:
    acc["6b"].add(err, scale, f"max |u_EM - u_LBFGS| = {err:.3g} in {field!r}; objective EM "
                  f"{ll_em:.12g}, L-BFGS {optimum.objective:.12g}")
  else:
    acc["6b"].add(err2, scale, f"L-BFGS from the start found another local optimum (objective "
                  f"{optimum.objective:.12g} vs EM {ll_em:.12g}); L-BFGS from theta_EM moves "
                  f"by max |du| = {err2:.3g} in {field2!r}")


def _distance(k: Kernels, u_a, u_b):
  """Largest |u_a - u_b| over the trainable entries, and its field."""
  field, err = k.coords.worst_field(np.asarray(u_a) - np.asarray(u_b))
  return err, field


def _statistics_note(acc: dict) -> str:
  """What checks 4 can say when the E-step's statistics go to the M-step unchecked."""
  failed = lambda checks: [c for c in checks if acc[c].seen and acc[c].result().passed is False]
  m_failed, e_failed = failed(("4a", "4b", "4c", "4d")), failed(("1", "2", "3"))
  advice = ("define statistics(params, data, latent_values) in the file (the statistics of one "
            "complete data set) and check 2b compares the E-step's with their exact expectation")
  if m_failed and not e_failed:
    return (f"E-step suspected as well: checks {', '.join(m_failed)} failed with checks 1-3 "
            "passing, and without `statistics` or `expected_log_joint` the M-step was handed "
            "the E-step's statistics unchecked, so the bug may be in them rather than in the "
            f"M-step; to tell the steps apart, {advice}")
  return ("the E-step's statistics are not checked (no `statistics` or `expected_log_joint`): "
          f"a bug in them would show as an M-step failure (checks 4); {advice}")


ACCUMULATED = ("1", "2", "2b", "3", "4a", "4b", "4c", "4d", "4e", "5", "6a", "6b")


def run_checks(target: Target, tol: Tolerances, *, checks, n_steps: int, max_iter: int,
               seed: int) -> tuple[list, dict]:
  """Runs the selected checks; returns (list of CheckResult, info)."""
  tols = dict(zip(ACCUMULATED, (tol.likelihood, tol.posterior, tol.statistics, tol.fisher,
                                tol.support, tol.m_step_gradient, tol.q_slack, tol.q_slack,
                                tol.fixed, tol.q_slack, tol.stationary, tol.lbfgs)))
  acc = {c: Acc(c, t) for c, t in tols.items()}
  info = {"n_points": len(target.starts), "n_obs": target.n_obs}
  rng = np.random.default_rng(seed)
  kernels = Kernels(target)
  gscales = []
  if any(c in checks for c in ("1", "2", "3", "4")) or "6" in checks:
    for i, params in enumerate(target.starts):
      gscales.append(check_point(target, kernels, params, i, tol, acc, rng))
  if "5" in checks:
    check_monotone(target, kernels, n_steps, tol, acc, info)
  if "6" in checks:
    gscale = gscales[0] if gscales and gscales[0] is not None else 1e-3 * target.n_obs
    guard(acc, ("6a", "6b"), "check 6", lambda: check_fixed_point(
        target, kernels, gscale, tol, max_iter, acc, info))
  for c in acc:
    if c[0] not in checks:
      acc[c].seen, acc[c].skip = False, "not selected"
  if target.unchecked_statistics:
    target.notes.append(_statistics_note(acc))
  if target.notes:
    info["notes"] = list(dict.fromkeys(target.notes))
  return [acc[c].result() for c in acc], info
