"""Checks 1-4 of `tfp_em.verify` at one parameter point, on a normalized `Target`.

A `Target` (see `tfp_em.verification.kernels`) is what every input is turned
into; its reference computations are compiled once per `verify` call
(`Kernels`). Params may be NamedTuples or dicts of tensors, matched by name;
all work is in float64.

Each check runs on its own (`guard`): an exception in the user's code becomes
that check's failure, with the user's file and line, and the other checks
still report.

#### Tolerances

Each check divides its error by a scale and compares the result with a
relative tolerance (`Tolerances`). The scales:

* likelihood, Q values: |loglik| + N. Float64 sums over N points carry a
  round-off of a few eps per term, so the error of a correct E-step is
  ~1e-14 of this scale; a wrong one is O(1) per point.
* posteriors: max |exact value| (1 for probabilities); statistics: max
  |exact value| of the field, at least 1.
* gradients (Fisher identity, M-step, stationarity): the gradient scale
  g = max(|grad loglik(theta_0)|_inf, |grad Q(theta_0)|_inf, 1e-3 N) at the
  starting point, i.e. how steep the problem is where the check starts. The
  floor 1e-3 N keeps the scale meaningful at a point that is already
  (nearly) stationary.

A correct implementation lands near 1e-12 on every relative error; the
tolerances leave 3 to 6 orders of magnitude of room on both sides.
"""
from __future__ import annotations

import os
import re
import traceback
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from tfp_em.verification.exact import dense_covariance
from tfp_em.verification.kernels import N_DIRECTIONS, Kernels, Target
from tfp_em.verification.params import (conform, field_names, field_values,
                                        leaf_paths, max_abs, worst_field)
from tfp_em.verification.report import CHECK_TITLES, CheckResult

EPS = float(np.finfo(np.float64).eps)


class Tolerances(NamedTuple):
  """Relative tolerances of the checks (see the module docstring for scales).

  Attributes:
    likelihood: check 1, |loglik_E - loglik_exact| / (|loglik| + N). 1e-9.
    posterior: check 2, max |post - exact| / max |exact|. 1e-8.
    statistics: check 2b, max |stat - exact expectation| / max(|exact|, 1)
      per field. 1e-8.
    fisher: check 3, |grad Q - grad loglik|_inf / g. 1e-7.
    support: check 4a, |constrain(unconstrain(theta_new)) - theta_new| /
      max |theta_new|. 1e-8 (the bijectors round-trip to ~1e-15).
    m_step_gradient: check 4b, |grad Q(theta_new)|_inf / g. 1e-7.
    q_slack: checks 4c, 4d and 5: allowed decrease / (|value| + N).
      1000 eps ~ 2.2e-13, the engine's round-off slack.
    perturbation: check 4d, size of the random steps in u. 1e-3: large enough
      that the curvature term 0.5 h^2 |H| ~ 1e-6 N dwarfs round-off, small
      enough that a nonzero gradient dominates it.
    fixed: check 4e, |theta_new - theta_old| / max |theta_old| on the fixed
      (non-trainable) fields. 1e-12.
    stationary: check 6a, |grad loglik(theta*)|_inf / g. 1e-4. EM converges
      linearly, and slowly where components overlap or variance components
      are weakly identified; stopping at a loglik change of 1e-14 (|loglik| +
      N) leaves a gradient of 1e-7 to 3e-6 g on the shipped models, while a
      wrong fixed point leaves 1e-2 to 1 g.
    lbfgs: check 6b, max |u_EM - u_LBFGS| / (1 + max |u_EM|) after label
      matching. 1e-3: both optimizers stop at a gradient ~1e-6 g, i.e. a
      parameter error ~1e-5 on the shipped models; a different fixed point
      differs by 1e-2 or more.
  """
  likelihood: float = 1e-9
  posterior: float = 1e-8
  statistics: float = 1e-8
  fisher: float = 1e-7
  support: float = 1e-8
  m_step_gradient: float = 1e-7
  q_slack: float = 1e3 * EPS
  perturbation: float = 1e-3
  fixed: float = 1e-12
  stationary: float = 1e-4
  lbfgs: float = 1e-3


# ----------------------------------------------------------------------------
# Accumulating errors; exceptions as failures.

