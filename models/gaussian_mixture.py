"""Gaussian mixture model as a TFP JointDistribution.

    z_n ~ Categorical(weights)                     n = 1..N
    x_n | z_n = k ~ MVN(means[k], covariance_k)

`covariances` has the shape of scikit-learn's `covariances_` for each
covariance type:

    full      [K, D, D]   one full covariance per component
    tied      [D, D]      one full covariance shared by all components
    diag      [K, D]      per-component diagonal variances
    spherical [K]         per-component single variance

#### References

[1] C. M. Bishop. Pattern Recognition and Machine Learning, section 9.2.
    Springer, 2006.
"""
import functools
from typing import NamedTuple

import tensorflow as tf
import tensorflow_probability as tfp

from models.specs import ParamSpec

tfd = tfp.distributions
tfb = tfp.bijectors

COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")


class GaussianMixtureParams(NamedTuple):
  weights: tf.Tensor      # [K]
  means: tf.Tensor        # [K, D]
  covariances: tf.Tensor  # see module docstring


def check_covariance_type(covariance_type: str) -> str:
  if covariance_type not in COVARIANCE_TYPES:
    raise ValueError(f"covariance_type must be one of {COVARIANCE_TYPES}, "
                     f"got {covariance_type!r}")
  return covariance_type


@functools.lru_cache(maxsize=None)  # bijectors built once per argument
def param_specs(covariance_type: str) -> GaussianMixtureParams:
  """Specs with bijectors from unconstrained space for each parameter."""
  check_covariance_type(covariance_type)
  if covariance_type in ("full", "tied"):
    cov = tfb.Chain([tfb.CholeskyOuterProduct(), tfb.FillScaleTriL(diag_shift=None)])
  else:
    cov = tfb.Softplus()
  return GaussianMixtureParams(
      weights=ParamSpec(True, tfb.SoftmaxCentered()),
      means=ParamSpec(True, tfb.Identity()),
      covariances=ParamSpec(True, cov))


def component_scale_tril(params: GaussianMixtureParams, covariance_type: str):
  """Cholesky factors of the component covariances, shape [K, D, D]."""
  k = tf.shape(params.means)[0]
  d = tf.shape(params.means)[1]
  cov = params.covariances
  if covariance_type == "full":
    return tf.linalg.cholesky(cov)
  if covariance_type == "tied":
    return tf.broadcast_to(tf.linalg.cholesky(cov)[tf.newaxis], [k, d, d])
  if covariance_type == "diag":
    return tf.linalg.diag(tf.sqrt(cov))
  check_covariance_type(covariance_type)
  return tf.sqrt(cov)[:, tf.newaxis, tf.newaxis] * tf.eye(d, dtype=cov.dtype)


def component_distribution(params: GaussianMixtureParams, covariance_type: str):
  """Batch of K multivariate normals."""
  return tfd.MultivariateNormalTriL(
      loc=params.means, scale_tril=component_scale_tril(params, covariance_type))


def marginal(params: GaussianMixtureParams, covariance_type: str):
  """p(x | params) = sum_k w_k N(x | mu_k, Sigma_k), event shape [D]."""
  return tfd.MixtureSameFamily(
      mixture_distribution=tfd.Categorical(probs=params.weights),
      components_distribution=component_distribution(params, covariance_type))


def joint(params: GaussianMixtureParams, covariance_type: str, num_points: int):
  """JointDistribution over (z [N], x [N, D]).

  Summing `exp(log_prob)` over z for each point gives `marginal(...)`; the
  verifier enumerates z to check exactly that.
  """
  components = component_distribution(params, covariance_type)
  return tfd.JointDistributionNamedAutoBatched(dict(
      z=tfd.Sample(tfd.Categorical(probs=params.weights), num_points),
      x=lambda z: tfd.MultivariateNormalTriL(
          loc=tf.gather(components.loc, z),
          scale_tril=tf.gather(components.scale_tril, z)),
  ))
