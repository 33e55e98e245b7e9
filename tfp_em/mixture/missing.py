"""EM maths for Gaussian mixtures with entries missing at random (NaN in x).

For a row observed on the coordinates o and missing on m, and component k
with mean mu and covariance Sigma (Gaussian conditioning):

    log N(x_o | mu_o, Sigma_oo)                              (the E-step's l)
    x^_m = mu_m + Sigma_mo Sigma_oo^{-1} (x_o - mu_o)        E[x_m | x_o, z = k]
    C_mm = Sigma_mm - Sigma_mo Sigma_oo^{-1} Sigma_om        Cov[x_m | x_o, z = k]

Rows sharing a missingness pattern share Sigma_oo, so the work is one batched
Cholesky factorization per pattern (of K matrices) and triangular solves for
its rows. To keep shapes static, each pattern's matrices are written in all D
coordinates: with the 0/1 mask m of observed coordinates,

    Sigma_p = (m m^T) * Sigma + diag(1 - m) = blockdiag(Sigma_oo, I),

whose Cholesky factor is blockdiag(chol Sigma_oo, I) and whose log-determinant
is that of Sigma_oo. The sufficient statistics are those of the complete-data
M-step (`tfp_em.mixture.em.GaussianMixtureStats`) with x_n replaced by
x^_nk = E[x_n | x_o, z = k] and the conditional covariance added to the
scatter:

    sq_dev_k = sum_n w_n r_nk [(x^_nk - c_k)(x^_nk - c_k)^T + C_nk],

so every M-step works unchanged.

#### References

[1] R. J. A. Little and D. B. Rubin. Statistical Analysis with Missing Data,
    2nd ed., section 11.2 (EM for the multivariate normal). Wiley, 2002.
[2] Z. Ghahramani and M. I. Jordan. Supervised learning from incomplete data
    via an EM approach. NIPS 6, 1994 (mixtures with missing values).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from models import gaussian_mixture as gm
from models.gaussian_mixture_missing import filled
from tfp_em.mixture.em import GaussianMixtureStats


class PatternBlocks(NamedTuple):
  """Rows grouped by missingness pattern, in blocks of at most `size` rows.

  Block b holds the rows `order[starts[b]:ends[b]]`, all of one pattern.
  """
  order: tf.Tensor   # [N] row indices, sorted by pattern
  starts: tf.Tensor  # [B]
  ends: tf.Tensor    # [B]


class Conditional(NamedTuple):
  """One pattern's rows given each component."""
  log_prob: tf.Tensor  # [n, K] log N(x_o | mu_ko, Sigma_koo)
  mean: tf.Tensor      # [n, K, D] E[x | x_o, z = k]: x on o, x^ on m
  cov: tf.Tensor       # [K, D, D] Cov[x | x_o, z = k]: C_mm on m x m, 0 elsewhere


def check_no_empty_rows(x, name: str = "X") -> None:
  """A ValueError naming the rows of x [N, D] (numpy) whose every entry is NaN."""
  rows = np.flatnonzero(np.all(np.isnan(x), axis=1))
  if rows.size:
    raise ValueError(f"{name} has {rows.size} row(s) with every entry missing (rows "
                     f"{_listed(rows)}): they carry no information; drop them")


def check_no_empty_columns(x, name: str = "X") -> None:
  """A ValueError naming the columns of x [N, D] (numpy) never observed (nothing to fit)."""
  columns = np.flatnonzero(np.all(np.isnan(x), axis=0))
  if columns.size:
    raise ValueError(f"{name} has {columns.size} column(s) with every entry missing (columns "
                     f"{_listed(columns)}): their parameters cannot be estimated; drop them")


def _listed(indices) -> str:
  return ", ".join(str(i) for i in indices[:10]) + (", ..." if indices.size > 10 else "")


def fill_column_means(x, weights) -> np.ndarray:
  """x [N, D] (numpy) with each NaN replaced by its column's weighted observed mean."""
  observed = ~np.isnan(x)
  w = np.asarray(weights, np.float64)[:, np.newaxis] * observed                  # [N, D]
  means = np.sum(np.where(observed, x, 0.0) * w, 0) / np.maximum(w.sum(0), 1e-300)  # [D]
  return np.where(observed, x, means.astype(x.dtype))


def dense_covariances(params, covariance_type: str):
  """Every component's covariance as a [K, D, D] matrix."""
  if gm.covariance_layout(covariance_type) == "full":
    return params.covariances
  scale = gm.component_scale_tril(params, covariance_type)  # [K, D, D]
  return tf.matmul(scale, scale, transpose_b=True)


def pattern_blocks(observed, size: int) -> PatternBlocks:
  """Groups the rows of `observed` [N, D] (bool) by pattern, in blocks of <= size rows."""
  _, pattern = tf.raw_ops.UniqueV2(x=tf.cast(observed, tf.int32),
                                   axis=tf.constant([0], tf.int64))   # [N] pattern ids
  order = tf.argsort(pattern, stable=True)                             # [N]
  counts = tf.math.bincount(pattern)                                   # [P]
  per_pattern = (counts + size - 1) // size                            # [P] blocks
  block_pattern = tf.repeat(tf.range(tf.size(counts)), per_pattern)    # [B]
  pattern_start = tf.cumsum(counts, exclusive=True)                    # [P]
  within = (tf.range(tf.size(block_pattern))
            - tf.gather(tf.cumsum(per_pattern, exclusive=True), block_pattern))  # [B]
  starts = tf.gather(pattern_start, block_pattern) + within * size
  ends = tf.minimum(starts + size, tf.gather(pattern_start + counts, block_pattern))
  return PatternBlocks(order, starts, ends)


