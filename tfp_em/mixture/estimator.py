"""`GaussianMixture`: a scikit-learn-style estimator fitted by `fit_em`.

Differences from `sklearn.mixture.GaussianMixture`, all deliberate:
  * `log_likelihood_` is the total log-likelihood *at the returned params*
    (scikit-learn's `lower_bound_` is the mean one step before them);
  * a decrease of the log-likelihood is never taken for convergence;
  * `fit` takes `sample_weight`;
  * `tol` is relative to the mean log-likelihood per point;
  * 'random_from_data' assigns every point to its nearest random centre.
"""
from __future__ import annotations

import math
import os
import warnings

import numpy as np
import tensorflow as tf
from sklearn.base import BaseEstimator, DensityMixin

from models import gaussian_mixture as gm
from tfp_em.diagnostics.mixin import DiagnosticsMixin
from tfp_em.engine import ON_DECREASE_OPTIONS, fit_em, fit_online_em
from tfp_em.engine import inputs as v
from tfp_em.engine.compiling import compiled
from tfp_em.engine.streams import checked_batches, features_dataset
from tfp_em.mixture.em import GaussianMixtureEM, MixtureData, precision_cholesky
from tfp_em.mixture import missing as mv
from tfp_em.mixture.missing_em import MissingValuesGaussianMixtureEM
from tfp_em.mixture import reseed as mr
from tfp_em.mixture import spurious
from tfp_em.mixture import starting_values as sv
from tfp_em.mixture.initialization import INIT_METHODS, Initializer

# XLA's E-step kernel costs about 0.3 s more than a graph trace, once per process
# and configuration, and saves about 0.8 ns per point x component x D^2 (x D for
# diag/spherical) per iteration on a 2-core CPU (2-3x per iteration): worth it
# above this much expected work.
XLA_MIN_WORK = 4e8
EXPECTED_ITERATIONS = 50  # per restart, for that estimate (max_iter if smaller)
INFERENCE_CHUNK = 65536  # rows per chunk in predict / score_samples


