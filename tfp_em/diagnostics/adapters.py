"""The adapter interface: what diagnostics need to know about a fitted estimator.

Diagnostics, standard errors, HMC and reports are written once against the
small `Adapter` interface below. Each estimator family provides one adapter in
its own package and registers it for its estimator class; subclasses of that
class inherit it. An adapter never refits anything: it reads the fitted
estimator's params and builds the estimator's `EMModel`.

    @register(GaussianMixture)
    class GaussianMixtureAdapter(Adapter): ...

    adapter = get_adapter(fitted)
    model = adapter.model(fitted)                # an EMModel (engine protocol)
    data = adapter.data(fitted, X, y, weights)   # the tuple the model takes
    params = adapter.params(fitted)              # NamedTuple of tensors
"""
from __future__ import annotations

import inspect
import abc
import json
import pkgutil
import sys

from typing import NamedTuple

import numpy as np
from scipy.optimize import linear_sum_assignment

_ADAPTERS = {}  # estimator class -> Adapter instance


def register(estimator_class: type):
  """Class decorator: registers an `Adapter` subclass for `estimator_class`.

  The adapter also serves every subclass of `estimator_class` that has no
  adapter of its own.
  """
  def wrap(adapter_class):
    _ADAPTERS[estimator_class] = adapter_class()
    return adapter_class
  return wrap


def get_adapter(fitted):
  """The adapter for a fitted estimator (or an estimator class).

  Walks the class's MRO, so a subclass uses its nearest registered parent's
  adapter. Raises ValueError naming the known estimators when none is found.
  """
  cls = fitted if isinstance(fitted, type) else type(fitted)
  for klass in cls.__mro__:
    if klass in _ADAPTERS:
      return _ADAPTERS[klass]
  raise ValueError(f"no diagnostics adapter for {cls.__name__}; known estimators: "
                   f"{_names()}")


def estimator_class(name: str, path: str | None = None) -> type:
  """The estimator class stored in a netCDF file: a registered class or a subclass of one.

  Args:
    name: the class's `__name__`.
    path: 'module:qualname' of the class. Importing that module registers
      its family's adapter (a family package registers it when imported). It
      is imported only when it belongs to tfp_em or is imported already (a
      user's subclass): a file never makes tfp_em import arbitrary code.
  """
  module = (path or "").partition(":")[0]
  if module.startswith("tfp_em.") or module in sys.modules:
    cls = pkgutil.resolve_name(path)
    if isinstance(cls, type):
      get_adapter(cls)  # a clear error when it has none
      return cls
  matches = [cls for cls in _with_subclasses(_ADAPTERS) if cls.__name__ == name]
  if not matches:
    raise ValueError(f"no diagnostics adapter for an estimator named {name!r}; known "
                     f"estimators: {_names()} (import the package that defines it, e.g. "
                     "tfp_em.mixture, before loading)")
  return matches[0]


def _with_subclasses(classes) -> list[type]:
  out = list(classes)
  for cls in out:  # grows while iterating: breadth first, the registered classes first
    out += [sub for sub in cls.__subclasses__() if sub not in out]
  return out


def _names() -> list[str]:
  return sorted(cls.__name__ for cls in _ADAPTERS)


class Table(NamedTuple):
  """A model-specific table of the report: a title, a note and its cells."""
  title: str
  note: str
  header: list
  rows: list


