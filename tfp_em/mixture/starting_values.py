"""Where a mixture fit starts when the user says: the last fit (warm start) or
`weights_init`, `means_init` and `precisions_init` (scikit-learn's options).

Each given value is checked and named in the error; the ones not given come
from the model's own initialization.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from models.gaussian_mixture import GaussianMixtureParams
from tfp_em.engine import inputs as v
from tfp_em.engine import restart_seeds


def last_fit(params, n_components: int, n_features: int, dtype) -> GaussianMixtureParams:
  """The last fit's `params` as the start (warm_start=True), if its K and D match."""
  k = params.weights.shape[0]
  if k != n_components or params.means.shape[1] != n_features:
    raise ValueError(f"warm_start=True: the last fit has {k} components and "
                     f"{params.means.shape[1]} features, but this fit asks for "
                     f"{n_components} components and {n_features} features; refit with "
                     "warm_start=False")
  return GaussianMixtureParams(*[tf.constant(np.asarray(p), dtype) for p in params])


def user_given(model, data, dtype, n_components: int, weights_init, means_init,
               precisions_init, covariance_layout: str, seed: int):
  """Params from the user's `*_init` values (None when none is given); the
  missing ones from `model.initialize`.

  Args:
    model: the mixture's EM model. data: its `MixtureData` (a first batch
      when streamed). covariance_layout: how `precisions_init` is shaped
      (`models.gaussian_mixture.covariance_layout`).
  """
  given = (weights_init, means_init, precisions_init)
  if all(g is None for g in given):
    return None
  k, d = n_components, data.x.shape[1]
  if any(g is None for g in given):
    base = model.initialize(data, restart_seeds(seed, 1)[0])
    weights, means, covariances = (np.asarray(p) for p in base)
  if weights_init is not None:
    weights = v.check_array(weights_init, "weights_init", ndim=1, dtype=dtype)
    if weights.shape != (k,) or np.any(weights < 0) or not np.isclose(weights.sum(), 1.0):
      raise ValueError(f"weights_init must be {k} non-negative numbers summing to 1, "
                       f"got {weights}")
  if means_init is not None:
    means = v.check_array(means_init, "means_init", dtype=dtype)
    if means.shape != (k, d):
      raise ValueError(f"means_init must have shape {(k, d)}, got {means.shape}")
  if precisions_init is not None:
    covariances = covariances_from_precisions(precisions_init, covariance_layout, k, d, dtype)
  return GaussianMixtureParams(tf.constant(weights), tf.constant(means),
                               tf.constant(covariances))


def covariances_from_precisions(precisions, covariance_layout: str, k: int, d: int, dtype):
  """Covariances from scikit-learn's `precisions_init` of the given layout, checked."""
  shapes = {"full": (k, d, d), "tied": (d, d), "diag": (k, d), "spherical": (k,)}
  p = v.check_array(precisions, "precisions_init", ndim=len(shapes[covariance_layout]),
                    dtype=dtype)
  if p.shape != shapes[covariance_layout]:
    raise ValueError(f"precisions_init for a {covariance_layout!r} covariance must have "
                     f"shape {shapes[covariance_layout]}, got {p.shape}")
  if covariance_layout in ("full", "tied"):
    try:
      np.linalg.cholesky(p)
    except np.linalg.LinAlgError:
      raise ValueError("precisions_init must be symmetric positive definite") from None
    return np.linalg.inv(p)
  if np.any(p <= 0):
    raise ValueError("precisions_init must be positive")
  return 1.0 / p
