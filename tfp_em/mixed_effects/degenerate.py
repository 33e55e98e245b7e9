"""Degenerate data for the mixed model with one grouping factor, named before fitting.

* y constant overall: nothing to split between random effects and noise.
* y fitted exactly within every cluster by its random effects (y_i in the
  span of Z_i, e.g. y constant within clusters under a random intercept):
  sigma^2 -> 0 makes the likelihood unbounded, so there is no ML estimate.
* the fixed-effects design: true collinearity (rank deficient once every
  column has unit scale) against a scale problem (columns of wildly
  different magnitude, which the fit handles by exact power-of-two column
  scaling).
"""
from __future__ import annotations

import numpy as np

# relative size below which a sum of squares counts as 0
ZERO_SS = 1e-20


def check_response(y, z, codes, num_clusters: int) -> None:
  """ValueError when y is constant, or fitted exactly by Z_i u_i in every cluster.

  Args:
    y: [n] responses. z: [n, q] random-effects design. codes: [n] cluster
    codes in [0, num_clusters).
  """
  total = float(np.sum((y - np.mean(y)) ** 2))
  if total <= ZERO_SS * max(float(np.sum(y ** 2)), np.finfo(np.float64).tiny):
    raise ValueError(f"y is constant (every value is {y[0]:.6g}): there is no variance to "
                     "split between the random effects and the noise")
  q = z.shape[1]
  if np.all(np.bincount(codes, minlength=num_clusters) <= q):
    return  # no cluster has more rows than effects: a matter of identifiability
  ztz = np.zeros((num_clusters, q, q))
  ztr = np.zeros((num_clusters, q))
  np.add.at(ztz, codes, z[:, :, None] * z[:, None, :])
  np.add.at(ztr, codes, z * y[:, None])
  fitted_ss = np.einsum("gq,gq->", ztr, np.einsum("gqr,gr->gq", np.linalg.pinv(ztz), ztr))
  residual = float(np.sum(y ** 2)) - fitted_ss   # sum_i ||y_i - Z_i (Z_i^+ y_i)||^2
  if residual <= 1e-12 * total:
    raise ValueError("y is fitted exactly by each cluster's random effects (for a random "
                     "intercept: y is constant within every cluster), so the residual "
                     "variance is 0 and the likelihood has no maximum; drop the random "
                     "effects the data determine exactly, or model the cluster means")


def column_scales(design) -> np.ndarray:
  """Power-of-two scale of each column [p]: its largest |value| where that lies
  outside [2^-30, 2^30], else 1 (moderate designs are fitted as given).

  Dividing by a power of two is exact, so a scaled fit differs from the
  unscaled one by round-off only, where the unscaled one does not overflow.
  """
  largest = np.max(np.abs(design), axis=0) if design.shape[0] else np.ones(design.shape[1])
  exponent = np.round(np.log2(np.where(largest > 0., largest, 1.)))
  return np.exp2(np.where(np.abs(exponent) > 30, exponent, 0.))


def check_fixed_design(design, with_intercept: bool) -> np.ndarray:
  """`column_scales` of the design [n, p]; ValueError when it is rank deficient once
  every column has unit scale (true collinearity, not a matter of scale)."""
  largest = np.max(np.abs(design), axis=0) if design.shape[0] else np.ones(design.shape[1])
  rank = np.linalg.matrix_rank(design / np.where(largest > 0., largest, 1.))
  if rank < design.shape[1]:
    raise ValueError(f"X{' with the intercept column' if with_intercept else ''} has rank "
                     f"{rank} < {design.shape[1]} columns: drop collinear or constant columns "
                     "(beta is not identifiable)")
  return column_scales(design)
