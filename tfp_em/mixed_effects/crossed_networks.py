"""Network f with K crossed random intercepts: MeNets EM and LMMNN NLL.

    y = f(x) + sum_k Z_k u_k + eps,   u_k ~ N(0, sigma_k^2 I_{q_k}),   eps ~ N(0, sigma^2 I)

f is a Keras model (`training.Network`); the random-intercept part is
that of `models.crossed_effects` with f(x) in the place of X beta, so the
exact posterior of u given the residual y - f(x) and the exact marginal come
from `crossed_posterior.posterior` (the sparse factorization: exact up to
`max_dense` levels outside the largest factor, CG and Hutchinson traces
beyond).

* `fit_crossed_network_em` (MeNets): E-step = the exact crossed posterior;
  M-step = the closed-form sigma_k^2 update, `epochs_per_step` Adam epochs of f
  on the mean squared error to the target y - sum_k Z_k m_k, then sigma^2 with
  the new f. By the Fisher identity the gradient of the exact marginal wrt the
  outputs of f is (y - f - Z m) / sigma^2, the gradient of the f-part of Q, so
  the f step follows the exact marginal's gradient. A PX step (Liu, Rubin and
  Wu 1998) moves sum_k mean(m_k) into f's output bias, so a common offset does
  not crawl between f and the u_k.
* `fit_crossed_network_nll` (LMMNN): Adam over the network weights and
  log sigma_k^2, log sigma^2 on the NLL of mini-batches. A batch B contributes
  its exact marginal -log N(y_B | f(X_B), V_B) with the dense

      V_B = sigma^2 I + sum_k sigma_k^2 Z_kB Z_kB^T,  (Z_kB Z_kB^T)_ij = 1[level_ik = level_jk],

  (`batch_log_prob`, one b x b Cholesky per step), scaled by
  num_batches / N. The sum over batches is a composite likelihood: the exact
  marginal of each batch, the dependence between batches dropped. Batches are
  whole levels of one factor, cycling through the factors by epoch (so every
  within-level pair of factor k is inside a batch once every K epochs), cut at
  level ends once they hold `batch_size` rows; a factor whose largest level
  has more than `MAX_GROUP_ROWS` rows is not used for grouping, and without
  such a factor the batches are random rows.

Early stopping (`training.train_with_early_stopping`) is on the exact validation
NLL -(l(train + val) - l(train)) / N_val, or on the training -l / N without
validation data, both from the crossed factorization in inference mode. Beyond
the exact limit log|P| is not available: the criterion is then the mean squared
error of f + BLUPs on the validation rows (the training rows without
validation data), and the log-likelihood trace and `log_likelihood` are NaN.

#### References

[1] Y. Xiong, H. J. Kim and V. Singh. Mixed effects neural networks (MeNets)
    with applications to gaze estimation. CVPR, 2019.
[2] G. Simchoni and S. Rosset. Using random effects to account for
    high-cardinality categorical features and repeated measures in deep neural
    networks. NeurIPS, 2021.
[3] C. Liu, D. B. Rubin and Y. N. Wu. Parameter expansion to accelerate EM:
    the PX-EM algorithm. Biometrika, 85(4):755-770, 1998.
"""
from __future__ import annotations

import warnings
from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from models import crossed_effects as ce
from tfp_em.engine import fit_em
from tfp_em.engine import inputs as val
from tfp_em.engine.unconstrained import Flattener
from tfp_em.mixed_effects import crossed_em as cx
from tfp_em.mixed_effects import crossed_posterior as cp
from tfp_em.mixed_effects.crossed_predictions import CrossedPredictions, PosteriorPrecision
from tfp_em.mixed_effects.em import update_noise_variance
from tfp_em.mixed_effects.labels import (code_labels, code_positions, encode_factors,
                                         sum_at_positions)
from tfp_em.mixed_effects.training import (Network, NetworkFit, cluster_minibatches,
                                           fit_summary, minibatch_epoch, minibatches, mse_epoch,
                                           train_with_early_stopping)

