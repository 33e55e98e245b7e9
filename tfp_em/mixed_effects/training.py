"""What the network trainers share: f as a Keras model, mini-batches, early stopping.

`train_with_early_stopping` is the one loop of every network trainer (MeNets
EM and LMMNN NLL, one factor or K crossed): evaluate in inference mode, keep
the best weights and params by the criterion, stop after `patience`
evaluations without improvement, else take one EM iteration or epoch.
`check_validation_data` is the one rule for the early-stopping data.
"""
from __future__ import annotations

import time
from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf

from models import mixed_effects as me
from tfp_em.engine import FitResult, RestartTrace, default_decrease_tol, to_numpy
from tfp_em.mixed_effects.labels import as_factors


class ValidationData(NamedTuple):
  """The parts of `validation_data` (unchecked arrays; time and Z may be None)."""
  X: object
  y: object
  clusters: list  # K grouping factors
  time: object
  Z: object


def check_validation_data(validation_data, network: bool, num_factors: int):
  """`validation_data` = (X, y, clusters[, time[, Z]]) as `ValidationData`, or None.

  Raises ValueError unless it is None or such a tuple with clusters of
  `num_factors` grouping factors, as in fit; and for a linear f (`network`
  False), where there is no early stopping to use it.
  """
  if validation_data is None:
    return None
  if not network:
    raise ValueError("validation_data (early stopping) is only used with a network f; "
                     "got f=None (linear)")
  if not isinstance(validation_data, (tuple, list)) or not 3 <= len(validation_data) <= 5:
    raise ValueError("validation_data must be a tuple (X, y, clusters[, time[, Z]])")
  Xv, yv, clusters, tv, zv = (list(validation_data) + [None, None])[:5]
  factors = as_factors(clusters)
  if len(factors) != num_factors:
    want = "one grouping factor" if num_factors == 1 else f"a list of {num_factors} grouping factors"
    raise ValueError(f"validation clusters must be {want}, as in fit")
  return ValidationData(Xv, yv, factors, tv, zv)


def default_mlp(input_dim: int, hidden_units=(100, 50, 25, 12), dropout: float = 0.25,
                activation: str = "relu", seed: int = 0) -> keras.Model:
  """The LMMNN paper's MLP: Dense(100-50-25-12, ReLU), dropout 0.25 after each
  hidden layer but the last, and a linear output unit (float32)."""
  init = lambda k: keras.initializers.GlorotUniform(seed=seed + k)
  layers = [keras.Input((input_dim,))]
  for k, units in enumerate(hidden_units):
    layers.append(keras.layers.Dense(units, activation=activation, kernel_initializer=init(k)))
    if dropout > 0 and k < len(hidden_units) - 1:
      layers.append(keras.layers.Dropout(dropout, seed=seed + 100 + k))
  layers.append(keras.layers.Dense(1, kernel_initializer=init(len(hidden_units))))
  return keras.Sequential(layers)


def build_network(f, input_dim: int, *, features: bool, hidden_units, dropout: float, seed: int,
                  dtype) -> "Network | None":
  """The estimator's `f` as a `Network` (None for a linear f).

  'mlp' is `default_mlp(input_dim, hidden_units, dropout, seed)`; a Keras
  model is cloned with its weights (the user's stays untouched); a callable
  is called with `input_dim` and must return a Keras model.
  """
  if f is None:
    return None
  if isinstance(f, str):
    if f != "mlp":
      raise ValueError(f"f must be None, 'mlp', a Keras model or a callable, got {f!r}")
    model = default_mlp(input_dim, tuple(hidden_units), dropout, seed=seed)
  elif isinstance(f, keras.Model):
    model = keras.models.clone_model(f)
    model.set_weights(f.get_weights())
  elif callable(f):
    model = f(input_dim)
    if not isinstance(model, keras.Model):
      raise ValueError(f"f(input_dim) must return a keras.Model, got {type(model).__name__}")
  else:
    raise ValueError(f"f must be None, 'mlp', a Keras model or a callable, got {f!r}")
  return Network(model, features=features, dtype=dtype)


