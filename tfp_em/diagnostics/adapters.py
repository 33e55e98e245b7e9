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
from tfp_em.engine import inputs as v
from tfp_em.engine.loop import to_tensors

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
  hmc_fixed = ()
  observed_names = ("x",)
  pointwise_dim = "obs"
  latent_states = False

  def model(self, fitted):
    raise NotImplementedError

  def params(self, fitted):
    return fitted.params_

  def data(self, fitted, X, y=None, **kwargs):
    raise NotImplementedError

  def param_specs(self, fitted):
    """NamedTuple of ParamSpec parallel to the params."""
    return self.model(fitted).param_specs

  def gauge_dimension(self, fitted) -> int:
    """Number of directions along which the likelihood is exactly flat."""
    return 0

  def training_data(self, fitted):
    """The data the estimator kept from `fit`, or None."""
    return getattr(fitted, "fit_data_", None)

  def observed(self, data) -> dict:
    """{name: numpy array} of observed variables (first dim = obs)."""
    raise NotImplementedError

  def pointwise_log_likelihood(self, fitted, params, data):
    """log p(obs_n | params), shape [N] (along `pointwise_dim`)."""
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

  def posterior_predictive(self, fitted, params, data, num_draws, seed):
    """{observed name: [num_draws, N, ...]} drawn from the model at `params`
    (with the designs/covariates of `data`)."""
    raise NotImplementedError

  def simulate(self, fitted, params, data, seed: int):
    """A data set of the same size drawn from the model at `params`."""
    raise NotImplementedError

  def default_priors(self, fitted, data):
    """{field: tfd.Distribution} weak proper priors on the constrained params."""
    raise NotImplementedError

  def figures(self, fitted, data, feature_names=None):
    """Model-specific figures: list of (Figure, file name, caption)."""
    return []

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
    from tfp_em.mixture.em import MixtureData
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

  def posterior_predictive(self, fitted, params, data, num_draws, seed, num_points=None):
    marginal = gm.marginal(params, fitted.covariance_type)
    num_points = int(data.x.shape[0]) if num_points is None else num_points
    x = marginal.sample([num_draws, num_points], seed=tf.constant([int(seed) % 2**31, 7], tf.int32))
    return {"x": x.numpy()}

  def simulate(self, fitted, params, data, seed):
    """Unit-weight points, as many as the total weight of `data`."""
    n = int(round(float(tf.reduce_sum(data.weights))))
    x = self.posterior_predictive(fitted, params, data, 1, seed, num_points=n)["x"][0]
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

  def figures(self, fitted, data, feature_names=None):
    from tfp_em.diagnostics import plots as plots
    return [(plots.mixture_ellipses(fitted, data, feature_names=feature_names),
             "mixture_ellipses.png", "Data coloured by most probable component; 1- and 2-sd "
             "ellipses of each component (first two features).")]

  def rebuild(self, config, params, n_features):
    from tfp_em.mixture.estimator import GaussianMixture
    est = GaussianMixture(**json.loads(config))
    est._set_fitted(to_tensors(params), n_features)
    return est