tfd = tfp.distributions

MAX_GROUP_ROWS = 2000


class CrossedNetData(NamedTuple):
  """One data set as numpy arrays.

  Attributes:
    x: [N, p] inputs of f.
    y: [N] responses (float64).
    codes: [N, K] int level of each row in each factor; in a validation set,
      levels unseen in training have codes >= the training q_k.
    num_levels: [K] q_k (training levels plus, for a validation set, its new ones).
  """
  x: np.ndarray
  y: np.ndarray
  codes: np.ndarray
  num_levels: np.ndarray


def blup_by_code(codes, num_levels, mean):
  """sum_k m_k[level_k] per row [N], 0 for levels >= q_k (unseen in training)."""
  return sum_at_positions(code_positions(codes, num_levels), mean)


def batch_log_prob(resid, codes, variances, noise_variance):
  """log N(resid | 0, V_B), V_B = sigma^2 I + sum_k sigma_k^2 1[level_ik = level_jk].

  Args:
    resid: [b] y - f(x) of the batch.
    codes: [b, K] levels of the batch's rows (any integer coding).
    variances: [K] sigma_k^2.  noise_variance: [] sigma^2.
  """
  same = tf.cast(tf.equal(codes[:, None, :], codes[None, :, :]), resid.dtype)  # [b, b, K]
  cov = tf.linalg.matvec(same, variances)                                     # [b, b]
  cov += noise_variance * tf.eye(tf.shape(resid)[0], dtype=resid.dtype)
  return tfd.MultivariateNormalTriL(scale_tril=tf.linalg.cholesky(cov)).log_prob(resid)


def _batches(rng, codes, num_levels, epoch: int, batch_size: int):
  """(order, starts, ends) of one epoch: whole levels of factor epoch mod K' (see module doc)."""
  groupable = [k for k in range(codes.shape[1])
               if np.bincount(codes[:, k], minlength=num_levels[k]).max() <= MAX_GROUP_ROWS]
  if not groupable:
    return minibatches(rng, codes.shape[0], batch_size)
  k = groupable[epoch % len(groupable)]
  return cluster_minibatches(rng, codes[:, k], int(num_levels[k]), batch_size)[:3]


class _Evaluator:
  """f in inference mode, the exact posterior on the training rows and the criterion."""

  def __init__(self, net: Network, train: CrossedNetData, val: CrossedNetData | None,
               max_dense: int, num_probes: int):
    self.net, self.train, self.val = net, train, val
    self.max_dense, self.num_probes = max_dense, num_probes
    self.z = cp.design_matrix(train.codes, train.num_levels)
    self.ztz = (self.z.T @ self.z).tocsr()
    self.exact = cp.exact_limit_ok(train.num_levels, max_dense)
    if val is not None:
      self.both_levels = np.maximum(train.num_levels, val.num_levels)
      self.z_both = cp.design_matrix(np.concatenate([train.codes, val.codes]), self.both_levels)
      self.ztz_both = (self.z_both.T @ self.z_both).tocsr()
      self.exact = self.exact and cp.exact_limit_ok(self.both_levels, max_dense)

  def f(self, x):
    return np.asarray(self.net(tf.constant(x))[0], np.float64)

  def _posterior(self, resid, z, ztz, num_levels, params):
    return cp.posterior(np.zeros((len(resid), 0)), resid, z, ztz, num_levels, np.zeros(0),
                        np.asarray(params.variances, np.float64),
                        float(params.noise_variance), self.max_dense, self.num_probes)

  def evaluate(self, params):
    """(training l (0 beyond the exact limit), criterion, training posterior)."""
    train = self.train
    post = self._posterior(train.y - self.f(train.x), self.z, self.ztz, train.num_levels, params)
    if self.val is None:
      crit = (-post.log_prob if self.exact else
              float(np.sum((post.residual - self.z @ post.mean) ** 2))) / len(train.y)
      return self.loglik(post), crit, post
    f_val = self.f(self.val.x)
    if self.exact:
      resid = np.concatenate([post.residual, self.val.y - f_val])
      both = self._posterior(resid, self.z_both, self.ztz_both, self.both_levels, params)
      crit = -(both.log_prob - post.log_prob) / len(self.val.y)
    else:
      pred = f_val + blup_by_code(self.val.codes, train.num_levels, post.mean)
      crit = float(np.mean((self.val.y - pred) ** 2))
    return self.loglik(post), crit, post

  def loglik(self, post):
    """The training l, or 0 beyond the exact limit (NaN there would stop training)."""
    return post.log_prob if self.exact else 0.


