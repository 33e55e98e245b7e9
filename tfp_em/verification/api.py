"""`tfp_em.verify`: check hand-coded EM updates against TFP log_prob and autodiff.

Two kinds of input:

1. An `tfp_em.EMModel` (every model of the package, or your own subclass),
   with its data::

     report = verify(GaussianMixtureEM(3, "full", reg_covar=0.0), data)

   The model's declared hooks say the rest: `param_specs`, `posterior`,
   `verification_oracle` (the exact reference of checks 1-2),
   `component_axes`, `generalized_m_step_fields`, `verification_tolerances`.

2. Your own TFP JointDistribution, a function of the params, and your E- and
   M-steps as plain functions, no subclassing needed::

     report = verify(joint_distribution, data, e_step=e_step, m_step=m_step,
                     init_params=params0, param_specs=specs, latents={"z": 3},
                     posterior=posterior)

   Q is derived from the JointDistribution and your posterior when you do not
   give `expected_log_joint` (enumeration for discrete latents, Gaussian
   expectations for linear-Gaussian ones).

The checks (DESIGN.md section 4), all in float64, at `n_points` parameter
points (the start and seeded random perturbations of it in unconstrained
coordinates) on the data you give:

  1   likelihood: the E-step's loglik equals the exact log p(data | theta)
      (enumeration of discrete latents, Gaussian conditioning, or the model's
      TFP marginal), at every point and along EM iterations.
  2   posterior: the E-step posterior equals the exact posterior.
  3   Fisher identity: grad_theta Q(theta | theta_old) = grad loglik(theta_old)
      at theta = theta_old, by autodiff in unconstrained coordinates.
  4a  the M-step's output lies in the parameter support.
  4b  grad Q(theta_new | theta_old) = 0 (closed-form blocks).
  4c  Q(theta_new) >= Q(theta_old).
  4d  Q(theta_new) >= Q(theta_new perturbed) in random directions.
  5   loglik never decreases along EM iterations, beyond round-off.
  6a  EM run to convergence ends at grad loglik(theta*) = 0.
  6b  the EM optimum matches an L-BFGS optimum of -loglik from the same start,
      up to label permutation (Hungarian matching on `component_axes`).

Tolerances scale with the problem; see `tfp_em.verification.Tolerances`.

#### References

[1] A. P. Dempster, N. M. Laird and D. B. Rubin. Maximum likelihood from
    incomplete data via the EM algorithm. JRSS B, 39(1):1-38, 1977.
[2] T. A. Louis. Finding the observed information matrix when using the EM
    algorithm. JRSS B, 44(2):226-233, 1982 (the Fisher identity).
"""
from __future__ import annotations

import importlib.util
import inspect
import os
import sys
import time

import numpy as np
import tensorflow as tf

from tfp_em.engine import inputs as v
from tfp_em.engine.protocol import EMModel
from tfp_em.verification.checks import (Coordinates, Target, Tolerances, maybe_compiled,
                                        field_names, field_values, normalize_specs, run_checks,
                                        to_float64)
from tfp_em.verification.exact import (GAUSSIAN, ExactPosterior, expected_log_joint_discrete,
                                       expected_log_joint_gaussian, marginalize_discrete,
                                       marginalize_gaussian)
from tfp_em.verification.report import VerificationReport

__all__ = ["ALL_CHECKS", "FILE_NAMES", "load_user_module", "main_verify", "verify", "verify_file"]

ALL_CHECKS = ("1", "2", "3", "4", "5", "6")


# ----------------------------------------------------------------------------
# Helpers shared by the two input kinds.

def _float64_data(data):
  def cast(x):
    t = tf.convert_to_tensor(x)
    return tf.cast(t, tf.float64) if t.dtype.is_floating else t
  return tf.nest.map_structure(cast, data)


def _perturbed_starts(start, specs, n_points: int, scale: float, seed: int):
  """The start plus n_points - 1 seeded perturbations of it in unconstrained space."""
  rng = np.random.default_rng(seed)
  coords = Coordinates(specs, start)
  noise = [rng.standard_normal(coords.flattener.size) for _ in range(n_points - 1)]
  return [start] + [coords.unflatten(coords.u_hat + tf.constant(scale * e, coords.u_hat.dtype))
                    for e in noise]


def _arity(fn) -> int:
  try:
    params = inspect.signature(fn).parameters.values()
  except (TypeError, ValueError):
    return 2
  return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
             for p in params)


