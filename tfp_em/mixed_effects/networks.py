"""Neural-network fixed effects f for the mixed model: EM (MeNets) and NLL (LMMNN).

Both trainers fit the same model, y_ij = f(x_ij) + z_ij^T u_i + eps_ij, with f
a Keras 3 model:

* `fit_network_em` (MeNets): EM with the closed-form Sigma_u and sigma^2
  updates of `em` and a generalized M-step for f: a few epochs of Adam on
  the expected complete-data squared error E[(y - f(x) - z^T u)^2 | y], in
  which the MeNets design z = [1, Gamma(x)] moves with the weights (a fixed
  target y - z^T m would ignore that). sigma^2 is updated after f, with the
  new f and z, so each block maximizes Q given the others. `fit_menets`
  runs it in two stages for the MeNets design.
* `fit_network_nll` (LMMNN): Adam on the exact marginal negative log-likelihood,
  jointly over the network weights and the variance parameters (Sigma_u through
  its Cholesky factor, sigma^2 through softplus). Each mini-batch is a set of
  whole clusters, so its loss is an exact marginal (an unbiased estimate of
  the full one).

Both run `training.train_with_early_stopping`; `variances_given_network`
then refits Sigma_u and sigma^2 exactly given the returned network (`fit_network`
runs the whole). Early stopping (patience counted in EM iterations or epochs)
is on the validation NLL -log p(y_val | y_train, theta) = -(l(train + val) - l(train)),
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

import warnings
from typing import NamedTuple

import keras
import numpy as np
import scipy.linalg
import tensorflow as tf

from models import mixed_effects as me
from tfp_em.engine import ConvergenceWarning, fit_em
from tfp_em.engine.unconstrained import Flattener
from tfp_em.mixed_effects import em as mem
from tfp_em.mixed_effects.training import (Network, NetworkFit, cluster_minibatches,
                                           expected_loss_epoch, minibatch_epoch, minibatches,
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


def independent_columns(z: np.ndarray) -> np.ndarray:
  """Indices (sorted) of a maximal set of linearly independent columns of z [N, q]."""
  r, pivots = scipy.linalg.qr(z, mode="r", pivoting=True)
  diagonal = np.abs(np.diag(r))
  rank = int(np.sum(diagonal > max(z.shape) * np.finfo(z.dtype).eps * diagonal[0]))
  return np.sort(pivots[:rank])


def variances_given_network(net: Network, train: me.MixedEffectsData, covariance_type: str, *,
                            seed: int, max_iter: int = 500, tol: float = 1e-10, start=None):
  """(params, l): the exact ML of Sigma_u and sigma^2 with f held fixed, and the
  mean of the random effects moved into f.

  The linear mixed model y - f(x) = x^T beta + z^T u + eps, with f and the
  design z of the network in inference mode (the given z, or [1, Gamma(x)] for
  MeNets), fitted by PX-EM for at most `max_iter` iterations (near a singular
  Sigma_u, common with [1, Gamma], EM and L-BFGS both crawl). Its fixed
  effects x are the columns of z that the output layer can absorb: the
  constant, and for MeNets the linearly independent columns of [1, Gamma].
  `Network.shift_output` then adds x^T beta to f, so the returned params (with
  an empty beta) and the shifted network give the marginal l. With f = w^T
  Gamma + b this is the exact M-step of (w, b, Sigma_u, sigma^2) given Gamma.
  From `start` (params with an empty beta; the fixed effects start at 0), l
  never ends below l(start) (up to the float32 rounding of the shift); without
  it EM starts from `MixedEffectsEM.initialize`.
  """
  f, hidden = net(train.x)
  z = net.design(hidden, train.z)                                     # [N, q]
  n, dtype = int(train.y.shape[0]), train.y.dtype
  columns = independent_columns(np.asarray(z)) if net.features else np.array([0])
  x = tf.gather(z, columns, axis=1) if net.features else tf.ones([n, 1], dtype)
  probe = train._replace(x=x, y=train.y - f, z=z)
  model = mem.MixedEffectsEM(covariance_type, expand=True)
  if start is not None:
    start = start._replace(beta=tf.zeros([columns.size], dtype))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", ConvergenceWarning)  # a bounded polish, not a fit
    result = fit_em(model, probe, max_iter=max_iter, tol=tol, seed=seed, init_params=start,
                    progress=False).params
  shift = np.zeros(int(z.shape[1]))
  shift[columns] = np.asarray(result.beta)
  net.shift_output(shift)
  params = result._replace(beta=tf.zeros([0], dtype))
  f, hidden = net(train.x)  # l of the shifted network as it computes (float32 weights)
  post, _ = model.cluster_posterior(
      params, train._replace(z=net.design(hidden, train.z)), loc=f)
  return params, float(tf.reduce_sum(post.log_prob))


class NetworkResult(NamedTuple):
  """What `fit_network` returns."""
  fit: NetworkFit                 # the trainer's (for MeNets EM, its [1, Gamma] stage)
  start: me.MixedEffectsParams    # the params the trainer started from
  params: me.MixedEffectsParams   # Sigma_u, sigma^2 refitted given the returned network
  log_likelihood: float           # training marginal at `params` and the returned network
  pretraining: NetworkFit | None  # MeNets EM's random-intercept stage, else None


def fit_network(net: Network, train: me.MixedEffectsData, val, covariance_type: str, *,
                method: str, seed: int, epochs_per_step: int, **options) -> NetworkResult:
  """Trains a network f by MeNets EM (`method='em'`) or LMMNN (`'nll'`), then
  refits Sigma_u and sigma^2 exactly given the returned network.

  The refit (`variances_given_network` from the trainer's params) makes the
  returned variances the ML estimates given f in inference mode: the trainers
  see f with dropout, and LMMNN's sigma^2 otherwise absorbs the dropout noise
  (about twice EM's on the same model). It needs an output layer that can
  take the fixed part (`Network.shifts_output`); otherwise the trainer's
  params are returned. PX-EM's expansion ('intercept') applies when z's first
  column is the constant 1; MeNets EM (`net.features`) runs `fit_menets`.
  `options`: max_iter, batch_size, learning_rate, patience.
  """
  pretraining = None
  if method == "em" and net.features:
    pretraining, start, fit = fit_menets(net, train, val, covariance_type, seed=seed,
                                         epochs_per_step=epochs_per_step, **options)
  else:
    start, _ = variances_given_network(net, train, covariance_type, seed=seed, max_iter=50,
                                       tol=1e-6)
    if method == "em":
      z = np.asarray(train.z)
      constant_first = z.shape[1] > 0 and bool(np.all(z[:, 0] == 1.))
      fit = fit_network_em(net, train, val, covariance_type, start, seed=seed,
                           expand="intercept" if constant_first else "none",
                           epochs_per_step=epochs_per_step, **options)
    else:
      fit = fit_network_nll(net, train, val, covariance_type, start, seed=seed, **options)
  params, log_likelihood = fit.params, fit.log_likelihood
  if net.shifts_output:
    params, log_likelihood = variances_given_network(net, train, covariance_type, seed=seed,
                                                     start=fit.params)
  return NetworkResult(fit, start, params, log_likelihood, pretraining)


def fit_menets(net: Network, train: me.MixedEffectsData, val, covariance_type: str, *,
               seed: int, **options) -> tuple[NetworkFit, me.MixedEffectsParams, NetworkFit]:
  """MeNets EM in two stages: (pretraining, the second stage's start, fit).

  The design [1, Gamma(x)] is only as good as the features Gamma, and from
  random weights EM drifts into a degenerate corner: Gamma's scale and
  Sigma_u trade off freely, the Adam step pushes units with a large posterior
  spread towards zero, ReLU units die or turn constant (columns of z that are
  zero or collinear with the constant), and f loses its capacity. So f is
  first trained with random intercepts only (the sub-model with the
  Gamma block of Sigma_u at 0), then Sigma_u and sigma^2 are fitted exactly
  on the Gamma of that network, and MeNets EM goes on from there.
  `options` are `fit_network_em`'s keyword arguments.
  """
  intercepts = net.with_features(False)

  def intercept_design(data):
    return None if data is None else data._replace(
        z=tf.ones([int(data.y.shape[0]), 1], data.y.dtype))

  start, _ = variances_given_network(intercepts, intercept_design(train), covariance_type,
                                     seed=seed, max_iter=50, tol=1e-6)
  pretraining = fit_network_em(intercepts, intercept_design(train), intercept_design(val),
                               covariance_type, start, expand="intercept", seed=seed, **options)
  start, _ = variances_given_network(net, train, covariance_type, seed=seed)
  return pretraining, start, fit_network_em(net, train, val, covariance_type, start,
                                            expand="all", seed=seed, **options)


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

  train_epoch = expected_loss_epoch(net, train.x, train.z, train.cluster, optimizer)

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
    for _ in range(epochs_per_step):
      train_epoch(*map(tf.constant, minibatches(rng, n, batch_size)), train.y, mean,
                  post.covariance)
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
