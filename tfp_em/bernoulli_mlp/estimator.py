"""`BernoulliMLPClassifier`: the estimator around `BernoulliMLPEM`."""
from __future__ import annotations

import time
import warnings

import numpy as np
import tensorflow as tf
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import DataConversionWarning
from sklearn.utils.multiclass import check_classification_targets

from models import bernoulli_mlp as mlp
from models.bernoulli_mlp import BernoulliMLPParams
from tfp_em.bernoulli_mlp.em import BernoulliMLPEM, check_num_hidden, fit_autodiff
from tfp_em.bernoulli_mlp.summed import model_class, resolve_m_step
from tfp_em.bernoulli_mlp.penalty import SMALL_DATA_L2, holdout_split, walk_grid
from tfp_em.bernoulli_mlp.streamed import standardized_stream, summarize_stream
from tfp_em.diagnostics.mixin import DiagnosticsMixin
from tfp_em.engine import inputs as v
from tfp_em.engine import ConvergenceWarning, fit_em, fit_online_em
from tfp_em.engine.streams import checked_batches


METHODS = ("em", "autodiff")


def _check_labels(y, num_rows: int) -> tuple[np.ndarray, np.ndarray]:
  """Labels (int or str) -> (classes [C], indices [N] int32).

  A column vector [N, 1] is raveled with a `DataConversionWarning`;
  continuous targets are refused ("Unknown label type: continuous", from
  `sklearn.utils.multiclass.type_of_target`), and so are labels that mix
  strings and numbers (0 and '0' would otherwise become one class), as in
  scikit-learn.
  """
  if y is None:
    raise ValueError("BernoulliMLPClassifier requires y to be passed, but the target y is None")
  if hasattr(y, "numpy") and callable(y.numpy):
    y = y.numpy()
  _check_one_label_kind(y)
  y = np.array(y, copy=True)
  if y.ndim == 2 and y.shape[1] == 1:
    warnings.warn("A column-vector y was passed when a 1d array was expected; raveled to "
                  "shape (n_samples,)", DataConversionWarning, stacklevel=3)
    y = y.ravel()
  if y.ndim != 1:
    raise ValueError(f"y must be 1-D (one label per row of X), got shape {y.shape}")
  if y.shape[0] != num_rows:
    raise ValueError(f"y has {y.shape[0]} labels but X has {num_rows} rows")
  if y.dtype.kind == "f" and not np.all(np.isfinite(y)):
    raise ValueError("Input y contains NaN or inf; every row needs a class label")
  if y.dtype == object and any(e is None or (isinstance(e, float) and np.isnan(e)) for e in y):
    raise ValueError("y contains missing labels (None or NaN); every row needs a class label")
  try:
    classes, indices = np.unique(y, return_inverse=True)
  except TypeError as e:
    raise ValueError(f"y labels could not be sorted (mixed types?): {e}") from None
  check_classification_targets(y)
  return classes, indices.astype(np.int32).reshape(-1)


def _check_two_classes(classes: np.ndarray) -> None:
  if len(classes) < 2:
    raise ValueError(f"y has a single class ({classes[0]!r}); a classifier needs at least 2")


def _check_one_label_kind(y) -> None:
  """Refuses labels that mix strings and numbers, before NumPy turns them all into
  strings (scikit-learn's `unique_labels` message)."""
  if isinstance(y, np.ndarray) and y.dtype != object:
    return
  try:
    values = np.asarray(y, dtype=object).ravel()
  except ValueError:  # ragged: reported by the shape checks
    return
  kinds = {isinstance(v, (str, bytes)) for v in values if v is not None}
  if len(kinds) > 1:
    raise ValueError("Mix of label input types (string and number) in y: labels such as 0 and "
                     "'0' would be ambiguous; give every label the same type")


