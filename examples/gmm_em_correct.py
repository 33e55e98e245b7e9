"""A hand-written EM for a Gaussian mixture (full covariances), as a user writes it.

The model is a TFP JointDistribution; the E- and M-steps are plain functions.
Check them against the model's log_prob and autodiff with

    tfp-em verify examples/gmm_em_correct.py

or, from Python, `tfp_em.verification.verify_file("examples/gmm_em_correct.py")`.
The names below are the ones `verify_file` looks for. `statistics` (the
statistics of one complete data set) lets the verifier check the E-step's
statistics field by field and hand the M-step exact ones, so that a bug is
blamed on the step that has it.
"""
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

tfd = tfp.distributions
tfb = tfp.bijectors

K = 3


def make_data(seed=0, n_per_cluster=40):
  """Three overlapping 2-D clusters."""
  rng = np.random.default_rng(seed)
  centres = np.array([[0.0, 0.0], [2.0, 1.0], [0.0, 2.5]])
  x = np.concatenate([c + 0.8 * rng.standard_normal((n_per_cluster, 2)) for c in centres])
  return {"x": x}


data = make_data()

latents = {"z": K}   # z_n in {0, 1, 2}

param_specs = {       # bijectors from unconstrained space onto each parameter's support
    "weights": tfb.SoftmaxCentered(),
    "means": tfb.Identity(),
    "covariances": tfb.Chain([tfb.CholeskyOuterProduct(), tfb.FillScaleTriL(diag_shift=None)]),
}

init_params = {
    "weights": np.full(K, 1.0 / K),
    "means": data["x"][[0, 40, 80]],
    "covariances": np.stack([np.eye(2)] * K),
}

component_axes = {"weights": 0, "means": 0, "covariances": 0}  # for label matching


def joint_distribution(params, data):
  """p(z, x | params) for the whole data set."""
  scale_tril = tf.linalg.cholesky(params["covariances"])
  return tfd.JointDistributionNamed(dict(
      z=tfd.Sample(tfd.Categorical(probs=params["weights"]), data["x"].shape[0]),
      x=lambda z: tfd.Independent(tfd.MultivariateNormalTriL(
          loc=tf.gather(params["means"], z), scale_tril=tf.gather(scale_tril, z)), 1),
  ))


def _log_joint(params, x):
  """log w_k + log N(x_n | mu_k, Sigma_k), shape [N, K]."""
  components = tfd.MultivariateNormalTriL(params["means"], tf.linalg.cholesky(params["covariances"]))
  return tf.math.log(params["weights"]) + components.log_prob(x[:, tf.newaxis, :])


def posterior(params, data):
  """Responsibilities p(z_n = k | x_n), shape [N, K]."""
  return {"z": tf.nn.softmax(_log_joint(params, data["x"]), axis=-1)}


def statistics(params, data, latent_values):
  """The statistics of the complete data (x, z); the E-step returns their expectation."""
  onehot = tf.one_hot(latent_values["z"], K, dtype=tf.float64)   # [N, K]
  x = data["x"]
  return {"n": tf.reduce_sum(onehot, 0),
          "sx": tf.einsum("nk,nd->kd", onehot, x),
          "sxx": tf.einsum("nk,nd,ne->kde", onehot, x, x)}


def e_step(params, data):
  x = data["x"]
  log_joint = _log_joint(params, x)
  r = tf.nn.softmax(log_joint, axis=-1)                        # [N, K]
  stats = {"n": tf.reduce_sum(r, 0),                           # [K]
           "sx": tf.einsum("nk,nd->kd", r, x),                 # [K, D]
           "sxx": tf.einsum("nk,nd,ne->kde", r, x, x)}         # [K, D, D]
  return stats, tf.reduce_sum(tf.reduce_logsumexp(log_joint, axis=-1))


def m_step(params, stats):
  n = stats["n"]
  means = stats["sx"] / n[:, None]
  covariances = stats["sxx"] / n[:, None, None] - tf.einsum("kd,ke->kde", means, means)
  return {"weights": n / tf.reduce_sum(n), "means": means, "covariances": covariances}