def _finish(fit: NetworkFit, evaluator: _Evaluator) -> NetworkFit:
  if not evaluator.exact:  # the loop was given 0 for the unavailable l
    fit = fit._replace(log_likelihood=float("nan"), trace=np.full_like(fit.trace, np.nan))
  return fit


def initial_params(net: Network, train: CrossedNetData, seed: int, max_dense: int):
  """A crossed random-intercept LMM with a constant, fitted to y - f_0(x) by EM
  (<= 50 iterations; 20 CG/Hutchinson iterations beyond the exact limit), its
  constant moved into f's output bias. Returns `CrossedParams` with empty beta."""
  n = len(train.y)
  f0 = np.asarray(net(tf.constant(train.x))[0], np.float64)
  data = ce.CrossedData(tf.ones([n, 1], tf.float64), tf.constant(train.y - f0),
                        tf.constant(train.codes, tf.int32), tf.constant(train.num_levels, tf.int32))
  model = cx.CrossedEffectsEM(intercept=0, max_dense=max_dense)
  init = model.initialize(data, seed)
  if cp.exact_limit_ok(train.num_levels, max_dense):
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      params = fit_em(model, data, max_iter=50, tol=1e-6, seed=seed, init_params=init,
                      progress=False, keep_trajectory=False).params
  else:
    params = cx.fit_em_large(model, data, init, max_iter=20, tol=1e-3)[0]
  net.shift_output(np.array([float(params.beta[0])]))
  return params._replace(beta=tf.zeros([0], tf.float64))


def fit_crossed_network_em(net: Network, train: CrossedNetData, val, init_params: ce.CrossedParams,
                           *, max_iter: int, epochs_per_step: int, batch_size: int,
                           learning_rate: float, patience: int, seed: int,
                           max_dense: int = cp.MAX_DENSE, num_probes: int = 64,
                           expand: bool = True) -> NetworkFit:
  """MeNets EM with K crossed random intercepts (see the module docstring).

  `expand` (default True) adds the PX step: mu_k = mean(m_k) is fitted too,
  sum_k mu_k goes into f's output bias (exactly; skipped when the last layer
  is not a linear Dense with a bias) and the m_k are centred.
  Returns a `NetworkFit` whose params are `CrossedParams` with empty beta.
  """
  evaluator = _Evaluator(net, train, val, max_dense, num_probes)
  rng = np.random.default_rng(seed)
  optimizer = keras.optimizers.Adam(learning_rate)
  x = tf.constant(train.x)
  n = len(train.y)
  num_levels = np.asarray(train.num_levels)
  factor_of = np.repeat(np.arange(len(num_levels)), num_levels)
  dtype = net.dtype

  train_epoch = mse_epoch(net, x, optimizer)

  def step(it, params, post):
    variances, sigma2 = np.asarray(params.variances, np.float64), float(params.noise_variance)
    stats, _ = cx.CrossedEffectsEM.stats_from(post, np.zeros((n, 0)), evaluator.z, num_levels,
                                              variances, sigma2, tf.zeros([0], tf.float64))
    mean, second = post.mean, stats.second_moment.numpy()
    if expand:
      mu = stats.mean_sum.numpy() / num_levels                           # [K]
      if net.shift_output(np.array([mu.sum()])):
        mean, second = mean - mu[factor_of], second - num_levels * mu ** 2
    new_variances = cx.update_variances(second, num_levels)
    target = train.y - evaluator.z @ mean                                # [N]
    for _ in range(epochs_per_step):
      train_epoch(*map(tf.constant, minibatches(rng, n, batch_size)), tf.constant(target, dtype))
    resid_ss = float(np.sum((target - evaluator.f(train.x)) ** 2))
    return ce.CrossedParams(
        beta=params.beta, variances=tf.constant(new_variances, tf.float64),
        noise_variance=tf.constant(update_noise_variance(resid_ss, float(stats.trace), n),
                                   tf.float64))

  fit = train_with_early_stopping(net, init_params, evaluate=evaluator.evaluate, step=step,
                                  max_iter=max_iter, patience=patience,
                                  label="MeNets EM (crossed)", unit="iteration")
  return _finish(fit, evaluator)


