"""Predictions of a fitted K-factor model: BLUP lookups and predictive intervals.

A new row adds sum_k z_k^T E[u_k(level_k) | y] over the factors whose level
was seen in fit (the prior mean 0 otherwise). Its predictive variance needs
entries of the posterior covariance P^-1 (`covariance_entries`), exact from
the factorization of `crossed_posterior` or by CG beyond its limit.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import scipy.sparse as sp
import scipy.stats as sps

from tfp_em.engine import inputs as val
from tfp_em.mixed_effects.crossed_posterior import (Factorization, covariance_matrices, effect_counts,
                                                    factorize, schur_inverse, solve)
from tfp_em.mixed_effects.labels import code_labels, is_factor_list


def covariance_entries(fac: Factorization, rows, cols, block: int = 256) -> np.ndarray:
  """Entries (P^-1)[rows[i], cols[i]] of the posterior covariance, [m].

  Exact path, with G = A^-1 B and H = G S^-1 for the rows of the largest
  factor that occur: (P^-1)_CC = S^-1, (P^-1)_AC = -H, (P^-1)_AA = A^-1 + H G^T.
  On the CG path, P^-1 e_j is solved for each distinct column j, `block` at a time.
  """
  rows, cols = np.asarray(rows, np.int64), np.asarray(cols, np.int64)
  size = fac.precision.shape[0]
  if not fac.exact:
    out = np.empty(len(rows))
    unique, inverse = np.unique(cols, return_inverse=True)
    for start in range(0, len(unique), block):
      chunk = unique[start:start + block]
      unit = np.zeros((size, len(chunk)))
      unit[chunk, np.arange(len(chunk))] = 1.
      columns = solve(fac, unit)                                        # [Q, block]
      hit = (inverse >= start) & (inverse < start + len(chunk))
      out[hit] = columns[rows[hit], inverse[hit] - start]
    return out
  where_a = np.full(size, -1)
  where_a[fac.index_a] = np.arange(len(fac.index_a))
  where_c = np.full(size, -1)
  where_c[fac.index_c] = np.arange(len(fac.index_c))
  ia, ja, ic, jc = where_a[rows], where_a[cols], where_c[rows], where_c[cols]
  # Put an A position first in mixed pairs (P^-1 is symmetric).
  swap = (ia < 0) & (ja >= 0)
  ia, ja = np.where(swap, ja, ia), np.where(swap, ia, ja)
  ic, jc = np.where(swap, jc, ic), np.where(swap, ic, jc)
  out = np.zeros(len(rows))
  aa = (ia >= 0) & (ja >= 0)
  if np.any(aa):
    out[aa] = np.asarray(fac.a_inv[ia[aa], ja[aa]]).ravel()
  if fac.chol is None:  # a single factor: P = A
    return out
  s_inv = schur_inverse(fac)                                            # [r, r]
  used_a, first = np.unique(ia[ia >= 0], return_inverse=True)
  h = np.asarray(fac.g[used_a] @ s_inv)                                 # [u, r]
  row_h = np.zeros(len(rows), np.int64)
  row_h[ia >= 0] = first
  cc = ia < 0
  out[cc] = s_inv[ic[cc], jc[cc]]
  ac = (ia >= 0) & (ja < 0)
  out[ac] = -h[row_h[ac], jc[ac]]
  if np.any(aa):
    out[aa] += np.asarray(fac.g[ja[aa]].multiply(h[row_h[aa]]).sum(1)).ravel()
  return out


def predictive_variance(fac: Factorization, positions, weights=None) -> np.ndarray:
  """Var[sum_j weights[:, j] u[positions[:, j]] | y] for positions [n, m] in u
  (-1: skip) and weights [n, m] (default ones), [n]."""
  positions = np.asarray(positions, np.int64)
  n, m = positions.shape
  weights = np.ones((n, m)) if weights is None else np.asarray(weights, np.float64)
  point = np.repeat(np.arange(n), m * m)
  rows = np.repeat(positions, m, axis=1).reshape(-1)                    # p_j for each (j, i)
  cols = np.tile(positions, (1, m)).reshape(-1)                         # p_i
  w = (np.repeat(weights, m, axis=1) * np.tile(weights, (1, m))).reshape(-1)
  keep = (rows >= 0) & (cols >= 0)
  return np.bincount(point[keep], w[keep] * covariance_entries(fac, rows[keep], cols[keep]), n)


def effect_positions(levels, num_effects, clusters, n: int) -> np.ndarray:
  """[n, sum_k d_k] position in u of each row's effects of each factor; -1 for
  a level unseen in fit (all -1 for clusters=None)."""
  total = int(np.sum(num_effects))
  if clusters is None:
    return np.full((n, total), -1, np.int64)
  if not is_factor_list(clusters) or len(clusters) != len(levels):
    raise ValueError(f"clusters must be a list of {len(levels)} grouping factors, as in fit")
  out, start = [], 0
  for k, (labels, d) in enumerate(zip(levels, num_effects)):
    codes = code_labels(labels, clusters[k], n, f"clusters[{k}]")[0]    # [n]
    seen = codes < len(labels)
    for j in range(d):
      out.append(np.where(seen, start + codes * d + j, -1))
    start += len(labels) * d
  return np.stack(out, 1)


class PosteriorPrecision(NamedTuple):
  """The training data's P = D^-1 + Z^T Z / sigma^2 at the fitted variances."""
  ztz: sp.csr_matrix        # [Q, Q] Z^T Z of the training rows
  num_levels: np.ndarray    # [K]
  variances: np.ndarray     # packed Sigma_k ([K] sigma_k^2 for intercepts)
  noise_variance: float     # sigma^2
  max_dense: int
  num_effects: np.ndarray | None = None  # [K] d_k (None: intercepts)

  def factorize(self):
    return factorize(*self)