@register("MixedEffectsRegressor")
class MixedEffectsAdapter(Adapter):
  """Adapter for `tfp_em.mixed_effects.MixedEffectsRegressor`.

  Data: X, y plus `clusters` (and `time` / `Z` as in `fit`). For a network f,
  the model sees f(x) as a single fixed-effects column with beta = 1 held
  fixed, so the variance components are what the diagnostics estimate.
  HMC holds beta at its EM estimate (`hmc_fixed`): the variance components
  with f fixed. The log-likelihood does not factor over points, so
  `log_likelihood` is per cluster.
  """
  fitted_attribute = "fit_result_"
  observed_names = ("y",)
  pointwise_dim = "cluster"
  hmc_fixed = ("beta",)

  @property
  def params_type(self):
    from models.mixed_effects import MixedEffectsParams
    return MixedEffectsParams

  def model(self, fitted):
    from tfp_em.mixed_effects.em import MixedEffectsEM
    return MixedEffectsEM(fitted.covariance, compile="graph")

  def params(self, fitted):
    p = fitted.params_
    if fitted.network_ is not None:
      p = p._replace(beta=tf.ones([1], p.noise_variance.dtype))
    return p

  def param_specs(self, fitted):
    specs = self.model(fitted).param_specs
    if fitted.network_ is not None:
      specs = specs._replace(beta=specs.beta._replace(trainable=False))
    return specs

  def data(self, fitted, X, y=None, clusters=None, time=None, Z=None):
    if y is None or clusters is None:
      raise ValueError("MixedEffectsRegressor diagnostics need X, y and clusters "
                       "(and time / Z as passed to fit)")
    dtype = fitted.dtype_
    X, y = fitted._check_xy(X, y, dtype)
    v.check_n_features(X, fitted.n_features_in_)
    n = X.shape[0]
    codes = fitted._codes_with_new(clusters, n, "clusters")
    if codes.max() >= len(fitted.cluster_labels_):
      raise ValueError("clusters contains labels not seen in fit; diagnostics need the "
                       "training data")
    z = fitted._design(n, time, Z, dtype)
    if fitted.network_ is None:
      x = fitted._fixed_design(X)
    else:
      f, hidden = fitted.network_(tf.constant(X))
      z = np.asarray(fitted.network_.design(hidden, z), dtype)
      x = np.asarray(f, dtype)[:, None]
    return fitted._data(x, y, z, codes, len(fitted.cluster_labels_))

  def observed(self, data):
    return {"y": np.asarray(data.y)}

  def pointwise_log_likelihood(self, fitted, params, data):
    from models import mixed_effects as me
    return me.marginal_log_prob_per_cluster(params, data, fitted.covariance)

  def dims(self, fitted):
    cov = ("effect", "effect_bis") if fitted.covariance == "full" else ("effect",)
    return {"beta": ("coef",), "covariance": cov, "noise_variance": ()}

  def posterior_predictive(self, fitted, params, data, num_draws, seed):
    from models import mixed_effects as me
    joint = me.joint_distribution(params, data, fitted.covariance)
    # the model's gather takes one draw at a time
    draws = [joint.sample(seed=tf.constant([int(seed) % 2**31, i], tf.int32))["y"].numpy()
             for i in range(num_draws)]
    return {"y": np.stack(draws)}

  def simulate(self, fitted, params, data, seed):
    y = self.posterior_predictive(fitted, params, data, 1, seed)["y"][0]
    return data._replace(y=tf.constant(y, data.y.dtype))

  def default_priors(self, fitted, data):
    """Nearly flat: Sigma_u ~ Wishart(q+1, 100 var(y) I) ('diag': Exponential
    with mean 200 var(y)); sigma^2 ~ Exponential(mean 200 var(y)); beta ~
    N(0, (100 sd(y))^2)."""
    y = np.asarray(data.y)
    dtype = y.dtype
    var = float(np.var(y)) + np.finfo(dtype).eps
    q = int(data.z.shape[1])
    rate = tf.constant(1.0 / (200 * var), dtype)
    if fitted.covariance == "full":
      cov = tfd.WishartTriL(df=tf.constant(q + 1.0, dtype),
                            scale_tril=tf.constant(np.sqrt(100 * var) * np.eye(q), dtype),
                            input_output_cholesky=False)
    else:
      cov = tfd.Independent(tfd.Exponential(tf.fill([q], rate)), 1)
    p = int(data.x.shape[1])
    return {"beta": tfd.Independent(tfd.Normal(tf.zeros([p], dtype),
                                               tf.constant(100 * np.sqrt(var), dtype)), 1),
            "covariance": cov, "noise_variance": tfd.Exponential(rate)}

  def figures(self, fitted, data, feature_names=None):
    from tfp_em.diagnostics import plots as plots
    return [(plots.caterpillar(fitted), "caterpillar.png",
             "Caterpillar plot: posterior mean and 95% interval of each cluster's random "
             "effects, sorted.")]

  def rebuild(self, config, params, n_features):
    raise ValueError("rebuilding a MixedEffectsRegressor from netCDF is not supported "
                     "(the designs and network are not stored); write the report from the "
                     "fitted estimator")


