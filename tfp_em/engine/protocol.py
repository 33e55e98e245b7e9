"""The EM protocol: what `fit_em`, SQUAREM, the verifier and diagnostics need from a model.

A model subclasses `EMModel`, implements its six abstract methods, and
overrides the hooks below only where its defaults do not fit. Every hook is
declared here once, with its default: nothing in tfp_em probes a model for
optional attributes.

`Params` and `Stats` are NamedTuples of tensors. Stats are sums over data
points (or clusters), so partial stats from batches or replicas add up;
a model whose stats are not all sums names the others in
`per_point_stats_fields`, and the engine then fits it on in-memory data only.
"""
from __future__ import annotations

import abc
import types

import numpy as np
from sklearn.exceptions import ConvergenceWarning as SklearnConvergenceWarning


class ConvergenceWarning(SklearnConvergenceWarning):
  """EM stopped at `max_iter` before the tolerance was met."""


class LikelihoodDecreaseWarning(RuntimeWarning):
  """The log-likelihood decreased between two EM iterations."""


class LikelihoodDecreaseError(RuntimeError):
  """Raised by `on_decrease='raise'` when the log-likelihood decreases."""


class NumericalFailureError(ValueError):
  """The fit produced a non-finite log-likelihood or failed a factorization."""


def split_rows(data, num_shards: int):
  """Row blocks of a tuple of [N, ...] tensors, as equal as possible."""
  n = int(np.shape(data[0])[0])
  bounds = np.linspace(0, n, num_shards + 1).astype(int)
  return [type(data)(*[t[a:b] for t in data]) if hasattr(data, "_fields")
          else tuple(t[a:b] for t in data) for a, b in zip(bounds[:-1], bounds[1:])]


class EMModel(abc.ABC):
  """Base class of every model that `fit_em` fits and `tfp_em.verify` checks.

  Hooks (class attributes; override in a subclass or set on an instance):
    name: how messages and progress bars name the model.
    compile: how `fit_em` compiles the steps by default: 'eager', 'graph'
      (tf.function) or 'xla'.
    autograph: False when the steps have no Python control flow on tensors:
      tracing then skips AutoGraph's source conversion (faster first fit).
    trace_exact_rows: data of at most this many rows are traced at their
      exact size, larger data share one trace with the row count unknown
      (default 0: always shared). For steps whose trace is much simpler when
      N is known, like a chunk loop that small data skip.
    fuse_steps: False when the M-step cannot share one compiled function
      with the E-step (for instance an M-step that runs eagerly).
    failure_hint: what to try when the fit goes non-finite; appended to
      `NumericalFailureError` messages.
    param_specs: NamedTuple of `models.specs.ParamSpec` parallel to the
      params (trainable flag, bijector to unconstrained space); needed by
      SQUAREM, standard errors and the autodiff checks. None: not offered.
    shared_stats_fields: stats fields that are the same in every batch of a
      pass (a centring point, say): taken, not added.
    per_point_stats_fields: stats fields that hold one row per data point
      (concatenated, not summed). Batches and replicas cannot add them, so
      `fit_em` and `fit_online_em` refuse a `tf.data.Dataset` or a strategy
      for a model that declares any (default (): every field is a sum).
    summable_hint: for such a model, what to fit instead when the data come
      in batches or replicas (a model whose stats are sums); appended to
      that refusal (default "").
    generalized_m_step_fields: params whose M-step is iterative (a
      generalized M-step that must not decrease Q) rather than an argmax; the
      verifier checks Q increases there instead of a zero gradient.
    component_axes: {param field: axis} of fields whose components can be
      relabelled (mixtures); the verifier matches labels along these axes.
    traced_component_axes: {NamedTuple class: {field: axis}}: the axes of the
      steps' arguments (params, stats, data) that run over components.
      Compiled steps trace them at unknown size, so every number of
      components shares one trace (`tfp_em.engine.compiling`). A model that
      declares any reads the number of components from those shapes inside
      its steps, never from a Python attribute, and leaves it out of
      `step_config`. Default: none (traced at their sizes).
    traced_settings: names of float attributes (a penalty, say) that compiled
      steps take as scalar tensors in the params' dtype, so models that
      differ only in them share one trace (`tfp_em.engine.compiling`); the
      default `step_config` leaves them out. The steps must use them as
      numbers only, never in Python control flow. Default: none.
    verification_tolerances: `tfp_em.verification` tolerances for this model,
      or None for the defaults.

  Methods with defaults: `step_config` (what compiled steps are shared on),
  `split_data`, `rebase_stats`, `posterior`, `verification_oracle`.
  """
  name: str = "EMModel"
  compile: str = "graph"
  autograph: bool = True
  trace_exact_rows: int = 0
  fuse_steps: bool = True
  failure_hint: str = ""
  param_specs = None
  shared_stats_fields: tuple = ()
  per_point_stats_fields: tuple = ()
  summable_hint: str = ""
  generalized_m_step_fields: tuple = ()
  component_axes = types.MappingProxyType({})
  traced_component_axes = types.MappingProxyType({})
  traced_settings: tuple = ()
  verification_tolerances = None

  @abc.abstractmethod
  def initialize(self, data, seed: int):
    """Initial params for one restart (deterministic given `seed`)."""

  @abc.abstractmethod
  def e_step(self, params, data):
    """Returns `(stats, loglik)`; `loglik` is the objective at `params`."""

  @abc.abstractmethod
  def m_step(self, params, stats):
    """Returns argmax_theta Q(theta | params) (or a non-decreasing step)."""

  @abc.abstractmethod
  def expected_log_joint(self, params, stats):
    """Q(params | params_old), where `stats` came from the E-step at params_old."""

  @abc.abstractmethod
  def marginal_log_prob(self, params, data):
    """Differentiable log p(data | params) built from the TFP model."""

  @abc.abstractmethod
  def num_observations(self, data) -> float:
    """Total weight of the data; the tolerance applies to loglik / this."""

  def step_config(self):
    """A hashable value equal for any two models of this class whose steps
    compute the same thing, or None.

    Models of one class with equal `step_config()` share compiled steps for
    the whole process (`tfp_em.engine.compiling.compiled`), so a fresh
    model of a configuration seen before does not trace again. The default
    is every instance attribute but the `traced_settings`, sorted by name;
    None (no sharing) when one is not hashable. Keep callables the steps
    never run (an initializer, say) hashable by value, or they key the cache
    by identity. The cache keeps the
    first model of each configuration alive: a model should hold its
    configuration, not data.
    """
    try:
      config = tuple(sorted((name, value) for name, value in vars(self).items()
                            if name not in self.traced_settings))
      hash(config)
    except TypeError:
      return None
    return config

  def split_data(self, data, num_shards: int) -> list:
    """In-memory data cut into one self-contained shard per replica (row blocks)."""
    return split_rows(data, num_shards)

  def rebase_stats(self, stats, like):
    """`stats` re-expressed at the shared fields of `like` (online EM); identity
    for models without `shared_stats_fields`."""
    return stats

  def posterior(self, params, data):
    """The E-step's posterior of the latents for the verifier's check 2, or
    None when the model does not expose it."""
    return None

  def verification_oracle(self, params, data):
    """Exact log p(data) and latent posterior from the model itself (an
    `tfp_em.verification.exact.ExactPosterior`), or None: the verifier then has
    no reference for checks 1-2 beyond `marginal_log_prob`."""
    return None
