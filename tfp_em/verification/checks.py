"""The six checks of `tfp_em.verify`, run on a normalized `Target`.

A `Target` is what every input (an EMModel, or a user's JointDistribution with
plain-callable steps) is turned into: E-step, M-step, Q, a differentiable
marginal log-likelihood, optionally an exact posterior, and parameter specs.
Params may be NamedTuples or dicts of tensors; all work happens in float64.

Gradients are taken in unconstrained coordinates u (the ParamSpec bijectors,
through the engine's `Flattener`), over trainable fields only, so that every
coordinate is free and a stationary point means a zero gradient.

#### Tolerances

Each check divides its error by a scale and compares the result with a
relative tolerance (`Tolerances`). The scales:

* likelihood, Q values: |loglik| + N. Float64 sums over N points carry a
  round-off of a few eps per term, so the error of a correct E-step is
  ~1e-14 of this scale; a wrong one is O(1) per point.
* posteriors: max |exact value| (1 for probabilities).
* gradients (Fisher identity, M-step, stationarity): the gradient scale
  g = max(|grad loglik(theta_0)|_inf, |grad Q(theta_0)|_inf, 1e-3 N) at the
  starting point, i.e. how steep the problem is where the check starts. The
  floor 1e-3 N keeps the scale meaningful at a point that is already
  (nearly) stationary.

A correct implementation lands near 1e-12 on every relative error; the
tolerances leave 3 to 6 orders of magnitude of room on both sides.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
from scipy.optimize import linear_sum_assignment

from models.specs import ParamSpec
from tfp_em.engine.compiling import compiled_or_eager
from tfp_em.engine.unconstrained import Flattener, minimize_lbfgs
from tfp_em.verification.exact import dense_covariance
from tfp_em.verification.report import CHECK_TITLES, CheckResult

EPS = float(np.finfo(np.float64).eps)


class Tolerances(NamedTuple):
  """Relative tolerances of the checks (see the module docstring for scales).

  Attributes:
    likelihood: check 1, |loglik_E - loglik_exact| / (|loglik| + N). 1e-9.
    posterior: check 2, max |post - exact| / max |exact|. 1e-8.
    fisher: check 3, |grad Q - grad loglik|_inf / g. 1e-7.
    support: check 4a, |constrain(unconstrain(theta_new)) - theta_new| /
      max |theta_new|. 1e-8 (the bijectors round-trip to ~1e-15).
    m_step_gradient: check 4b, |grad Q(theta_new)|_inf / g. 1e-7.
    q_slack: checks 4c, 4d and 5: allowed decrease / (|value| + N).
      1000 eps ~ 2.2e-13, the engine's round-off slack.
    perturbation: check 4d, size of the random steps in u. 1e-3: large enough
      that the curvature term 0.5 h^2 |H| ~ 1e-6 N dwarfs round-off, small
      enough that a nonzero gradient dominates it.
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
  fisher: float = 1e-7
  support: float = 1e-8
  m_step_gradient: float = 1e-7
  q_slack: float = 1e3 * EPS
  perturbation: float = 1e-3
  stationary: float = 1e-4
  lbfgs: float = 1e-3


class Target(NamedTuple):
  """Everything the checks need, whatever the input was.

  Attributes:
    name: shown in the report.
    data: passed to `e_step` and `marginal`.
    starts: list of parameter points (the first is the EM start of check 6).
    specs: list of ParamSpec, parallel to the params' fields.
    e_step: (params, data) -> (stats, loglik).
    m_step: (params, stats) -> params.
    q: (params, old_params, stats) -> Q(params | old_params).
    marginal: (params, data) -> differentiable log p(data | params).
    exact: (params, data) -> ExactPosterior (None if there is none), or None.
    posterior: (params, data) -> dict, the E-step's posterior (None if not
      offered), or None.
    n_obs: the data's total weight N.
    component_axes: {field: axis} of fields permuted by label switching.
    generalized_fields: fields updated by a generalized (non-exact) M-step:
      checks 4b and 4d skip them, 4c still applies.
    compile: whether to tf.function the EM loop and L-BFGS.
  """
  name: str
  data: Any
  starts: list
  specs: list
  e_step: Callable
  m_step: Callable
  q: Callable
  marginal: Callable
  exact: Callable | None
  posterior: Callable | None
  n_obs: float
  component_axes: dict
  generalized_fields: tuple
  compile: bool


# ----------------------------------------------------------------------------
# Params as NamedTuples or dicts.