class BernoulliMLPClassifier(ClassifierMixin, DiagnosticsMixin, BaseEstimator):
  """Classifier: MLP with m stochastic binary hidden units, fitted by exact EM.

  p(y | x) = sum_z p(z | x) p(y | z) over the 2^m hidden configurations;
  `predict` is its argmax. Inputs are standardized internally (`mean_`,
  `scale_`); labels may be integers or strings.

  Args:
    n_hidden: number of hidden units m, 1..16 (default 5).
    max_iter: maximum EM iterations, or L-BFGS iterations for 'autodiff'
      (default 200).
    tol: relative tolerance on the mean per-point objective (default 1e-6).
    l2: 'auto' (default) or a number >= 0: the penalty (l2 / 2) |w|^2 on the
      non-bias weights, i.e. a Gaussian prior N(0, 1 / l2) on each weight of
      the standardized inputs and of the hidden units, on the summed
      log-likelihood (it does not grow with N). 'auto' picks it from
      `penalty.L2_GRID` (10, 3, 1, 0.3, 0.1, 0.03, 0.01) by the log-likelihood of
      a stratified 20% held-out split (`tfp_em.bernoulli_mlp.penalty`; 1
      when a class has fewer than 2 rows or a part would have fewer rows
      than classes), then refits all rows at that penalty exactly as
      `l2=l2_` would (the held-out fits use the first start only, the final
      fit all `n_init`): at most 8 fits. 0 is maximum likelihood, which
      diverges on separable classes.
    n_init: restarts from random weights; the best objective wins (default 1).
    seed: integer seed or None (default 0).
    dtype: 'float64' (default) or 'float32'.
    method: 'em' (default) or 'autodiff' (L-BFGS on the same TFP marginal).
    memory_budget_mb: bound on the E-step's work arrays (default 256).
    m_step: 'auto' (default: 'exact' for in-memory arrays, 'summed' for a
      `tf.data.Dataset` or a `strategy`), 'exact' (the hidden units' Newton
      M-step run to convergence on per-point soft targets, faster in memory;
      refused with a stream or a strategy) or 'summed'
      (`BernoulliMLPSummedEM`: one certified Newton step per iteration from
      statistics summed over points, the model that streams and distributes;
      its penalty is shared by the N rows, `total_rows`).
    accelerate: 'squarem' (default: `tfp_em.squarem`, whose safeguard keeps
      the objective monotone; where plain EM stops at max_iter=200 on wine,
      breast cancer and digits, SQUAREM converges in under 150 iterations,
      `validation/em_mlp.py`) or None (plain EM). Used by method='em' on
      arrays and streams; not by online fits.

  `fit(X, y, strategy=..., online=...)` also takes a `tf.data.Dataset` of
  (x [B, D], y [B]) batches as X (y None): a first pass finds the rows, the
  column means and scales and the classes with one batch in memory, then
  each EM iteration is one pass (or, with `online=True`, one-pass online EM,
  `tfp_em.fit_online_em`, from the first start only). A stream needs a
  numeric `l2` ('auto' needs a held-out split and is refused) and
  `method='em'`. `strategy`: a `tf.distribute` strategy whose replicas share
  the E-step (arrays or a stream).

  Attributes (after `fit`):
    classes_, mean_, scale_, n_features_in_, params_ (BernoulliMLPParams,
    numpy), fit_result_ (`tfp_em.FitResult`; per-iteration objective of every
    restart in `fit_result_.restarts[i].log_likelihood`), iteration_seconds_
    (seconds since the start of the chosen restart at each trace entry),
    m_step_ (the M-step EM used: 'exact' or 'summed'; None for 'autodiff'),
    n_samples_seen_ (the training rows N: the summed model's `total_rows`),
    n_iter_, converged_, objective_ (penalized loglik the fit maximized),
    l2_ (the penalty of that objective), l2_scores_ ({penalty: held-out
    log-likelihood per point} for the penalties 'auto' tried; empty
    otherwise),
    log_likelihood_ (unpenalized log p(y | x) on the training data),
    iteration_seconds_ is None after an online fit,
    feature_names_in_ (when X is a DataFrame with string column names).

  A scikit-learn classifier (`get_params`/`set_params`, `clone`, pipelines,
  grid searches); predict-side methods check a DataFrame's columns against
  `feature_names_in_`.
  """

  def __init__(self, n_hidden: int = 5, max_iter: int = 200, tol: float = 1e-6,
               l2: float | str = "auto", n_init: int = 1, seed: int | None = 0,
               dtype: str = "float64", method: str = "em",
               memory_budget_mb: float = 256., m_step: str = "auto",
               accelerate: str | None = "squarem"):
    self.n_hidden = n_hidden
    self.max_iter = max_iter
    self.tol = tol
    self.l2 = l2
    self.n_init = n_init
    self.seed = seed
    self.dtype = dtype
    self.method = method
    self.memory_budget_mb = memory_budget_mb
    self.m_step = m_step
    self.accelerate = accelerate

  def em_model(self, num_classes: int, l2: float | None = None, m_step: str | None = None,
               total_rows: int | None = None) -> BernoulliMLPEM:
    """The `BernoulliMLPEM` this estimator fits, for `num_classes` classes.

    `l2` None: the `l2` parameter when it is a number, else the fitted `l2_`.
    `m_step` None: the `m_step` parameter unless 'auto', else the fitted
    `m_step_` ('exact', the in-memory choice, before a fit). `total_rows` None: the fitted `n_samples_seen_` (the summed
    model shares its penalty over them; needed when l2 > 0).
    """
    budget = v.check_float("memory_budget_mb", self.memory_budget_mb, minimum=0., strict=True)
    if l2 is None:
      l2 = self.l2 if self._check_l2() != "auto" else self._fitted("l2_")
    if m_step is None:
      m_step = resolve_m_step(self.m_step, batched=False)
      if self.m_step == "auto":  # the fitted choice; 'exact' before a fit
        m_step = vars(self).get("m_step_") or m_step
    model = model_class(m_step)
    if model is BernoulliMLPEM:
      return model(self.n_hidden, num_classes, l2=l2, memory_budget_bytes=int(budget * 2 ** 20))
    if total_rows is None and l2 > 0:
      total_rows = self._fitted("n_samples_seen_")
    return model(self.n_hidden, num_classes, l2=l2, total_rows=total_rows,
                 memory_budget_bytes=int(budget * 2 ** 20))

  def _check_l2(self):
    if isinstance(self.l2, str):
      if self.l2 != "auto":
        raise ValueError(f"l2 must be 'auto' or a number >= 0, got {self.l2!r}")
      return self.l2
    return v.check_float("l2", self.l2, minimum=0.)

  def _fitted(self, name: str):
    v.check_is_fitted(self, name)
    return getattr(self, name)

  def _run(self, model, data, method, seed, n_init, callback=None, progress=None, strategy=None):
    if method == "em":
      return fit_em(model, data, max_iter=self.max_iter, tol=self.tol, n_init=n_init, seed=seed,
                    callback=callback, progress=progress, strategy=strategy,
                    accelerate=self.accelerate)
    return fit_autodiff(model, data, max_iter=self.max_iter, tol=self.tol, n_init=n_init,
                        seed=seed, callback=callback)

  def _choose_l2(self, Xs, labels, num_classes, method, seed, dtype, m_step, strategy):
    """(l2, {l2: held-out log-likelihood per point}); see `penalty`."""
    l2 = self._check_l2()
    if l2 != "auto":
      return l2, {}
    split = holdout_split(labels, num_classes, seed)
    if split is None:
      return SMALL_DATA_L2, {}
    train, held_out = split
    data = (tf.constant(Xs[train], dtype), tf.constant(labels[train]))

    def score(penalty):
      model = self.em_model(num_classes, penalty, m_step, total_rows=len(train))
      with warnings.catch_warnings():  # the final fit warns about its own convergence
        warnings.simplefilter("ignore", ConvergenceWarning)
        params = self._run(model, data, method, seed, n_init=1, progress=False,
                           strategy=strategy).params
      return _log_likelihood(model, params, Xs[held_out], labels[held_out]) / len(held_out)

    return walk_grid(score)

  def fit(self, X, y=None, *, strategy=None, online: bool = False):
    """Fits the MLP; returns self.

    Args:
      X: [N, D] array, or a `tf.data.Dataset` of (x [B, D], y [B]) batches
        (then y is None; see the class docstring).
      y: [N] class labels (integers or strings) for an array X.
      strategy: a `tf.distribute` strategy whose replicas share the E-step
        (the summed M-step; arrays are cut into one row block per replica).
      online: one-pass online EM over a stream (`tfp_em.fit_online_em`).
    """
    check_num_hidden(self.n_hidden)
    l2 = self._check_l2()
    v.check_int("max_iter", self.max_iter, minimum=0)
    v.check_float("tol", self.tol, minimum=0.)
    v.check_int("n_init", self.n_init, minimum=1)
    if self.accelerate is not None:
      v.check_option("accelerate", self.accelerate, ("squarem",))
    seed = v.check_seed(self.seed)
    method = v.check_option("method", self.method, METHODS)
    dtype = v.check_dtype(self.dtype)
    streamed = isinstance(X, tf.data.Dataset)
    if online and not streamed:
      raise ValueError("online=True needs a tf.data.Dataset of (x, y) batches as X")
    if method != "em" and (streamed or strategy is not None):
      raise ValueError("a tf.data.Dataset or a strategy needs method='em' (the autodiff fit "
                       "runs on in-memory arrays only)")
    m_step = resolve_m_step(self.m_step, batched=streamed or strategy is not None)
    if streamed:
      if y is not None:
        raise ValueError("with a tf.data.Dataset as X the labels come in its (x, y) batches; "
                         "y must be None")
      if l2 == "auto":
        raise ValueError("l2='auto' picks the penalty on a held-out split of in-memory data; "
                         "for a tf.data.Dataset give a number, e.g. l2=0.1")
      summary = summarize_stream(X)
      num_rows, mean, scale, classes = summary
      _check_two_classes(classes)
      data = standardized_stream(X, summary, dtype)
      self.n_features_in_ = mean.shape[0]
      self.__dict__.pop("feature_names_in_", None)
      scores = {}
    else:
      X = v.check_features(self, X, reset=True, dtype=np.float64, min_rows=2)
      classes, labels = _check_labels(y, X.shape[0])
      _check_two_classes(classes)
      num_rows, mean = X.shape[0], X.mean(axis=0)
      scale = X.std(axis=0)
      scale = np.where(scale > 0, scale, 1.)
      Xs = (X - mean) / scale
      l2, scores = self._choose_l2(Xs, labels, len(classes), method, seed, dtype, m_step,
                                   strategy)
      data = (tf.constant(Xs, dtype), tf.constant(labels))
    model = self.em_model(len(classes), l2, m_step, total_rows=num_rows)
    if online:
      result = fit_online_em(model, data, seed=seed)
      self.iteration_seconds_ = None
    else:
      times = {}

      def clock(restart, it, params, ll):
        times.setdefault(restart, []).append(time.perf_counter())

      result = self._run(model, data, method, seed, self.n_init, callback=clock,
                         strategy=strategy)
      chosen = result.restarts[result.best_restart]
      stamps = np.asarray(times[result.best_restart][:len(chosen.log_likelihood)])
      # The restart began about `seconds` before its last trace entry.
      self.iteration_seconds_ = stamps - (stamps[-1] - chosen.seconds)
    self.mean_, self.scale_ = mean, scale
    self.l2_, self.l2_scores_ = l2, scores
    self.m_step_ = m_step if method == "em" else None
    self.n_samples_seen_ = num_rows
    self.classes_ = classes
    self.params_ = BernoulliMLPParams(*[np.array(p) for p in result.params])
    self.fit_result_ = result
    self.n_iter_ = result.n_iter
    self.converged_ = result.converged
    self.objective_ = result.log_likelihood
    self._em_model = model
    batches = checked_batches(data) if streamed else [(Xs, labels)]
    self.log_likelihood_ = sum(_log_likelihood(model, result.params, np.asarray(x), np.asarray(c))
                               for x, c in batches)
    return self

  # -- prediction -------------------------------------------------------------

  def standardized_inputs(self, X) -> np.ndarray:
    """X checked against the fit and standardized with `mean_`, `scale_` (float64)."""
    v.check_is_fitted(self, "params_")
    X = v.check_features(self, X, reset=False, dtype=np.float64)
    return (X - self.mean_) / self.scale_

  def em_params(self) -> BernoulliMLPParams:
    """`params_` as tensors of the estimator's dtype."""
    dtype = v.check_dtype(self.dtype)
    return BernoulliMLPParams(*[tf.constant(p, dtype) for p in self.params_])

  def predict_proba(self, X) -> np.ndarray:
    """p(y = classes_[i] | x), shape [N, C]."""
    Xs = self.standardized_inputs(X)
    params = self.em_params()
    out = [np.exp(self._em_model.predict_log_proba(params, tf.constant(Xs[b], params[0].dtype)).numpy())
           for b in _batches(self._em_model, Xs.shape[0])]
    return np.concatenate(out, axis=0)

  def predict(self, X) -> np.ndarray:
    """argmax_i p(y = classes_[i] | x)."""
    proba = self.predict_proba(X)
    return self.classes_[np.argmax(proba, axis=1)]

  def score(self, X, y) -> float:
    """Accuracy of `predict(X)` against `y`."""
    pred = self.predict(X)
    y = np.asarray(y)
    if y.shape != pred.shape:
      raise ValueError(f"y has shape {y.shape} but X gives {pred.shape[0]} predictions")
    return float(np.mean(pred == y))

  def log_likelihood(self, X, y) -> float:
    """Unpenalized log p(y | X) = sum_j log p(y_j | x_j) at the fitted params."""
    Xs = self.standardized_inputs(X)
    return _log_likelihood(self._em_model, self.em_params(), Xs, self.label_codes(y, Xs.shape[0]))

  def label_codes(self, y, n: int) -> np.ndarray:
    """Codes in `classes_` of n labels y, each seen in fit; int32 [n]."""
    y = np.asarray(y)
    if y.ndim != 1 or y.shape[0] != n:
      raise ValueError(f"y must have one label per row of X ({n}), got shape {y.shape}")
    unknown = ~np.isin(y, self.classes_)
    if np.any(unknown):
      raise ValueError(f"y contains labels not seen in fit: {np.unique(y[unknown])[:5].tolist()}")
    return np.searchsorted(self.classes_, y).astype(np.int32)


def _batches(model: BernoulliMLPEM, n: int) -> list[slice]:
  """Row slices whose [rows, 2^m, C] arrays fit the model's memory budget."""
  rows = max(1, model.chunk_rows() // model.num_classes)
  return [slice(i, min(n, i + rows)) for i in range(0, n, rows)]


def _log_likelihood(model: BernoulliMLPEM, params, Xs: np.ndarray, labels: np.ndarray) -> float:
  """Unpenalized sum_j log p(y_j | x_j) of standardized inputs, in batches."""
  dtype = params[0].dtype
  return sum(float(tf.reduce_sum(mlp.marginal_log_prob(
      params, tf.constant(Xs[b], dtype), tf.constant(labels[b]))))
      for b in _batches(model, Xs.shape[0]))
