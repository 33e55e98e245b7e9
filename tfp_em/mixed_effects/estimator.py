"""`MixedEffectsRegressor`: linear mixed models and mixed-effects neural networks.

    y_ij = f(x_ij) + z_ij^T u_i + eps_ij,   u_i ~ N(0, Sigma_u),   eps ~ N(0, sigma^2)

with one grouping factor (cluster i). f is linear (`f=None`, a plain LMM fitted
by exact EM or L-BFGS on the marginal) or a Keras 3 network (MeNets EM or
LMMNN marginal NLL). The model is `models.mixed_effects`; the EM steps are in
`em`, the network trainers in `networks`; several factors go to
`crossed_estimator.fit_crossed`. A list of one factor is that factor.

Prediction rule: a point whose cluster was seen in `fit` gets
f(x) + z^T m_i, with m_i the BLUP E[u_i | y_train]; a point of an unseen
cluster (or with `clusters=None`) gets f(x), the population mean (u_i = 0).
`predict_interval` adds the matching predictive variance: z^T Cov[u_i | y] z +
sigma^2 for seen clusters, z^T Sigma_u z + sigma^2 for unseen ones (the
uncertainty of f itself is not included).

#### References

[1] Y. Xiong, H. J. Kim and V. Singh. Mixed effects neural networks (MeNets)
    with applications to gaze estimation. CVPR, 2019.
[2] G. Simchoni and S. Rosset. Using random effects to account for
    high-cardinality categorical features and repeated measures in deep neural
    networks. NeurIPS, 2021.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import tensorflow as tf
from scipy import stats as sps
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.metrics import r2_score

from models import mixed_effects as me
from tfp_em.engine import inputs as val
from tfp_em.mixed_effects.crossed_estimator import fit_crossed
from tfp_em.mixed_effects.degenerate import check_fixed_design, check_response
from tfp_em.mixed_effects.em import MixedEffectsEM, MixedEffectsStats
from tfp_em.mixed_effects.formula import FormulaMixin
from tfp_em.mixed_effects.labels import as_factors, code_labels, encode_clusters
from tfp_em.mixed_effects.linear_fit import fit_converged, fit_linear, linear_model
from tfp_em.mixed_effects.names import random_effect_names
from tfp_em.mixed_effects.networks import fit_network
from tfp_em.mixed_effects.singular import warn_if_singular
from tfp_em.mixed_effects.training import (build_network, check_validation_data, default_mlp,
                                           fit_summary)

RANDOM_EFFECTS = ("intercept", "slopes", "features", "custom")
METHODS = ("em", "nll")

__all__ = ["MixedEffectsRegressor", "MixedEffectsEM", "MixedEffectsStats",
           "default_mlp", "encode_clusters"]


class RandomEffect(NamedTuple):
  """BLUP of one cluster's random effect: u_i | y_train ~ N(mean, covariance)."""
  mean: np.ndarray        # [q]
  covariance: np.ndarray  # [q, q]