def fit_crossed_network_nll(net: Network, train: CrossedNetData, val,
                            init_params: ce.CrossedParams, *, max_iter: int, batch_size: int,
                            learning_rate: float, patience: int, seed: int,
                            max_dense: int = cp.MAX_DENSE, num_probes: int = 64) -> NetworkFit:
  """LMMNN: Adam on the batch marginal NLL (a composite likelihood; module docstring).

  `max_iter` counts epochs. Returns a `NetworkFit` whose params are
  `CrossedParams` with empty beta.
  """
  evaluator = _Evaluator(net, train, val, max_dense, num_probes)
  rng = np.random.default_rng(seed)
  optimizer = keras.optimizers.Adam(learning_rate)
  dtype = net.dtype
  specs = ce.param_specs()
  flat = Flattener(init_params, specs._replace(beta=specs.beta._replace(trainable=False)), dtype)
  free = tf.Variable(flat.u_hat, name="free_variance_parameters")
  variables = list(net.trainable_variables) + [free]
  x, y, codes = tf.constant(train.x), tf.constant(train.y, dtype), tf.constant(train.codes)
  n = len(train.y)

  def batch_loss(idx, start, end, scale):
    f, _ = net(tf.gather(x, idx), training=True)
    params = flat.unflatten(free)
    return -scale * batch_log_prob(tf.gather(y, idx) - f, tf.gather(codes, idx),
                                   params.variances, params.noise_variance)

  train_epoch = minibatch_epoch(batch_loss, variables, optimizer)

  def step(it, params, post):
    order, starts, ends = _batches(rng, train.codes, train.num_levels, it, batch_size)
    train_epoch(*map(tf.constant, (order, starts, ends)), tf.constant(len(starts) / n, dtype))
    return flat.unflatten(free)

  fit = train_with_early_stopping(net, flat.unflatten(free), evaluate=evaluator.evaluate,
                                  step=step, max_iter=max_iter, patience=patience,
                                  label="LMMNN NLL (crossed)", unit="epoch")
  return _finish(fit, evaluator)


# ---------------------------------------------------------------------------
# `MixedEffectsRegressor(f=<network>).fit(X, y, clusters=[g1, ..., gK])`.

class CrossedNetworkPredictor(CrossedPredictions):
  """A fitted network f with K crossed random intercepts: predicts
  f(x) + sum_k BLUP_k(level_k), 0 for a level unseen in fit (each factor
  independently) or for clusters=None; `predict_interval` and
  `random_effects(k)` as `CrossedEffectsRegressor`.

  Attributes: network (the `Network`), levels_ (K arrays of labels seen in
  fit), blups_ (K arrays of E[u_k | y_train] in the same order), precision_
  (the training posterior precision at the fitted variances), num_effects_
  and intercepts_ (one random intercept per factor).
  """

  def __init__(self, network: Network, levels, blups, precision: PosteriorPrecision,
               n_features: int):
    self.network, self.levels_, self.blups_ = network, levels, blups
    self.precision_, self.n_features_in_ = precision, n_features
    self.num_effects_, self.intercepts_ = (1,) * len(levels), (True,) * len(levels)

  def fixed_part(self, X):
    """f(x), [n]."""
    X = val.check_array(X, "X", ndim=2, dtype=np.float64)
    val.check_n_features(X, self.n_features_in_)
    return np.asarray(self.network(tf.constant(X))[0], np.float64)

  def effects_design(self, n: int, Z=None):
    """Random intercepts: z_k = 1, [n, K]."""
    return np.ones((n, len(self.levels_)))


