"""The EM of gmm_em_correct.py with one typo in the M-step.

The covariance is divided by the total number of points N instead of the
component's soft count N_k. The fit still runs and its log-likelihood still
looks plausible; the verifier names the M-step as the culprit:

    tfp-em verify examples/gmm_em_buggy.py
"""
import tensorflow as tf

from gmm_em_correct import (component_axes, data, e_step, init_params, joint_distribution,  # noqa: F401
                            latents, param_specs, posterior, statistics)


def m_step(params, stats):
  n = stats["n"]
  means = stats["sx"] / n[:, None]
  scatter = stats["sxx"] - n[:, None, None] * tf.einsum("kd,ke->kde", means, means)
  covariances = scatter / tf.reduce_sum(n)      # BUG: should be / n[:, None, None]
  return {"weights": n / tf.reduce_sum(n), "means": means, "covariances": covariances}
