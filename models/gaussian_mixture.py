"""Gaussian mixture model as a TFP JointDistribution.

    z_n ~ Categorical(weights)                     n = 1..N
    x_n | z_n = k ~ MVN(means[k], covariance_k)

`covariances` has the shape of scikit-learn's `covariances_` for each
covariance type:

    full      [K, D, D]   one full covariance per component
    tied      [D, D]      one full covariance shared by all components
    diag      [K, D]      per-component diagonal variances
    spherical [K]         per-component single variance

mclust's 14 models [2, 3] write Sigma_k = lambda_k D_k A_k D_k^T (volume
lambda_k, shape A_k diagonal with |A_k| = 1, orientation D_k orthogonal), each
of the three Equal across components, Varying, or the Identity. Four are
scikit-learn's types under other names (VII = spherical, VVI = diag,
EEE = tied, VVV = full) and keep their layout; the other ten store
`covariances` as [K, D, D] (`covariance_layout`), constrained to the family by
the bijector of `models.eigen_covariance`.

#### References

[1] C. M. Bishop. Pattern Recognition and Machine Learning, section 9.2.
    Springer, 2006.
[2] G. Celeux and G. Govaert. Gaussian parsimonious clustering models.
    Pattern Recognition, 28(5):781-793, 1995.
[3] L. Scrucca, M. Fop, T. B. Murphy and A. E. Raftery. mclust 5: clustering,
    classification and density estimation using Gaussian finite mixture
    models. The R Journal, 8(1):289-317, 2016 (`nVarParams`).
"""
import functools
from typing import NamedTuple

import tensorflow as tf
import tensorflow_probability as tfp

from models.eigen_covariance import EigenCovariance
from models.specs import ParamSpec

tfd = tfp.distributions
tfb = tfp.bijectors

COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")  # scikit-learn's names
MCLUST_MODELS = ("EII", "VII", "EEI", "VEI", "EVI", "VVI", "EEE",
                 "VEE", "EVE", "VVE", "EEV", "VEV", "EVV", "VVV")
# mclust names that are scikit-learn's types: the same maths, the same code path.
MCLUST_ALIASES = {"VII": "spherical", "VVI": "diag", "EEE": "tied", "VVV": "full"}
ALL_COVARIANCE_TYPES = COVARIANCE_TYPES + MCLUST_MODELS


class GaussianMixtureParams(NamedTuple):
  weights: tf.Tensor      # [K]
  means: tf.Tensor        # [K, D]
  covariances: tf.Tensor  # see module docstring


def check_covariance_type(covariance_type: str) -> str:
  if not isinstance(covariance_type, str) or covariance_type not in ALL_COVARIANCE_TYPES:
    raise ValueError(f"covariance_type must be one of scikit-learn's {COVARIANCE_TYPES} or "
                     f"mclust's {MCLUST_MODELS}, got {covariance_type!r}")
  return covariance_type


def canonical_type(covariance_type: str) -> str:
  """The name whose code path fits `covariance_type`: scikit-learn's name for
  its four types under either name, mclust's name for the ten others."""
  check_covariance_type(covariance_type)
  return MCLUST_ALIASES.get(covariance_type, covariance_type)


def mclust_name(covariance_type: str) -> str:
  """mclust's name of `covariance_type` ('full' -> 'VVV')."""
  canonical = canonical_type(covariance_type)
  return {v: k for k, v in MCLUST_ALIASES.items()}.get(canonical, canonical)


def covariance_layout(covariance_type: str) -> str:
  """How `covariances` is stored: 'full' [K, D, D], 'tied' [D, D], 'diag'
  [K, D] or 'spherical' [K]. mclust's ten constrained models are 'full'."""
  canonical = canonical_type(covariance_type)
  return canonical if canonical in COVARIANCE_TYPES else "full"


def n_covariance_parameters(covariance_type: str, n_components: int, n_features: int) -> int:
  """Free parameters of the K covariances (mclust's `nVarParams` [3])."""
  g, d = n_components, n_features
  rotation = d * (d - 1) // 2  # one orientation D
  return {"EII": 1, "VII": g, "EEI": d, "VEI": g + d - 1, "EVI": 1 + g * (d - 1),
          "VVI": g * d, "EEE": d * (d + 1) // 2,
          "VEE": g + d - 1 + rotation, "EVE": 1 + g * (d - 1) + rotation,
          "VVE": g * d + rotation, "EEV": d + g * rotation,
          "VEV": g + d - 1 + g * rotation, "EVV": 1 + g * (d - 1) + g * rotation,
          "VVV": g * d * (d + 1) // 2}[mclust_name(covariance_type)]


def n_parameters(covariance_type: str, n_components: int, n_features: int) -> int:
  """Free parameters of the mixture, for BIC: covariances + means (K D) +
  weights (K - 1), as mclust's `nMclustParams` [3]."""
  k, d = n_components, n_features
  return n_covariance_parameters(covariance_type, k, d) + k * d + k - 1


@functools.lru_cache(maxsize=None)  # bijectors built once per argument
def param_specs(covariance_type: str) -> GaussianMixtureParams:
  """Specs with bijectors from unconstrained space for each parameter; mclust's
  ten constrained models map onto their family (`EigenCovariance`)."""
  canonical = canonical_type(covariance_type)
  if canonical in ("full", "tied"):
    cov = tfb.Chain([tfb.CholeskyOuterProduct(), tfb.FillScaleTriL(diag_shift=None)])
  elif canonical in ("diag", "spherical"):
    cov = tfb.Softplus()
  else:
    cov = EigenCovariance(canonical)
  return GaussianMixtureParams(
      weights=ParamSpec(True, tfb.SoftmaxCentered()),
      means=ParamSpec(True, tfb.Identity()),
      covariances=ParamSpec(True, cov))


def component_scale_tril(params: GaussianMixtureParams, covariance_type: str):
  """Cholesky factors of the component covariances, shape [K, D, D]."""
  k = tf.shape(params.means)[0]
  d = tf.shape(params.means)[1]
  cov = params.covariances
  layout = covariance_layout(covariance_type)
  if layout == "full":
    return tf.linalg.cholesky(cov)
  if layout == "tied":
    return tf.broadcast_to(tf.linalg.cholesky(cov)[tf.newaxis], [k, d, d])
  if layout == "diag":
    return tf.linalg.diag(tf.sqrt(cov))
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
