"""Neural-network fixed effects f for the mixed model: EM (MeNets) and NLL (LMMNN).

Both trainers fit the same model, y_ij = f(x_ij) + z_ij^T u_i + eps_ij, with f
a Keras 3 model:

* `fit_network_em` (MeNets): EM with the closed-form Sigma_u and sigma^2
  updates of `tfp_em.mixed_effects_em` and a generalized M-step for f: a few
  epochs of Adam on the mean squared error to the target y - z^T m.
  sigma^2 is updated after f, with the new f (and the new z for the 'features'
  design), so each block maximizes Q given the others.
* `fit_network_nll` (LMMNN): Adam on the exact marginal negative log-likelihood,
  jointly over the network weights and the variance parameters (Sigma_u through
  its Cholesky factor, sigma^2 through softplus). Each mini-batch is a set of
  whole clusters, so its loss is an exact marginal (an unbiased estimate of
  the full one).

Early stopping (patience counted in EM iterations or epochs) is on the
validation NLL -log p(y_val | y_train, theta) = -(l(train + val) - l(train)),
exact from the same segment sums; without validation data it is on the
training -l. The weights and parameters with the best criterion are returned,
and the log-likelihood reported is the training marginal at those.

Every epoch runs inside one `tf.function` (a graph loop over mini-batches).

#### References

[1] Y. Xiong, H. J. Kim and V. Singh. Mixed effects neural networks (MeNets)
    with applications to gaze estimation. CVPR, 2019.
[2] G. Simchoni and S. Rosset. Using random effects to account for
    high-cardinality categorical features and repeated measures in deep neural
    networks. NeurIPS, 2021.
"""
from __future__ import annotations

import time
from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf

from models import mixed_effects as me
from models.specs import constrain, unconstrain
from tfp_em.mixed_effects import em as mem


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


class Network:
  """A Keras model seen as f(x) [N] and, for the MeNets design, Gamma(x) [N, H].

  Gamma is the input of the model's last layer. Outputs are cast to `dtype`.
  """

  def __init__(self, model: keras.Model, features: bool, dtype):
    self.model = model
    self.dtype = tf.as_dtype(dtype)
    self.input_dtype = tf.as_dtype(getattr(model, "compute_dtype", "float32") or "float32")
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

  def shift_output(self, shift) -> bool:
    """f(x) += z(x)^T shift, exactly, where the design allows it.

    The constant column z_0 = 1 goes into the output bias; for the MeNets
    design, the Gamma part goes into the output kernel. Needs a last Dense
    layer with a bias and linear activation; returns False (and does
    nothing) otherwise.
    """
    last = self.model.layers[-1]
    if not (isinstance(last, keras.layers.Dense) and last.use_bias
            and last.activation in (None, keras.activations.linear)):
      return False
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
  params: me.MixedEffectsParams  # beta is empty
  log_likelihood: float          # training marginal at `params` and the returned weights
  trace: np.ndarray              # training loglik at each iteration/epoch (inference mode)
  val_nll: np.ndarray            # early-stopping criterion at each iteration/epoch
  best_iteration: int
  n_iter: int
  stop_reason: str               # 'early_stopping' | 'max_iter'
  seconds: float


def _combined(train: me.MixedEffectsData, val: me.MixedEffectsData):
  """train + val as one data set; val's cluster ids already index the union."""
  return me.MixedEffectsData(
      x=tf.concat([train.x, val.x], 0), y=tf.concat([train.y, val.y], 0),
      z=tf.concat([train.z, val.z], 0), cluster=tf.concat([train.cluster, val.cluster], 0),
      num_clusters=tf.maximum(train.num_clusters, val.num_clusters))


class _Evaluator:
  """Training loglik, posterior and the early-stopping criterion, in inference mode."""

  def __init__(self, net: Network, covariance_type: str, train, val):
    self.net, self.covariance_type, self.train = net, covariance_type, train
    self.both = None if val is None else _combined(train, val)
    self.n_val = None if val is None else float(val.y.shape[0])
    self.evaluate = tf.function(self._evaluate, reduce_retracing=True)

  def _loglik(self, params, data):
    f, hidden = self.net(data.x, training=False)
    z = self.net.design(hidden, data.z)
    stats = me.cluster_stats(z, data.y - f, data.cluster, data.num_clusters)
    cov_u = me.covariance_matrix(params.covariance, self.covariance_type)
    post = me.cluster_posterior(cov_u, params.noise_variance, stats)
    return tf.reduce_sum(post.log_prob), post, stats, z

  def _evaluate(self, params):
    ll, post, stats, z = self._loglik(params, self.train)
    if self.both is None:
      crit = -ll / tf.cast(tf.shape(self.train.y)[0], ll.dtype)
    else:
      crit = -(self._loglik(params, self.both)[0] - ll) / self.n_val
    return ll, crit, post, stats, z


def _minibatches(rng, n: int, batch_size: int):
  order = rng.permutation(n).astype(np.int32)
  starts = np.arange(0, n, batch_size, dtype=np.int32)
  return order, starts, np.minimum(starts + batch_size, n).astype(np.int32)


def _cluster_minibatches(rng, cluster: np.ndarray, num_clusters: int, batch_size: int):
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


def _snapshot(net, params):
  return net.model.get_weights(), type(params)(*[tf.constant(np.asarray(p)) for p in params])


class _EarlyStopper:
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
      self.best, self.best_crit, self.best_it = _snapshot(self.net, params), self.crits[-1], it
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