class Acc:
  """Accumulates the worst error of one check over points."""

  def __init__(self, check, tol):
    self.check, self.tol = check, tol
    self.abs, self.rel, self.detail, self.skip = 0.0, 0.0, "", None
    self.seen, self.raised = False, False

  def add(self, abs_err, scale, detail):
    abs_err = float(abs_err)
    rel = abs_err / scale if scale > 0 else (0.0 if abs_err == 0 else np.inf)
    if not np.isfinite(abs_err):
      rel = np.inf
    if not self.raised and (not self.seen or rel > self.rel or np.isnan(rel)):
      self.abs, self.rel, self.detail = abs_err, rel, detail
    self.seen = True

  def fail(self, detail):
    """An exception stopped this check."""
    if not self.raised:
      self.abs, self.rel, self.detail, self.raised = np.inf, np.inf, detail, True
    self.seen = True

  def result(self) -> CheckResult:
    if not self.seen:
      return CheckResult(self.check, CHECK_TITLES[self.check], float("nan"), float("nan"),
                         self.tol, None, self.skip or "not run")
    ok = bool(np.isfinite(self.rel) and self.rel <= self.tol)
    return CheckResult(self.check, CHECK_TITLES[self.check], self.abs, self.rel, self.tol, ok,
                       self.detail, self.raised)


_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def describe_exception(e: BaseException) -> str:
  """'TypeError: message (at my_em.py:12 in m_step)', naming the user's frame."""
  frames = traceback.extract_tb(e.__traceback__)
  user = [f for f in frames if not os.path.abspath(f.filename).startswith(_PACKAGE)
          and "site-packages" not in f.filename and not f.filename.startswith("<")
          and os.sep + "lib" + os.sep + "python" not in f.filename]
  where = f" (at {user[-1].filename}:{user[-1].lineno} in {user[-1].name})" if user else ""
  text = str(e).strip().splitlines()
  first = re.sub(r"\s*\[Op:\w+\].*$", "", re.sub(r"^\{\{.*?\}\}\s*", "", text[0])) if text else ""
  return f"{type(e).__name__}: {first[:200]}{where}"


def guard(acc: dict, checks, where: str, fn):
  """fn(), or None after marking `checks` failed by the exception it raised."""
  try:
    return fn()
  except Exception as e:  # noqa: BLE001 - the user's code raised: that check fails
    detail = f"{where}: {describe_exception(e)}"
    for c in checks:
      acc[c].fail(detail)
    return None


# ----------------------------------------------------------------------------
# Checks 1-4 at one parameter point.

def check_point(target: Target, k: Kernels, params, index: int, tol: Tolerances, acc: dict,
                rng) -> float | None:
  """Runs checks 1-4 at `params`; returns the gradient scale (None if unknown)."""
  where = f"point {index}"
  u = k.coords.flatten(params)
  if k.exact_in_vg:
    reference = guard(acc, ("1", "2", "2b", "3"), where, lambda: k.vg(u))
    exact = reference[4] if reference is not None else None
  else:
    reference = guard(acc, ("1", "3"), where, lambda: k.vg(u))
    exact = guard(acc, ("1", "2", "2b"), where, lambda: k.exact(params)) if k.exact else None
  e_out = guard(acc, ("1", "2b", "3"), where,
                lambda: k.e_step(params))
  stats, ll = e_out if e_out is not None else (None, None)
  marg = float(reference[0]) if reference is not None else None
  ref = float(exact.log_prob) if exact is not None else marg

  # 1. likelihood.
  if ll is not None and ref is not None:
    _check_likelihood(target, params, float(ll), marg, ref, where, acc)

  # 2. posterior.
  post = guard(acc, ("2",) if exact is not None else (), where,
               lambda: k.posterior(params)) if k.posterior is not None else None
  if exact is None:
    acc["2"].skip = target.exact_note or "no exact posterior (give `latents`, or an oracle)"
  elif k.posterior is None:
    acc["2"].skip = "the E-step exposes no posterior (give `posterior(params, data)`)"
  elif post is not None:
    _check_posterior(post, exact, where, acc)
  elif not acc["2"].raised:
    acc["2"].skip = "the E-step exposes no posterior"

  # 2b. statistics, field by field.
  stats_m = stats
  if k.statistics is None:
    acc["2b"].skip = ("no `statistics(params, data, latent_values)`: the E-step's statistics "
                      "are not compared with their exact expectation")
  elif exact is not None and stats is not None:
    expected = guard(acc, ("2b",), where, lambda: k.statistics(params, exact))
    if expected is not None:
      _check_statistics(stats, expected, where, acc)
      stats_m = expected

  # 3. Fisher identity.
  gscale = None
  if reference is not None:
    g_ll = k.coords.per_field(reference[1].numpy())
    gscale = max(max_abs(g_ll), 1e-3 * target.n_obs)
  if target.fisher_evidence is None:
    acc["3"].skip = ("Q comes from the exact posterior (no expected_log_joint or posterior): "
                     "check 2b covers the E-step")
  elif stats is not None and reference is not None:
    points = tf.tile(u[tf.newaxis], [k.n_q_points, 1])  # not evaluated: the trace's shape
    q_out = guard(acc, ("3",), where, lambda: k.q_kernel(
        u, points, tf.zeros([k.n_q_points], tf.bool), target.fisher_evidence(stats, post)))
    if q_out is not None:
      g_q = k.coords.per_field((q_out[1] - reference[3]).numpy())  # without the log prior
      gscale = max(gscale, max_abs(g_q))
      field, err = worst_field(k.coords.names, [a - b for a, b in zip(g_q, g_ll)])
      acc["3"].add(err, gscale, f"{where}: |grad Q - grad loglik| = {err:.3g} in {field!r} "
                   f"(Q from {target.q_fisher_source}; gradient scale {gscale:.3g})")

  # 4. M-step.
  if stats_m is not None:
    new = guard(acc, ("4a", "4b", "4c", "4d", "4e"), where,
                lambda: conform(target.starts[0], k.m_step(params, stats_m), "m_step"))
    if new is not None:
      guard(acc, ("4a", "4b", "4c", "4d", "4e"), where, lambda: check_m_step(
          target, k, params, u, target.m_evidence(stats_m, post, exact), new,
          gscale or 1e-3 * target.n_obs, where, tol, acc, rng))
  return gscale