def field_names(params) -> list:
  if hasattr(params, "_fields"):
    return list(params._fields)
  if isinstance(params, dict):
    return list(params)
  raise ValueError(f"params must be a NamedTuple or a dict of arrays, got {type(params).__name__}")


def field_values(params) -> list:
  return [params[k] for k in params] if isinstance(params, dict) else list(params)


def pack(template, values):
  if isinstance(template, dict):
    return dict(zip(template, values))
  return type(template)(*values)


def to_float64(params):
  return pack(params, [tf.cast(tf.convert_to_tensor(v), tf.float64) for v in field_values(params)])


def normalize_specs(params, specs) -> list:
  """Specs (NamedTuple / dict of ParamSpec, bijector or None) -> list of ParamSpec."""
  names = field_names(params)
  if specs is None:
    raise ValueError("param_specs are required: one ParamSpec (or TFP bijector onto the "
                     f"parameter's support) per parameter {names}")
  if isinstance(specs, dict):
    missing = [n for n in names if n not in specs]
    if missing:
      raise ValueError(f"param_specs has no entry for parameters {missing}")
    raw = [specs[n] for n in names]
  else:
    raw = list(specs)
    if len(raw) != len(names):
      raise ValueError(f"param_specs has {len(raw)} entries for {len(names)} parameters {names}")
  out = []
  for n, s in zip(names, raw):
    if isinstance(s, ParamSpec):
      out.append(s)
    elif s is None:
      out.append(ParamSpec(False))
    elif isinstance(s, tfp.bijectors.Bijector):
      out.append(ParamSpec(True, s))
    else:
      raise ValueError(f"param_specs[{n!r}] must be a ParamSpec, a tfp bijector or None, got {s!r}")
  return out


class _Fields(tuple):
  """The params' field values in order: the NamedTuple-like view `Flattener`
  takes, since params may be dicts."""

  def __new__(cls, *values):
    return super().__new__(cls, values)


class Coordinates:
  """Unconstrained coordinates u [P] of the trainable fields around a template.

  The engine's `Flattener`, on dict params too: `unflatten` returns params of
  the template's kind, with its fixed fields.

  Args:
    specs: list of ParamSpec, parallel to the params' fields.
    template: params (NamedTuple or dict); `u_hat` is u there.
  """

  def __init__(self, specs: list, template):
    self.template = template
    self.flattener = Flattener(_Fields(*field_values(template)), specs)
    self.u_hat = self.flattener.u_hat

  def flatten(self, params):
    return self.flattener.flatten(_Fields(*field_values(params)))

  def unflatten(self, u):
    return pack(self.template, list(self.flattener.unflatten(u)))

  def per_field(self, vector) -> list:
    """A [P] vector cut into one array per trainable field."""
    parts = np.split(np.asarray(vector), np.cumsum(self.flattener.sizes)[:-1])
    return [p.reshape(tuple(s)) for p, s in zip(parts, self.flattener.shapes)]


def trainable_names(target: Target, params) -> list:
  return [n for n, s in zip(field_names(params), target.specs) if s.trainable]


def value_and_grad_u(coords: Coordinates, fn, u=None):
  """fn(params) at u (default: the template) and its gradient in u, per field."""
  u = tf.identity(coords.u_hat if u is None else u)
  with tf.GradientTape() as tape:
    tape.watch(u)
    value = fn(coords.unflatten(u))
  grad = tape.gradient(value, u)
  grad = tf.zeros_like(u) if grad is None else tf.convert_to_tensor(grad)
  return value, coords.per_field(grad.numpy())


def _max_abs(arrays) -> float:
  return max([float(np.max(np.abs(a))) if np.size(a) else 0.0 for a in arrays] + [0.0])


def _worst_field(names, arrays):
  values = [float(np.max(np.abs(a))) if np.size(a) else 0.0 for a in arrays]
  i = int(np.argmax(values))
  return names[i], values[i]


class _Acc:
  """Accumulates the worst error of one check over points."""

  def __init__(self, check, tol):
    self.check, self.tol = check, tol
    self.abs, self.rel, self.detail, self.skip = 0.0, 0.0, "", None
    self.seen = False

  def add(self, abs_err, scale, detail):
    abs_err = float(abs_err)
    rel = abs_err / scale if scale > 0 else (0.0 if abs_err == 0 else np.inf)
    if not np.isfinite(abs_err):
      rel = np.inf
    if not self.seen or rel > self.rel or np.isnan(rel):
      self.abs, self.rel, self.detail = abs_err, rel, detail
    self.seen = True

  def result(self) -> CheckResult:
    if not self.seen:
      return CheckResult(self.check, CHECK_TITLES[self.check], float("nan"), float("nan"),
                         self.tol, None, self.skip or "not run")
    ok = bool(np.isfinite(self.rel) and self.rel <= self.tol)
    return CheckResult(self.check, CHECK_TITLES[self.check], self.abs, self.rel, self.tol, ok,
                       self.detail)


