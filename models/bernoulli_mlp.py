"""MLP with stochastic Bernoulli hidden units as a TFP JointDistribution.

    z_hj | x_j ~ Bernoulli(logits = x~_j^T W[:, h])     h = 1..m, j = 1..N
    y_j | z_j ~ Categorical(logits = z~_j^T V)

x~ = [1, x] and z~ = [1, z] carry the bias, so `hidden_weights` W is
[D+1, m] and `output_weights` V is [m+1, C]; row 0 of each is the bias.
The marginal p(y_j | x_j) = sum_z p(z | x_j) p(y_j | z) sums over the 2^m
hidden configurations returned by `hidden_configurations(m)`.

The softmax is invariant to adding one vector to every column of V; fitted
output weights are kept centred across classes (each row sums to zero).

#### References

[1] S.-K. Ng and G. J. McLachlan. Using the EM algorithm to train neural
    networks: misconceptions and a new algorithm for multiclass
    classification. IEEE Transactions on Neural Networks, 15(3):738-749, 2004.
"""
import functools
from typing import NamedTuple

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from models.specs import ParamSpec

tfd = tfp.distributions
tfb = tfp.bijectors


class BernoulliMLPParams(NamedTuple):
  hidden_weights: tf.Tensor  # [D+1, m]; row 0 is the bias
  output_weights: tf.Tensor  # [m+1, C]; row 0 is the bias


@functools.lru_cache(maxsize=None)  # bijectors built once per argument
def param_specs() -> BernoulliMLPParams:
  """Both weight matrices are unconstrained reals."""
  return BernoulliMLPParams(hidden_weights=ParamSpec(True, tfb.Identity()),
                            output_weights=ParamSpec(True, tfb.Identity()))


def hidden_configurations(num_hidden: int, dtype=tf.float64) -> tf.Tensor:
  """All 2^m binary hidden states, shape [2^m, m].

  Row k holds the binary digits of k, most significant first, so the order
  matches `itertools.product([0, 1], repeat=m)`.
  """
  k = np.arange(2 ** num_hidden)[:, np.newaxis]
  bits = (k >> np.arange(num_hidden - 1, -1, -1)[np.newaxis, :]) & 1
  return tf.constant(bits, dtype=dtype)


def add_bias(x: tf.Tensor) -> tf.Tensor:
  """[..., D] -> [..., D+1] with a leading column of ones."""
  x = tf.convert_to_tensor(x)
  ones = tf.ones_like(x[..., :1])
  return tf.concat([ones, x], axis=-1)


def hidden_logits(params: BernoulliMLPParams, x: tf.Tensor) -> tf.Tensor:
  """Logits of p(z_h = 1 | x), shape [N, m]."""
  return tf.matmul(add_bias(x), params.hidden_weights)


def output_logits(params: BernoulliMLPParams, z: tf.Tensor) -> tf.Tensor:
  """Logits of p(y | z), shape [..., C] for z of shape [..., m]."""
  return tf.linalg.matvec(params.output_weights, add_bias(z), transpose_a=True)


def configuration_log_prior(logits: tf.Tensor, configs: tf.Tensor) -> tf.Tensor:
  """log p(z = configs[k] | x_j) from hidden logits a [N, m]: shape [N, K].

  sum_h z_h log s(a_h) + (1 - z_h) log s(-a_h), one [N, 2m] x [2m, K] matmul.
  Every term is <= 0, so the sum stays accurate for large |a| (the shorter
  z^T a - sum_h softplus(a_h) cancels: at |a| = 1e13 its error is 1e-3).
  """
  return tf.matmul(log_sigmoid_pair(logits), config_indicators(configs), transpose_b=True)


def log_sigmoid_pair(logits: tf.Tensor) -> tf.Tensor:
  """[log s(a), log s(-a)] of hidden logits a [N, m]: shape [N, 2m]."""
  return tf.concat([tf.math.log_sigmoid(logits), tf.math.log_sigmoid(-logits)], -1)