@register("BernoulliMLPClassifier")
class BernoulliMLPAdapter(Adapter):
  """Adapter for `tfp_em.bernoulli_mlp.BernoulliMLPClassifier`.

  Latents: the 2^m hidden configurations (enumerable, so Louis' method
  applies; an L2 penalty enters as a per-point constant of the table). The
  softmax output weights are flat along 'add a vector to every class'
  (m+1 directions): SEs use the pseudo-inverse, i.e. they are the SEs of the
  class-centred weights the estimator stores. Hidden units are matched to the
  reference (Hungarian matching on their input weights, allowing the z -> 1-z
  flip of a unit); output weights are centred across classes after matching.
  """
  observed_names = ("y",)
  latent_states = True

  @property
  def params_type(self):
    from models.bernoulli_mlp import BernoulliMLPParams
    return BernoulliMLPParams

  def model(self, fitted):
    return fitted._model(len(fitted.classes_))

  def params(self, fitted):
    return fitted._params()

  def param_specs(self, fitted):
    from models import bernoulli_mlp as mlp
    return mlp.param_specs()

  def gauge_dimension(self, fitted):
    return int(fitted.n_hidden) + 1

  def data(self, fitted, X, y=None):
    if y is None:
      raise ValueError("BernoulliMLPClassifier diagnostics need X and y")
    xs = fitted._inputs(X)
    labels = fitted._label_codes(y, xs.shape[0])
    return (tf.constant(xs, v.check_dtype(fitted.dtype)), tf.constant(labels))

  def observed(self, data):
    return {"y": np.asarray(data[1])}

  def pointwise_log_likelihood(self, fitted, params, data):
    from models import bernoulli_mlp as mlp
    return mlp.marginal_log_prob(params, data[0], data[1])

  def complete_log_prob_table(self, fitted, params, data):
    """log p(z = config_k, y_n | x_n) - penalty / N, shape [N, 2^m]."""
    from models import bernoulli_mlp as mlp
    from tfp_em.bernoulli_mlp.em import l2_penalty
    model = self.model(fitted)
    x, y = data
    dtype = params.hidden_weights.dtype
    table = model.log_joint(params, mlp.add_bias(x), tf.one_hot(y, model.num_classes, dtype=dtype),
                            model.configurations(dtype))
    return table - l2_penalty(params, model.l2) / tf.cast(tf.shape(y)[0], dtype)

  def dims(self, fitted):
    return {"hidden_weights": ("input", "hidden"), "output_weights": ("hidden_bias", "class")}

  def label_permutation(self, fitted, reference, params):
    """(perm, signs): unit perm[j] (flipped where signs[j] = -1) matches unit j.

    Two exact symmetries: permuting hidden units, and flipping one (z_h ->
    1 - z_h, i.e. W[:, h] -> -W[:, h], V[0] += V[h+1], V[h+1] -> -V[h+1]).
    """
    ref = np.asarray(reference.hidden_weights).T                  # [m, D+1]
    cand = np.asarray(params.hidden_weights).T
    plus = np.sum((ref[:, None] - cand[None]) ** 2, -1)           # [m, m]
    minus = np.sum((ref[:, None] + cand[None]) ** 2, -1)
    _, perm = linear_sum_assignment(np.minimum(plus, minus))
    rows = np.arange(len(perm))
    return perm, np.where(minus[rows, perm] < plus[rows, perm], -1.0, 1.0)

  def permute(self, fitted, params, perm_signs):
    perm, signs = perm_signs
    w = np.array(params.hidden_weights, copy=True)
    out = np.array(params.output_weights, copy=True)
    for h, s in zip(perm, signs):
      if s < 0:
        out[0] += out[h + 1]
        out[h + 1] = -out[h + 1]
        w[:, h] = -w[:, h]
    out = out[np.concatenate([[0], np.asarray(perm) + 1])]
    return type(params)(w[:, perm], out - out.mean(axis=-1, keepdims=True))

  def posterior_predictive(self, fitted, params, data, num_draws, seed):
    from models import bernoulli_mlp as mlp
    dist = mlp.marginal(params, data[0])
    y = dist.sample(num_draws, seed=tf.constant([int(seed) % 2**31, 13], tf.int32))
    return {"y": y.numpy()}

  def simulate(self, fitted, params, data, seed):
    y = self.posterior_predictive(fitted, params, data, 1, seed)["y"][0]
    return (data[0], tf.constant(y, tf.int32))

  def default_priors(self, fitted, data):
    """Weak: every weight ~ N(0, 10^2) (inputs are standardized)."""
    p = self.params(fitted)
    dtype = p.hidden_weights.dtype
    return {name: tfd.Independent(tfd.Normal(tf.zeros(value.shape, dtype), tf.constant(10.0, dtype)), 2)
            for name, value in zip(p._fields, p)}

  def figures(self, fitted, data, feature_names=None):
    from tfp_em.diagnostics import plots as plots
    return [(plots.hidden_unit_heatmap(fitted, data), "hidden_units.png",
             "Posterior E[z_h | x, y] of every hidden unit (columns) for every point (rows, "
             "grouped by class).")]

  def rebuild(self, config, params, n_features):
    raise ValueError("rebuilding a BernoulliMLPClassifier from netCDF is not supported (the "
                     "input scaling is not stored); write the report from the fitted estimator")