# ----------------------------------------------------------------------------
# Checks 1-4 at one parameter point.

def check_point(target: Target, params, index: int, tol: Tolerances, acc: dict, rng):
  """Runs checks 1-4 at `params`; returns (theta_new, gradient scale)."""
  where = f"point {index}"
  stats, ll = target.e_step(params, target.data)
  ll = float(ll)
  marg = float(target.marginal(params, target.data))
  exact = target.exact(params, target.data) if target.exact is not None else None
  ref = float(exact.log_prob) if exact is not None else marg
  scale_ll = abs(ref) + target.n_obs

  # 1. likelihood.
  err_e, err_m = abs(ll - ref), abs(marg - ref)
  if err_e >= err_m:
    acc["1"].add(err_e, scale_ll, f"{where}: E-step loglik {ll:.12g} vs exact {ref:.12g}")
  else:
    acc["1"].add(err_m, scale_ll, f"{where}: marginal_log_prob {marg:.12g} vs exact {ref:.12g}")

  # 2. posterior.
  post = None
  if exact is not None and target.posterior is not None:
    post = target.posterior(params, target.data)
  if post is not None:
    common = [k for k in post if k in exact.posterior]
    if not common:
      acc["2"].skip = (f"the E-step posterior keys {sorted(post)} match none of the exact "
                       f"posterior's {sorted(exact.posterior)}")
    for k in common:
      a = np.asarray(post[k], np.float64)
      b = np.asarray(exact.posterior[k], np.float64)
      if a.shape != b.shape and k.endswith("_cov") and a.ndim == 3:
        a = dense_covariance(tf.constant(a), b.shape[0]).numpy()
      if a.shape != b.shape:
        acc["2"].add(np.inf, 1.0, f"{where}: posterior[{k!r}] has shape {a.shape}, exact {b.shape}")
        continue
      err = float(np.max(np.abs(a - b))) if a.size else 0.0
      acc["2"].add(err, max(float(np.max(np.abs(b))), 1e-300),
                   f"{where}: max |posterior[{k!r}] - exact| = {err:.3g}")
  elif exact is None:
    acc["2"].skip = "no exact posterior (give `latents`, or an oracle for the model)"
  else:
    acc["2"].skip = "the E-step exposes no posterior (give `posterior(params, data)`)"

  # 3. Fisher identity.
  names = trainable_names(target, params)
  coords = Coordinates(target.specs, params)
  _, g_ll = value_and_grad_u(coords, lambda p: target.marginal(p, target.data))
  q_old, g_q = value_and_grad_u(coords, lambda p: target.q(p, params, stats))
  gscale = max(_max_abs(g_ll), _max_abs(g_q), 1e-3 * target.n_obs)
  field, err = _worst_field(names, [a - b for a, b in zip(g_q, g_ll)])
  acc["3"].add(err, gscale, f"{where}: |grad Q - grad loglik| = {err:.3g} in {field!r} "
               f"(gradient scale {gscale:.3g})")

  # 4. M-step optimality.
  new = target.m_step(params, stats)
  new = to_float64(new)
  check_m_step(target, params, stats, new, float(q_old), gscale, where, tol, acc, rng)
  return new, gscale