def config_indicators(configs: tf.Tensor) -> tf.Tensor:
  """[z, 1 - z] of configurations [K, m]: shape [K, 2m]."""
  return tf.concat([configs, 1. - configs], -1)


def configuration_log_output(params: BernoulliMLPParams, configs: tf.Tensor) -> tf.Tensor:
  """log p(y = i | z = configs[k]), shape [K, C]."""
  return tf.nn.log_softmax(tf.matmul(add_bias(configs), params.output_weights), axis=-1)


def configuration_log_joint(logits: tf.Tensor, labels_onehot: tf.Tensor, log_output: tf.Tensor,
                            configs: tf.Tensor) -> tf.Tensor:
  """log p(z = configs[k], y_j | x_j), shape [N, K], as one matmul:

  [log s(a_j), log s(-a_j), y_j] [configs, 1 - configs, log p(y | z)]^T, from
  hidden logits a [N, m], one-hot labels [N, C] and `configuration_log_output`
  [K, C] (terms all <= 0, as in `configuration_log_prior`).
  """
  return tf.matmul(tf.concat([log_sigmoid_pair(logits), labels_onehot], -1),
                   tf.concat([config_indicators(configs), log_output], -1),
                   transpose_b=True)


def joint(params: BernoulliMLPParams, x: tf.Tensor):
  """JointDistribution over (z [N, m], y [N]) given inputs x [N, D].

  Batch shape [N]: `log_prob(z=z, y=y)` is per data point, so a stack of
  configurations z of shape [K, N, m] gives [K, N] and enumeration over K
  yields the posterior and the marginal. Sum over N for the dataset.
  """
  dtype = params.hidden_weights.dtype
  return tfd.JointDistributionNamed(dict(
      z=tfd.Independent(tfd.Bernoulli(logits=hidden_logits(params, x), dtype=dtype),
                        reinterpreted_batch_ndims=1),
      y=lambda z: tfd.Categorical(logits=output_logits(params, z)),
  ))


def marginal(params: BernoulliMLPParams, x: tf.Tensor, configs: tf.Tensor = None):
  """p(y_j | x_j) as a TFP mixture over the 2^m configurations, batch [N].

  Materializes [N, 2^m, C] logits; use `marginal_log_prob` on large inputs.
  """
  dtype = params.hidden_weights.dtype
  if configs is None:
    configs = hidden_configurations(params.hidden_weights.shape[-1], dtype)
  log_prior = configuration_log_prior(hidden_logits(params, x), configs)  # [N, K]
  log_out = configuration_log_output(params, configs)                    # [K, C]
  return tfd.MixtureSameFamily(
      mixture_distribution=tfd.Categorical(logits=log_prior),
      components_distribution=tfd.Categorical(
          logits=tf.broadcast_to(log_out, tf.concat(
              [tf.shape(log_prior), tf.shape(log_out)[-1:]], axis=0))))


def marginal_log_prob(params: BernoulliMLPParams, x: tf.Tensor, y: tf.Tensor,
                      configs: tf.Tensor = None) -> tf.Tensor:
  """Pointwise log p(y_j | x_j), shape [N]; equals `marginal(...).log_prob(y)`.

  Memory is O(N 2^m): `tfp_em.bernoulli_mlp` chunks over N for large inputs.
  One matmul (`configuration_log_joint`): its gradient costs about half that
  of adding a gathered [N, K] log-likelihood to the log prior.
  """
  dtype = params.hidden_weights.dtype
  if configs is None:
    configs = hidden_configurations(params.hidden_weights.shape[-1], dtype)
  log_out = configuration_log_output(params, configs)                    # [K, C]
  onehot = tf.one_hot(y, log_out.shape[-1], dtype=dtype)                 # [N, C]
  log_joint = configuration_log_joint(hidden_logits(params, x), onehot, log_out, configs)
  return tf.reduce_logsumexp(log_joint, axis=-1)
