"""A hand-written EM for factor analysis (one factor; PPCA with a diagonal noise).

    tfp-em verify examples/factor_analysis_em.py

z_n ~ N(0, I_q), x_n | z_n ~ N(W z_n + mu, diag(psi)). The posterior of z_n is
Gaussian with covariance M^{-1}, M = I + W^T diag(psi)^{-1} W, and mean
M^{-1} W^T diag(psi)^{-1} (x_n - mu). With z~ = [z, 1] and W~ = [W, mu] the
M-step is W~ = (sum x E[z~]^T)(sum E[z~ z~^T])^{-1},
psi = diag(sum x x^T - W~ sum E[z~] x^T) / N.

#### References

[1] Z. Ghahramani and G. E. Hinton. The EM algorithm for mixtures of factor
    analyzers. Technical report CRG-TR-96-1, University of Toronto, 1996.
"""
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

tfd = tfp.distributions
tfb = tfp.bijectors

P, Q = 5, 1


def make_data(seed=0, n=50):
  rng = np.random.default_rng(seed)
  w = np.array([[1.0], [0.8], [-0.9], [0.6], [0.7]])
  z = rng.standard_normal((n, Q))
  noise = rng.standard_normal((n, P)) * [0.5, 0.6, 0.4, 0.5, 0.6]
  return {"x": z @ w.T + np.array([0.5, -1.0, 2.0, 0.0, 1.0]) + noise}


data = make_data()
latents = {"z": "gaussian"}          # z: [N, Q]
param_specs = {"w": tfb.Identity(), "mu": tfb.Identity(), "psi": tfb.Softplus()}
init_params = {"w": np.array([[0.5], [0.5], [-0.5], [0.5], [0.5]]), "mu": np.zeros(P),
               "psi": np.ones(P)}


def joint_distribution(params, data):
  n = data["x"].shape[0]
  return tfd.JointDistributionNamed(dict(
      z=tfd.Sample(tfd.Normal(tf.constant(0.0, tf.float64), 1.0), [n, Q]),
      x=lambda z: tfd.Independent(tfd.Normal(
          tf.matmul(z, params["w"], transpose_b=True) + params["mu"], tf.sqrt(params["psi"])), 2)))


def posterior(params, data):
  """z_n | x_n: means [N, Q] and covariances [N, Q, Q] (the same for every n)."""
  w, psi = params["w"], params["psi"]
  m = tf.eye(Q, dtype=tf.float64) + tf.matmul(w / psi[:, None], w, transpose_a=True)   # [Q, Q]
  cov = tf.linalg.inv(m)
  mean = tf.matmul((data["x"] - params["mu"]) / psi, w) @ cov                         # [N, Q]
  n = data["x"].shape[0]
  return {"z_mean": mean, "z_cov": tf.tile(cov[None], [n, 1, 1])}


def _augmented(z):
  return tf.concat([z, tf.ones_like(z[:, :1])], axis=1)                             # [N, Q+1]


def statistics(params, data, latent_values):
  """sum x z~^T, sum z~ z~^T, sum x^2 and N for the complete data (x, z)."""
  zt, x = _augmented(latent_values["z"]), data["x"]
  return {"sxz": tf.matmul(x, zt, transpose_a=True), "szz": tf.matmul(zt, zt, transpose_a=True),
          "sxx": tf.reduce_sum(x ** 2, 0), "n": tf.cast(tf.shape(x)[0], tf.float64)}


def e_step(params, data):
  x = data["x"]
  post = posterior(params, data)
  mean, cov = post["z_mean"], post["z_cov"][0]
  zt = _augmented(mean)                                                              # E[z~]
  szz = tf.matmul(zt, zt, transpose_a=True)
  szz += tf.pad(tf.cast(tf.shape(x)[0], tf.float64) * cov, [[0, 1], [0, 1]])        # + N Cov
  stats = {"sxz": tf.matmul(x, zt, transpose_a=True), "szz": szz,
           "sxx": tf.reduce_sum(x ** 2, 0), "n": tf.cast(tf.shape(x)[0], tf.float64)}
  marginal_cov = tf.matmul(params["w"], params["w"], transpose_b=True) + tf.linalg.diag(params["psi"])
  loglik = tf.reduce_sum(tfd.MultivariateNormalTriL(
      params["mu"], tf.linalg.cholesky(marginal_cov)).log_prob(x))
  return stats, loglik


def m_step(params, stats):
  wt = tf.matmul(stats["sxz"], tf.linalg.inv(stats["szz"]))                          # [P, Q+1]
  psi = (stats["sxx"] - tf.reduce_sum(wt * stats["sxz"], axis=1)) / stats["n"]
  return {"w": wt[:, :Q], "mu": wt[:, Q], "psi": psi}
