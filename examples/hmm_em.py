"""A hand-written EM (Baum-Welch) for a two-state Gaussian HMM on short sequences.

    tfp-em verify examples/hmm_em.py

z_{n,0} ~ Categorical(initial), z_{n,t} | z_{n,t-1} ~ Categorical(transition[z_{n,t-1}]),
x_{n,t} | z_{n,t} ~ N(means[z], scales[z]^2), for N independent sequences of
length T. The verifier's exact reference enumerates the K^T paths of each
sequence; `marginal_log_prob` is TFP's forward algorithm
(`tfd.HiddenMarkovModel`). The E-step is the scaled forward-backward
recursion.

#### References

[1] L. R. Rabiner. A tutorial on hidden Markov models and selected
    applications in speech recognition. Proc. IEEE, 77(2):257-286, 1989.
"""
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

tfd = tfp.distributions
tfb = tfp.bijectors

K, T = 2, 4


def make_data(seed=0, n=30):
  rng = np.random.default_rng(seed)
  transition = np.array([[0.8, 0.2], [0.3, 0.7]])
  z = np.zeros((n, T), np.int64)
  z[:, 0] = rng.random(n) < 0.4
  for t in range(1, T):
    z[:, t] = rng.random(n) < transition[z[:, t - 1], 1]
  return {"x": np.array([-1.0, 1.5])[z] + np.array([0.7, 0.8])[z] * rng.standard_normal((n, T))}


data = make_data()
latents = {"z": K}                    # z: [N, T]; each sequence's paths are enumerated
param_specs = {"initial": tfb.SoftmaxCentered(), "transition": tfb.SoftmaxCentered(),
               "means": tfb.Identity(), "scales": tfb.Softplus()}
init_params = {"initial": np.array([0.5, 0.5]), "transition": np.array([[0.7, 0.3], [0.3, 0.7]]),
               "means": np.array([-0.5, 0.5]), "scales": np.array([1.0, 1.0])}


def joint_distribution(params, data):
  chain = tfd.MarkovChain(
      initial_state_prior=tfd.Categorical(probs=params["initial"]),
      transition_fn=lambda _, state: tfd.Categorical(probs=tf.gather(params["transition"], state)),
      num_steps=T)
  return tfd.JointDistributionNamed(dict(
      z=tfd.Sample(chain, data["x"].shape[0]),
      x=lambda z: tfd.Independent(tfd.Normal(tf.gather(params["means"], z),
                                             tf.gather(params["scales"], z)), 2)))


def marginal_log_prob(params, data):
  """log p(x) by the forward algorithm (TFP's HiddenMarkovModel)."""
  hmm = tfd.HiddenMarkovModel(
      initial_distribution=tfd.Categorical(probs=params["initial"]),
      transition_distribution=tfd.Categorical(probs=params["transition"]),
      observation_distribution=tfd.Normal(params["means"], params["scales"]), num_steps=T)
  return tf.reduce_sum(hmm.log_prob(data["x"]))


def statistics(params, data, latent_values):
  """Initial-state counts, transition counts and per-state sums of the complete data."""
  onehot = tf.one_hot(latent_values["z"], K, dtype=tf.float64)                   # [N, T, K]
  x = data["x"]
  return {"start": tf.reduce_sum(onehot[:, 0], 0),
          "trans": tf.einsum("ntk,ntl->kl", onehot[:, :-1], onehot[:, 1:]),
          "n": tf.reduce_sum(onehot, [0, 1]),
          "sx": tf.einsum("ntk,nt->k", onehot, x),
          "sxx": tf.einsum("ntk,nt->k", onehot, x ** 2)}


def e_step(params, data):
  """Scaled forward-backward; gamma [N, T, K], xi [N, T-1, K, K]."""
  x, a = data["x"], params["transition"]
  log_b = tfd.Normal(params["means"], params["scales"]).log_prob(x[..., None])   # [N, T, K]
  shift = tf.reduce_max(log_b, -1, keepdims=True)
  b = tf.exp(log_b - shift)
  alphas, scales = [], []
  alpha = params["initial"] * b[:, 0]
  for t in range(T):
    if t > 0:
      alpha = tf.matmul(alpha, a) * b[:, t]
    c = tf.reduce_sum(alpha, -1, keepdims=True)                                 # [N, 1]
    alpha = alpha / c
    alphas.append(alpha)
    scales.append(c)
  betas = [tf.ones_like(alpha)]
  for t in range(T - 1, 0, -1):
    betas.insert(0, tf.matmul(b[:, t] * betas[0], a, transpose_b=True) / scales[t])
  gamma = tf.stack([al * be for al, be in zip(alphas, betas)], 1)                # [N, T, K]
  xi = tf.stack([alphas[t][:, :, None] * a * (b[:, t + 1] * betas[t + 1])[:, None, :]
                 / scales[t + 1][:, :, None] for t in range(T - 1)], 1)           # [N, T-1, K, K]
  stats = {"start": tf.reduce_sum(gamma[:, 0], 0), "trans": tf.reduce_sum(xi, [0, 1]),
           "n": tf.reduce_sum(gamma, [0, 1]), "sx": tf.einsum("ntk,nt->k", gamma, x),
           "sxx": tf.einsum("ntk,nt->k", gamma, x ** 2)}
  loglik = tf.reduce_sum(tf.math.log(tf.concat(scales, -1))) + tf.reduce_sum(shift)
  return stats, loglik


def m_step(params, stats):
  means = stats["sx"] / stats["n"]
  return {"initial": stats["start"] / tf.reduce_sum(stats["start"]),
          "transition": stats["trans"] / tf.reduce_sum(stats["trans"], 1, keepdims=True),
          "means": means, "scales": tf.sqrt(stats["sxx"] / stats["n"] - means ** 2)}