def check_m_step(target, old, stats, new, q_old, gscale, where, tol, acc, rng):
  names = trainable_names(target, new)
  values = [v for v, s in zip(field_values(new), target.specs) if s.trainable]
  finite = all(np.all(np.isfinite(np.asarray(v))) for v in values)
  if not finite:
    bad = [n for n, v in zip(names, values) if not np.all(np.isfinite(np.asarray(v)))]
    for c in ("4a", "4b", "4c", "4d"):
      acc[c].add(np.inf, 1.0, f"{where}: M-step returned non-finite {bad}")
    return
  coords = Coordinates(target.specs, new)
  # tf.identity defeats the bijector cache, which would hand back `new` itself.
  u_new = tf.identity(coords.u_hat)
  round_trip = coords.unflatten(u_new)
  rt = [np.asarray(a) - np.asarray(b) for a, b, s in
        zip(field_values(round_trip), field_values(new), target.specs) if s.trainable]
  field, err = _worst_field(names, rt)
  if not np.isfinite(err) or not np.all(np.isfinite(u_new.numpy())):
    err = np.inf
  acc["4a"].add(err, max(_max_abs(values), 1e-300),
                f"{where}: {field!r} moves by {err:.3g} when mapped to the support and back")
  q = lambda p: target.q(p, old, stats)
  q_rt, g_new = value_and_grad_u(coords, q, u_new)
  exact_fields = [i for i, n in enumerate(names) if n not in target.generalized_fields]
  if exact_fields:
    field, err = _worst_field([names[i] for i in exact_fields], [g_new[i] for i in exact_fields])
    acc["4b"].add(err, gscale, f"|{err:.3g}|_inf in {field!r} at {where} "
                  f"(gradient scale {gscale:.3g})")
  q_new = float(q(new))
  scale_q = abs(q_old) + target.n_obs
  acc["4c"].add(max(q_old - q_new, 0.0), scale_q,
                f"{q_old - q_new:.3g} at {where} (Q_old={q_old:.12g}, Q_new={q_new:.12g})")
  if exact_fields:
    worst, worst_detail = 0.0, f"nothing at {where}"
    q_rt = float(q_rt)
    shapes = [tuple(s) for s in coords.flattener.shapes]
    for _ in range(3):
      direction = np.concatenate([
          np.ravel(tol.perturbation * rng.standard_normal(shape) if i in exact_fields
                   else np.zeros(shape)) for i, shape in enumerate(shapes)])
      for sign in (1.0, -1.0):
        moved = u_new + sign * tf.constant(direction, u_new.dtype)
        gain = float(q(coords.unflatten(moved))) - q_rt
        if gain > worst or not np.isfinite(gain):
          worst, worst_detail = gain, f"{gain:.3g} at {where} (step {tol.perturbation:g} in u)"
    acc["4d"].add(max(worst, 0.0), scale_q, worst_detail)


# ----------------------------------------------------------------------------
# Check 5 and EM runs.

def maybe_compiled(fn, compile: bool):
  """`fn` compiled (`tfp_em.engine.compiling.compiled_or_eager`) unless compile is False."""
  return fn if compile is False else compiled_or_eager(fn)


def make_em_iteration(target: Target):
  """params -> (M-step(E-step(params)), loglik), compiled when possible."""
  def iteration(params):
    stats, ll = target.e_step(params, target.data)
    return to_float64(target.m_step(params, stats)), tf.cast(ll, tf.float64)
  return maybe_compiled(iteration, bool(target.compile))


def check_monotone(target: Target, iterate, starts, n_steps: int, acc: dict):
  """Check 5 (and check 1 along the way): n_steps EM iterations per start."""
  for i, params in enumerate(starts):
    prev = None
    for t in range(n_steps + 1):
      marg = float(target.marginal(params, target.data))
      if not np.isfinite(marg):
        acc["5"].add(np.inf, 1.0, f"loglik became {marg} at point {i}, iteration {t} "
                     "(the M-step produced invalid parameters)")
        break
      new, ll = iterate(params)
      ll = float(ll)
      acc["1"].add(abs(ll - marg), abs(marg) + target.n_obs,
                   f"point {i}, EM iteration {t}: E-step loglik {ll:.12g} vs marginal {marg:.12g}")
      if prev is not None:
        drop = prev - marg
        acc["5"].add(max(drop, 0.0) if np.isfinite(marg) else np.inf, abs(prev) + target.n_obs,
                     f"loglik fell by {drop:.3g} at point {i}, iteration {t} "
                     f"({prev:.12g} -> {marg:.12g})")
      prev, params = marg, new


def run_em(iterate, params, n_obs, max_iter: int, rtol: float):
  """EM from `params` until the loglik change is below rtol (|ll| + N)."""
  prev = None
  for it in range(max_iter):
    new, ll = iterate(params)
    ll = float(ll)
    if not np.isfinite(ll):
      return params, it, False
    if prev is not None and abs(ll - prev) <= rtol * (abs(ll) + n_obs):
      return params, it, True
    prev, params = ll, new
  return params, max_iter, False


# ----------------------------------------------------------------------------
# Check 6.

def lbfgs_optimum(target: Target, start, max_iter: int):
  """L-BFGS optimum of -loglik / N in unconstrained trainable coordinates."""
  coords = Coordinates(target.specs, start)

  def value_and_gradient(u):
    return tfp.math.value_and_gradient(
        lambda w: -target.marginal(coords.unflatten(w), target.data) / target.n_obs, u)

  result = minimize_lbfgs(value_and_gradient, coords.u_hat, max_iterations=max_iter,
                          tolerance=1e-9, num_correction_pairs=20, compile=target.compile)
  return coords.unflatten(result.position), result


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