class Network:
  """A Keras model seen as f(x) [N] and, for the MeNets design, Gamma(x) [N, H].

  Gamma is the input of the model's last layer. Outputs are cast to `dtype`.
  """

  def __init__(self, model: keras.Model, features: bool, dtype):
    self.model = model
    self.features = bool(features)
    self.dtype = tf.as_dtype(dtype)
    self.input_dtype = tf.as_dtype(model.compute_dtype or "float32")
    self._two = None
    if features:
      try:
        self._two = keras.Model(model.inputs, [model.outputs[0], model.layers[-1].input])
      except (AttributeError, ValueError, IndexError, TypeError) as e:
        raise ValueError(
            "random_effects='features' needs a Keras Sequential or functional model whose "
            f"last layer's input is the last hidden layer; could not read it ({e})") from None

  @property
  def trainable_variables(self):
    return self.model.trainable_variables

  def __call__(self, x, training=False):
    """(f [N], Gamma [N, H] or None)."""
    x = tf.cast(x, self.input_dtype)
    if self._two is None:
      out, hidden = self.model(x, training=training), None
    else:
      out, hidden = self._two(x, training=training)
      hidden = tf.cast(hidden, self.dtype)
    return tf.cast(out[:, 0] if out.shape.rank == 2 else out, self.dtype), hidden

  def with_features(self, features: bool) -> "Network":
    """The same Keras model (shared weights) seen with or without the MeNets design."""
    return Network(self.model, features, self.dtype)

  @property
  def shifts_output(self) -> bool:
    """Whether `shift_output` can move a shift into the last layer (a biased linear Dense)."""
    last = self.model.layers[-1]
    return (isinstance(last, keras.layers.Dense) and last.use_bias
            and last.activation in (None, keras.activations.linear))

  def shift_output(self, shift) -> bool:
    """f(x) += z(x)^T shift, exactly, where the design allows it.

    The constant column z_0 = 1 goes into the output bias; for the MeNets
    design, the Gamma part goes into the output kernel. Needs a last Dense
    layer with a bias and linear activation; returns False (and does
    nothing) otherwise.
    """
    if not self.shifts_output:
      return False
    last = self.model.layers[-1]
    shift = np.asarray(shift)
    last.bias.assign_add(np.full(last.bias.shape, shift[0], last.bias.dtype))
    if self._two is not None:
      last.kernel.assign_add(shift[1:, None].astype(last.kernel.dtype))
    return True

  def design(self, hidden, z):
    """The random-effects design: [1, Gamma] for 'features', else the given z."""
    return z if hidden is None else me.features_design(hidden)


class NetworkFit(NamedTuple):
  """What a network trainer returns."""
  params: tuple                  # MixedEffectsParams or CrossedParams; beta is empty
  log_likelihood: float          # training marginal at `params` and the returned weights
  trace: np.ndarray              # training loglik at each iteration/epoch (inference mode)
  val_nll: np.ndarray            # early-stopping criterion at each iteration/epoch
  best_iteration: int
  n_iter: int
  stop_reason: str               # 'early_stopping' | 'max_iter'
  seconds: float


def minibatches(rng, n: int, batch_size: int):
  """Random rows: (order, starts, ends) of one epoch's mini-batches of `batch_size` rows."""
  order = rng.permutation(n).astype(np.int32)
  starts = np.arange(0, n, batch_size, dtype=np.int32)
  return order, starts, np.minimum(starts + batch_size, n).astype(np.int32)


