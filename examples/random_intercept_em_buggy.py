"""random_intercept_em.py with an M-step bug: s2u = mean(E[u]^2).

The variance of the random intercepts is estimated from the squared posterior
means alone; the posterior variance E[u^2] - E[u]^2 is forgotten. The
verifier names the M-step (Q is not maximized in 's2u'):

    tfp-em verify examples/random_intercept_em_buggy.py
"""
import tensorflow as tf

from random_intercept_em import (data, e_step, init_params, joint_distribution,  # noqa: F401
                                 latents, param_specs, posterior, statistics)
from random_intercept_em import m_step as correct_m_step


def m_step(params, stats):
  new = correct_m_step(params, stats)
  new["s2u"] = tf.reduce_mean(stats["u"] ** 2)    # BUG: should be mean(stats["uu"])
  return new