def check_fixed_point(target: Target, iterate, gscale: float, tol: Tolerances,
                      max_iter: int, acc: dict, info: dict):
  """Check 6: EM to convergence, zero gradient, and agreement with L-BFGS."""
  start = target.starts[0]
  theta, n_iter, converged = run_em(iterate, start, target.n_obs, max_iter, rtol=1e-14)
  info["em_iterations"], info["em_converged"] = n_iter, converged
  names = trainable_names(target, theta)
  marg = lambda p: target.marginal(p, target.data)
  theta_coords = Coordinates(target.specs, theta)
  ll_em, g = value_and_grad_u(theta_coords, marg)
  field, err = _worst_field(names, g)
  if not np.isfinite(float(ll_em)):
    note = f"; loglik became {float(ll_em)} after {n_iter} iterations"
  else:
    note = "" if converged else f"; EM had not converged after {n_iter} iterations"
  acc["6a"].add(err, gscale, f"|{err:.3g}|_inf in {field!r} after {n_iter} EM iterations "
                f"(gradient scale {gscale:.3g}{note})")

  theta_bfgs, result = lbfgs_optimum(target, start, max_iter)
  info["lbfgs_iterations"] = int(result.num_iterations)
  info["lbfgs_converged"] = bool(result.converged)
  info["loglik_em"], info["loglik_lbfgs"] = float(ll_em), float(marg(theta_bfgs))
  err, field = _distance(target, theta, match_labels(target, theta, theta_bfgs))
  detail = (f"max |u_EM - u_LBFGS| = {err:.3g} in {field!r}; loglik EM {float(ll_em):.12g}, "
            f"L-BFGS {info['loglik_lbfgs']:.12g}")
  scale = 1.0 + _max_abs([theta_coords.u_hat.numpy()])
  if np.isfinite(err) and err > tol.lbfgs * scale and np.isfinite(float(ll_em)):
    # Another local optimum from the same start is no error if theta_EM is a
    # local optimum itself: then L-BFGS started there must stay there.
    theta_polish, result = lbfgs_optimum(target, theta, max_iter)
    err2, field2 = _distance(target, theta, theta_polish)
    info["lbfgs_from_em_iterations"] = int(result.num_iterations)
    detail = (f"L-BFGS from the start found another local optimum (loglik "
              f"{info['loglik_lbfgs']:.12g} vs EM {float(ll_em):.12g}); L-BFGS from theta_EM "
              f"moves by max |du| = {err2:.3g} in {field2!r}")
    err = err2
  acc["6b"].add(err, scale, detail)


def _distance(target, a, b):
  """Largest |u(a) - u(b)| over the trainable entries, and its field."""
  coords = Coordinates(target.specs, a)
  diff = coords.u_hat.numpy() - coords.flatten(b).numpy()
  field, err = _worst_field(trainable_names(target, a), coords.per_field(diff))
  return err, field


def run_checks(target: Target, tol: Tolerances, *, checks, n_steps: int, max_iter: int,
               seed: int) -> tuple[list, dict]:
  """Runs the selected checks; returns (list of CheckResult, info)."""
  acc = {
      "1": _Acc("1", tol.likelihood), "2": _Acc("2", tol.posterior), "3": _Acc("3", tol.fisher),
      "4a": _Acc("4a", tol.support), "4b": _Acc("4b", tol.m_step_gradient),
      "4c": _Acc("4c", tol.q_slack), "4d": _Acc("4d", tol.q_slack), "5": _Acc("5", tol.q_slack),
      "6a": _Acc("6a", tol.stationary), "6b": _Acc("6b", tol.lbfgs),
  }
  info = {"n_points": len(target.starts), "n_obs": target.n_obs}
  rng = np.random.default_rng(seed)
  gscales = []
  for i, params in enumerate(target.starts):
    _, gscale = check_point(target, params, i, tol, acc, rng)
    gscales.append(gscale)
  iterate = make_em_iteration(target)
  if "5" in checks:
    check_monotone(target, iterate, target.starts, n_steps, acc)
  if "6" in checks:
    check_fixed_point(target, iterate, gscales[0], tol, max_iter, acc, info)
  selected = [c for c in acc if c[0] in checks]
  for c in acc:
    if c not in selected:
      acc[c].seen, acc[c].skip = False, "not selected"
  return [acc[c].result() for c in acc], info