def cluster_minibatches(rng, cluster: np.ndarray, num_clusters: int, batch_size: int):
  """Rows grouped by cluster in a random cluster order, cut at cluster ends
  once a batch holds >= batch_size rows. Returns order, starts, ends and each
  row's cluster index local to its batch (in batch order, 0..G_b-1)."""
  counts = np.bincount(cluster, minlength=num_clusters)
  perm = rng.permutation(np.flatnonzero(counts))                       # non-empty clusters
  rank = np.zeros(num_clusters, np.int64)
  rank[perm] = np.arange(perm.size)
  order = np.argsort(rank[cluster], kind="stable").astype(np.int32)
  ends_c = np.cumsum(counts[perm])
  cut = np.flatnonzero(np.diff(ends_c // batch_size, prepend=0) > 0)    # last cluster of a batch
  if cut.size == 0 or cut[-1] != perm.size - 1:
    cut = np.append(cut, perm.size - 1)
  ends = ends_c[cut].astype(np.int32)
  starts = np.concatenate([[0], ends[:-1]]).astype(np.int32)
  first = np.concatenate([[0], cut[:-1] + 1])
  batch_of = np.repeat(np.arange(cut.size), np.diff(np.concatenate([[-1], cut])))
  local = np.arange(perm.size) - first[batch_of]                        # by rank
  return order, starts, ends, local[rank[cluster[order]]].astype(np.int32)


def snapshot(net, params):
  """(the network's weights, params as new tensors): a state to restore."""
  return net.model.get_weights(), type(params)(*[tf.constant(np.asarray(p)) for p in params])


class EarlyStopper:
  """Keeps the loglik and validation traces and the best weights and params;
  says when `patience` evaluations have passed without improvement."""

  def __init__(self, net, patience: int, label: str, unit: str):
    self.net, self.patience, self.label, self.unit = net, patience, label, unit
    self.trace, self.crits = [], []
    self.best, self.best_crit, self.best_it, self.stop_reason = None, np.inf, 0, "max_iter"
    self.start = time.perf_counter()

  def should_stop(self, it: int, params, loglik, criterion) -> bool:
    self.trace.append(float(loglik))
    self.crits.append(float(criterion))
    if not np.isfinite(self.trace[-1]):
      raise ValueError(f"{self.label}: log-likelihood became {self.trace[-1]} at {self.unit} "
                       f"{it}; lower learning_rate or standardize y.")
    if self.crits[-1] < self.best_crit:
      self.best, self.best_crit, self.best_it = snapshot(self.net, params), self.crits[-1], it
    elif it - self.best_it >= self.patience:
      self.stop_reason = "early_stopping"
      return True
    return False

  def result(self, n_iter: int) -> NetworkFit:
    """Restores the best weights and returns the fit at the best evaluation."""
    self.net.model.set_weights(self.best[0])
    return NetworkFit(params=self.best[1], log_likelihood=self.trace[self.best_it],
                      trace=np.array(self.trace), val_nll=np.array(self.crits),
                      best_iteration=self.best_it, n_iter=n_iter, stop_reason=self.stop_reason,
                      seconds=time.perf_counter() - self.start)


def minibatch_epoch(batch_loss, variables, optimizer):
  """A compiled epoch: `train_epoch(order, starts, ends, *args)` takes one
  `optimizer` step on `variables` per mini-batch, minimizing
  `batch_loss(idx, start, end, *args)` with idx = order[start:end].
  """
  @tf.function(reduce_retracing=True)
  def train_epoch(order, starts, ends, *args):
    for i in tf.range(tf.size(starts)):
      with tf.GradientTape() as tape:
        loss = batch_loss(order[starts[i]:ends[i]], starts[i], ends[i], *args)
      optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))

  return train_epoch


