"""EM maths for Gaussian mixtures with entries missing at random (NaN in x).

For a row observed on the coordinates o and missing on m, and component k
with mean mu and covariance Sigma (Gaussian conditioning):

    log N(x_o | mu_o, Sigma_oo)                              (the E-step's l)
    x^_m = mu_m + Sigma_mo Sigma_oo^{-1} (x_o - mu_o)        E[x_m | x_o, z = k]
    C_mm = Sigma_mm - Sigma_mo Sigma_oo^{-1} Sigma_om        Cov[x_m | x_o, z = k]

Rows sharing a missingness pattern share Sigma_oo, so the work is one batched
Cholesky factorization per pattern (of K matrices) and triangular solves for
its rows. Patterns with few rows (`shared_pattern_rows`) are pooled in blocks
factorized row by row in one batched call, which beats a loop iteration per
pattern when most rows have a pattern of their own (large D). To keep shapes
static, the matrices are written in all D coordinates: with the 0/1 mask m of
observed coordinates,

    Sigma_p = (m m^T) * Sigma + diag(1 - m) = blockdiag(Sigma_oo, I),

whose Cholesky factor is blockdiag(chol Sigma_oo, I) and whose log-determinant
is that of Sigma_oo. The sufficient statistics are those of the complete-data
M-step (`tfp_em.mixture.stats.GaussianMixtureStats`) with x_n replaced by
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
from tfp_em.mixture.stats import GaussianMixtureStats


class PatternBlocks(NamedTuple):
  """Rows in blocks: block b holds the rows `order[starts[b]:ends[b]]`, either
  all of one pattern (`per_row[b]` False: one factorization for the block) or
  of rare patterns pooled (`per_row[b]` True: one factorization per row)."""
  order: tf.Tensor    # [N] row indices: frequent patterns first, each contiguous
  starts: tf.Tensor   # [B]
  ends: tf.Tensor     # [B]
  per_row: tf.Tensor  # [B] bool


class Conditional(NamedTuple):
  """A block's rows given each component; the rows come in G groups of R rows
  that share a pattern (G = 1, R = n: a pattern's block; G = n, R = 1: rows
  of rare patterns)."""
  log_prob: tf.Tensor  # [n, K] log N(x_o | mu_ko, Sigma_koo)
  mean: tf.Tensor      # [n, K, D] E[x | x_o, z = k]: x on o, x^ on m
  cov: tf.Tensor       # [G, K, D, D] Cov[x | x_o, z = k]: C_mm on m x m, 0 elsewhere


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


def shared_pattern_rows(n_components: int, n_features: int) -> int:
  """Rows from which a pattern gets blocks of its own (one factorization for
  all its rows); rarer patterns are pooled and factorized row by row, which
  costs ~K D^3 per row instead of a loop iteration (~0.3 ms) per pattern."""
  return max(8, -(-2 ** 16 // (n_components * n_features ** 3)))


def pattern_blocks(observed, size: int, shared_rows: int) -> PatternBlocks:
  """Blocks of the rows of `observed` [N, D] (bool): patterns with at least
  `shared_rows` rows in blocks of <= size rows each, the other rows pooled in
  blocks of <= max(1, size // D) rows (their memory is [rows, K, D, D])."""
  _, pattern = tf.raw_ops.UniqueV2(x=tf.cast(observed, tf.int32),
                                   axis=tf.constant([0], tf.int64))   # [N] pattern ids
  counts = tf.math.bincount(pattern)                                   # [P]
  frequent = counts >= shared_rows                                     # [P]
  counts = tf.where(frequent, counts, 0)                               # rows in own blocks
  n_patterns = tf.size(counts)
  order = tf.argsort(tf.where(tf.gather(frequent, pattern), pattern, pattern + n_patterns),
                     stable=True)                                      # [N]
  per_pattern = (counts + size - 1) // size                            # [P] blocks
  block_pattern = tf.repeat(tf.range(n_patterns), per_pattern)         # [B1]
  pattern_start = tf.cumsum(counts, exclusive=True)                    # [P]
  within = (tf.range(tf.size(block_pattern))
            - tf.gather(tf.cumsum(per_pattern, exclusive=True), block_pattern))  # [B1]
  starts = tf.gather(pattern_start, block_pattern) + within * size
  ends = tf.minimum(starts + size, tf.gather(pattern_start + counts, block_pattern))
  pooled_size = max(1, size // int(observed.shape[-1]))
  pooled = tf.range(tf.reduce_sum(counts), tf.size(pattern), pooled_size)   # [B2]
  return PatternBlocks(order, tf.concat([starts, pooled], 0),
                       tf.concat([ends, tf.minimum(pooled + pooled_size, tf.size(pattern))], 0),
                       tf.concat([tf.zeros_like(starts, tf.bool),
                                  tf.ones_like(pooled, tf.bool)], 0))


def conditional(x0, mask, means, covariances) -> Conditional:
  """Gaussian conditioning of a block's rows on their observed coordinates.

  Args:
    x0: [G, R, D] rows in G groups sharing a pattern, any finite value where missing.
    mask: [G, D] 1 where observed, 0 where missing.
    means: [K, D]; covariances: [K, D, D].
  """
  missing = 1.0 - mask                                                  # [G, D]
  outer = mask[:, tf.newaxis, :, tf.newaxis] * mask[:, tf.newaxis, tf.newaxis]  # [G, 1, D, D]
  padded = (outer * covariances
            + tf.linalg.diag(missing)[:, tf.newaxis])                   # [G, K, D, D] blockdiag(S_oo, I)
  chol = tf.linalg.cholesky(padded)                                     # [G, K, D, D]
  diff = ((x0[:, tf.newaxis] - means[:, tf.newaxis])
          * mask[:, tf.newaxis, tf.newaxis])                            # [G, K, R, D], 0 on m
  solved = tf.linalg.triangular_solve(chol, tf.linalg.matrix_transpose(diff))  # [G, K, D, R]
  mahalanobis = tf.reduce_sum(tf.square(solved), -2)                    # [G, K, R]
  half_log_det = tf.reduce_sum(tf.math.log(tf.linalg.diag_part(chol)), -1)  # [G, K]
  log_prob = (-0.5 * (tf.reduce_sum(mask, -1)[:, tf.newaxis, tf.newaxis] * math.log(2 * math.pi)
                      + mahalanobis) - half_log_det[..., tf.newaxis])    # [G, K, R]
  precision_diff = tf.linalg.triangular_solve(chol, solved, adjoint=True)  # [G, K, D, R] S_oo^-1 d_o
  regression = tf.matmul(missing[:, tf.newaxis, :, tf.newaxis] * covariances,
                         precision_diff)                                # [G, K, D, R], 0 on o
  fill = means[:, tf.newaxis] + tf.linalg.matrix_transpose(regression)     # [G, K, R, D]
  mean = tf.where(mask[:, tf.newaxis, tf.newaxis] > 0, x0[:, tf.newaxis], fill)  # [G, K, R, D]
  rows_o = tf.linalg.triangular_solve(chol, mask[:, tf.newaxis, :, tf.newaxis] * covariances)
  explained = tf.matmul(rows_o, rows_o, transpose_a=True)              # S_.o S_oo^-1 S_o.
  cov = (missing[:, tf.newaxis, :, tf.newaxis] * missing[:, tf.newaxis, tf.newaxis]
         * (covariances - explained))                                   # [G, K, D, D]
  k, d = tf.shape(means)[0], tf.shape(means)[1]
  return Conditional(tf.reshape(tf.transpose(log_prob, [0, 2, 1]), [-1, k]),        # [n, K]
                     tf.reshape(tf.transpose(mean, [0, 2, 1, 3]), [-1, k, d]),     # [n, K, D]
                     cov)


def expected_stats(rw, cond: Conditional, center, full: bool) -> GaussianMixtureStats:
  """Complete-data stats of rows with weighted responsibilities rw [n, K], about
  center [K, D], with each row's missing entries at their conditional mean and
  the conditional covariance added to the scatter (full [K, D, D] or diagonal [K, D])."""
  xc = cond.mean - center                                               # [n, K, D]
  counts = tf.reduce_sum(rw, 0)                                         # [K]
  dev = tf.einsum("nk,nkd->kd", rw, xc)                                 # [K, D]
  groups = tf.shape(cond.cov)[0]
  group_counts = tf.reduce_sum(tf.reshape(rw, [groups, -1, tf.shape(rw)[1]]), 1)  # [G, K]
  if full:
    sq_dev = (tf.einsum("nkd,nke->kde", rw[..., tf.newaxis] * xc, xc)
              + tf.einsum("gk,gkde->kde", group_counts, cond.cov))      # [K, D, D]
  else:
    sq_dev = (tf.einsum("nk,nkd->kd", rw, tf.square(xc))
              + tf.einsum("gk,gkd->kd", group_counts, tf.linalg.diag_part(cond.cov)))  # [K, D]
  return GaussianMixtureStats(counts, dev, sq_dev, center)


def no_stats(center, full: bool) -> GaussianMixtureStats:
  """The stats of no rows, about center [K, D]."""
  k, d = tf.shape(center)[0], tf.shape(center)[1]
  return expected_stats(tf.zeros([0, k], center.dtype),
                        Conditional(None, tf.zeros([0, k, d], center.dtype),
                                    tf.zeros([1, k, d, d], center.dtype)), center, full)


def fold_blocks(x, size: int, shared_rows: int, step, initial):
  """Folds `step(acc, b, rows [n], x0 [G, R, D], mask [G, D]) -> acc` over the
  blocks of rows of x [N, D] (NaN = missing); returns (acc, blocks)."""
  x0, mask = filled(x)
  blocks = pattern_blocks(mask > 0, size, shared_rows)

  def body(b, acc):
    rows = blocks.order[blocks.starts[b]:blocks.ends[b]]               # [n]
    groups = tf.where(blocks.per_row[b], tf.size(rows), 1)
    x_block = tf.reshape(tf.gather(x0, rows), [groups, -1, tf.shape(x0)[1]])  # [G, R, D]
    return b + 1, step(acc, b, rows, x_block, tf.gather(mask, rows[:groups]))

  n_blocks = tf.shape(blocks.starts)[0]
  _, acc = tf.while_loop(lambda b, _: b < n_blocks, body, (tf.constant(0), initial))
  return acc, blocks


def map_rows(x, size: int, shared_rows: int, row_fn, dtype, shape):
  """`row_fn(rows, x0 [G, R, D], mask [G, D]) -> [n, *shape]` over the blocks of
  x [N, D], returned in x's row order, shape [N, *shape]."""
  def step(acc, b, rows, x0, mask):
    return acc.write(b, row_fn(rows, x0, mask))

  out = tf.TensorArray(dtype, size=0, dynamic_size=True, infer_shape=False,
                       element_shape=tf.TensorShape([None] + list(shape)))
  out, blocks = fold_blocks(x, size, shared_rows, step, out)
  return tf.gather(out.concat(), tf.math.invert_permutation(blocks.order))


def responsibilities(log_prob, weights):
  """(r [n, K], log p(x_o) [n]) from log N(x_o | k) [n, K] and mixture weights [K]."""
  log_joint = log_prob + tf.math.log(weights)                           # [n, K]
  log_norm = tf.reduce_logsumexp(log_joint, -1)                         # [n]
  return tf.exp(log_joint - log_norm[:, tf.newaxis]), log_norm
