"""Turning `verify`'s two kinds of input into a `Target` the checks run on.

1. An `tfp_em.EMModel`: its hooks give the steps, Q (`expected_log_joint`),
   the marginal and the exact reference (`verification_oracle`).
2. A user's JointDistribution with plain-function steps. Q for the M-step
   checks comes, in order of preference, from `expected_log_joint`, from the
   exact posterior (when `statistics` lets the verifier hand the M-step the
   exact expected statistics), or from the user's `posterior`. A first call of
   each step (`preflight`) turns mistakes in the file's names, shapes,
   cardinalities and precision into one-line `ValueError`s.
"""
from __future__ import annotations

import inspect

import numpy as np
import tensorflow as tf

from tfp_em.engine.protocol import EMModel
from tfp_em.verification.kernels import Target
from tfp_em.verification.exact import (GAUSSIAN, ExactPosterior, dense_covariance,
                                       expected_log_joint_discrete, expected_log_joint_gaussian,
                                       flat_latents, latent_shapes, marginalize_discrete,
                                       marginalize_gaussian)
from tfp_em.verification.params import (Coordinates, check_precision, conform, leaf_paths,
                                        normalize_specs, to_float64)
from tfp_em.verification.statistics import (expected_statistics_discrete,
                                            expected_statistics_gaussian, linear_gaussian_defect)

# Relative change of the latents' second differences above which a model declared
# linear-Gaussian is not (round-off leaves ~1e-15).
LINEAR_GAUSSIAN_TOL = 1e-8


def float64_data(data):
  def cast(x):
    t = tf.convert_to_tensor(x)
    return tf.cast(t, tf.float64) if t.dtype.is_floating else t
  return tf.nest.map_structure(cast, data)


def perturbed_starts(start, specs, scale: float, seed: int):
  """i -> the start (i = 0) or its i-th seeded perturbation in unconstrained space."""
  coords = Coordinates(specs, start)

  def point(i: int):
    if i == 0:
      return start
    noise = np.random.default_rng([seed, i]).standard_normal(coords.flattener.size)
    return coords.unflatten(coords.u_hat + tf.constant(scale * noise, coords.u_hat.dtype))
  return point


def arity(fn) -> int:
  try:
    params = inspect.signature(fn).parameters.values()
  except (TypeError, ValueError):
    return 2
  return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
             for p in params)


def model_target(model: EMModel, data, *, init_params, param_specs, oracle, component_axes,
                 n_points, perturbation, seed, compile) -> Target:
  data = float64_data(data)
  start = init_params if init_params is not None else model.initialize(data, seed)
  start = to_float64(start)
  specs = normalize_specs(start, model.param_specs if param_specs is None else param_specs)
  exact_fn = model.verification_oracle if oracle is None else oracle
  point = perturbed_starts(start, specs, perturbation, seed)
  from_stats = lambda stats, *_: stats
  return Target(
      name=model.name, data=data, starts=[point(i) for i in range(n_points)], more_starts=point,
      specs=specs, e_step=model.e_step, m_step=model.m_step, q=model.expected_log_joint,
      fisher_evidence=from_stats, m_evidence=from_stats,
      q_fisher_source="the model's expected_log_joint of the E-step statistics",
      statistics=None, marginal=lambda p: model.marginal_log_prob(p, data),
      exact=lambda p: exact_fn(p, data), exact_note="", posterior=lambda p: model.posterior(p, data),
      log_prior=None, n_obs=float(model.num_observations(data)),
      component_axes=dict(model.component_axes if component_axes is None else component_axes),
      generalized_fields=tuple(model.generalized_m_step_fields),
      compile=model.compile != "eager" if compile is None else compile, notes=[])


class KnownLayout:
  """A JointDistribution whose event shapes and dtypes are given.

  TFP derives them by tracing the whole model, once per instance, and the
  checks build a new instance at every parameter point and in every trace:
  the verifier takes them from the instance at the start. Only `log_prob`,
  `event_shape` and `dtype` are used.
  """

  def __init__(self, jd, event_shape, dtype):
    self.jd, self.event_shape, self.dtype = jd, event_shape, dtype

  def log_prob(self, *args, **values):
    return self.jd.log_prob(*args, **values)