def _check_likelihood(target, params, ll, marg, ref, where, acc):
  scale = abs(ref) + target.n_obs
  prior = float(target.log_prior(params)) if target.log_prior is not None else None
  err_e = abs(ll - ref)
  if prior is not None:  # a MAP E-step may report loglik + log prior
    err_e = min(err_e, abs(ll - ref - prior))
  err_m = abs(marg - ref) if marg is not None else 0.0
  if err_e >= err_m:
    acc["1"].add(err_e, scale, f"{where}: E-step loglik {ll:.12g} vs exact {ref:.12g} "
                 f"(error {err_e:.3g})")
  else:
    acc["1"].add(err_m, scale, f"{where}: marginal_log_prob {marg:.12g} vs exact {ref:.12g}")


def _check_posterior(post, exact, where, acc):
  common = [key for key in post if key in exact.posterior]
  if not common:
    acc["2"].skip = (f"the E-step posterior keys {sorted(post)} match none of the exact "
                     f"posterior's {sorted(exact.posterior)}")
  for key in common:
    a = np.asarray(post[key], np.float64)
    b = np.asarray(exact.posterior[key], np.float64)
    if a.shape != b.shape and key.endswith("_cov") and a.ndim == 3:
      a = dense_covariance(tf.constant(a), b.shape[0]).numpy()
    if a.shape != b.shape:
      acc["2"].add(np.inf, 1.0, f"{where}: posterior[{key!r}] has shape {a.shape}, exact {b.shape}")
      continue
    err = float(np.max(np.abs(a - b))) if a.size else 0.0
    acc["2"].add(err, max(float(np.max(np.abs(b))) if b.size else 0.0, 1e-300),
                 f"{where}: max |posterior[{key!r}] - exact| = {err:.3g}")


def _check_statistics(stats, expected, where, acc):
  given = dict(leaf_paths(stats))
  worst = None
  for path, b in leaf_paths(expected):
    b = np.asarray(b)
    if not np.issubdtype(b.dtype, np.floating):
      continue
    if path not in given:
      acc["2b"].add(np.inf, 1.0, f"{where}: the E-step returned no statistic {path!r}")
      continue
    a = np.asarray(given[path], np.float64)
    if a.shape != b.shape:
      acc["2b"].add(np.inf, 1.0, f"{where}: statistic {path!r} has shape {a.shape}, exact "
                    f"expectation {b.shape}")
      continue
    err = float(np.max(np.abs(a - b))) if a.size else 0.0
    scale = max(float(np.max(np.abs(b))) if b.size else 0.0, 1.0)
    if worst is None or not err / scale <= worst[0]:
      worst = (err / scale, err, scale, path)
  if worst is not None:
    rel, err, scale, path = worst
    acc["2b"].add(err, scale, f"{where}: statistic {path!r} differs from its exact expectation "
                  f"by {err:.3g} (scale {scale:.3g})")