class Adapter(abc.ABC):
  """Interface that every estimator family implements: abstract methods, and defaults.

  Attributes:
    fitted_attribute: attribute that exists once the estimator is fitted.
    params_type: the params NamedTuple class (rebuilding from netCDF).
    hmc_fixed: params HMC holds at the EM estimate by default.
    observed_names: names of the observed variables in `observed_data`.
    pointwise_dim: dim of the pointwise log-likelihood ('obs', 'cluster').
    latent_states: whether `complete_log_prob_table` exists (discrete latents
      that can be enumerated; enables Louis' method).
    density_check: whether the report draws the generic predictive check
      (densities of observed and replicated data); False where `figures`
      has a check of its own (a classifier's class counts).
  """
  fitted_attribute = "params_"
  params_type = None
  hmc_fixed = ()
  observed_names = ("x",)
  pointwise_dim = "obs"
  latent_states = False
  density_check = True

  @abc.abstractmethod
  def model(self, fitted):
    """The estimator's `EMModel`."""

  def params(self, fitted):
    """The fitted params, NamedTuple of tensors."""
    return fitted.params_

  @abc.abstractmethod
  def data(self, fitted, X, y=None, **kwargs):
    """The model's data tuple from X (and y, and the data keywords of `fit`)."""

  def param_specs(self, fitted):
    """NamedTuple of ParamSpec parallel to the params."""
    return self.model(fitted).param_specs

  def hmc_unavailable(self, fitted) -> str | None:
    """Why NUTS cannot sample this fit's params (None: it can)."""
    return None

  def gauge_dimension(self, fitted) -> int:
    """Number of directions along which the likelihood is exactly flat."""
    return 0

  def training_data(self, fitted):
    """The data the estimator kept from `fit`, or None."""
    return None

  def sample_weight(self, data):
    """Per-point weights [N] of `data`, or None (every point counts once)."""
    return None

  @abc.abstractmethod
  def observed(self, data) -> dict:
    """{name: numpy array} of observed variables (first dim = obs)."""

  @abc.abstractmethod
  def pointwise_log_likelihood(self, fitted, params, data):
    """log p(obs_n | params), shape [N] (along `pointwise_dim`)."""

  def complete_log_prob_table(self, fitted, params, data):
    """log p(obs_n, latent = k | params), shape [N, K] (when `latent_states`)."""
    raise NotImplementedError

  @abc.abstractmethod
  def dims(self, fitted) -> dict:
    """{param field: tuple of dim names (without chain/draw)}."""

  def label_permutation(self, fitted, reference, params):
    """Permutation of latent labels matching `params` to `reference`, or None."""
    return None

  def is_relabelling(self, perm) -> bool:
    """Whether `perm` (from `label_permutation`) changes any label."""
    return perm is not None and not np.array_equal(perm, np.arange(len(perm)))

  def permute(self, fitted, params, perm):
    """`params` (numpy) with latent labels reordered by `perm`."""
    return params

  def align(self, fitted, reference, params):
    """`params` (numpy) with latent labels permuted to best match `reference`."""
    perm = self.label_permutation(fitted, reference, params)
    params = type(params)(*[np.asarray(p) for p in params])
    return params if perm is None else self.permute(fitted, params, perm)

  @abc.abstractmethod
  def posterior_predictive(self, fitted, params, data, num_draws, seed):
    """{observed name: [num_draws, N, ...]} drawn from the model at `params`
    (with the designs/covariates of `data`)."""

  @abc.abstractmethod
  def simulate(self, fitted, params, data, seed: int):
    """A data set of the same size drawn from the model at `params`."""

  @abc.abstractmethod
  def default_priors(self, fitted, data):
    """{field: tfd.Distribution} weak proper priors on the constrained params."""

  def coords(self, fitted, feature_names=None) -> dict:
    """{dim: names} naming the positions of the params' dims (`naming.entries`): by
    default the features' names ({'feature': feature_names}) when given."""
    return {} if feature_names is None else {"feature": [str(f) for f in feature_names]}

  def figures(self, fitted, data, feature_names=None):
    """Model-specific figures: list of (Figure, file name, caption)."""
    return []

  def tables(self, fitted, data, feature_names=None):
    """Model-specific tables: list of `Table`."""
    return []

  def config(self, fitted) -> str:
    """JSON of what `rebuild` needs (constructor arguments)."""
    return json.dumps(_constructor_args(fitted))

  @abc.abstractmethod
  def rebuild(self, estimator_class: type, config: str, params, n_features: int):
    """A fitted `estimator_class` from `config` and final params (numpy NamedTuple)."""


def _constructor_args(est) -> dict:
  """The estimator's scalar constructor arguments (None, bool, int, float, str)."""
  out = {}
  for name in list(inspect.signature(type(est).__init__).parameters)[1:]:
    value = getattr(est, name, None)
    if value is None or isinstance(value, (bool, int, float, str)):
      out[name] = value
  return out


def hungarian_permutation(reference, candidate) -> np.ndarray:
  """perm with candidate[perm] closest to reference (rows), by squared distance."""
  reference = np.asarray(reference).reshape(len(reference), -1)
  candidate = np.asarray(candidate).reshape(len(candidate), -1)
  cost = np.sum((reference[:, None, :] - candidate[None, :, :]) ** 2, axis=-1)  # [K, K]
  _, perm = linear_sum_assignment(cost)
  return perm