def _jd_variables(jd):
  names = jd.event_shape
  if hasattr(names, "_asdict"):
    names = names._asdict()
  return dict(names) if isinstance(names, dict) else {}


def _check_latents(latents):
  latents = dict(latents or {})
  for k, c in latents.items():
    if c != GAUSSIAN and (isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 2):
      raise ValueError(f"latents[{k!r}] must be a cardinality >= 2 or 'gaussian', got {c!r}")
  kinds = {"gaussian" if c == GAUSSIAN else "discrete" for c in latents.values()}
  if len(kinds) > 1:
    raise ValueError("mixing discrete and Gaussian latents is not supported; verify them in "
                     "separate models")
  return latents, (kinds.pop() if kinds else None)


def user_target(joint_distribution, data, *, e_step, m_step, init_params, param_specs, latents,
                posterior, expected_log_joint, marginal_log_prob, statistics, prior,
                component_axes, n_points, perturbation, seed, compile, name) -> Target:
  for fn_name, fn in (("e_step", e_step), ("m_step", m_step)):
    if not callable(fn):
      raise ValueError(f"{fn_name} must be a function; verifying a JointDistribution needs "
                       "e_step(params, data) -> (stats, loglik) and m_step(params, stats) -> params")
  for fn_name, fn in (("posterior", posterior), ("expected_log_joint", expected_log_joint),
                      ("marginal_log_prob", marginal_log_prob), ("statistics", statistics),
                      ("prior", prior)):
    if fn is not None and not callable(fn):
      raise ValueError(f"{fn_name} must be a function, got a {type(fn).__name__}")
  if init_params is None:
    raise ValueError("init_params are required: the parameter point to start from "
                     "(a dict or NamedTuple of arrays)")
  if not isinstance(data, dict):
    raise ValueError("data must be a dict {variable name: array} of the JointDistribution's "
                     f"observed variables (plus any covariates), got {type(data).__name__}")
  data = float64_data(data)
  start = to_float64(init_params)
  specs = normalize_specs(start, param_specs)
  latents, kind = _check_latents(latents)

  user_jd = (lambda p: joint_distribution(p, data)) if arity(joint_distribution) >= 2 \
      else joint_distribution
  jd0 = user_jd(start)  # one instance: its static attributes are traced once
  variables = _jd_variables(jd0)
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
  dtypes = jd0.dtype
  jd_fn = lambda p: KnownLayout(user_jd(p), jd0.event_shape, dtypes)
  dtypes = dtypes._asdict() if hasattr(dtypes, "_asdict") else dtypes
  observed = {k: tf.cast(data[k], dtypes[k]) for k in observed_names}

  exact_note = ""
  if kind == "gaussian":
    defect = linear_gaussian_defect(jd0, latents, observed)
    if not defect <= LINEAR_GAUSSIAN_TOL:
      exact_note = (f"the latents {sorted(latents)} are declared Gaussian, but log p(data, "
                    f"latents) is not quadratic in them (its second differences change by "
                    f"{defect:.3g} relative), so the exact Gaussian-conditioning path does not apply")
      if marginal_log_prob is None or expected_log_joint is None:
        raise ValueError(exact_note + "; give marginal_log_prob(params, data) and "
                         "expected_log_joint(params, stats) to run the autodiff checks")
      kind = None
  exact0 = None
  if kind == "discrete":  # raises a ValueError if the latents are coupled across points
    exact0 = _exact_at_start(lambda: marginalize_discrete(jd0, latents, observed,
                                                 check_factorization=True), latents)
  elif kind == "gaussian":
    exact0 = _exact_at_start(
        lambda: marginalize_gaussian(jd0, latents, observed), latents)

  def exact_fn(p):
    if kind == "discrete":
      return marginalize_discrete(lambda: jd_fn(p), latents, observed, check_factorization=False)
    if kind == "gaussian":
      return marginalize_gaussian(lambda: jd_fn(p), latents, observed)
    return ExactPosterior(jd_fn(p).log_prob(**observed), {})

  if marginal_log_prob is not None:
    marginal = lambda p: marginal_log_prob(p, data)
  else:  # None: the exact reference's log_prob
    marginal = None if kind is not None else (lambda p: exact_fn(p).log_prob)

  # Q is one function of (params, evidence), so checks 3 and 4 share one trace:
  # the evidence is the E-step's statistics (with expected_log_joint), or a
  # posterior (the user's or the exact one) in one layout: [N, M]
  # probabilities (discrete), flat means and dense covariances (Gaussian).
  def posterior_evidence(post):
    if post is None:
      raise ValueError("your posterior() failed at this point (see check 2)")
    if kind == "discrete":
      return tf.cast(post[next(iter(latents))], tf.float64)                # [N, M]
    _, sizes = flat_latents(jd0, list(latents))
    return {key: value for n, s in zip(latents, sizes) for key, value in (
        (n + "_mean", tf.reshape(tf.cast(post[n + "_mean"], tf.float64), [-1])),   # [s]
        (n + "_cov", dense_covariance(tf.cast(post[n + "_cov"], tf.float64), s)))}  # [s, s]

  def q_posterior(p, evidence):
    """Q(p) under a posterior in the layout of `posterior_evidence`."""
    if kind == "discrete":
      return expected_log_joint_discrete(lambda: jd_fn(p), latents, observed, evidence)
    return expected_log_joint_gaussian(lambda: jd_fn(p), latents, observed, evidence)

  if kind == "discrete" and len(latents) > 1 and posterior is not None and \
      expected_log_joint is None and statistics is None:
    raise ValueError("with several discrete latents give expected_log_joint(params, stats) or "
                     "statistics(params, data, latent_values)")
  stat = None
  if statistics is not None and kind is not None:
    stat = statistics if arity(statistics) >= 3 else (lambda p, d, values: statistics(d, values))

  def stats_fn(old, exact_old):
    """The exact expectation of the E-step's statistics at old."""
    fn = lambda values: stat(old, data, values)
    if kind == "discrete":
      (lat, *_) = latents
      return expected_statistics_discrete(fn, jd_fn(old), latents, observed,
                                          exact_old.posterior[lat])
    return expected_statistics_gaussian(
        fn, jd_fn(old), latents, {n: exact_old.posterior[n + "_mean"] for n in latents},
        exact_old.joint_cov)
  if expected_log_joint is not None:
    q = lambda p, stats: expected_log_joint(p, stats)
    fisher_evidence = lambda stats, post: stats
    m_evidence = lambda stats, post, exact_old: stats
    source = "expected_log_joint of your E-step's statistics"
  elif kind is not None and (posterior is not None or stat is not None):
    q = q_posterior
    fisher_evidence = ((lambda stats, post: posterior_evidence(post)) if posterior is not None
                       else None)
    m_evidence = ((lambda stats, post, exact_old: posterior_evidence(exact_old.posterior))
                  if stat is not None
                  else (lambda stats, post, exact_old: posterior_evidence(post)))
    source = "your posterior() (the E-step's statistics do not enter it)"
  else:
    raise ValueError("the verifier needs Q: give expected_log_joint(params, stats), or "
                     "statistics(params, data, latent_values) (the complete-data statistics "
                     "whose expectation your E-step returns), or posterior(params, data), "
                     "with latents naming the JointDistribution's latent variables")

  user_m_step = m_step if arity(m_step) >= 2 else (lambda p, stats: m_step(stats))
  point = perturbed_starts(start, specs, perturbation, seed)
  target = Target(
      name=name or getattr(joint_distribution, "__name__", "user model"), data=data,
      starts=[point(i) for i in range(n_points)], more_starts=point, specs=specs,
      e_step=e_step, m_step=user_m_step, q=q, fisher_evidence=fisher_evidence,
      m_evidence=m_evidence, q_fisher_source=source,
      statistics=stats_fn if stat is not None else None, marginal=marginal,
      exact=exact_fn if kind is not None else None,
      exact_note=exact_note, posterior=(lambda p: posterior(p, data)) if posterior else None,
      log_prior=prior, n_obs=float(tf.shape(observed[observed_names[0]])[0]),
      component_axes=dict(component_axes or {}), generalized_fields=(),
      compile=True if compile is None else compile, notes=[],
      unchecked_statistics=expected_log_joint is None and stat is None)
  preflight(target, latents, kind, jd0, stat, exact0)
  return target