class CrossedPredictions:
  """`random_effects`, `predict` and `predict_interval` of a fitted K-factor model.

  Needs `levels_`, `blups_` (K arrays: [q_k] for an intercept, [q_k, d_k] for
  d_k effects), `precision_` (a `PosteriorPrecision`), `fixed_part(X)` and
  `effects_design(n, Z)` ([n, sum_k d_k]).
  """

  def random_effects(self, k: int) -> dict:
    """{label: BLUP} of factor k."""
    val.check_is_fitted(self, "blups_")
    return dict(zip(self.levels_[k], self.blups_[k]))

  def _random_part(self, n, clusters, Z):
    """(positions [n, m], weights [n, m]) of each row's seen random effects."""
    num_effects = effect_counts(self.precision_.num_levels, self.precision_.num_effects)
    positions = effect_positions(self.levels_, num_effects, clusters, n)
    return positions, self.effects_design(n, Z)

  def predict(self, X, clusters=None, Z=None):
    """f(x) + sum_k z_k^T BLUP_k(level) (0 for unseen levels or clusters=None)."""
    val.check_is_fitted(self, "blups_")
    f = self.fixed_part(X)
    positions, weights = self._random_part(len(f), clusters, Z)
    mean = np.concatenate([np.reshape(b, -1) for b in self.blups_]).astype(np.float64)
    return f + np.sum(np.where(positions >= 0, weights * mean[np.maximum(positions, 0)], 0.), 1)

  def predict_interval(self, X, clusters=None, level: float = 0.95, Z=None):
    """Normal predictive interval for a new observation, [n, 2] (lower, upper).

    The variance is sigma^2 + Var[sum_k z_k^T u_k(level_k) | y] over the
    factors whose level was seen in fit (the exact posterior covariance,
    cross-factor terms included) + z_k^T Sigma_k z_k for each unseen factor.
    The uncertainty of f (beta or the network) is not included.
    """
    level = val.check_interval_level(level)
    mean = self.predict(X, clusters, Z)
    positions, weights = self._random_part(len(mean), clusters, Z)
    prec = self.precision_
    var = np.full(len(mean), prec.noise_variance)
    start = 0
    for cov in covariance_matrices(prec.variances, prec.num_levels, prec.num_effects):
      d = len(cov)
      w = weights[:, start:start + d]
      unseen = positions[:, start] < 0
      var += np.where(unseen, np.einsum("ni,ij,nj->n", w, cov, w), 0.)
      start += d
    if np.any(positions >= 0):
      var = var + predictive_variance(prec.factorize(), positions, weights)
    half = sps.norm.ppf(0.5 + level / 2.) * np.sqrt(var)
    return np.stack([mean - half, mean + half], axis=-1)

