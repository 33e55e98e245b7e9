"""factor_analysis_em.py with an E-step bug: E[z z^T] without the posterior covariance.

The E-step uses E[z] E[z]^T where E[z z^T] = E[z] E[z]^T + Cov[z | x] belongs.
The verifier compares the statistics with their exact expectation and names
the E-step and the field 'szz':

    tfp-em verify examples/factor_analysis_em_buggy.py
"""
import tensorflow as tf
import tensorflow_probability as tfp

from factor_analysis_em import (data, init_params, joint_distribution, latents,  # noqa: F401
                                m_step, param_specs, posterior, statistics)


def e_step(params, data):
  x = data["x"]
  mean = posterior(params, data)["z_mean"]
  zt = tf.concat([mean, tf.ones_like(mean[:, :1])], axis=1)
  stats = {"sxz": tf.matmul(x, zt, transpose_a=True),
           "szz": tf.matmul(zt, zt, transpose_a=True),       # BUG: + N Cov[z | x] forgotten
           "sxx": tf.reduce_sum(x ** 2, 0), "n": tf.cast(tf.shape(x)[0], tf.float64)}
  marginal_cov = tf.matmul(params["w"], params["w"], transpose_b=True) + tf.linalg.diag(params["psi"])
  loglik = tf.reduce_sum(tfp.distributions.MultivariateNormalTriL(
      params["mu"], tf.linalg.cholesky(marginal_cov)).log_prob(x))
  return stats, loglik