class GaussianMixture(DensityMixin, DiagnosticsMixin, BaseEstimator):
  """Gaussian mixture fitted by exact EM on TensorFlow Probability.

  Args:
    n_components: number of components K (default 1).
    covariance_type: 'full' (default), 'tied', 'diag' or 'spherical', or one of
      mclust's 14 models (`models.gaussian_mixture.MCLUST_MODELS`: VII, VVI,
      EEE and VVV are the same fits as spherical, diag, tied and full; the
      ten others keep [K, D, D] `covariances_`).
    tol: convergence tolerance on the change of the mean log-likelihood per
      point, relative to max(1, |mean loglik|) (default 1e-6).
    reg_covar: non-negative value added to covariance diagonals (default 1e-6),
      in squared data units: scale it with the data. A component that
      collapses onto one point (or onto duplicates) keeps covariance
      reg_covar * I; with reg_covar=0 the fit stops with a
      `NumericalFailureError` naming reg_covar. A component that loses all
      its points (N_k -> 0) is re-seeded at the worst-fitted point, with an
      `EmptyComponentWarning` (`tfp_em.mixture.reseed`). In float32, data
      far from the origin relative to their spread get a warning to use
      float64; the fit never returns NaN parameters.
    max_iter: maximum EM iterations per restart (default 100).
    n_init: number of restarts; the best log-likelihood wins (default 1).
    init_params: 'kmeans++' (default), 'kmeans', 'random' or
      'random_from_data'.
    weights_init, means_init, precisions_init: optional user-given initial
      weights [K], means [K, D] and precisions (the shape of
      `covariances_`); they override the corresponding part of `init_params`.
    seed: integer seed (default 0); the same seed gives the same fit.
    dtype: 'float64' (default; use for validation) or 'float32' (faster).
    on_decrease: 'warn' (default), 'raise' or 'revert' when the
      log-likelihood decreases (see `tfp_em.fit_em`).
    compile: 'auto' (default: 'xla' when the expected work repays XLA's
      compile time, else 'graph'), 'xla', 'graph' or 'eager'. 'xla' compiles
      the E-step's per-chunk kernel for a few fixed chunk shapes, once per
      process and configuration, so later fits on any N do not compile again.
    accelerate: None (default, plain EM) or 'squarem' (`tfp_em.squarem`).
    verbose: None shows a progress bar on long fits (off under pytest);
      True/False force it.
    warm_start: if True, a refit starts from the last fit's parameters (one
      run; `n_init` and the `*_init` arguments are ignored), as in
      scikit-learn (default False).
    missing: 'error' (default: NaN in X is an error) or 'em': NaN entries are
      missing at random; EM conditions them on each row's observed entries
      (`tfp_em.mixture.missing`), the log-likelihood is that of the observed
      entries, `predict`, `predict_proba` and `score_samples` take NaN too
      and `impute` fills them. Streamed input too (empty CSV cells, Parquet
      nulls and absent TFRecord features are missing). Rows with every entry
      missing are an error, and so are columns for in-memory X. Diagnostics
      (`summary`, reports) do not take missing values: the fit keeps no
      `fit_data_`; pass them complete X.

  A scikit-learn estimator: `get_params`/`set_params`, `clone`, pipelines and
  grid searches (`score` is the mean log-likelihood); `feature_names_in_` is
  set when X is a DataFrame, and predict-side methods check its columns.

  Attributes (after `fit`):
    weights_, means_, covariances_, precisions_, precisions_cholesky_:
      numpy arrays in scikit-learn's conventions.
    log_likelihood_: total (weighted) log-likelihood at the fitted params.
    n_iter_, converged_: of the best restart.
    fit_result_: the engine's `FitResult` with every restart's trace.
    fit_data_: the (validated copy of the) in-memory training data, used by
      `summary()` and `to_inference_data()` when no X is given; None for
      streamed fits.

  #### References

  [1] scikit-learn's `sklearn.mixture.GaussianMixture`, whose interface this
      follows.
  """

  def __init__(self, n_components: int = 1, *, covariance_type: str = "full",
               tol: float = 1e-6, reg_covar: float = 1e-6, max_iter: int = 100,
               n_init: int = 1, init_params: str = "kmeans++", weights_init=None,
               means_init=None, precisions_init=None, seed: int | None = 0,
               dtype="float64", on_decrease: str = "warn", compile: str = "auto",
               accelerate: str | None = None, verbose: bool | None = None,
               warm_start: bool = False, missing: str = "error"):
    self.n_components = n_components
    self.covariance_type = covariance_type
    self.tol = tol
    self.reg_covar = reg_covar
    self.max_iter = max_iter
    self.n_init = n_init
    self.init_params = init_params
    self.weights_init = weights_init
    self.means_init = means_init
    self.precisions_init = precisions_init
    self.seed = seed
    self.dtype = dtype
    self.on_decrease = on_decrease
    self.compile = compile
    self.accelerate = accelerate
    self.verbose = verbose
    self.warm_start = warm_start
    self.missing = missing

  # -- fitting ---------------------------------------------------------------
  def _check_options(self):
    v.check_int("n_components", self.n_components, minimum=1)
    gm.check_covariance_type(self.covariance_type)
    v.check_float("tol", self.tol, minimum=0.0)
    v.check_float("reg_covar", self.reg_covar, minimum=0.0)
    v.check_int("max_iter", self.max_iter, minimum=0)
    v.check_int("n_init", self.n_init, minimum=1)
    v.check_option("init_params", self.init_params, INIT_METHODS)
    v.check_option("on_decrease", self.on_decrease, ON_DECREASE_OPTIONS)
    v.check_option("compile", self.compile, ("auto", "graph", "xla", "eager"))
    v.check_option("missing", self.missing, ("error", "em"))
    if self.accelerate is not None:
      v.check_option("accelerate", self.accelerate, ("squarem",))
    v.check_seed(self.seed)
    return v.check_dtype(self.dtype)

  def em_model(self, n_points=None, n_features=None) -> GaussianMixtureEM:
    """The `GaussianMixtureEM` this estimator fits; its compile mode suits
    n_points x n_features data (None: streamed)."""
    mode = self._compile_mode(n_points, n_features)
    if self.missing == "em":  # its E-step loops over patterns: never XLA
      return MissingValuesGaussianMixtureEM(
          self.n_components, self.covariance_type, self.reg_covar,
          init=Initializer(self.init_params, self.n_components),
          compile="graph" if mode == "xla" else mode)
    return GaussianMixtureEM(self.n_components, self.covariance_type, self.reg_covar,
                             init=Initializer(self.init_params, self.n_components),
                             compile="graph" if mode == "xla" else mode,
                             jit_chunks=mode == "xla")

  def _compile_mode(self, n_points, n_features) -> str:
    if self.compile != "auto":
      return self.compile
    if n_points is None or n_features is None:  # streamed: batches are large by construction
      return "xla"
    per_point = n_features ** (2 if gm.covariance_layout(self.covariance_type) in ("full", "tied")
                               else 1)
    work = (n_points * self.n_components * per_point * self.n_init
            * min(self.max_iter, EXPECTED_ITERATIONS))
    return "xla" if work >= XLA_MIN_WORK else "graph"

  def fit(self, X, y=None, sample_weight=None, *, online: bool = False, strategy=None,
          columns=None, batch_size: int = 65536, checkpoint_dir=None,
          checkpoint_every: int = 10, resume: bool = False):
    """Fits the mixture; returns self.

    Args:
      X: [N, D] array; or, for data that need not fit in memory, a
        `tf.data.Dataset` of [B, D] batches or a path/glob of CSV, Parquet
        or TFRecord files (see `tfp_em.streams`). Streamed input makes one
        pass per EM iteration with memory bounded by `batch_size`.
      y: ignored (scikit-learn convention).
      sample_weight: optional non-negative [N] weights (arrays only).
      online: one-pass stochastic EM (`tfp_em.online`; streamed input only).
      strategy: a `tf.distribute` strategy whose replicas share the E-step.
      columns: columns to read from files (default all).
      batch_size: rows per batch for files and datasets (default 65536).
      checkpoint_dir, checkpoint_every, resume: save the fit's state every
        `checkpoint_every` iterations and, with `resume=True`, continue from
        it (see `tfp_em.fit_em`).
    """
    dtype = self._check_options()
    v.check_int("batch_size", batch_size, minimum=1)
    warm = self.warm_start and hasattr(self, "params_")
    if _is_stream_source(X):
      if sample_weight is not None:
        raise ValueError("sample_weight is only supported for in-memory arrays")
      data, first = self._stream(X, columns, batch_size, dtype)
      n_features = first.x.shape[1]
      model = self.em_model(None, n_features)
      init = self._start(model, first, warm, dtype)
      del first  # only one batch is held at a time
      self.__dict__.pop("feature_names_in_", None)
    else:
      if online:
        raise ValueError("online=True needs streamed input (a tf.data.Dataset or files)")
      data = self._in_memory(X, sample_weight, dtype)
      n_features = data.x.shape[1]
      model = self.em_model(*data.x.shape)
      init = self._start(model, data, warm, dtype)
    if online:
      result = fit_online_em(model, data, seed=self.seed, init_params=init)
    else:
      result = fit_em(model, data, max_iter=self.max_iter, tol=self.tol,
                      n_init=1 if warm else self.n_init,
                      seed=self.seed, init_params=init, on_decrease=self.on_decrease,
                      progress=self.verbose, accelerate=self.accelerate, strategy=strategy,
                      checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                      resume=resume)
      if isinstance(data, MixtureData):
        result = mr.revive_empty(result, model, data, self._refit_from, self.n_components,
                                 gm.covariance_layout(self.covariance_type), self.reg_covar)
      else:
        mr.warn_empty_streamed(result)
    n_points = (np.count_nonzero(data.weights) if isinstance(data, MixtureData)
                else result.num_observations)  # in units of an average point's weight
    spurious.warn(spurious.fit_findings(result.params.weights, result.params.covariances,
                                        n_points, self.covariance_type, n_features,
                                        self.reg_covar), "after")
    self.set_fitted_params(result.params, n_features)
    # In-memory training data (already a private copy) for summary() and reports.
    self.fit_data_ = data if isinstance(data, MixtureData) and self.missing != "em" else None
    self.log_likelihood_ = result.log_likelihood
    self.n_iter_ = result.n_iter
    self.converged_ = result.converged
    self.fit_result_ = result
    return self

  def _refit_from(self, model, data, params):
    """EM continued from `params` with this estimator's options (one run)."""
    return fit_em(model, data, max_iter=self.max_iter, tol=self.tol, seed=self.seed,
                  init_params=params, on_decrease=self.on_decrease, progress=self.verbose)

  def _in_memory(self, X, sample_weight, dtype) -> MixtureData:
    x = self._features(X, reset=True, dtype=dtype)
    if self.missing == "em":
      mv.check_no_empty_columns(x)
    if x.shape[0] < self.n_components:
      raise ValueError(f"X has {x.shape[0]} points but n_components={self.n_components}; "
                       "need at least as many points as components")
    w = v.check_sample_weight(sample_weight, x.shape[0], dtype=dtype)
    if dtype == np.float32:
      _warn_float32_offset(x)
    if np.count_nonzero(w) < self.n_components:
      raise ValueError(f"only {np.count_nonzero(w)} points have positive sample_weight "
                       f"but n_components={self.n_components}")
    largest_variance = float(np.max(np.nanvar(x, axis=0, dtype=np.float64)))
    spurious.warn(spurious.size_findings(np.count_nonzero(w), x.shape[1], self.n_components,
                                         gm.covariance_layout(self.covariance_type),
                                         largest_variance, self.reg_covar),
                  "before", stacklevel=3)
    return MixtureData(tf.constant(x), tf.constant(w))

  def _stream(self, source, columns, batch_size, dtype):
    features, _ = features_dataset(source, columns, batch_size, dtype,
                                   allow_nan=self.missing == "em")
    first = next(checked_batches(features), None)
    if first is None or first.shape[0] < self.n_components:
      raise ValueError(f"the first batch has {0 if first is None else first.shape[0]} rows but "
                       f"n_components={self.n_components}; use a larger batch_size")
    data = features.map(_unit_weights)
    return data, _unit_weights(first)

  def _start(self, model, data, warm: bool, dtype):
    """The first params: the last fit's (warm start), the user's, or None (initialize)."""
    if warm:
      return sv.last_fit(self.params_, self.n_components, data.x.shape[1], dtype)
    return sv.user_given(model, data, dtype, self.n_components, self.weights_init, self.means_init,
                         self.precisions_init, gm.covariance_layout(self.covariance_type),
                         self.seed)

  def set_fitted_params(self, params, n_features: int):
    """Sets `params_` (tensors) and the attributes derived from them, as `fit` does."""
    self.n_features_in_ = n_features
    self.params_ = params
    self.weights_ = params.weights.numpy()
    self.means_ = params.means.numpy()
    self.covariances_ = params.covariances.numpy()
    self.precisions_cholesky_ = precision_cholesky(params.covariances,
                                                   self.covariance_type).numpy()
    u = self.precisions_cholesky_
    if gm.covariance_layout(self.covariance_type) in ("full", "tied"):
      self.precisions_ = u @ np.swapaxes(u, -1, -2)
    else:
      self.precisions_ = u ** 2

  # -- inference -------------------------------------------------------------
  def _features(self, X, reset: bool, dtype):
    """X checked; NaN allowed (rows not all NaN) with missing='em'."""
    hint = " (or use GaussianMixture(missing='em') to fit with missing values)"
    allow = self.missing == "em"
    x = v.check_features(self, X, reset=reset, dtype=dtype, allow_nan=allow, nan_hint=hint)
    if allow:
      mv.check_no_empty_rows(x)
    return x

  def _checked_x(self, X):
    v.check_is_fitted(self, "params_")
    return tf.constant(self._features(X, reset=False, dtype=v.check_dtype(self.dtype)))

  def _log_joint(self, X):
    """log w_k + log N(x_n | k), shape [N, K], in chunks so that memory stays
    O(N K) rather than O(N K D)."""
    x = self._checked_x(X)
    model = self.em_model()
    log_joint = compiled(model, "log_prob_components", lambda m: m.log_prob_components,
                         model.one_off_mode(), data_arg=-1)
    step = INFERENCE_CHUNK
    return tf.concat([log_joint(self.params_, x[i:i + step])
                      for i in range(0, max(int(x.shape[0]), 1), step)], axis=0)

  def score_samples(self, X):
    """log p(x_n) for each row, shape [N]."""
    return tf.reduce_logsumexp(self._log_joint(X), axis=-1).numpy()

  def score(self, X, y=None):
    """Mean log-likelihood per point."""
    return float(np.mean(self.score_samples(X)))

  def predict_proba(self, X):
    """Posterior responsibilities p(z_n = k | x_n), shape [N, K]."""
    return tf.nn.softmax(self._log_joint(X), axis=-1).numpy()

  def predict(self, X):
    """Most probable component of each row, shape [N]."""
    return np.argmax(self._log_joint(X).numpy(), axis=-1)

  def impute(self, X):
    """X [N, D] with each NaN replaced by E[x_missing | x_observed] under the
    fitted mixture (responsibility-weighted conditional means); observed
    entries unchanged, X not modified. Needs missing='em'."""
    if self.missing != "em":
      raise ValueError("impute needs a GaussianMixture fitted with missing='em'")
    x = self._checked_x(X)
    filled = self.em_model().impute(self.params_, x).numpy()
    return np.where(np.isnan(x.numpy()), filled, x.numpy())

  def fit_predict(self, X, y=None, sample_weight=None):
    return self.fit(X, sample_weight=sample_weight).predict(X)

  def sample(self, n_samples: int = 1, seed: int | None = None):
    """Draws (X [n, D], labels [n]) from the fitted JointDistribution."""
    v.check_is_fitted(self, "params_")
    n = v.check_int("n_samples", n_samples, minimum=1)
    seed = v.check_seed(seed)
    joint = gm.joint(self.params_, self.covariance_type, n)
    draw = joint.sample(seed=tf.constant([0 if seed is None else seed, 1]))
    return draw["x"].numpy(), draw["z"].numpy()

  def _n_parameters(self) -> int:
    return gm.n_parameters(self.covariance_type, self.n_components, self.n_features_in_)

  def bic(self, X) -> float:
    """Bayesian information criterion on X (lower is better)."""
    n = np.asarray(X).shape[0]
    return -2 * self.score(X) * n + self._n_parameters() * math.log(n)

  def aic(self, X) -> float:
    """Akaike information criterion on X (lower is better)."""
    return -2 * self.score(X) * np.asarray(X).shape[0] + 2 * self._n_parameters()

  def icl(self, X) -> float:
    """Integrated completed likelihood on X (lower is better, like `bic`).

    ICL = BIC - 2 sum_n log r_n,z_n with z_n the most probable component of x_n:
    BIC plus twice the entropy of the hard classification, as mclust's `icl`
    (which reports -ICL, larger is better) [1, 2].

    #### References

    [1] C. Biernacki, G. Celeux and G. Govaert. Assessing a mixture model for
        clustering with the integrated completed likelihood. IEEE TPAMI
        22(7):719-725, 2000.
    [2] L. Scrucca, M. Fop, T. B. Murphy and A. E. Raftery. mclust 5. The R
        Journal 8(1):289-317, 2016.
    """
    log_joint = self._log_joint(X)  # [N, K]
    log_resp = log_joint - tf.reduce_logsumexp(log_joint, axis=-1, keepdims=True)
    return self.bic(X) - 2.0 * float(tf.reduce_sum(tf.reduce_max(log_resp, axis=-1)))


def _unit_weights(x) -> MixtureData:
  return MixtureData(x, tf.ones(tf.shape(x)[:1], x.dtype))


def _warn_float32_offset(x) -> None:
  """Warns when float32 cannot resolve the data's spread next to its offset."""
  offset = np.abs(np.nanmean(x, axis=0, dtype=np.float64))
  spread = np.nanstd(x, axis=0, dtype=np.float64)
  ratio = float(np.max(offset / spread, initial=0.0, where=spread > 0))
  if ratio > 1e3:
    warnings.warn(f"X is far from the origin relative to its spread (|mean| / std up to "
                  f"{ratio:.3g}); float32 keeps ~7 significant digits, so the data lose "
                  "precision: use dtype='float64' or centre X first.", UserWarning, stacklevel=4)


def _is_stream_source(X) -> bool:
  return isinstance(X, (str, os.PathLike, tf.data.Dataset))
