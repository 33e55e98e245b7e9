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

   Q for the M-step checks comes from `expected_log_joint` when given; else,
   with `statistics` (the complete-data statistics whose expectation the
   E-step returns), the verifier computes their exact expectation, compares
   it with the E-step's field by field (check 2b) and hands it to the
   M-step, with Q under the exact posterior; else Q comes from your
   `posterior`. A `prior` makes it a MAP EM (objective loglik + log prior).

The checks (DESIGN.md section 4), all in float64, at `n_points` parameter
points (the start and seeded random perturbations of it in unconstrained
coordinates) on the data you give:

  1   likelihood: the E-step's loglik equals the exact log p(data | theta)
      (enumeration of discrete latents, Gaussian conditioning, or the model's
      TFP marginal), at every point.
  2   posterior: the E-step posterior equals the exact posterior.
  2b  statistics: the E-step's statistics equal their exact expectation,
      field by field (with `statistics`).
  3   Fisher identity: grad_theta Q(theta | theta_old) = grad loglik(theta_old)
      at theta = theta_old, by autodiff in unconstrained coordinates.
  4a  the M-step's output lies in the parameter support.
  4b  grad Q(theta_new | theta_old) = 0 (closed-form blocks).
  4c  Q(theta_new) >= Q(theta_old).
  4d  Q(theta_new) >= Q(theta_new perturbed) in random directions.
  4e  the fixed (non-trainable) parameters come out of the M-step unchanged.
  5   loglik never decreases along EM iterations, beyond round-off. A start
      from which EM runs into a singularity of the likelihood (a collapsing
      component) is reported as degenerate and replaced.
  6a  EM run to convergence ends at grad loglik(theta*) = 0.
  6b  the EM optimum is an optimum of loglik: L-BFGS (SciPy) started there
      stays, or, EM's point being stationary, L-BFGS from the same start
      reaches it up to label permutation (Hungarian matching on
      `component_axes`).

Checks 1-3 and 2b examine the E-step, checks 4a-4e the M-step; the report
names the step, the field and the size of each failure. Each check runs on
its own: an exception in the user's code fails that check (naming the file
and line) and the others still report. Tolerances scale with the problem;
see `tfp_em.verification.Tolerances`.

#### References

[1] A. P. Dempster, N. M. Laird and D. B. Rubin. Maximum likelihood from
    incomplete data via the EM algorithm. JRSS B, 39(1):1-38, 1977.
[2] T. A. Louis. Finding the observed information matrix when using the EM
    algorithm. JRSS B, 44(2):226-233, 1982 (the Fisher identity).
