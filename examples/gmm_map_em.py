"""MAP EM for the Gaussian mixture of gmm_em_correct.py: an inverse-Wishart prior.

    tfp-em verify examples/gmm_map_em.py

With `prior` (the log-density of the parameters) in the file, the verifier
checks a MAP EM: the objective is loglik + log prior, the M-step must maximize
Q + log prior. Each covariance has the prior IW(Sigma_k | PSI, NU), so the
M-step is Sigma_k = (S_k + PSI) / (N_k + NU + D + 1), S_k the scatter about
the new mean.
"""
import tensorflow as tf

from gmm_em_correct import (component_axes, data, e_step, init_params, joint_distribution,  # noqa: F401
                            latents, param_specs, posterior, statistics)

D = 2
NU = D + 2.0
PSI = 0.5 * tf.eye(D, dtype=tf.float64)


def prior(params):
  """sum_k log IW(Sigma_k | PSI, NU), up to a constant."""
  cov = params["covariances"]
  return tf.reduce_sum(-0.5 * (NU + D + 1) * tf.linalg.logdet(cov)
                       - 0.5 * tf.linalg.trace(tf.linalg.solve(cov, tf.broadcast_to(PSI, cov.shape))))


def m_step(params, stats):
  n = stats["n"]
  means = stats["sx"] / n[:, None]
  scatter = stats["sxx"] - n[:, None, None] * tf.einsum("kd,ke->kde", means, means)
  covariances = (scatter + PSI) / (n + NU + D + 1)[:, None, None]
  return {"weights": n / tf.reduce_sum(n), "means": means, "covariances": covariances}