def conditional(x0, mask, means, covariances) -> Conditional:
  """Gaussian conditioning of one pattern's rows on their observed coordinates.

  Args:
    x0: [n, D] rows, any finite value where missing.
    mask: [D] 1 where observed, 0 where missing (the same for every row).
    means: [K, D]; covariances: [K, D, D].
  """
  missing = 1.0 - mask                                                  # [D]
  padded = (mask[:, tf.newaxis] * mask * covariances
            + tf.linalg.diag(missing))                                  # [K, D, D] blockdiag(S_oo, I)
  chol = tf.linalg.cholesky(padded)                                     # [K, D, D]
  diff = (x0[:, tf.newaxis] - means) * mask                             # [n, K, D], 0 on m
  solved = tf.linalg.triangular_solve(chol, tf.transpose(diff, [1, 2, 0]))  # [K, D, n]
  mahalanobis = tf.transpose(tf.reduce_sum(tf.square(solved), 1))       # [n, K]
  half_log_det = tf.reduce_sum(tf.math.log(tf.linalg.diag_part(chol)), -1)  # [K]
  log_prob = (-0.5 * (tf.reduce_sum(mask) * math.log(2 * math.pi) + mahalanobis)
              - half_log_det)                                           # [n, K]
  precision_diff = tf.linalg.triangular_solve(chol, solved, adjoint=True)  # [K, D, n] S_oo^-1 d_o
  regression = tf.matmul(missing[:, tf.newaxis] * covariances, precision_diff)  # [K, D, n], 0 on o
  mean = tf.where(mask > 0, x0[:, tf.newaxis],
                  means + tf.transpose(regression, [2, 0, 1]))         # [n, K, D]
  rows_o = tf.linalg.triangular_solve(chol, mask[:, tf.newaxis] * covariances)  # [K, D, D]
  explained = tf.matmul(rows_o, rows_o, transpose_a=True)              # S_.o S_oo^-1 S_o.
  cov = missing[:, tf.newaxis] * missing * (covariances - explained)   # [K, D, D]
  return Conditional(log_prob, mean, cov)


def expected_stats(rw, cond: Conditional, center, full: bool) -> GaussianMixtureStats:
  """Complete-data stats of rows with weighted responsibilities rw [n, K], about
  center [K, D], with each row's missing entries at their conditional mean and
  the conditional covariance added to the scatter (full [K, D, D] or diagonal [K, D])."""
  xc = cond.mean - center                                               # [n, K, D]
  counts = tf.reduce_sum(rw, 0)                                         # [K]
  dev = tf.einsum("nk,nkd->kd", rw, xc)                                 # [K, D]
  if full:
    sq_dev = (tf.einsum("nkd,nke->kde", rw[..., tf.newaxis] * xc, xc)
              + counts[:, tf.newaxis, tf.newaxis] * cond.cov)           # [K, D, D]
  else:
    sq_dev = (tf.einsum("nk,nkd->kd", rw, tf.square(xc))
              + counts[:, tf.newaxis] * tf.linalg.diag_part(cond.cov))  # [K, D]
  return GaussianMixtureStats(counts, dev, sq_dev, center)


def no_stats(center, full: bool) -> GaussianMixtureStats:
  """The stats of no rows, about center [K, D]."""
  k, d = tf.shape(center)[0], tf.shape(center)[1]
  return expected_stats(tf.zeros([0, k], center.dtype),
                        Conditional(None, tf.zeros([0, k, d], center.dtype),
                                    tf.zeros([k, d, d], center.dtype)), center, full)


def fold_blocks(x, size: int, step, initial):
  """Folds `step(acc, b, rows [n], x0 [n, D], mask [D]) -> acc` over the blocks
  of rows of x [N, D] (NaN = missing) that share a pattern."""
  x0, mask = filled(x)
  blocks = pattern_blocks(mask > 0, size)

  def body(b, acc):
    rows = blocks.order[blocks.starts[b]:blocks.ends[b]]               # [n]
    return b + 1, step(acc, b, rows, tf.gather(x0, rows), mask[rows[0]])

  n_blocks = tf.shape(blocks.starts)[0]
  _, acc = tf.while_loop(lambda b, _: b < n_blocks, body, (tf.constant(0), initial))
  return acc, blocks


def map_rows(x, size: int, row_fn, dtype, shape):
  """`row_fn(rows, x0 [n, D], mask [D]) -> [n, *shape]` over the pattern blocks of
  x [N, D], returned in x's row order, shape [N, *shape]."""
  def step(acc, b, rows, x0, mask):
    return acc.write(b, row_fn(rows, x0, mask))

  out = tf.TensorArray(dtype, size=0, dynamic_size=True, infer_shape=False,
                       element_shape=tf.TensorShape([None] + list(shape)))
  out, blocks = fold_blocks(x, size, step, out)
  return tf.gather(out.concat(), tf.math.invert_permutation(blocks.order))


def responsibilities(log_prob, weights):
  """(r [n, K], log p(x_o) [n]) from log N(x_o | k) [n, K] and mixture weights [K]."""
  log_joint = log_prob + tf.math.log(weights)                           # [n, K]
  log_norm = tf.reduce_logsumexp(log_joint, -1)                         # [n]
  return tf.exp(log_joint - log_norm[:, tf.newaxis]), log_norm