def _exact_at_start(fn, latents):
  try:
    return fn()
  except ValueError:
    raise
  except Exception as e:  # noqa: BLE001 - a setup error, not a check failure
    first = (str(e).strip().splitlines() or [""])[0][:200]
    raise ValueError(f"the exact reference fails at init_params ({type(e).__name__}: {first}); "
                     f"check latents {latents} (names, cardinalities) against the "
                     "JointDistribution") from None


def preflight(target: Target, latents: dict, kind, jd, statistics, exact0) -> None:
  """One call of each user function at the start; ValueError for setup mistakes.

  A step that raises is left to the checks (which report it with the file and
  line); only what is certainly a mistake in the file's setup is refused here.

  Args:
    target: the user's target.
    latents, kind: the declared latents and their kind ('discrete',
      'gaussian' or None).
    jd: the JointDistribution at the start.
    statistics: (params, data, latent_values) -> statistics, or None.
    exact0: the exact reference at the start, or None.
  """
  start = target.starts[0]
  try:
    out = target.e_step(start, target.data)
  except Exception:  # noqa: BLE001 - the checks report it
    out = None
  if out is not None:
    if not isinstance(out, (tuple, list)) or len(out) != 2:
      raise ValueError(f"e_step must return (stats, loglik), got a {type(out).__name__}")
    stats, ll = out
    check_precision({"stats": stats, "loglik": ll}, "e_step")
    if tf.convert_to_tensor(ll).shape.rank not in (0, None):
      raise ValueError("e_step must return (stats, loglik) with a scalar loglik, got shape "
                       f"{tf.convert_to_tensor(ll).shape.as_list()}")
    try:
      new = target.m_step(start, stats)
    except Exception:  # noqa: BLE001
      new = None
    if new is not None:
      conform(start, new, "m_step", strict=True)
  if target.posterior is not None and kind is not None:
    try:
      post = target.posterior(start)
    except Exception:  # noqa: BLE001
      post = None
    if post is not None:
      _check_posterior_keys(post, latents, kind, exact0)
  if statistics is not None and out is not None and exact0 is not None:
    shapes = latent_shapes(jd, list(latents))
    dtypes = jd.dtype._asdict() if hasattr(jd.dtype, "_asdict") else jd.dtype
    if kind == "discrete" and tf.convert_to_tensor(exact0.posterior[next(iter(latents))]).shape[0] \
        != shapes[next(iter(latents))][0]:
      n = int(tf.convert_to_tensor(exact0.posterior[next(iter(latents))]).shape[0])
      shapes = {k: [n] + v for k, v in shapes.items()}
    try:
      value = statistics(start, target.data, {k: tf.zeros(shapes[k], dtypes[k]) for k in latents})
      fields = [p for p, _ in leaf_paths(value)]
    except Exception:  # noqa: BLE001 - check 2b reports it
      fields = None
    if fields is not None:
      have = [p for p, _ in leaf_paths(out[0])]
      lacking = [p for p in fields if p not in have]
      if lacking:
        raise ValueError(f"statistics() returns fields {lacking} that the E-step's statistics "
                         f"({have}) lack; the E-step must return the expectation of each")


def _check_posterior_keys(post, latents, kind, exact0):
  if not isinstance(post, dict):
    raise ValueError(f"posterior must return a dict keyed by latent name, got {type(post).__name__}")
  if kind == "gaussian":
    expected = [f"{n}_{s}" for n in latents for s in ("mean", "cov")]
  else:
    expected = list(latents)
  missing = [k for k in expected if k not in post]
  if missing:
    raise ValueError(f"posterior() returned keys {sorted(post)}; for the "
                     f"{'Gaussian' if kind == 'gaussian' else 'discrete'} latents "
                     f"{sorted(latents)} it must return {expected}")
  check_precision(post, "posterior")
  if exact0 is None:
    return
  for k in (latents if kind == "discrete" else [f"{n}_mean" for n in latents]):
    shape = tf.convert_to_tensor(post[k]).shape.as_list()
    want = tf.convert_to_tensor(exact0.posterior[k]).shape.as_list()
    if shape != want:
      hint = (f"latents {dict(latents)} give {want[-1]} configurations per point: check the "
              "cardinalities" if kind == "discrete" else "check the latent's shape")
      raise ValueError(f"posterior()[{k!r}] has shape {shape}, the exact posterior {want}; {hint}")