class MixedEffectsRegressor(FormulaMixin, RegressorMixin, BaseEstimator):
  """Mixed-effects regression with one or several grouping factors, linear or neural f.

  One factor (`clusters` = one label array, or a list of one) takes any
  random-effects design below; several (`clusters=[g1, ..., gK]`, K >= 2)
  take crossed random intercepts with one variance each, or with linear f
  random_effects='custom' and Z=[z_1, ..., z_K] (None for an intercept) a
  design per factor (`crossed_estimator`, `crossed_networks`).

  Args:
    random_effects: the design z_ij (default 'intercept'):
      'intercept' z = [1]; 'slopes' z = [1, t, ..., t^degree] from `time`;
      'features' (MeNets) z = [1, Gamma(x)], Gamma the network's last hidden
      layer (needs a network f); 'custom' z = the `Z` passed to fit/predict.
      When to use 'features': each cluster's effect varies along directions
      the network also uses for f (random slopes on inputs f depends on),
      with enough points per cluster for a q = H + 1 dimensional random
      effect (H the last hidden layer's width; shrinkage makes 5 per cluster
      work, and far fewer than H become noisy). With method='em' it is
      fitted in two stages (`networks.fit_menets`): f with random
      intercepts first, then [1, Gamma] on that network. When you know
      which inputs carry random slopes, 'custom' with Z = [1, those
      inputs] is the model to prefer; when the slope is on an input f does
      not use, Gamma cannot represent it and 'features' falls back to about
      the random-intercept fit.
    degree: polynomial degree for 'slopes' (default 1).
    covariance: 'full' (default) or 'diag' Sigma_u.
    f: the fixed effect. None (default): linear, x^T beta (+ intercept).
      'mlp': `default_mlp` (100-50-25-12 ReLU, dropout 0.25). A Keras model
      (cloned, then trained; yours is left untouched) or a callable
      `input_dim -> keras.Model`.
    method: 'em' (default; for linear f, exact EM with the PX-EM expansion
      step when Z lies in the span of the fixed-effects design, else plain
      EM; for a network, MeNets EM) or 'nll' (L-BFGS on the exact marginal
      for linear f; LMMNN Adam on the marginal NLL for a network).
    fit_intercept: add an intercept column to linear f (default True).
    max_iter: EM iterations (linear f: M-steps; network: outer EM iterations)
      or, for 'nll' with a network, epochs (default 500).
    tol: relative tolerance on the mean log-likelihood for linear f
      (default 1e-10).
    seed: integer seed for initialization, weights and shuffling (default 0).
    dtype: 'float64' (default) or 'float32' for the variance computations
      (a default network always computes in float32).
    epochs_per_step: network epochs per EM M-step (default 1).
    batch_size: rows per mini-batch (default 100); for 'nll' batches are
      whole clusters, cut once they reach `batch_size` rows.
    learning_rate: Adam learning rate (default 1e-3).
    patience: early-stopping patience, in EM iterations or epochs (default 10).
    hidden_units, dropout: for f='mlp' (defaults (100, 50, 25, 12), 0.25).
    on_decrease: `fit_em`'s guard for linear EM: 'warn' (default), 'raise' or
      'revert'.
    reml: linear f with one factor: fit by restricted maximum likelihood
      (`reml`; lme4's and statsmodels' default) instead of maximum likelihood
      (default False: l is then comparable across fixed-effects designs, and
      the EM objective stays the likelihood).

  Attributes (after fit):
    random_effects_: dict cluster label -> `RandomEffect(mean [q], covariance [q, q])`.
    cluster_labels_: [G] labels, in the order of the arrays below.
    random_effects_mean_ [G, q], random_effects_covariance_ [G, q, q].
    cov_random_effects_: [q, q] Sigma_u.
    sigma2_: the noise variance.
    variances_: [K] sigma_k^2 (several factors only; then the per-cluster
      attributes above are not set and `crossed_` holds the BLUPs); with
      designs Z, the diagonals of covariances_ (K Sigma_k, linear f).
    coef_, intercept_: linear f only.
    network_: the trained Keras model (network f only).
    log_likelihood_: training marginal log-likelihood at the returned params
      (reml=True: the restricted one, -1/2 the REML criterion).
    polish_: linear f, method='em': `linear_fit.Polish` (L-BFGS iterations
      after EM and the l they gained); None for 'nll'.
    singular_: linear f: True when the estimate is on the boundary (a
      `singular.SingularFitWarning` was issued); cov_random_effects_ is
      then the boundary estimate (`singular.boundary_fit`: those variances
      exactly 0, correlations exactly +-1), params_ the interior point the
      optimizer stopped at, within the tolerance 1e-4 of it (relative
      Cholesky scale).
      For a network f, Sigma_u and sigma^2 are at the end refitted exactly
      given the returned network in inference mode (with its output bias,
      and for 'features' its output layer, as fixed effects:
      `networks.variances_given_network`), so they are the ML estimates given
      f and do not absorb dropout noise; l is then >= the trainer's.
    fit_result_: an `engine.FitResult`; for a network, one restart whose
      trace holds l up to the returned iteration/epoch.
    n_iter_: fit_result_.n_iter: EM iterations (polish_.n_iter counts the
      polish's), L-BFGS's ('nll') or a network's returned iteration/epoch;
      several factors, linear f: crossed_.n_iter_.
    converged_: the fit met its stopping test: EM's tolerance or, after EM,
      the polish's (the point is then the optimum; no ConvergenceWarning);
      L-BFGS's ('nll'); early stopping for a network (False: max_iter).
    history_ (network f only): dict with 'log_likelihood' (training l at each
      iteration/epoch, inference mode), 'criterion' (the early-stopping NLL),
      'best_iteration', 'stop_reason' and 'n_decreases' (drops of l beyond
      round-off: tracked, not enforced, since the network step is stochastic),
      and 'pretraining': the random-intercept stage of MeNets EM (a
      `training.NetworkFit`), or None.
  """

  def __init__(self, random_effects: str = "intercept", degree: int = 1,
               covariance: str = "full", f=None, method: str = "em",
               fit_intercept: bool = True, max_iter: int = 500, tol: float = 1e-10,
               seed: int = 0, dtype="float64", epochs_per_step: int = 1,
               batch_size: int = 100, learning_rate: float = 1e-3, patience: int = 10,
               hidden_units=(100, 50, 25, 12), dropout: float = 0.25,
               on_decrease: str = "warn", reml: bool = False):
    self.random_effects = random_effects
    self.degree = degree
    self.covariance = covariance
    self.f = f
    self.method = method
    self.fit_intercept = fit_intercept
    self.max_iter = max_iter
    self.tol = tol
    self.seed = seed
    self.dtype = dtype
    self.epochs_per_step = epochs_per_step
    self.batch_size = batch_size
    self.learning_rate = learning_rate
    self.patience = patience
    self.hidden_units = hidden_units
    self.dropout = dropout
    self.on_decrease = on_decrease
    self.reml = reml

  # -- checks -------------------------------------------------------------------
  def _check_options(self):
    val.check_option("random_effects", self.random_effects, RANDOM_EFFECTS)
    val.check_option("method", self.method, METHODS)
    me.check_covariance_type(self.covariance)
    val.check_int("degree", self.degree, minimum=0)
    val.check_int("max_iter", self.max_iter, minimum=0)
    val.check_float("tol", self.tol, minimum=0.)
    val.check_seed(self.seed)
    val.check_int("epochs_per_step", self.epochs_per_step, minimum=1)
    val.check_int("batch_size", self.batch_size, minimum=1)
    val.check_float("learning_rate", self.learning_rate, minimum=0., strict=True)
    val.check_int("patience", self.patience, minimum=1)
    val.check_float("dropout", self.dropout, minimum=0.)
    if not isinstance(self.reml, (bool, np.bool_)):
      raise ValueError(f"reml must be True or False, got {self.reml!r}")
    if self.reml and self.f is not None:
      raise ValueError("reml=True applies to linear f (f=None); a network f is fitted by "
                       "maximum likelihood")
    if self.f is None and self.random_effects == "features":
      raise ValueError("random_effects='features' (MeNets) needs a network f; "
                       "pass f='mlp' or a Keras model")
    return val.check_dtype(self.dtype)

  def random_effects_design(self, n, time_, Z, dtype, name=""):
    """The random-effects design [n, q] (None for 'features': the network makes it)."""
    kind = self.random_effects
    if kind != "slopes" and time_ is not None:
      raise ValueError(f"time{name} is only used with random_effects='slopes', got "
                       f"random_effects={kind!r}")
    if kind != "custom" and Z is not None:
      raise ValueError(f"Z{name} is only used with random_effects='custom', got "
                       f"random_effects={kind!r}")
    if kind == "intercept":
      return me.intercept_design(n, dtype)
    if kind == "slopes":
      t = _design_input(time_, f"time{name}", kind, n, 1, dtype)
      return me.polynomial_design(t, self.degree).astype(dtype)
    if kind == "custom":
      z = _design_input(Z, f"Z{name}", kind, n, 2, dtype)
      if hasattr(self, "n_random_effects_") and z.shape[1] != self.n_random_effects_:
        raise ValueError(f"Z{name} has {z.shape[1]} columns but the model was fitted with "
                         f"{self.n_random_effects_}")
      return z
    return np.zeros((n, 0), dtype)

  def fixed_effects_design(self, X):
    """Linear f: X with an intercept column (if fit_intercept); a network: X."""
    if self.network_ is None and self.fit_intercept:
      return np.concatenate([np.ones((X.shape[0], 1), X.dtype), X], axis=1)
    return X

  def checked_xy(self, X, y, dtype, name=""):
    """(X [n, p], y [n]) checked and cast to `dtype`; `name` tags error messages."""
    X = val.check_array(X, f"X{name}", ndim=2, dtype=dtype)
    y = val.check_array(y, f"y{name}", ndim=1, dtype=dtype)
    if y.shape[0] != X.shape[0]:
      raise ValueError(f"y{name} has length {y.shape[0]} but X{name} has {X.shape[0]} rows")
    return X, y

  # -- fit ------------------------------------------------------------------------
  def fit(self, X, y, clusters, time=None, Z=None, validation_data=None, *, strategy=None):
    """Fits the model.

    Args:
      X: [n, p] features (inputs of f).
      y: [n] responses.
      clusters: [n] cluster labels, any hashable values (strings work).
      time: [n] time column, for random_effects='slopes'.
      Z: [n, q] random-effects design, for random_effects='custom'; with
        several factors (linear f) a list of K designs [n, d_k], None for
        a random intercept.
      validation_data: optional tuple (X, y, clusters[, time[, Z]]) used for
        early stopping of a network f (a ValueError for linear f).
      strategy: a `tf.distribute` strategy for linear f with one factor and
        method='em': each replica takes whole clusters and the statistics
        are all-reduced, so the fit equals the single-device one.

    Returns:
      self.
    """
    self._fit(X, y, clusters, time, Z, validation_data, strategy)
    if self.fit_result_ is not None:  # else a crossed fit without EM: `fit_crossed` copied them
      self.n_iter_ = int(self.fit_result_.n_iter)
      self.converged_ = fit_converged(self.fit_result_.converged, self.polish_)
    return self

  def _fit(self, X, y, clusters, time, Z, validation_data, strategy):
    dtype = self._check_options()
    val.check_features(self, X, reset=True, dtype=dtype)  # n_features_in_, feature_names_in_
    self.dtype_ = dtype
    self.__dict__.pop("n_random_effects_", None)  # a refit may change q
    self.crossed_, self.polish_, self.singular_ = None, None, False
    self.formula_ = None  # `from_formula` sets it after the fit
    factors = as_factors(clusters)
    if strategy is not None and (self.f is not None or self.method != "em" or len(factors) > 1
                                 or self.reml):
      raise ValueError("strategy= is supported for linear f with one grouping factor, "
                       "method='em' and reml=False")
    valid = check_validation_data(validation_data, self.f is not None, len(factors))
    if len(factors) > 1 and self.f is None:  # CrossedEffectsRegressor checks X and y
      return fit_crossed(self, X, y, factors, time, Z)
    X, y = self.checked_xy(X, y, dtype)
    if valid is not None:
      Xv, yv = self.checked_xy(valid.X, valid.y, dtype, name=" (validation)")
      val.check_n_features(Xv, self.n_features_in_, "X (validation)")
      valid = valid._replace(X=Xv, y=yv)
    n = X.shape[0]
    if len(factors) == 1:
      labels, codes = encode_clusters(factors[0], n)
      if labels.shape[0] < 2:
        raise ValueError("clusters has a single level: the random-effects covariance is not "
                         "identifiable from one cluster; fit an ordinary regression instead")
    self.network_ = build_network(self.f, X.shape[1], features=self.random_effects == "features",
                                  hidden_units=self.hidden_units, dropout=self.dropout,
                                  seed=self.seed, dtype=self.dtype_)
    if len(factors) > 1:  # K crossed grouping factors, network f
      return fit_crossed(self, X, y, factors, time, Z, valid)
    z = self.random_effects_design(n, time, Z, dtype)
    check_response(y, z, codes, len(labels))
    self.cluster_labels_ = labels
    train = self.em_data(self.fixed_effects_design(X), y, z, codes, len(labels))
    if self.network_ is None:
      self._fit_linear(train, strategy)
    else:
      self._fit_network(train, None if valid is None else self._validation(valid, dtype))
    return self

  def em_data(self, x, y, z, codes, num_clusters) -> me.MixedEffectsData:
    """The `MixedEffectsData` the EM model takes, from numpy designs and cluster codes."""
    return me.MixedEffectsData(
        x=tf.constant(x), y=tf.constant(y), z=tf.constant(z),
        cluster=tf.constant(codes, tf.int32), num_clusters=tf.constant(num_clusters, tf.int32))

  def _validation(self, valid, dtype):
    """`MixedEffectsData` of the checked `ValidationData`; unseen clusters get new codes."""
    n = valid.X.shape[0]
    codes = self.cluster_codes(valid.clusters[0], n, "clusters (validation)")
    z = self.random_effects_design(n, valid.time, valid.Z, dtype, name=" (validation)")
    return self.em_data(valid.X, valid.y, z, codes, int(codes.max()) + 1)

  def cluster_codes(self, clusters, n, name):
    """Codes of seen labels; unseen labels get new codes after the seen ones."""
    return code_labels(self.cluster_labels_, clusters, n, name)[0]

  def _fit_linear(self, train, strategy=None):
    scales = check_fixed_design(np.asarray(train.x), self.fit_intercept)
    model = linear_model(self.covariance, self.method, self.reml)
    result, self.polish_ = fit_linear(model, rows_by_cluster(train), scales,
                                      method=self.method, max_iter=self.max_iter, tol=self.tol,
                                      seed=self.seed, on_decrease=self.on_decrease,
                                      strategy=strategy)
    beta = np.asarray(result.params.beta)
    self.intercept_ = float(beta[0]) if self.fit_intercept else 0.
    self.coef_ = beta[1:] if self.fit_intercept else beta
    self._finish(model, result, rows_by_cluster(train), loc=None)
    self.log_likelihood_ = result.log_likelihood  # l_R for REML
    found, self.cov_random_effects_ = warn_if_singular(self.cov_random_effects_, self.sigma2_,
                                                       random_effect_names(self))
    self.singular_ = bool(found)

  def _fit_network(self, train, valid):
    net = self.network_
    result = fit_network(net, train, valid, self.covariance, method=self.method, seed=self.seed,
                         epochs_per_step=self.epochs_per_step, max_iter=self.max_iter,
                         batch_size=self.batch_size, learning_rate=self.learning_rate,
                         patience=self.patience)
    self.history_, fit_result = fit_summary(result.fit, result.start, result.params,
                                            result.log_likelihood, train.y.shape[0], self.seed,
                                            self.dtype_)
    self.history_["pretraining"] = result.pretraining
    f, hidden = net(train.x)
    self._finish(MixedEffectsEM(self.covariance), fit_result,
                 train._replace(z=net.design(hidden, train.z)), loc=f)

  def _finish(self, model, result, train, loc):
    post, _ = model.cluster_posterior(result.params, train, loc=loc)
    self.fit_result_ = result
    self.params_ = result.params
    self.log_likelihood_ = float(tf.reduce_sum(post.log_prob))
    self.sigma2_ = float(result.params.noise_variance)
    self.cov_random_effects_ = np.asarray(me.covariance_matrix(result.params.covariance,
                                                               self.covariance))
    self.n_random_effects_ = self.cov_random_effects_.shape[0]
    self.random_effects_mean_ = np.asarray(post.mean)
    self.random_effects_covariance_ = np.asarray(post.covariance)
    self.random_effects_ = {
        lab: RandomEffect(self.random_effects_mean_[i], self.random_effects_covariance_[i])
        for i, lab in enumerate(self.cluster_labels_)}

  # -- predict --------------------------------------------------------------------
  def checked_predict_x(self, X) -> np.ndarray:
    """X for predict: fitted, and its columns as in fit (count and DataFrame names)."""
    val.check_is_fitted(self, "fit_result_")
    return val.check_features(self, X, reset=False, dtype=self.dtype_)

  def _predict_parts(self, X, clusters, time_, Z):
    X = self.checked_predict_x(X)
    n = X.shape[0]
    z = self.random_effects_design(n, time_, Z, self.dtype_)
    if self.network_ is None:
      f = self.fixed_effects_design(X) @ np.asarray(self.params_.beta)
    else:
      f, hidden = self.network_(tf.constant(X))
      z = np.asarray(self.network_.design(hidden, z))
      f = np.asarray(f)
    seen = np.zeros(n, bool)
    index = np.zeros(n, np.int64)
    if clusters is not None:
      factors = as_factors(clusters)
      if len(factors) != 1:
        raise ValueError(f"clusters must be one grouping factor, as in fit; got {len(factors)}")
      codes = self.cluster_codes(factors[0], n, "clusters")
      seen = codes < len(self.cluster_labels_)
      index = np.where(seen, codes, 0)
    return f, z, seen, index

  def predict(self, X, clusters=None, time=None, Z=None):
    """f(x) + z^T m_i for points of seen clusters, f(x) otherwise. Returns [n]."""
    if getattr(self, "crossed_", None) is not None:
      self.checked_predict_x(X)
      return self.crossed_.predict(X, clusters, Z)
    f, z, seen, index = self._predict_parts(X, clusters, time, Z)
    blup = np.sum(z * self.random_effects_mean_[index], axis=-1)
    return f + np.where(seen, blup, 0.)

  def score(self, X, y, clusters=None, time=None, Z=None, sample_weight=None) -> float:
    """R^2 of `predict(X, clusters, time, Z)` against y. Under scikit-learn's metadata
    routing, `set_fit_request(clusters=True)` and `set_score_request(clusters=True)`
    pass the groups through `cross_validate`, `GridSearchCV` and pipelines."""
    return float(r2_score(y, self.predict(X, clusters, time, Z), sample_weight=sample_weight))

  def predict_interval(self, X, clusters=None, time=None, Z=None, level: float = 0.95):
    """Normal predictive interval for a new observation, shape [n, 2] (lower, upper).

    Variance z^T Cov[u_i | y] z + sigma^2 for seen clusters and
    z^T Sigma_u z + sigma^2 otherwise; the uncertainty of f is not included.
    Several factors: `CrossedPredictions.predict_interval`.
    """
    if getattr(self, "crossed_", None) is not None:
      self.checked_predict_x(X)
      return self.crossed_.predict_interval(X, clusters, level, Z)
    level = val.check_interval_level(level)
    f, z, seen, index = self._predict_parts(X, clusters, time, Z)
    blup = np.sum(z * self.random_effects_mean_[index], axis=-1)
    mean = f + np.where(seen, blup, 0.)
    cov = np.where(seen[:, None, None], self.random_effects_covariance_[index],
                   self.cov_random_effects_[None])
    var = np.einsum("nq,nqr,nr->n", z, cov, z) + self.sigma2_
    half = sps.norm.ppf(0.5 + level / 2.) * np.sqrt(var)
    return np.stack([mean - half, mean + half], axis=-1)


def _design_input(value, what: str, kind: str, n: int, ndim: int, dtype) -> np.ndarray:
  """`time` or `Z` as a checked [n] or [n, q] array; errors name `what`."""
  if value is None:
    raise ValueError(f"random_effects={kind!r} needs {what}")
  array = val.check_array(value, what, ndim=ndim, dtype=dtype)
  if array.shape[0] != n:
    size = f"length {array.shape[0]}" if ndim == 1 else f"{array.shape[0]} rows"
    raise ValueError(f"{what} has {size} but X has {n} rows")
  return array


def rows_by_cluster(data: me.MixedEffectsData) -> me.MixedEffectsData:
  """The rows of `data` in cluster order (stable).

  Every statistic is a sum over rows, so results change only by round-off;
  the E-step's segment sums then read and write memory in order (2-3x faster
  on CPU at 100k rows).
  """
  order = np.argsort(np.asarray(data.cluster), kind="stable")          # [N]
  return data._replace(x=tf.gather(data.x, order), y=tf.gather(data.y, order),
                       z=tf.gather(data.z, order), cluster=tf.gather(data.cluster, order))
