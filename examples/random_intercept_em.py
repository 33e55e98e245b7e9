"""A hand-written EM for a random-intercept model (a continuous, Gaussian latent).

    tfp-em verify examples/random_intercept_em.py

y_gj = mu + u_g + e_gj, u_g ~ N(0, s2u), e_gj ~ N(0, s2e). The posterior of
each u_g is Gaussian with precision 1/s2u + n_g/s2e; the E-step returns E[u_g]
and E[u_g^2] (plus data sums), the M-step the closed-form maximizer of Q.
"""
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

tfd = tfp.distributions
tfb = tfp.bijectors

G = 6


def make_data(seed=0):
  rng = np.random.default_rng(seed)
  cluster = np.repeat(np.arange(G), [3, 4, 5, 6, 7, 8])
  y = 1.0 + 1.2 * rng.standard_normal(G)[cluster] + 0.7 * rng.standard_normal(cluster.size)
  return {"y": y, "cluster": cluster.astype(np.int32)}


data = make_data()
latents = {"u": "gaussian"}
param_specs = {"mu": tfb.Identity(), "s2u": tfb.Softplus(), "s2e": tfb.Softplus()}
init_params = {"mu": 0.0, "s2u": 1.0, "s2e": 1.0}


def joint_distribution(params, data):
  return tfd.JointDistributionNamed(dict(
      u=tfd.Sample(tfd.Normal(tf.constant(0.0, tf.float64), tf.sqrt(params["s2u"])), G),
      y=lambda u: tfd.Independent(tfd.Normal(params["mu"] + tf.gather(u, data["cluster"]),
                                             tf.sqrt(params["s2e"])), 1)))


def cluster_sums(data):
  """Per-cluster sizes n_g and sums of y, [G] each."""
  y, cluster = data["y"], data["cluster"]
  return (tf.math.unsorted_segment_sum(tf.ones_like(y), cluster, G),
          tf.math.unsorted_segment_sum(y, cluster, G))


def posterior(params, data):
  """u_g | y ~ N(mean_g, 1 / prec_g), independent across clusters."""
  n_g, sy_g = cluster_sums(data)
  prec = 1.0 / params["s2u"] + n_g / params["s2e"]
  mean = (sy_g - n_g * params["mu"]) / params["s2e"] / prec
  return {"u_mean": mean, "u_cov": tf.linalg.diag(1.0 / prec)}


def statistics(params, data, latent_values):
  """The complete-data statistics: u, u^2 and the data sums."""
  u = latent_values["u"]
  n_g, sy_g = cluster_sums(data)
  return {"u": u, "uu": u ** 2, "n_g": n_g, "sy_g": sy_g, "syy": tf.reduce_sum(data["y"] ** 2)}


def e_step(params, data):
  y = data["y"]
  n_g, sy_g = cluster_sums(data)
  post = posterior(params, data)
  m, v = post["u_mean"], tf.linalg.diag_part(post["u_cov"])
  # log N(y_g | mu 1, s2e I + s2u 11^T) per cluster, in closed form.
  s2e, s2u = params["s2e"], params["s2u"]
  r = sy_g - n_g * params["mu"]
  rr = tf.math.unsorted_segment_sum(tf.square(y - params["mu"]), data["cluster"], G)
  logdet = (n_g - 1) * tf.math.log(s2e) + tf.math.log(s2e + n_g * s2u)
  quad = (rr - s2u * r ** 2 / (s2e + n_g * s2u)) / s2e
  loglik = -0.5 * tf.reduce_sum(n_g * np.log(2 * np.pi) + logdet + quad)
  stats = {"u": m, "uu": m ** 2 + v, "n_g": n_g, "sy_g": sy_g, "syy": tf.reduce_sum(y ** 2)}
  return stats, loglik


def m_step(params, stats):
  n_g, u, uu = stats["n_g"], stats["u"], stats["uu"]
  n = tf.reduce_sum(n_g)
  mu = (tf.reduce_sum(stats["sy_g"]) - tf.reduce_sum(n_g * u)) / n
  # sum_gj E[(y_gj - mu - u_g)^2], expanded.
  sse = (stats["syy"] - 2 * mu * tf.reduce_sum(stats["sy_g"]) + n * mu ** 2
         - 2 * tf.reduce_sum(u * (stats["sy_g"] - n_g * mu)) + tf.reduce_sum(n_g * uu))
  return {"mu": mu, "s2u": tf.reduce_mean(uu), "s2e": sse / n}
