"""The posterior of K crossed random-effect factors: sparse, exact or CG/Hutchinson.

The model is `models.crossed_effects`: y = X beta + Z u + eps, factor k with
d_k effects per level (intercepts: d_k = 1) and u_kl ~ N(0, Sigma_k). The
posterior of u = [u_1 ... u_K] is Gaussian with sparse precision

    P = D^-1 + Z^T Z / sigma^2,        m = P^-1 Z^T (y - X beta) / sigma^2,

D^-1 = blockdiag_k(I (x) Sigma_k^-1). Within a factor Z_k^T Z_k is block
diagonal (d_k x d_k per level); the cross blocks hold co-occurrences.
`factorize` eliminates the factor with the most positions (a block-diagonal A)
exactly and factors the dense Schur complement S = C - B^T A^-1 B of the
remaining r positions by Cholesky. With G = A^-1 B this gives

    log|P| = log|A| + log|S|,   (P^-1)_CC = S^-1,   (P^-1)_AA = A^-1 + G S^-1 G^T,

so the per-factor sums of the posterior covariance blocks (what EM needs,
`factor_blocks`) are exact in O(nnz + r^3) time and 3 r^2 floats of memory:
the exact limit is `max_dense` (default 8,000 positions outside the largest
factor, about 1.5 GB in float64). Beyond it, `factorize` switches to conjugate
gradients (Jacobi preconditioned) for the mean and Hutchinson estimates with
Rademacher probes for the blocks, whose standard errors it reports; log|P| is
then not available (NaN), so only EM steps (no monotonicity check) can run
there.

The marginal uses the determinant lemma and Woodbury:

    log|V| = sum_k q_k log|Sigma_k| + log|P| + N log sigma^2,
    r^T V^-1 r = r^T r / sigma^2 - b^T m,   b = Z^T r / sigma^2.

With beta profiled out (`profiled_posterior`), the same solves give GLS beta,
X^T V^-1 X and, for REML (beta latent under a flat prior), the extra
posterior covariance K A^-1 K^T of u, K = P^-1 Z^T X / sigma^2, and
l_R = l(beta_GLS) - 1/2 log|X^T V^-1 X| + (p/2) log 2 pi.

#### References

[1] M. F. Hutchinson. A stochastic estimator of the trace of the influence
    matrix for Laplacian smoothing splines. Commun. Stat. Simul. Comput.,
    19(2):433-450, 1990.
[2] D. A. Harville. Maximum likelihood approaches to variance component
    estimation and to related problems. JASA, 72(358):320-338, 1977.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import scipy.linalg as sla
import scipy.sparse as sp

from models.crossed_effects import covariance_blocks

MAX_DENSE = 8000


# ---------------------------------------------------------------------------
# Layout of u = [u_1 ... u_K], each level-major: position offset_k + l d_k + j.

def effect_counts(num_levels, num_effects=None) -> np.ndarray:
  """[K] d_k (ones for random intercepts)."""
  if num_effects is None:
    return np.ones(len(num_levels), np.int64)
  return np.asarray(num_effects, np.int64)


def factor_slices(num_levels, num_effects=None) -> list:
  """[(start, q_k, d_k)] of each factor's positions in u."""
  num_levels = np.asarray(num_levels, np.int64)
  num_effects = effect_counts(num_levels, num_effects)
  starts = np.concatenate([[0], np.cumsum(num_levels * num_effects)[:-1]])
  return [(int(s), int(q), int(d)) for s, q, d in zip(starts, num_levels, num_effects)]


def design_matrix(codes, num_levels, effects=None, num_effects=None) -> sp.csr_matrix:
  """Z = [Z_1 ... Z_K] as a sparse [N, Q] matrix: row n holds z_kn at its levels' positions.

  effects: [N, sum_k d_k] the designs side by side (None: intercepts, d_k = 1).
  """
  codes = np.asarray(codes)
  n = codes.shape[0]
  effects = np.ones((n, codes.shape[1])) if effects is None else np.asarray(effects, np.float64)
  rows, cols, vals, e = [], [], [], 0
  slices = factor_slices(num_levels, num_effects)
  for k, (start, _, d) in enumerate(slices):
    for j in range(d):
      rows.append(np.arange(n))
      cols.append(start + codes[:, k].astype(np.int64) * d + j)
      vals.append(effects[:, e + j])
    e += d
  total = slices[-1][0] + slices[-1][1] * slices[-1][2]
  return sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                       shape=(n, total))