def _check_checks(checks):
  checks = tuple(str(c) for c in checks)
  bad = [c for c in checks if c not in ALL_CHECKS]
  if bad:
    raise ValueError(f"checks must be a subset of {ALL_CHECKS}, got {bad}")
  return checks


# ----------------------------------------------------------------------------
# Input kind 1: an EMModel.

def _model_target(model: EMModel, data, *, init_params, param_specs, oracle, component_axes,
                  n_points, perturbation, seed, compile):
  data = _float64_data(data)
  start = init_params if init_params is not None else model.initialize(data, seed)
  start = to_float64(start)
  specs = normalize_specs(start, model.param_specs if param_specs is None else param_specs)
  exact_fn = model.verification_oracle if oracle is None else oracle
  # Compiled: enumeration and Hessians are traced once. None: no exact reference.
  exact_compiled = maybe_compiled(lambda p: exact_fn(p, data), compile)
  return Target(
      name=model.name, data=data,
      starts=_perturbed_starts(start, specs, n_points, perturbation, seed),
      specs=specs, e_step=model.e_step, m_step=model.m_step,
      q=lambda p, old, stats: model.expected_log_joint(p, stats),
      marginal=model.marginal_log_prob, exact=lambda p, _: exact_compiled(p),
      posterior=model.posterior, n_obs=float(model.num_observations(data)),
      component_axes=dict(model.component_axes if component_axes is None else component_axes),
      generalized_fields=tuple(model.generalized_m_step_fields),
      compile=model.compile != "eager" if compile is None else compile)


# ----------------------------------------------------------------------------
# Input kind 2: a JointDistribution and plain functions.

def _jd_variables(jd):
  names = jd.event_shape
  if hasattr(names, "_asdict"):
    names = names._asdict()
  return dict(names) if isinstance(names, dict) else {}


def _user_target(joint_distribution, data, *, e_step, m_step, init_params, param_specs, latents,
                 posterior, expected_log_joint, marginal_log_prob, component_axes, n_points,
                 perturbation, seed, compile, name):
  for fn_name, fn in (("e_step", e_step), ("m_step", m_step)):
    if not callable(fn):
      raise ValueError(f"{fn_name} must be a function; verifying a JointDistribution needs "
                       "e_step(params, data) -> (stats, loglik) and m_step(params, stats) -> params")
  if init_params is None:
    raise ValueError("init_params are required: the parameter point to start from "
                     "(a dict or NamedTuple of arrays)")
  if not isinstance(data, dict):
    raise ValueError("data must be a dict {variable name: array} of the JointDistribution's "
                     f"observed variables (plus any covariates), got {type(data).__name__}")
  data = _float64_data(data)
  start = to_float64(init_params)
  specs = normalize_specs(start, param_specs)
  latents = dict(latents or {})
  for k, c in latents.items():
    if c != GAUSSIAN and (isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 2):
      raise ValueError(f"latents[{k!r}] must be a cardinality >= 2 or 'gaussian', got {c!r}")
  kinds = {"gaussian" if c == GAUSSIAN else "discrete" for c in latents.values()}
  if len(kinds) > 1:
    raise ValueError("mixing discrete and Gaussian latents is not supported; verify them in "
                     "separate models")
  kind = kinds.pop() if kinds else None

  jd_args = _arity(joint_distribution)
  jd_fn = (lambda p: joint_distribution(p, data)) if jd_args >= 2 else joint_distribution
  variables = _jd_variables(jd_fn(start))
  if not variables:
    raise ValueError("joint_distribution must return a JointDistribution with named variables "
                     "(e.g. tfd.JointDistributionNamed)")
  missing = [k for k in latents if k not in variables]
  if missing:
    raise ValueError(f"latents {missing} are not variables of the JointDistribution "
                     f"({sorted(variables)})")
  observed_names = [k for k in variables if k not in latents]
  absent = [k for k in observed_names if k not in data]
  if absent:
    raise ValueError(f"data has no values for the JointDistribution's observed variables {absent}; "
                     f"every variable that is not in latents ({sorted(latents)}) must be in data")
  dtypes = jd_fn(start).dtype
  dtypes = dtypes._asdict() if hasattr(dtypes, "_asdict") else dtypes
  observed = {k: tf.cast(data[k], dtypes[k]) for k in observed_names}

  # The exact references are compiled: enumeration through tf.vectorized_map
  # is traced once instead of on every call. The factorization across points
  # is checked once, eagerly, at the start.
  def exact_fn(p):
    if kind == "discrete":
      return marginalize_discrete(lambda: jd_fn(p), latents, observed, check_factorization=False)
    if kind == "gaussian":
      return marginalize_gaussian(lambda: jd_fn(p), latents, observed)
    return ExactPosterior(jd_fn(p).log_prob(**observed), {})

  if kind == "discrete":
    marginalize_discrete(lambda: jd_fn(start), latents, observed, check_factorization=True)
  exact_compiled = maybe_compiled(exact_fn, compile)
  exact = lambda p, _: exact_compiled(p)
  if marginal_log_prob is not None:
    marginal = marginal_log_prob
  else:
    marginal_compiled = maybe_compiled(lambda p: exact_fn(p).log_prob, compile)
    marginal = lambda p, _: marginal_compiled(p)

  if expected_log_joint is not None:
    q = lambda p, old, stats: expected_log_joint(p, stats)
  elif posterior is None:
    raise ValueError("give posterior(params, data) (the E-step's posterior, keyed by latent "
                     "name) or expected_log_joint(params, stats); the verifier needs one of them "
                     "to form Q")
  elif kind == "discrete":
    if len(latents) != 1:
      raise ValueError("with several discrete latents give expected_log_joint(params, stats)")
    (lat,) = latents
    q_tau = maybe_compiled(lambda p, tau: expected_log_joint_discrete(
        lambda: jd_fn(p), latents, observed, tau), compile)
    q = lambda p, old, stats: q_tau(p, tf.cast(posterior(old, data)[lat], tf.float64))
  elif kind == "gaussian":
    q_post = maybe_compiled(lambda p, post: expected_log_joint_gaussian(
        lambda: jd_fn(p), latents, observed, post), compile)
    q = lambda p, old, stats: q_post(p, to_float64(dict(posterior(old, data))))
  else:
    raise ValueError("without latents, give expected_log_joint(params, stats)")

  m_args = _arity(m_step)
  user_m_step = m_step if m_args >= 2 else (lambda p, stats: m_step(stats))
  return Target(
      name=name or getattr(joint_distribution, "__name__", "user model"), data=data,
      starts=_perturbed_starts(start, specs, n_points, perturbation, seed), specs=specs,
      e_step=e_step, m_step=user_m_step, q=q, marginal=marginal,
      exact=exact if kind is not None else None,
      posterior=posterior, n_obs=float(tf.shape(observed[observed_names[0]])[0]),
      component_axes=dict(component_axes or {}), generalized_fields=(),
      compile=True if compile is None else compile)