def mse_epoch(net: Network, x, optimizer):
  """`minibatch_epoch` of f's weights on mean((target - f(x))^2) over rows of x [N, p];
  called as `train_epoch(order, starts, ends, target [N])`."""
  def batch_loss(idx, start, end, target):
    f, _ = net(tf.gather(x, idx), training=True)
    return tf.reduce_mean(tf.square(tf.gather(target, idx) - f))

  return minibatch_epoch(batch_loss, net.trainable_variables, optimizer)


def fit_network_em(net: Network, train: me.MixedEffectsData, val, covariance_type: str,
                   init_params: me.MixedEffectsParams, *, max_iter: int, epochs_per_step: int,
                   batch_size: int, learning_rate: float, patience: int, seed: int,
                   expand: str = "intercept") -> NetworkFit:
  """MeNets: EM with closed-form variance updates and Adam epochs for f.

  `expand` is the parameter-expansion step (PX-EM, Liu, Rubin and Wu 1998):
  the M-step also fits a mean mu of the random effects, then moves it into f
  (f += z^T mu, exact through the output layer) and centres the m_i. Without
  it EM shifts a common offset between f's bias and the u_i only by the
  shrinkage fraction per iteration, which with large clusters takes hundreds
  of iterations. 'intercept' expands the constant column (z_0 = 1), 'all'
  every column (the MeNets 'features' design, where z = [1, Gamma] and f =
  w^T Gamma + b), 'none' turns it off.
  """
  stopper = _EarlyStopper(net, patience, "MeNets EM", "iteration")
  rng = np.random.default_rng(seed)
  optimizer = keras.optimizers.Adam(learning_rate)
  evaluator = _Evaluator(net, covariance_type, train, val)
  n = int(train.y.shape[0])
  dtype = train.y.dtype

  train_epoch = mse_epoch(net, train.x, optimizer)

  @tf.function(reduce_retracing=True)
  def noise_update(mean, covariance):
    f, hidden = net(train.x, training=False)
    z = net.design(hidden, train.z)
    resid = train.y - f - tf.reduce_sum(z * tf.gather(mean, train.cluster), -1)
    ztz = tf.math.unsorted_segment_sum(z[:, :, None] * z[:, None, :], train.cluster,
                                       train.num_clusters)
    return mem.update_noise_variance(tf.reduce_sum(tf.square(resid)),
                                     mem.trace_term(ztz, covariance), tf.cast(n, dtype))

  params = init_params
  for it in range(max_iter + 1):
    ll, crit, post, stats, z = evaluator.evaluate(params)
    if stopper.should_stop(it, params, ll, crit) or it == max_iter:
      break
    # M-step: mu (PX), Sigma_u (closed form), f (Adam epochs on y - z m), sigma^2.
    mean = post.mean
    if expand != "none":
      mu = tf.reduce_mean(mean, axis=0)
      if expand == "intercept":
        mu = mu * tf.one_hot(0, tf.shape(mu)[0], dtype=dtype)
      if net.shift_output(mu):
        mean = mean - mu
    covariance = mem.update_covariance(mem.posterior_second_moment(mean, post.covariance),
                                       tf.cast(train.num_clusters, dtype), covariance_type)
    target = train.y - tf.reduce_sum(z * tf.gather(mean, train.cluster), -1)
    for _ in range(epochs_per_step):
      train_epoch(*map(tf.constant, _minibatches(rng, n, batch_size)), target)
    params = me.MixedEffectsParams(beta=params.beta, covariance=covariance,
                                   noise_variance=noise_update(mean, post.covariance))
  return stopper.result(n_iter=it)


def fit_network_nll(net: Network, train: me.MixedEffectsData, val, covariance_type: str,
                    init_params: me.MixedEffectsParams, *, max_iter: int, batch_size: int,
                    learning_rate: float, patience: int, seed: int) -> NetworkFit:
  """LMMNN: Adam on the exact marginal NLL over weights and variance parameters."""
  stopper = _EarlyStopper(net, patience, "LMMNN NLL", "epoch")
  rng = np.random.default_rng(seed)
  optimizer = keras.optimizers.Adam(learning_rate)
  evaluator = _Evaluator(net, covariance_type, train, val)
  specs = me.param_specs(covariance_type)
  free = unconstrain(init_params, specs)
  free_cov = tf.Variable(np.asarray(free.covariance), name="free_covariance")
  free_noise = tf.Variable(np.asarray(free.noise_variance), name="free_noise_variance")
  variables = list(net.trainable_variables) + [free_cov, free_noise]
  n = int(train.y.shape[0])
  num_clusters = int(train.num_clusters)
  cluster_np = np.asarray(train.cluster)
  dtype = train.y.dtype

  def current_params():
    return constrain(me.MixedEffectsParams(init_params.beta, free_cov, free_noise), specs)

  def batch_loss(idx, start, end, local, scale):
    cluster = local[start:end]
    f, hidden = net(tf.gather(train.x, idx), training=True)
    z = net.design(hidden, tf.gather(train.z, idx))
    params = current_params()
    stats = me.cluster_stats(z, tf.gather(train.y, idx) - f, cluster, tf.reduce_max(cluster) + 1)
    post = me.cluster_posterior(me.covariance_matrix(params.covariance, covariance_type),
                                params.noise_variance, stats)
    return -tf.reduce_sum(post.log_prob) * scale

  train_epoch = minibatch_epoch(batch_loss, variables, optimizer)

  for it in range(max_iter + 1):
    params = current_params()
    ll, crit, _, _, _ = evaluator.evaluate(params)
    if stopper.should_stop(it, params, ll, crit) or it == max_iter:
      break
    order, starts, ends, local = _cluster_minibatches(rng, cluster_np, num_clusters, batch_size)
    scale = tf.constant(len(starts) / n, dtype)
    train_epoch(*map(tf.constant, (order, starts, ends, local)), scale)
  return stopper.result(n_iter=it)