def check_m_step(target, k, old, u_old, evidence, new, gscale, where, tol, acc, rng):
  """Checks 4a-4e for theta_new = M-step(theta_old), with Q from `evidence`."""
  names = field_names(new)
  trainable = [s.trainable for s in target.specs]
  # 4e: fixed fields unchanged.
  fixed = [(n, np.asarray(a), np.asarray(b)) for n, a, b, t in
           zip(names, field_values(new), field_values(old), trainable) if not t]
  if fixed:
    field, err = worst_field([n for n, _, _ in fixed], [a - b for _, a, b in fixed])
    scale = max(max_abs([b for _, _, b in fixed]), 1e-300)
    acc["4e"].add(err, scale, f"{where}: the fixed parameter {field!r} changed by {err:.3g} "
                  "(param_specs declares it fixed)")
  else:
    acc["4e"].skip = "every parameter is trainable"
  values = [np.asarray(v) for v, t in zip(field_values(new), trainable) if t]
  if not all(np.all(np.isfinite(v)) for v in values):
    bad = [n for n, v in zip(k.coords.names, values) if not np.all(np.isfinite(v))]
    for c in ("4a", "4b", "4c", "4d"):
      acc[c].add(np.inf, 1.0, f"{where}: the M-step returned non-finite {bad}")
    return
  # 4a: in the support (the bijectors round-trip).
  u_new = k.coords.flatten(new)
  round_trip = k.coords.unflatten(tf.identity(u_new))  # identity: no bijector cache
  rt = [np.asarray(a) - np.asarray(b) for a, b, t in
        zip(field_values(round_trip), field_values(new), trainable) if t]
  field, err = worst_field(k.coords.names, rt)
  if not np.isfinite(err) or not np.all(np.isfinite(u_new.numpy())):
    err = np.inf
  acc["4a"].add(err, max(max_abs(values), 1e-300),
                f"{where}: {field!r} moves by {err:.3g} when mapped to the support and back")
  exact_fields = k.exact_fields
  shapes = [tuple(s) for s in k.coords.flattener.shapes]
  directions = np.stack([np.concatenate(
      [np.ravel(sign * tol.perturbation * noise[i] if i in exact_fields else np.zeros(shape))
       for i, shape in enumerate(shapes)] + [np.zeros(0)])
      for noise in [[rng.standard_normal(s) for s in shapes] for _ in range(N_DIRECTIONS)]
      for sign in (1.0, -1.0)]) if exact_fields else np.zeros([0, u_new.shape[0]])
  points = tf.concat([u_old[tf.newaxis], u_new + directions], 0)                # [R, P]
  q_new, g_new, values = k.q_kernel(u_new, points, tf.ones([len(points)], tf.bool), evidence)
  q_new, q_old, moved = float(q_new), float(values[0]), values[1:]
  g_new = k.coords.per_field(g_new.numpy())
  scale_q = abs(q_old) + target.n_obs
  # 4b: zero gradient of Q at theta_new (closed-form fields).
  if exact_fields:
    field, err = worst_field([k.coords.names[i] for i in exact_fields],
                             [g_new[i] for i in exact_fields])
    acc["4b"].add(err, gscale, f"|{err:.3g}|_inf in {field!r} at {where} "
                  f"(gradient scale {gscale:.3g})")
  # 4c: Q does not decrease.
  acc["4c"].add(max(q_old - q_new, 0.0) if np.isfinite(q_new) else np.inf, scale_q,
                f"{q_old - q_new:.3g} at {where} (Q_old={q_old:.12g}, Q_new={q_new:.12g})")
  # 4d: no small step increases Q.
  if exact_fields:
    gains = moved.numpy() - q_new
    i = int(np.argmax(np.where(np.isfinite(gains), gains, np.inf)))
    worst = float(gains[i]) if np.isfinite(gains[i]) else np.inf
    field = k.coords.worst_field(directions[i])[0]
    acc["4d"].add(max(worst, 0.0), scale_q, f"{worst:.3g} at {where} (a step of "
                  f"{tol.perturbation:g} in u, largest in {field!r})")