# ----------------------------------------------------------------------------
# Entry points.

def verify(model_or_joint, data, *, e_step=None, m_step=None, init_params=None,
           param_specs=None, latents=None, posterior=None, expected_log_joint=None,
           marginal_log_prob=None, oracle=None, component_axes=None, checks=ALL_CHECKS,
           n_points: int = 3, n_steps: int = 5, max_iter: int = 2000,
           perturbation: float = 0.5, tolerances: Tolerances | dict | None = None,
           seed: int = 0, compile: bool | None = None, name: str | None = None
           ) -> VerificationReport:
  """Verifies E- and M-steps against the model's TFP log_prob and autodiff.

  Args:
    model_or_joint: a `tfp_em.EMModel` instance, or a function
      `params -> JointDistribution` (or `(params, data) -> JointDistribution`)
      with named variables.
    data: the model's data (EMModel), or a dict {name: array} holding every
      observed variable of the JointDistribution (plus any covariates your
      steps need). Keep it small (tens to a few hundred points): exact
      references enumerate latents per point.
    e_step: `(params, data) -> (stats, loglik)` (JointDistribution input).
    m_step: `(params, stats) -> params` (or `stats -> params`).
    init_params: start point, a dict or NamedTuple of arrays. Required for a
      JointDistribution; for an EMModel defaults to `model.initialize(data,
      seed)`.
    param_specs: per parameter a `ParamSpec`, a TFP bijector onto its support
      (trainable) or None (fixed); same structure as the params. Defaults to
      the EMModel's `param_specs`.
    latents: {name: cardinality} for discrete latents or {name: 'gaussian'}
      for linear-Gaussian ones (JointDistribution input).
    posterior: `(params, data) -> dict` of the E-step's posterior: for a
      discrete latent `z`, `{'z': [N, M] probabilities}` (and optionally
      `'z_mean'`); for a Gaussian latent `u`, `{'u_mean': ..., 'u_cov': ...}`.
      Check 2 compares it with the exact posterior; Q is derived from it when
      `expected_log_joint` is not given. An EMModel's `posterior` method is
      used unless it returns None.
    expected_log_joint: optional `(params, stats) -> Q`.
    marginal_log_prob: optional closed-form `(params, data) -> log p(data)`
      (e.g. the MVN marginal of a mixed model); used for autodiff checks.
    oracle: optional `(params, data) -> ExactPosterior` (see
      `tfp_em.verification.exact`) overriding the EMModel's
      `verification_oracle`: the exact reference of checks 1 and 2.
    component_axes: {param name: axis} of parameters whose components can be
      relabelled, for matching the L-BFGS optimum. Defaults to the EMModel's
      `component_axes`.
    checks: subset of ('1', '2', '3', '4', '5', '6') to run (default all).
    n_points: number of parameter points for checks 1-5 (default 3): the
      start and `n_points - 1` random perturbations of it.
    n_steps: EM iterations from each point in check 5 (default 5).
    max_iter: iteration cap for EM and L-BFGS in check 6 (default 2000).
    perturbation: standard deviation of the random perturbations in
      unconstrained coordinates (default 0.5).
    tolerances: a `Tolerances` or a dict overriding some of its fields.
      Default: `Tolerances()`, loosened by an EMModel's
      `verification_tolerances`.
    seed: integer seed for the points and directions (default 0).
    compile: tf.function the EM loop and L-BFGS (default: True, or the
      model's `compile != 'eager'`); falls back to eager for untraceable code.
    name: name shown in the report.

  Returns:
    A `VerificationReport`; call `.raise_if_failed()` to turn failures into an
    exception.

  Raises:
    TypeError: `model_or_joint` is neither an EMModel nor a function (an
      object with E/M-step methods must subclass `tfp_em.EMModel`).
    ValueError: bad arguments, or inputs the checks cannot use.
  """
  start_time = time.perf_counter()
  checks = _check_checks(checks)
  n_points = v.check_int("n_points", n_points, minimum=1)
  n_steps = v.check_int("n_steps", n_steps, minimum=1)
  max_iter = v.check_int("max_iter", max_iter, minimum=1)
  perturbation = v.check_float("perturbation", perturbation, minimum=0.0)
  seed = v.check_int("seed", seed, minimum=0)
  if tolerances is None:
    tol = Tolerances()
  elif isinstance(tolerances, Tolerances):
    tol = tolerances
  elif isinstance(tolerances, dict):
    unknown = [k for k in tolerances if k not in Tolerances._fields]
    if unknown:
      raise ValueError(f"unknown tolerances {unknown}; known: {Tolerances._fields}")
    tol = Tolerances()._replace(**tolerances)
  else:
    raise ValueError(f"tolerances must be a Tolerances or a dict, got {type(tolerances).__name__}")

  if isinstance(model_or_joint, EMModel):
    if not isinstance(tolerances, (Tolerances, dict)):
      model_tol = model_or_joint.verification_tolerances or {}
      tol = tol._replace(**{k: max(v, getattr(tol, k)) for k, v in model_tol.items()})
    target = _model_target(model_or_joint, data, init_params=init_params,
                           param_specs=param_specs, oracle=oracle, component_axes=component_axes,
                           n_points=n_points, perturbation=perturbation, seed=seed,
                           compile=compile)
  elif not callable(model_or_joint):
    raise TypeError(f"verify takes a tfp_em.EMModel or a function params -> JointDistribution, "
                    f"got a {type(model_or_joint).__name__}: make a model class subclass "
                    "tfp_em.EMModel, or pass the joint distribution with e_step=..., m_step=... "
                    "functions")
  else:
    target = _user_target(model_or_joint, data, e_step=e_step, m_step=m_step,
                          init_params=init_params, param_specs=param_specs, latents=latents,
                          posterior=posterior, expected_log_joint=expected_log_joint,
                          marginal_log_prob=marginal_log_prob, component_axes=component_axes,
                          n_points=n_points, perturbation=perturbation, seed=seed,
                          compile=compile, name=name)
  if name:
    target = target._replace(name=name)
  names = field_names(target.starts[0])
  for f, axis in target.component_axes.items():
    if f not in names:
      raise ValueError(f"component_axes names {f!r}, which is not a parameter ({names})")
    ndim = len(np.shape(field_values(target.starts[0])[names.index(f)]))
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or not 0 <= axis < ndim:
      raise ValueError(f"component_axes[{f!r}] must be an axis of a {ndim}-D parameter, got {axis!r}")
  results, info = run_checks(target, tol, checks=checks, n_steps=n_steps, max_iter=max_iter,
                             seed=seed)
  return VerificationReport(target.name, results, time.perf_counter() - start_time, info)


