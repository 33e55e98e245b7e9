"""Gaussian mixture whose rows are observed on some coordinates only (NaN = missing).

Row n is observed on the coordinates o_n, where it is not NaN; under missing
at random the likelihood is that of the observed sub-vectors:

    p(x_{n,o}) = sum_k w_k N(x_{n,o} | mu_{k,o}, Sigma_{k,oo}).

TFP's multivariate normal needs one event size for the whole batch, so each
row is written in all D coordinates: its missing ones are set to 0 and given
a standard normal of their own, independent of the rest,

    x~_n | z_n = k ~ MVN(m_n * mu_k, M_n Sigma_k M_n + (I - M_n)),

with m_n the row's 0/1 mask of observed coordinates and M_n = diag(m_n).
Its density at x~_n = (x_{n,o}, 0) is N(x_{n,o} | mu_{k,o}, Sigma_{k,oo})
times N(0 | 0, 1) per missing coordinate; `observed_log_prob` removes that
factor. The distributions have batch shape [N] (one per row): they are the
verifier's exact reference, meant for small data.

#### References

[1] R. J. A. Little and D. B. Rubin. Statistical Analysis with Missing Data,
    2nd ed., sections 8.2 and 11.2. Wiley, 2002.
"""
import math

import tensorflow as tf
import tensorflow_probability as tfp

from models import gaussian_mixture as gm
from models.gaussian_mixture import GaussianMixtureParams

tfd = tfp.distributions


def filled(x):
  """(x with NaN replaced by 0 [N, D], observed mask [N, D] in x's dtype)."""
  observed = tf.math.logical_not(tf.math.is_nan(x))
  return tf.where(observed, x, tf.zeros_like(x)), tf.cast(observed, x.dtype)


def padded_components(params: GaussianMixtureParams, covariance_type: str, mask):
  """Per row and component, the MVN of the filled row: batch [N, K], event [D]."""
  scale = gm.component_scale_tril(params, covariance_type)               # [K, D, D]
  cov = tf.matmul(scale, scale, transpose_b=True)                        # [K, D, D]
  outer = mask[:, tf.newaxis, :, tf.newaxis] * mask[:, tf.newaxis, tf.newaxis, :]  # [N, 1, D, D]
  padded = outer * cov + tf.linalg.diag(1.0 - mask)[:, tf.newaxis]      # [N, K, D, D]
  loc = mask[:, tf.newaxis, :] * params.means                            # [N, K, D]
  return tfd.MultivariateNormalTriL(loc=loc, scale_tril=tf.linalg.cholesky(padded))


def observed_marginal(params: GaussianMixtureParams, covariance_type: str, x):
  """The mixture of the filled rows, batch [N], event [D]; evaluate it at `filled(x)[0]`."""
  mask = filled(x)[1]
  weights = tf.broadcast_to(params.weights, [tf.shape(x)[0], tf.shape(params.weights)[0]])
  return tfd.MixtureSameFamily(mixture_distribution=tfd.Categorical(probs=weights),
                               components_distribution=padded_components(
                                   params, covariance_type, mask))


def observed_log_prob(params: GaussianMixtureParams, covariance_type: str, x):
  """log p(x_{n,o}) for each row [N] (NaN entries of x [N, D] are missing)."""
  x0, mask = filled(x)
  n_missing = tf.reduce_sum(1.0 - mask, axis=-1)                         # [N]
  padding = -0.5 * math.log(2 * math.pi) * n_missing                     # log N(0 | 0, 1) each
  return observed_marginal(params, covariance_type, x).log_prob(x0) - padding


def observed_responsibilities(params: GaussianMixtureParams, covariance_type: str, x):
  """p(z_n = k | x_{n,o}), shape [N, K]."""
  x0 = filled(x)[0]
  return observed_marginal(params, covariance_type, x).posterior_marginal(x0).probs_parameter()