def covariance_matrices(variances, num_levels, num_effects=None) -> list:
  """The K Sigma_k [d_k, d_k] (numpy) from the packed variances."""
  d = tuple(int(v) for v in effect_counts(num_levels, num_effects))
  return [np.asarray(b) for b in covariance_blocks(np.asarray(variances, np.float64), d)]


def prior_precision(variances, num_levels, num_effects=None):
  """(D^-1 sparse [Q, Q], log|D| = sum_k q_k log|Sigma_k|)."""
  blocks, log_det_d = [], 0.
  for cov, (_, q, _) in zip(covariance_matrices(variances, num_levels, num_effects),
                            factor_slices(num_levels, num_effects)):
    chol = np.linalg.cholesky(cov)
    inv = sla.cho_solve((chol, True), np.eye(len(cov)))
    blocks.append(sp.kron(sp.identity(q), inv))
    log_det_d += q * 2. * float(np.sum(np.log(np.diag(chol))))
  return sp.block_diag(blocks, format="csr"), log_det_d


# ---------------------------------------------------------------------------
# Sparse linear algebra (numpy / scipy).

class Factorization(NamedTuple):
  """P = D^-1 + Z^T Z / sigma^2 split as [[A, B], [B^T, C]] around the largest factor."""
  a_inv: sp.spmatrix       # [n_A, n_A] A^-1 (block diagonal, d_A x d_A blocks)
  a_inv_blocks: np.ndarray  # [q_A, d_A, d_A] its blocks
  a_log_det: float         # log|A|
  b: sp.spmatrix           # [n_A, r] cross block
  g: sp.spmatrix           # [n_A, r] G = A^-1 B
  chol: tuple              # scipy cho_factor of the Schur complement S [r, r] (exact path)
  index_a: np.ndarray      # [n_A] positions of the largest factor in u
  index_c: np.ndarray      # [r] positions of the other factors in u
  slices: list             # [(start, q_k, d_k)] of each factor
  prior_log_det: float     # log|D|
  precision: sp.spmatrix   # [Q, Q] P (for the CG path)
  exact: bool


def factorize(ztz, num_levels, variances, noise_variance, max_dense: int = MAX_DENSE,
              num_effects=None):
  """Factors P for the given packed variances (exactly when r <= max_dense)."""
  slices = factor_slices(num_levels, num_effects)
  d_inv, prior_log_det = prior_precision(variances, num_levels, num_effects)
  precision = (ztz / float(noise_variance) + d_inv).tocsr()
  largest = int(np.argmax([q * d for _, q, d in slices]))
  start, q_a, d_a = slices[largest]
  index_a = np.arange(start, start + q_a * d_a)
  index_c = np.setdiff1d(np.arange(precision.shape[0]), index_a)
  p_aa = precision[index_a][:, index_a]
  blocks = np.empty((q_a, d_a, d_a))
  for i in range(d_a):
    for j in range(d_a):
      blocks[:, i, j] = p_aa[i::d_a][:, j::d_a].diagonal()
  a_log_det = 2. * float(np.sum(np.log(np.diagonal(np.linalg.cholesky(blocks), 0, -2, -1))))
  a_inv_blocks = np.linalg.inv(blocks)
  a_inv = sp.bsr_matrix((a_inv_blocks, np.arange(q_a), np.arange(q_a + 1)),
                        shape=(q_a * d_a, q_a * d_a)).tocsr()
  b = precision[index_a][:, index_c]
  g = (a_inv @ b).tocsr()
  exact = len(index_c) <= max_dense
  chol = None
  if exact and len(index_c):
    schur = precision[index_c][:, index_c].toarray() - (b.T @ g).toarray()
    chol = sla.cho_factor(schur, lower=True, overwrite_a=True, check_finite=False)
  return Factorization(a_inv, a_inv_blocks, a_log_det, b, g, chol, index_a, index_c, slices,
                       prior_log_det, precision, exact)


