"""A hand-written EM for a two-component Poisson mixture of counts.

    tfp-em verify examples/poisson_mixture_em.py

z_n ~ Categorical(weights), x_n | z_n = k ~ Poisson(rates[k]). The E-step
returns the expected counts per component, the M-step their ratios.
"""
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

tfd = tfp.distributions
tfb = tfp.bijectors

K = 2


def make_data(seed=0, n=80):
  rng = np.random.default_rng(seed)
  low = rng.random(n) < 0.4
  return {"x": np.where(low, rng.poisson(2.0, n), rng.poisson(9.0, n)).astype(np.float64)}


data = make_data()
latents = {"z": K}
param_specs = {"weights": tfb.SoftmaxCentered(), "rates": tfb.Softplus()}
init_params = {"weights": np.array([0.5, 0.5]), "rates": np.array([1.0, 5.0])}
component_axes = {"weights": 0, "rates": 0}


def joint_distribution(params, data):
  n = data["x"].shape[0]
  return tfd.JointDistributionNamed(dict(
      z=tfd.Sample(tfd.Categorical(probs=params["weights"]), n),
      x=lambda z: tfd.Independent(tfd.Poisson(rate=tf.gather(params["rates"], z)), 1)))


def component_log_joint(params, x):
  """log w_k + log Poisson(x_n | rate_k), shape [N, K]."""
  return tf.math.log(params["weights"]) + tfd.Poisson(rate=params["rates"]).log_prob(x[:, None])


def posterior(params, data):
  return {"z": tf.nn.softmax(component_log_joint(params, data["x"]), axis=-1)}


def statistics(params, data, latent_values):
  """Counts and count sums per component of the complete data (x, z)."""
  onehot = tf.one_hot(latent_values["z"], K, dtype=tf.float64)    # [N, K]
  return {"n": tf.reduce_sum(onehot, 0), "sx": tf.linalg.matvec(onehot, data["x"], transpose_a=True)}


def e_step(params, data):
  x = data["x"]
  log_joint = component_log_joint(params, x)
  r = tf.nn.softmax(log_joint, axis=-1)                          # [N, K]
  stats = {"n": tf.reduce_sum(r, 0), "sx": tf.linalg.matvec(r, x, transpose_a=True)}
  return stats, tf.reduce_sum(tf.reduce_logsumexp(log_joint, axis=-1))


def m_step(params, stats):
  n = stats["n"]
  return {"weights": n / tf.reduce_sum(n), "rates": stats["sx"] / n}