# Names `verify_file` looks up in a user's file, and the `verify` argument each feeds.
FILE_NAMES = {
    "joint_distribution": "model_or_joint",   # required
    "data": "data",                           # required
    "e_step": "e_step",                       # required
    "m_step": "m_step",                       # required
    "init_params": "init_params",             # required
    "param_specs": "param_specs",             # required
    "latents": "latents",
    "posterior": "posterior",
    "expected_log_joint": "expected_log_joint",
    "marginal_log_prob": "marginal_log_prob",
    "component_axes": "component_axes",
    "verify_options": None,                   # dict of extra keyword arguments to verify
}
_REQUIRED = ("joint_distribution", "data", "e_step", "m_step", "init_params", "param_specs")


def load_user_module(path):
  """Imports a Python file by path (a fresh module each call)."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ValueError(f"no such file: {path}")
  if not path.endswith(".py"):
    raise ValueError(f"expected a Python file ending in .py, got {path}")
  module_name = "_tfp_em_user_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(module_name, path)
  module = importlib.util.module_from_spec(spec)
  sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
  try:
    spec.loader.exec_module(module)
  finally:
    sys.path.pop(0)
  return module


def verify_file(path, **overrides) -> VerificationReport:
  """Loads a user's Python file and verifies the EM it defines.

  The file defines, at module level:

    joint_distribution(params) or joint_distribution(params, data)
        -> a TFP JointDistribution with named variables (required)
    data              dict {name: array}: every observed variable (required)
    e_step(params, data) -> (stats, loglik)                          (required)
    m_step(params, stats) -> params                                  (required)
    init_params       dict (or NamedTuple) of arrays: the start       (required)
    param_specs       dict {name: TFP bijector onto the support, ParamSpec, or
                      None for a fixed parameter}                    (required)
    latents           {name: cardinality} or {name: 'gaussian'}
    posterior(params, data) -> {latent name: [N, M] probabilities} (discrete)
                      or {'u_mean': ..., 'u_cov': ...} (Gaussian)
    expected_log_joint(params, stats) -> Q (else derived from posterior)
    marginal_log_prob(params, data) -> closed-form log p(data)
    component_axes    {name: axis} for label matching
    verify_options    dict of extra keyword arguments to `verify`

  Keyword arguments override `verify_options`. The CLI `tfp-em verify PATH`
  prints the report and exits 0 if it passed, 1 if a check failed, 2 if the
  file could not be loaded or is missing a name (`ValueError`).

  Raises:
    ValueError: the file does not exist, fails to import, or lacks a
      required name.
  """
  try:
    module = load_user_module(path)
  except ValueError:
    raise
  except Exception as e:  # the user's file itself is broken
    raise ValueError(f"could not load {path}: {type(e).__name__}: {e}") from e
  missing = [n for n in _REQUIRED if not hasattr(module, n)]
  if missing:
    raise ValueError(f"{path} must define {missing} (see tfp_em.verification.verify_file for the "
                     "names it looks for)")
  kwargs = {FILE_NAMES[n]: getattr(module, n) for n in FILE_NAMES
            if FILE_NAMES[n] and hasattr(module, n)}
  options = dict(getattr(module, "verify_options", {}) or {})
  options.setdefault("name", os.path.basename(os.fspath(path)))
  options.update(overrides)
  joint = kwargs.pop("model_or_joint")
  if not callable(joint) and not isinstance(joint, EMModel):
    raise ValueError(f"{path} defines joint_distribution as a {type(joint).__name__}; verify "
                     "takes a tfp_em.EMModel or a function params -> JointDistribution")
  data = kwargs.pop("data")
  return verify(joint, data, **kwargs, **options)


def main_verify(path) -> int:
  """CLI body for `tfp-em verify PATH`: prints the report, returns the exit code."""
  try:
    report = verify_file(path)
  except ValueError as e:
    print(f"tfp-em verify: {e}", file=sys.stderr)
    return 2
  print(report)
  return 0 if report.passed else 1