def expected_loss_epoch(net: Network, x, z, cluster, optimizer):
  """`minibatch_epoch` of f's weights on the expected complete-data squared error

      mean_j E[(y_j - f(x_j) - z_j^T u_i)^2 | y] = mean_j (r_j - z_j^T m_i)^2 + z_j^T S_i z_j

  over rows of x [N, p], with z_j the design (given z [N, q], or [1, Gamma(x_j)]
  for the MeNets design, recomputed from the weights being trained), r_j =
  y_j - f(x_j) and (m_i, S_i) the E-step's posterior of row j's cluster.
  This is -2 sigma^2 Q up to a constant, so Adam on it is a generalized
  M-step for f. Called as `train_epoch(order, starts, ends, y [N], mean [G, q],
  covariance [G, q, q])`.
  """
  def batch_loss(idx, start, end, y, mean, covariance):
    f, hidden = net(tf.gather(x, idx), training=True)
    design = net.design(hidden, tf.gather(z, idx))                     # [B, q]
    c = tf.gather(cluster, idx)
    resid = tf.gather(y, idx) - f - tf.reduce_sum(design * tf.gather(mean, c), -1)
    spread = tf.einsum("bq,bqr,br->b", design, tf.gather(covariance, c), design)
    return tf.reduce_mean(tf.square(resid) + spread)

  return minibatch_epoch(batch_loss, net.trainable_variables, optimizer)


def mse_epoch(net: Network, x, optimizer):
  """`minibatch_epoch` of f's weights on mean((target - f(x))^2) over rows of x [N, p];
  called as `train_epoch(order, starts, ends, target [N])`."""
  def batch_loss(idx, start, end, target):
    f, _ = net(tf.gather(x, idx), training=True)
    return tf.reduce_mean(tf.square(tf.gather(target, idx) - f))

  return minibatch_epoch(batch_loss, net.trainable_variables, optimizer)


def train_with_early_stopping(net: Network, params, *, evaluate, step, max_iter: int,
                              patience: int, label: str, unit: str) -> NetworkFit:
  """The loop of every network trainer; returns the fit at the best criterion.

  Not `fit_em`: the f step is stochastic (Adam on mini-batches, so l may
  drop) and the stopping rule is early stopping with the best state restored.

  Args:
    net: the `Network`; its best weights are restored at the end.
    params: the params at iteration 0.
    evaluate: params -> (training loglik, criterion, state), in inference mode.
    step: (iteration, params, state) -> params after one EM iteration or epoch.
    max_iter: the most steps; patience: evaluations without improvement before
      stopping; label, unit: for messages ('MeNets EM', 'iteration').
  """
  stopper = EarlyStopper(net, patience, label, unit)
  for it in range(max_iter + 1):
    loglik, criterion, state = evaluate(params)
    if stopper.should_stop(it, params, loglik, criterion) or it == max_iter:
      break
    params = step(it, params, state)
  return stopper.result(n_iter=it)


def fit_summary(fit: NetworkFit, init, params, log_likelihood: float, num_obs: int,
                seed: int, dtype):
  """(history_, fit_result_) of an estimator fitted by a network trainer.

  The `FitResult` holds one restart whose trace is l up to the returned
  iteration/epoch, converged when early stopping (not max_iter) ended the
  training; `history_` counts the drops of l beyond round-off.
  """
  drops = -np.diff(fit.trace)
  slack = default_decrease_tol(dtype) * (np.abs(fit.trace[1:]) + num_obs)
  converged = fit.stop_reason == "early_stopping"
  history = {"log_likelihood": fit.trace, "criterion": fit.val_nll,
             "best_iteration": fit.best_iteration, "stop_reason": fit.stop_reason,
             "n_decreases": int(np.sum(drops > slack))}
  trace = RestartTrace(seed=seed, log_likelihood=fit.trace[:fit.best_iteration + 1],
                       params=[to_numpy(init), to_numpy(params)], converged=converged,
                       n_iter=fit.best_iteration, stop_reason=fit.stop_reason,
                       seconds=fit.seconds)
  result = FitResult(params=params, log_likelihood=log_likelihood, n_iter=fit.best_iteration,
                     converged=converged, best_restart=0, restarts=(trace,),
                     num_observations=float(num_obs))
  return history, result
