"""hmm_em.py with an M-step bug: the transition counts are normalized by column.

transition[k, l] must be p(z_t = l | z_{t-1} = k): each row sums to 1. This
M-step divides by the column sums instead. The verifier names the M-step:

    tfp-em verify examples/hmm_em_buggy.py
"""
import tensorflow as tf

from hmm_em import (data, e_step, init_params, joint_distribution, latents,  # noqa: F401
                    marginal_log_prob, param_specs, statistics)
from hmm_em import m_step as correct_m_step


def m_step(params, stats):
  new = correct_m_step(params, stats)
  new["transition"] = stats["trans"] / tf.reduce_sum(stats["trans"], 0, keepdims=True)  # BUG: axis 1
  return new