"""
from __future__ import annotations

import importlib.util
import os
import sys
import time

import numpy as np

from tfp_em.engine import inputs as v
from tfp_em.engine.protocol import EMModel
from tfp_em.verification.checks import Tolerances
from tfp_em.verification.iterations import run_checks
from tfp_em.verification.params import field_names, field_values
from tfp_em.verification.report import VerificationReport
from tfp_em.verification.targets import model_target, user_target

__all__ = ["ALL_CHECKS", "FILE_NAMES", "load_user_module", "main_verify", "verify", "verify_file"]

ALL_CHECKS = ("1", "2", "3", "4", "5", "6")


def _check_checks(checks):
  checks = tuple(str(c) for c in checks)
  bad = [c for c in checks if c not in ALL_CHECKS]
  if bad:
    raise ValueError(f"checks must be a subset of {ALL_CHECKS}, got {bad}")
  return checks


def _tolerances(tolerances, model) -> Tolerances:
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
  if isinstance(model, EMModel) and tolerances is None:
    model_tol = model.verification_tolerances or {}
    tol = tol._replace(**{k: max(t, getattr(tol, k)) for k, t in model_tol.items()})
  return tol


def verify(model_or_joint, data, *, e_step=None, m_step=None, init_params=None,
           param_specs=None, latents=None, posterior=None, expected_log_joint=None,
           statistics=None, prior=None, marginal_log_prob=None, oracle=None,
           component_axes=None, checks=ALL_CHECKS, n_points: int = 3, n_steps: int = 5,
           max_iter: int = 2000, perturbation: float = 0.5,
           tolerances: Tolerances | dict | None = None, seed: int = 0,
           compile: bool | None = None, name: str | None = None) -> VerificationReport:
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
    m_step: `(params, stats) -> params` (or `stats -> params`); params are
      matched to `init_params` by name.
    init_params: start point, a dict or NamedTuple of arrays. Required for a
      JointDistribution; for an EMModel defaults to `model.initialize(data,
      seed)`.
    param_specs: per parameter a `ParamSpec`, a TFP bijector onto its support
      (trainable) or None (fixed: the M-step must return it unchanged); same
      names as the params. Defaults to the EMModel's `param_specs`.
    latents: {name: cardinality} for discrete latents or {name: 'gaussian'}
      for linear-Gaussian ones (JointDistribution input).
    posterior: `(params, data) -> dict` of the E-step's posterior: for a
      discrete latent `z`, `{'z': [N, M] probabilities}` (and optionally
      `'z_mean'`); for a Gaussian latent `u`, `{'u_mean': ..., 'u_cov': ...}`.
      Check 2 compares it with the exact posterior.
    expected_log_joint: optional `(params, stats) -> Q`, read from the
      E-step's statistics (check 3) and maximized by the M-step (check 4).
    statistics: optional `(params, data, latent_values) -> stats`: the
      statistics of one complete data set, whose expectation under the
      posterior the E-step returns. Check 2b compares the E-step's statistics
      with their exact expectation field by field, and checks 4 hand the
      M-step the exact ones, so a bug is blamed on the step that has it.
      Must be a sum over data points (discrete latents) or at most quadratic
      in the latents (Gaussian latents).
    prior: optional `params -> log p(params)`: verify a MAP EM, whose
      objective is loglik + log prior (the E-step may report either).
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
    compile: compile the steps and the reference computations once per call
      (default: True, or the model's `compile != 'eager'`); code that cannot
      be traced runs eagerly, and the report says so.
    name: name shown in the report.

  Returns:
    A `VerificationReport` (with its wall time); call `.raise_if_failed()` to
    turn failures into an exception. An exception in the user's code fails
    the check it happened in, naming the file and line; the other checks
    still report.

  Raises:
    TypeError: `model_or_joint` is neither an EMModel nor a function (an
      object with E/M-step methods must subclass `tfp_em.EMModel`).
    ValueError: bad arguments, or inputs the checks cannot use (missing or
      unknown names, wrong shapes or cardinalities, a posterior without the
      expected keys, steps computing in float32).
  """
  start_time = time.perf_counter()
  checks = _check_checks(checks)
  n_points = v.check_int("n_points", n_points, minimum=1)
  n_steps = v.check_int("n_steps", n_steps, minimum=1)
  max_iter = v.check_int("max_iter", max_iter, minimum=1)
  perturbation = v.check_float("perturbation", perturbation, minimum=0.0)
  seed = v.check_int("seed", seed, minimum=0)
  tol = _tolerances(tolerances, model_or_joint)
  if isinstance(model_or_joint, EMModel):
    target = model_target(model_or_joint, data, init_params=init_params,
                          param_specs=param_specs, oracle=oracle, component_axes=component_axes,
                          n_points=n_points, perturbation=perturbation, seed=seed,
                          compile=compile)
  elif not callable(model_or_joint):
    raise TypeError(f"verify takes a tfp_em.EMModel or a function params -> JointDistribution, "
                    f"got a {type(model_or_joint).__name__}: make a model class subclass "
                    "tfp_em.EMModel, or pass the joint distribution with e_step=..., m_step=... "
                    "functions")
  else:
    target = user_target(model_or_joint, data, e_step=e_step, m_step=m_step,
                         init_params=init_params, param_specs=param_specs, latents=latents,
                         posterior=posterior, expected_log_joint=expected_log_joint,
                         marginal_log_prob=marginal_log_prob, statistics=statistics, prior=prior,
                         component_axes=component_axes, n_points=n_points,
                         perturbation=perturbation, seed=seed, compile=compile, name=name)
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
    "statistics": "statistics",
    "expected_log_joint": "expected_log_joint",
    "prior": "prior",
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
    statistics(params, data, latent_values) -> the statistics of one
                      complete data set; the E-step returns their expectation
    expected_log_joint(params, stats) -> Q
    prior(params)     -> log p(params): verify a MAP EM
    marginal_log_prob(params, data) -> closed-form log p(data)
    component_axes    {name: axis} for label matching
    verify_options    dict of extra keyword arguments to `verify`

  Q comes from `expected_log_joint`, else (with `statistics`) from the exact
  posterior, else from `posterior`: one of the three is needed. Keyword
  arguments override the file's names and `verify_options`. The CLI
  `tfp-em verify PATH` prints the report and exits 0 if it passed, 1 if a
  check failed, 2 if the file could not be loaded or set up (`ValueError`).

  Raises:
    ValueError: the file does not exist, fails to import, lacks a required
      name, or sets up something the checks cannot use (see `verify`).
  """
  try:
    module = load_user_module(path)
  except ValueError:
    raise
  except Exception as e:  # the user's file itself is broken
    first = (str(e).strip().splitlines() or [""])[0]
    raise ValueError(f"could not load {path}: {type(e).__name__}: {first}") from e
  missing = [n for n in _REQUIRED if not hasattr(module, n) and FILE_NAMES[n] not in overrides]
  if missing:
    raise ValueError(f"{path} must define {missing} (see tfp_em.verification.verify_file for the "
                     "names it looks for)")
  kwargs = {FILE_NAMES[n]: getattr(module, n) for n in FILE_NAMES
            if FILE_NAMES[n] and hasattr(module, n)}
  options = getattr(module, "verify_options", None) or {}
  if not isinstance(options, dict):
    raise ValueError(f"{path}: verify_options must be a dict of keyword arguments to verify, "
                     f"got a {type(options).__name__}")
  kwargs.update(options)
  kwargs.setdefault("name", os.path.basename(os.fspath(path)))
  kwargs.update(overrides)
  joint = kwargs.pop("model_or_joint")
  if not callable(joint) and not isinstance(joint, EMModel):
    raise ValueError(f"{path} defines joint_distribution as a {type(joint).__name__}; verify "
                     "takes a tfp_em.EMModel or a function params -> JointDistribution")
  data = kwargs.pop("data")
  try:
    return verify(joint, data, **kwargs)
  except TypeError as e:
    if "unexpected keyword argument" in str(e):
      raise ValueError(f"{path}: verify_options: {e}") from None
    raise


def main_verify(path) -> int:
  """CLI body for `tfp-em verify PATH`: prints the report, returns the exit code."""
  try:
    report = verify_file(path)
  except ValueError as e:
    print(f"tfp-em verify: {e}", file=sys.stderr)
    return 2
  print(report)
  return 0 if report.passed else 1
