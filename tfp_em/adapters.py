"""Per-estimator adapters: what diagnostics need to know about a fitted model.

Diagnostics, standard errors, HMC and reports are written once against the
small `Adapter` interface below; each estimator family contributes one
adapter (register it with `register`). An adapter never refits anything: it
reads the fitted estimator's params and builds the estimator's `EMModel`.

    adapter = get_adapter(fitted)
    model = adapter.model(fitted)                # an EMModel (engine protocol)
    data = adapter.data(fitted, X, y, weights)   # the tuple the model takes
    params = adapter.params(fitted)              # NamedTuple of tensors
"""
from __future__ import annotations

import json

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
from scipy.optimize import linear_sum_assignment

from models import gaussian_mixture as gm
from tfp_em import validation as v

tfd = tfp.distributions

_ADAPTERS = {}


def register(class_name: str):
  """Class decorator: registers an adapter for estimators named `class_name`."""
  def wrap(cls):
    _ADAPTERS[class_name] = cls()
    return cls
  return wrap


def get_adapter(fitted):
  """The adapter for a fitted estimator (or for an estimator class name)."""
  name = fitted if isinstance(fitted, str) else type(fitted).__name__
  if name not in _ADAPTERS:
    raise ValueError(f"no diagnostics adapter for {name!r}; known estimators: "
                     f"{sorted(_ADAPTERS)}")
  return _ADAPTERS[name]


class Adapter:
  """Interface (with defaults) that every estimator family implements.

  Attributes:
    fitted_attribute: attribute that exists once the estimator is fitted.
    observed_names: names of the observed variables in `observed_data`.
    latent_states: whether `complete_log_prob_table` exists (discrete latents
      that can be enumerated; enables Louis' method).
  """
  fitted_attribute = "params_"
  params_type = None
  observed_names = ("x",)
  latent_states = False

  def model(self, fitted):
    raise NotImplementedError

  def params(self, fitted):
    return fitted.params_

  def data(self, fitted, X, y=None, sample_weight=None):
    raise NotImplementedError

  def training_data(self, fitted):
    """The data the estimator kept from `fit`, or None."""
    return getattr(fitted, "fit_data_", None)

  def observed(self, data) -> dict:
    """{name: numpy array} of observed variables (first dim = obs)."""
    raise NotImplementedError

  def pointwise_log_likelihood(self, fitted, params, data):
    """log p(obs_n | params), shape [N]."""
    raise NotImplementedError

  def dims(self, fitted) -> dict:
    """{param field: tuple of dim names (without chain/draw)}."""
    raise NotImplementedError

  def label_permutation(self, fitted, reference, params):
    """Permutation of latent labels matching `params` to `reference`, or None."""
    return None

  def permute(self, fitted, params, perm):
    """`params` (numpy) with latent labels reordered by `perm`."""
    return params

  def align(self, fitted, reference, params):
    """`params` (numpy) with latent labels permuted to best match `reference`."""
    perm = self.label_permutation(fitted, reference, params)
    params = type(params)(*[np.asarray(p) for p in params])
    return params if perm is None else self.permute(fitted, params, perm)

  def posterior_predictive(self, fitted, params, num_points, num_draws, seed):
    """{observed name: [num_draws, num_points, ...]} drawn from the model."""
    raise NotImplementedError

  def simulate(self, fitted, params, data, seed: int):
    """A data set of the same size drawn from the model at `params`."""
    raise NotImplementedError

  def default_priors(self, fitted, data):
    """{field: tfd.Distribution} weak proper priors on the constrained params."""
    raise NotImplementedError

  def config(self, fitted) -> str:
    """JSON of what `rebuild` needs (constructor arguments)."""
    return json.dumps(_constructor_args(fitted))

  def rebuild(self, config: str, params, n_features: int):
    """A fitted estimator from `config` and final params (numpy NamedTuple)."""
    raise NotImplementedError


def _constructor_args(est) -> dict:
  import inspect
  sig = inspect.signature(type(est).__init__)
  out = {}
  for name in list(sig.parameters)[1:]:
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


