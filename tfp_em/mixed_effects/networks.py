"""Neural-network fixed effects f for the mixed model: EM (MeNets) and NLL (LMMNN).

Both trainers fit the same model, y_ij = f(x_ij) + z_ij^T u_i + eps_ij, with f
a Keras 3 model:

* `fit_network_em` (MeNets): EM with the closed-form Sigma_u and sigma^2
  updates of `em` and a generalized M-step for f: a few
  epochs of Adam on the mean squared error to the target y - z^T m.
  sigma^2 is updated after f, with the new f (and the new z for the 'features'
  design), so each block maximizes Q given the others.
* `fit_network_nll` (LMMNN): Adam on the exact marginal negative log-likelihood,
  jointly over the network weights and the variance parameters (Sigma_u through
  its Cholesky factor, sigma^2 through softplus). Each mini-batch is a set of
  whole clusters, so its loss is an exact marginal (an unbiased estimate of
  the full one).

Both run `training.train_with_early_stopping`. Early stopping (patience
counted in EM iterations or epochs) is on the
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

import keras
import numpy as np
import tensorflow as tf

from models import mixed_effects as me
from tfp_em.engine.unconstrained import Flattener
from tfp_em.mixed_effects import em as mem
from tfp_em.mixed_effects.training import (Network, NetworkFit, cluster_minibatches,
                                           minibatch_epoch, minibatches, mse_epoch,
                                           train_with_early_stopping)


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
    return tf.reduce_sum(post.log_prob), post, z

  def _evaluate(self, params):
    ll, post, z = self._loglik(params, self.train)
    if self.both is None:
      crit = -ll / tf.cast(tf.shape(self.train.y)[0], ll.dtype)
    else:
      crit = -(self._loglik(params, self.both)[0] - ll) / self.n_val
    return ll, crit, post, z


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

  def evaluate(params):
    ll, crit, post, z = evaluator.evaluate(params)
    return ll, crit, (post, z)

  def step(it, params, state):
    # M-step: mu (PX), Sigma_u (closed form), f (Adam epochs on y - z m), sigma^2.
    post, z = state
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
      train_epoch(*map(tf.constant, minibatches(rng, n, batch_size)), target)
    return me.MixedEffectsParams(beta=params.beta, covariance=covariance,
                                 noise_variance=noise_update(mean, post.covariance))

  return train_with_early_stopping(net, init_params, evaluate=evaluate, step=step,
                                   max_iter=max_iter, patience=patience, label="MeNets EM",
                                   unit="iteration")


def fit_network_nll(net: Network, train: me.MixedEffectsData, val, covariance_type: str,
                    init_params: me.MixedEffectsParams, *, max_iter: int, batch_size: int,
                    learning_rate: float, patience: int, seed: int) -> NetworkFit:
  """LMMNN: Adam on the exact marginal NLL over weights and variance parameters."""
  rng = np.random.default_rng(seed)
  optimizer = keras.optimizers.Adam(learning_rate)
  evaluator = _Evaluator(net, covariance_type, train, val)
  specs = me.param_specs(covariance_type)
  flat = Flattener(init_params, specs._replace(beta=specs.beta._replace(trainable=False)))
  free = tf.Variable(flat.u_hat, name="free_variance_parameters")
  variables = list(net.trainable_variables) + [free]
  n = int(train.y.shape[0])
  num_clusters = int(train.num_clusters)
  cluster_np = np.asarray(train.cluster)
  dtype = train.y.dtype

  def batch_loss(idx, start, end, local, scale):
    cluster = local[start:end]
    f, hidden = net(tf.gather(train.x, idx), training=True)
    z = net.design(hidden, tf.gather(train.z, idx))
    params = flat.unflatten(free)
    stats = me.cluster_stats(z, tf.gather(train.y, idx) - f, cluster, tf.reduce_max(cluster) + 1)
    post = me.cluster_posterior(me.covariance_matrix(params.covariance, covariance_type),
                                params.noise_variance, stats)
    return -tf.reduce_sum(post.log_prob) * scale

  train_epoch = minibatch_epoch(batch_loss, variables, optimizer)

  def evaluate(params):
    ll, crit, _, _ = evaluator.evaluate(params)
    return ll, crit, None

  def step(it, params, state):
    order, starts, ends, local = cluster_minibatches(rng, cluster_np, num_clusters, batch_size)
    scale = tf.constant(len(starts) / n, dtype)
    train_epoch(*map(tf.constant, (order, starts, ends, local)), scale)
    return flat.unflatten(free)

  return train_with_early_stopping(net, flat.unflatten(free), evaluate=evaluate, step=step,
                                   max_iter=max_iter, patience=patience, label="LMMNN NLL",
                                   unit="epoch")
