"""poisson_mixture_em.py with an E-step bug: the responsibilities forget the weights.

`posterior` is right, but the statistics the E-step hands the M-step come from
softmax_k log Poisson(x_n | rate_k), without log w_k. The verifier compares the
statistics with their exact expectation and names the E-step and the field:

    tfp-em verify examples/poisson_mixture_em_buggy.py
"""
import tensorflow as tf
import tensorflow_probability as tfp

from poisson_mixture_em import (component_axes, component_log_joint, data, init_params,  # noqa: F401
                                joint_distribution, latents, m_step, param_specs, posterior,
                                statistics)


def e_step(params, data):
  x = data["x"]
  log_joint = component_log_joint(params, x)
  r = tf.nn.softmax(tfp.distributions.Poisson(rate=params["rates"]).log_prob(x[:, None]),
                    axis=-1)                                     # BUG: no log w_k
  stats = {"n": tf.reduce_sum(r, 0), "sx": tf.linalg.matvec(r, x, transpose_a=True)}
  return stats, tf.reduce_sum(tf.reduce_logsumexp(log_joint, axis=-1))