def solve(fac: Factorization, rhs, cg_tol: float = 1e-10):
  """P^-1 rhs for rhs [Q] or [Q, m]: exact block elimination, or Jacobi-CG."""
  rhs = np.asarray(rhs, np.float64)
  if not fac.exact:
    return block_cg(fac.precision, rhs.reshape(rhs.shape[0], -1), cg_tol).reshape(rhs.shape)
  out = np.empty_like(rhs)
  ra, rc = rhs[fac.index_a], rhs[fac.index_c]
  if len(fac.index_c):
    xc = sla.cho_solve(fac.chol, rc - fac.g.T @ ra, check_finite=False)
    out[fac.index_c] = xc
    out[fac.index_a] = fac.a_inv @ ra - fac.g @ xc
  else:
    out[fac.index_a] = fac.a_inv @ ra
  return out


def block_cg(precision, rhs, tol: float = 1e-10, max_iter: int = 10000):
  """Jacobi-preconditioned conjugate gradients, one independent run per column of rhs [Q, m].

  Stops when every column has ||residual|| <= tol ||rhs||.
  """
  inv_diag = 1. / precision.diagonal()[:, None]                       # [Q, 1]
  x = np.zeros_like(rhs)
  r = rhs.copy()
  z = inv_diag * r
  p = z.copy()
  rz = np.sum(r * z, 0)
  target = tol * np.linalg.norm(rhs, axis=0)
  for _ in range(max_iter):
    if np.all(np.linalg.norm(r, axis=0) <= target):
      break
    ap = precision @ p
    alpha = rz / np.maximum(np.sum(p * ap, 0), np.finfo(float).tiny)
    x += alpha * p
    r -= alpha * ap
    z = inv_diag * r
    rz_new = np.sum(r * z, 0)
    p = z + (rz_new / np.maximum(rz, np.finfo(float).tiny)) * p
    rz = rz_new
  return x


def log_det(fac: Factorization) -> float:
  """log|P| (NaN on the CG path)."""
  if not fac.exact:
    return float("nan")
  out = fac.a_log_det
  if fac.chol is not None:
    out += 2. * float(np.sum(np.log(np.diag(fac.chol[0]))))
  return out


def schur_inverse(fac: Factorization) -> np.ndarray:
  """S^-1 [r, r], symmetric, from the Cholesky factor (exact path)."""
  s_inv = np.tril(sla.lapack.dpotri(fac.chol[0], lower=1)[0])
  s_inv += np.tril(s_inv, -1).T
  return s_inv


def factor_blocks(fac: Factorization, num_probes: int = 64, seed: int = 0):
  """([K] sums over levels of the d_k x d_k diagonal blocks of P^-1, standard errors [K]
  of their traces).

  Exact (standard errors 0) on the exact path; Hutchinson with `num_probes`
  Rademacher probes otherwise: E[z_i (P^-1 z)_j] = (P^-1)_ij within each level.
  """
  if not fac.exact:
    rng = np.random.default_rng(seed)
    probes = rng.choice([-1., 1.], size=(fac.precision.shape[0], num_probes))
    solved = solve(fac, probes)                                         # [Q, m]
    blocks, se = [], []
    for start, q, d in fac.slices:
      z = probes[start:start + q * d].reshape(q, d, -1)
      pz = solved[start:start + q * d].reshape(q, d, -1)
      est = np.einsum("lim,ljm->ijm", z, pz)                            # [d, d, m]
      est = 0.5 * (est + est.transpose(1, 0, 2))
      blocks.append(est.mean(-1))
      se.append(np.trace(est).std(ddof=1) / math.sqrt(num_probes))
    return blocks, np.array(se)
  s_inv = schur_inverse(fac) if fac.chol is not None else None
  where_c = np.full(fac.precision.shape[0], -1)
  where_c[fac.index_c] = np.arange(len(fac.index_c))
  blocks = []
  for start, q, d in fac.slices:
    if start == fac.index_a[0] and q * d == len(fac.index_a):  # the eliminated factor
      block = fac.a_inv_blocks.sum(0)
      if s_inv is not None:
        for i in range(d):
          for j in range(d):
            block[i, j] += (fac.g[i::d].T @ fac.g[j::d]).multiply(s_inv).sum()
    else:
      c = where_c[start:start + q * d].reshape(q, d)
      block = np.array([[s_inv[c[:, i], c[:, j]].sum() for j in range(d)] for i in range(d)])
    blocks.append(block)
  return blocks, np.zeros(len(fac.slices))