@register("GaussianMixture")
class GaussianMixtureAdapter(Adapter):
  """Adapter for `tfp_em.GaussianMixture`."""
  latent_states = True
  params_type = gm.GaussianMixtureParams

  def model(self, fitted):
    return fitted._model()

  def data(self, fitted, X, y=None, sample_weight=None):
    from tfp_em.mixture_em import MixtureData
    dtype = v.check_dtype(fitted.dtype)
    x = v.check_array(X, "X", dtype=dtype)
    v.check_n_features(x, fitted.n_features_in_)
    w = v.check_sample_weight(sample_weight, x.shape[0], dtype=dtype)
    return MixtureData(tf.constant(x), tf.constant(w))

  def observed(self, data):
    return {"x": np.asarray(data.x)}

  def pointwise_log_likelihood(self, fitted, params, data):
    return gm.marginal(params, fitted.covariance_type).log_prob(data.x)

  def complete_log_prob_table(self, fitted, params, data):
    """log p(x_n, z_n = k | params), shape [N, K] (for Louis' method)."""
    return fitted._model().log_prob_components(params, data.x)

  def dims(self, fitted):
    cov = {"full": ("component", "feature", "feature_bis"),
           "tied": ("feature", "feature_bis"),
           "diag": ("component", "feature"),
           "spherical": ("component",)}[fitted.covariance_type]
    return {"weights": ("component",), "means": ("component", "feature"), "covariances": cov}

  def label_permutation(self, fitted, reference, params):
    return hungarian_permutation(reference.means, params.means)

  def permute(self, fitted, params, perm):
    """Reorders the component axis (the leading axis after any batch dims)."""
    w, m, c = (np.asarray(p) for p in params)
    axis = w.ndim - 1
    return type(params)(
        weights=np.take(w, perm, axis), means=np.take(m, perm, axis),
        covariances=c if fitted.covariance_type == "tied" else np.take(c, perm, axis))

  def posterior_predictive(self, fitted, params, num_points, num_draws, seed):
    marginal = gm.marginal(params, fitted.covariance_type)
    x = marginal.sample([num_draws, num_points], seed=tf.constant([int(seed) % 2**31, 7], tf.int32))
    return {"x": x.numpy()}

  def simulate(self, fitted, params, data, seed):
    """Unit-weight points, as many as the total weight of `data`."""
    n = int(round(float(tf.reduce_sum(data.weights))))
    x = self.posterior_predictive(fitted, params, n, 1, seed)["x"][0]
    return type(data)(tf.constant(x), tf.ones([n], x.dtype))

  def default_priors(self, fitted, data):
    """Nearly flat proper priors (the posterior mode stays at the MLE).

    weights ~ Dirichlet(1) (flat on the simplex); means ~ N(mean(x), (10 sd)^2);
    full/tied covariances ~ Wishart(df=D+1, scale=100 var(x) I), whose log
    density is -tr(Sigma) / (200 var) + const; diag/spherical variances ~
    Exponential(rate=1 / (200 var)), the 1-D version of the same.
    """
    x = np.asarray(data.x)
    dtype = x.dtype
    k, d = fitted.n_components, x.shape[1]
    loc, sd = x.mean(0), x.std(0) + np.finfo(dtype).eps
    var = float(np.mean(sd ** 2))
    priors = {
        "weights": tfd.Dirichlet(tf.ones([k], dtype)),
        "means": tfd.Independent(tfd.Normal(tf.constant(np.broadcast_to(loc, (k, d)), dtype),
                                             tf.constant(10 * np.broadcast_to(sd, (k, d)), dtype)), 2),
    }
    ct = fitted.covariance_type
    if ct in ("full", "tied"):
      wishart = tfd.WishartTriL(df=tf.constant(d + 1.0, dtype),
                                scale_tril=tf.constant(np.sqrt(100 * var) * np.eye(d), dtype),
                                input_output_cholesky=False)
      priors["covariances"] = wishart if ct == "tied" else tfd.Sample(wishart, k)
    else:
      shape = (k, d) if ct == "diag" else (k,)
      rate = tf.constant(np.full(shape, 1.0 / (200 * var)), dtype)
      priors["covariances"] = tfd.Independent(tfd.Exponential(rate), len(shape))
    return priors

  def rebuild(self, config, params, n_features):
    from tfp_em.mixture import GaussianMixture
    est = GaussianMixture(**json.loads(config))
    est._set_fitted(type(params)(*[tf.constant(p) for p in params]), n_features)
    return est
