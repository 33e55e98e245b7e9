"""Deliberately wrong EM models for the Bernoulli hidden-unit MLP.

Each mutant subclasses `BernoulliMLPEM` and overrides one step with a bug
seen in circulating code or easy to make. A verifier is only as good as the
bugs it catches: every mutant here must fail at least one check while the
correct model passes them all (tests/test_bernoulli_mlp.py).

`MUTANTS` maps a name to a factory with the constructor signature of
`BernoulliMLPEM` (num_hidden, num_classes, **kwargs); `CORRECT` is the
reference factory. `EXPECTED_CATCHES` names, per mutant, the checks that
must flag it.
"""
import tensorflow as tf

from tfp_em.bernoulli_mlp import em as bm
from tfp_em.bernoulli_mlp import newton


class PrecedenceHiddenGradient(bm.BernoulliMLPEM):
  """Hidden-unit gradient written `a/b - u*x` instead of `(a/b - u)*x`.

  With t = a/b the posterior mean of z_h, the correct gradient is
  sum_j (t_hj - u_hj) x~_j; the mutant computes sum_j (t_hj - u_hj x~_j).
  """

  @staticmethod
  def hidden_gradient(weights_t, inputs, targets, l2=0.):
    probs = tf.sigmoid(tf.matmul(inputs, weights_t, transpose_b=True))   # [N, m]
    wrong = targets[:, :, tf.newaxis] - probs[:, :, tf.newaxis] * inputs[:, tf.newaxis, :]
    # The correct gradient at targets = probs is its L2 term alone (the fit term is 0).
    penalty = newton.hidden_unit_gradient(weights_t, inputs, probs, l2)
    return tf.reduce_sum(wrong, axis=0) + penalty


class UnnormalizedTau(bm.BernoulliMLPEM):
  """tau_j(z) = p(z, y_j | x_j), never divided by p(y_j | x_j)."""

  def normalize(self, log_joint):
    return tf.exp(log_joint), tf.reduce_logsumexp(log_joint, axis=-1)


class NewtonSignFlip(bm.BernoulliMLPEM):
  """Newton step taken along +H^{-1} g (descent) instead of -H^{-1} g."""

  @staticmethod
  def direction(gradient, neg_hessian):
    return -newton.newton_direction(gradient, neg_hessian)


class PriorAsPosterior(bm.BernoulliMLPEM):
  """E-step that forgets the label: tau_j(z) = p(z | x_j)."""

  def log_joint(self, params, inputs, labels_onehot, configs):
    log_joint = super().log_joint(params, inputs, labels_onehot, configs)
    log_prior = super().log_joint(params, inputs, tf.zeros_like(labels_onehot), configs)
    # Keep the right loglik (logsumexp of the true joint) but the prior's shape.
    return log_prior + tf.reduce_logsumexp(log_joint, -1, keepdims=True)


CORRECT = bm.BernoulliMLPEM

MUTANTS = {
    "precedence_hidden_gradient": PrecedenceHiddenGradient,
    "unnormalized_tau": UnnormalizedTau,
    "newton_sign_flip": NewtonSignFlip,
    "prior_as_posterior": PriorAsPosterior,
}

EXPECTED_CATCHES = {
    "precedence_hidden_gradient": ("m_step_stationary",),
    "unnormalized_tau": ("posterior", "fisher"),
    "newton_sign_flip": ("m_step_stationary", "fixed_point"),
    "prior_as_posterior": ("posterior", "fisher"),
}