class Posterior(NamedTuple):
  """u | y ~ N(mean, covariance) and what EM and the marginal need from it."""
  mean: np.ndarray          # [Q]
  blocks: list              # [K] of [d_k, d_k]: sums over levels of Cov[u_kl | y]
  trace_se: np.ndarray      # [K] standard errors of the blocks' traces (0 when exact)
  log_prob: float           # log p(y | params), or l_R for REML (NaN on the CG path)
  residual: np.ndarray      # [N] r = y - X beta
  num_latent_fixed: int = 0  # p when beta is latent (REML), else 0
  fixed_covariance: np.ndarray | None = None  # [p, p] (X^T V^-1 X)^-1 (profiled only)

  @property
  def traces(self) -> np.ndarray:
    """[K] tr of each factor's block (tr(P^-1)_kk for intercepts)."""
    return np.array([np.trace(b) for b in self.blocks])


def marginal_log_prob(fac: Factorization, residual, b, mean, noise_variance) -> float:
  """log p(y) = -1/2 (N log 2 pi + log|V| + r^T V^-1 r) by the determinant lemma and Woodbury."""
  n = len(residual)
  quad = float(residual @ residual) / noise_variance - float(b @ mean)
  log_v = fac.prior_log_det + log_det(fac) + n * math.log(noise_variance)
  return -0.5 * (n * math.log(2. * math.pi) + log_v + quad)


def posterior(x, y, z, ztz, num_levels, beta, variances, noise_variance,
              max_dense: int = MAX_DENSE, num_probes: int = 64, seed: int = 0,
              num_effects=None) -> Posterior:
  """Exact (or CG/Hutchinson) posterior of u and the marginal log p(y)."""
  fac = factorize(ztz, num_levels, variances, noise_variance, max_dense, num_effects)
  r = y - x @ beta
  b = z.T @ r / noise_variance
  mean = solve(fac, b)
  blocks, se = factor_blocks(fac, num_probes, seed)
  return Posterior(mean, blocks, se, marginal_log_prob(fac, r, b, mean, noise_variance), r)


def profiled_posterior(x, y, z, ztz, num_levels, variances, noise_variance,
                       max_dense: int = MAX_DENSE, reml: bool = False, num_effects=None,
                       num_probes: int = 64, seed: int = 0):
  """(GLS beta-hat, Posterior at it) for the given variances; with `reml`, beta
  is latent (flat prior): the blocks gain K A^-1 K^T and log_prob is l_R.

  X^T V^-1 X = (X^T X - X_z^T P^-1 X_z sigma^2) / sigma^2 with X_z = Z^T X / sigma^2,
  and the same for X^T V^-1 y.
  """
  fac = factorize(ztz, num_levels, variances, noise_variance, max_dense, num_effects)
  xz, yz = z.T @ x / noise_variance, z.T @ y / noise_variance
  pxz = solve(fac, np.column_stack([xz, yz]))                           # [Q, p+1]
  gram = x.T @ x / noise_variance - xz.T @ pxz[:, :-1]                  # [p, p] X^T V^-1 X
  rhs = x.T @ y / noise_variance - xz.T @ pxz[:, -1]
  p = x.shape[1]
  beta = sla.solve(gram, rhs, assume_a="pos") if p else np.zeros(0)
  fixed_cov = np.linalg.inv(gram) if p else np.zeros((0, 0))
  r = y - x @ beta
  mean = pxz[:, -1] - pxz[:, :-1] @ beta
  b = yz - xz @ beta
  blocks, se = factor_blocks(fac, num_probes, seed)
  log_prob = marginal_log_prob(fac, r, b, mean, noise_variance)
  if reml and p:
    root = pxz[:, :-1] @ np.linalg.cholesky(fixed_cov)                   # [Q, p] K chol(A^-1)
    for block, (start, q, d) in zip(blocks, fac.slices):
      part = root[start:start + q * d].reshape(q, d, p)
      block += np.einsum("lip,ljp->ij", part, part)
    log_prob += -0.5 * np.linalg.slogdet(gram)[1] + 0.5 * p * math.log(2. * math.pi)
  return beta, Posterior(mean, blocks, se, log_prob, r, p if reml else 0, fixed_cov)


def exact_limit_ok(num_levels, max_dense: int, num_effects=None) -> bool:
  """Whether `factorize` is exact for these level (and effect) counts."""
  sizes = [q * d for _, q, d in factor_slices(num_levels, num_effects)]
  return int(sum(sizes) - max(sizes)) <= max_dense