def _validation_set(valid, levels) -> CrossedNetData:
  """Checked validation (X, y, [g1, ..., gK]) with each factor coded against
  the training levels; unseen levels get codes q_k, q_k + 1, ..."""
  n = valid.X.shape[0]
  coded = [code_labels(levels[k], g, n, f"clusters[{k}] (validation)")
           for k, g in enumerate(valid.clusters)]
  return CrossedNetData(valid.X, valid.y.astype(np.float64), np.stack([c for c, _ in coded], 1),
                        np.array([q for _, q in coded]))


def fit_estimator(estimator, X, y, clusters, valid=None):
  """Fits `estimator` (a `MixedEffectsRegressor` with a network f, random
  intercepts, `network_` and `dtype_` set) on checked X, y and K crossed
  factors; `valid` is the checked `ValidationData` or None. Sets variances_
  [K], sigma2_, log_likelihood_ (exact training marginal at the returned
  weights and variances; NaN beyond the exact limit), history_, fit_result_,
  params_, n_iter_ and crossed_ (a `CrossedNetworkPredictor` holding the
  BLUPs of the final exact posterior)."""
  dtype = estimator.dtype_
  levels, codes = encode_factors(clusters, X.shape[0])
  train = CrossedNetData(X, y.astype(np.float64), codes, np.array([len(v) for v in levels]))
  valid = None if valid is None else _validation_set(valid, levels)
  net = estimator.network_
  init = initial_params(net, train, estimator.seed, cp.MAX_DENSE)
  common = dict(max_iter=estimator.max_iter, batch_size=estimator.batch_size,
                learning_rate=estimator.learning_rate, patience=estimator.patience,
                seed=estimator.seed)
  if estimator.method == "em":
    fit = fit_crossed_network_em(net, train, valid, init,
                                 epochs_per_step=estimator.epochs_per_step, **common)
  else:
    fit = fit_crossed_network_nll(net, train, valid, init, **common)
  params = ce.CrossedParams(*[tf.constant(np.asarray(p, np.float64)) for p in fit.params])
  final = _Evaluator(net, train, None, cp.MAX_DENSE, 64)
  _, _, post = final.evaluate(params)
  log_lik = post.log_prob
  estimator.history_, estimator.fit_result_ = fit_summary(fit, init, params, log_lik, len(y),
                                                          estimator.seed, dtype)
  estimator.params_ = params
  estimator.log_likelihood_ = float(log_lik)
  estimator.variances_ = np.asarray(params.variances, np.float64).astype(dtype)
  estimator.covariances_ = [np.reshape(v, (1, 1)) for v in estimator.variances_]
  estimator.sigma2_ = float(params.noise_variance)
  estimator.n_iter_ = fit.best_iteration
  offsets = np.concatenate([[0], np.cumsum(train.num_levels)])
  blups = [post.mean[offsets[k]:offsets[k + 1]].astype(dtype) for k in range(len(levels))]
  precision = PosteriorPrecision(final.ztz, train.num_levels,
                                    estimator.variances_.astype(np.float64), estimator.sigma2_,
                                    cp.MAX_DENSE)
  estimator.crossed_ = CrossedNetworkPredictor(net, levels, blups, precision, X.shape[1])
  return estimator
