"""The posterior of K crossed random intercepts: sparse, exact or CG/Hutchinson.

The model is `models.crossed_effects`: y = X beta + sum_k Z_k u_k + eps. The
posterior of u = [u_1 ... u_K] is Gaussian with sparse precision

    P = D^-1 + Z^T Z / sigma^2,        m = P^-1 Z^T (y - X beta) / sigma^2.

Within a factor Z_k^T Z_k is diagonal (level counts); the cross blocks are
co-occurrence counts. `factorize` eliminates the largest factor (a diagonal
block A) exactly and factors the dense Schur complement S = C - B^T A^-1 B of
the remaining r = sum_k q_k - max_k q_k levels by Cholesky. This gives

    log|P| = sum log a_i + log|S|,
    tr(P^-1)_AA = sum 1/a_i + tr(S^-1 B^T A^-2 B),  tr(P^-1)_CC = tr(S^-1) per factor,

exactly, in O(nnz + r^3) time and 3 r^2 floats of memory: the exact limit is
`max_dense` (default 8,000 levels outside the largest factor, about 1.5 GB in
float64). Beyond it, `factorize` switches to conjugate gradients (Jacobi
preconditioned) for the mean and Hutchinson estimates with Rademacher probes
for the traces, whose standard errors it reports; log|P| is then not
available (NaN), so only EM steps (no monotonicity check) can run there.

The marginal uses the determinant lemma and Woodbury:

    log|V| = sum_k q_k log sigma_k^2 + log|P| + N log sigma^2,
    r^T V^-1 r = r^T r / sigma^2 - b^T m,   b = Z^T r / sigma^2.

`CrossedPredictions` turns a fitted posterior into BLUP lookups and
predictive intervals, for the linear and the network f alike.

#### References

[1] M. F. Hutchinson. A stochastic estimator of the trace of the influence
    matrix for Laplacian smoothing splines. Commun. Stat. Simul. Comput.,
    19(2):433-450, 1990.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import scipy.linalg as sla
import scipy.sparse as sp
import scipy.stats as sps

from tfp_em.engine import inputs as val
from tfp_em.mixed_effects.labels import level_positions

MAX_DENSE = 8000


# ---------------------------------------------------------------------------
# Sparse linear algebra (numpy / scipy).

def design_matrix(codes, num_levels) -> sp.csr_matrix:
  """Z = [Z_1 ... Z_K] as a sparse [N, sum_k q_k] matrix with K ones per row."""
  codes = np.asarray(codes)
  num_levels = np.asarray(num_levels, dtype=np.int64)
  n, k = codes.shape
  offsets = np.concatenate([[0], np.cumsum(num_levels)[:-1]])
  cols = (codes + offsets[None, :]).reshape(-1)
  rows = np.repeat(np.arange(n), k)
  return sp.csr_matrix((np.ones(n * k), (rows, cols)), shape=(n, int(num_levels.sum())))


class Factorization(NamedTuple):
  """P = D^-1 + Z^T Z / sigma^2 split as [[A, B], [B^T, C]] around the largest factor."""
  a: np.ndarray            # [q_A] diagonal block of the largest factor
  b: sp.spmatrix           # [q_A, r] cross block
  chol: tuple              # scipy cho_factor of the Schur complement S [r, r] (exact path)
  index_a: np.ndarray      # [q_A] positions of the largest factor in u
  index_c: np.ndarray      # [r] positions of the other factors in u
  factor_of: np.ndarray    # [Q] factor of each position of u
  precision: sp.spmatrix   # [Q, Q] P (for the CG path)
  exact: bool


def factorize(ztz, num_levels, variances, noise_variance, max_dense: int = MAX_DENSE):
  """Factors P for the given variances (exactly when r <= max_dense)."""
  num_levels = np.asarray(num_levels, dtype=np.int64)
  factor_of = np.repeat(np.arange(len(num_levels)), num_levels)
  prior_precision = 1. / np.asarray(variances, np.float64)[factor_of]  # [Q]
  precision = (ztz / float(noise_variance) + sp.diags(prior_precision)).tocsr()
  largest = int(np.argmax(num_levels))
  index_a = np.flatnonzero(factor_of == largest)
  index_c = np.flatnonzero(factor_of != largest)
  a = precision.diagonal()[index_a]
  b = precision[index_a][:, index_c]
  exact = len(index_c) <= max_dense
  chol = None
  if exact and len(index_c):
    schur = precision[index_c][:, index_c].toarray() - (b.T @ sp.diags(1. / a) @ b).toarray()
    chol = sla.cho_factor(schur, lower=True, overwrite_a=True, check_finite=False)
  return Factorization(a, b, chol, index_a, index_c, factor_of, precision, exact)


def solve(fac: Factorization, rhs, cg_tol: float = 1e-10):
  """P^-1 rhs for rhs [Q] or [Q, m]: exact block elimination, or Jacobi-CG."""
  rhs = np.asarray(rhs, np.float64)
  if not fac.exact:
    return block_cg(fac.precision, rhs.reshape(rhs.shape[0], -1), cg_tol).reshape(rhs.shape)
  out = np.empty_like(rhs)
  ra, rc = rhs[fac.index_a], rhs[fac.index_c]
  scale = (1. / fac.a).reshape((-1,) + (1,) * (rhs.ndim - 1))
  if len(fac.index_c):
    xc = sla.cho_solve(fac.chol, rc - fac.b.T @ (scale * ra), check_finite=False)
    out[fac.index_c] = xc
    ra = ra - fac.b @ xc
  out[fac.index_a] = scale * ra
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
  out = float(np.sum(np.log(fac.a)))
  if fac.chol is not None:
    out += 2. * float(np.sum(np.log(np.diag(fac.chol[0]))))
  return out


def factor_traces(fac: Factorization, num_probes: int = 64, seed: int = 0):
  """(tr(P^-1) restricted to each factor [K], standard errors [K]).

  Exact (standard errors 0) on the exact path; Hutchinson with `num_probes`
  Rademacher probes otherwise: z^T P^-1 z summed within each factor.
  """
  num_factors = int(fac.factor_of.max()) + 1
  if not fac.exact:
    rng = np.random.default_rng(seed)
    probes = rng.choice([-1., 1.], size=(len(fac.factor_of), num_probes))
    quad = probes * solve(fac, probes)                                  # [Q, m]
    per = np.stack([quad[fac.factor_of == k].sum(0) for k in range(num_factors)])  # [K, m]
    return per.mean(1), per.std(1, ddof=1) / math.sqrt(num_probes)
  traces = np.zeros(num_factors)
  largest = fac.factor_of[fac.index_a[0]]
  traces[largest] = np.sum(1. / fac.a)
  if fac.chol is not None:
    s_inv = np.tril(sla.lapack.dpotri(fac.chol[0], lower=1)[0])        # lower triangle of S^-1
    m = (fac.b.T @ sp.diags(fac.a ** -2) @ fac.b).toarray()
    diag = np.diag(s_inv)
    traces[largest] += 2. * float(np.sum(s_inv * m)) - float(diag @ np.diag(m))
    np.add.at(traces, fac.factor_of[fac.index_c], diag)
  return traces, np.zeros(num_factors)


def covariance_entries(fac: Factorization, rows, cols, block: int = 256) -> np.ndarray:
  """Entries (P^-1)[rows[i], cols[i]] of the posterior covariance, [m].

  Exact path, with H = B S^-1 for the rows of the largest factor that occur:
  (P^-1)_CC = S^-1, (P^-1)_AC = -A^-1 H, (P^-1)_AA = A^-1 + A^-1 H B^T A^-1.
  On the CG path, P^-1 e_j is solved for each distinct column j, `block` at a time.
  """
  rows, cols = np.asarray(rows, np.int64), np.asarray(cols, np.int64)
  if not fac.exact:
    out = np.empty(len(rows))
    unique, inverse = np.unique(cols, return_inverse=True)
    for start in range(0, len(unique), block):
      chunk = unique[start:start + block]
      unit = np.zeros((len(fac.factor_of), len(chunk)))
      unit[chunk, np.arange(len(chunk))] = 1.
      columns = solve(fac, unit)                                        # [Q, block]
      hit = (inverse >= start) & (inverse < start + len(chunk))
      out[hit] = columns[rows[hit], inverse[hit] - start]
    return out
  where_a = np.full(len(fac.factor_of), -1)
  where_a[fac.index_a] = np.arange(len(fac.index_a))
  where_c = np.full(len(fac.factor_of), -1)
  where_c[fac.index_c] = np.arange(len(fac.index_c))
  if fac.chol is None:  # a single factor: P is diagonal
    return np.where(rows == cols, 1. / fac.a[np.maximum(where_a[rows], 0)], 0.)
  s_inv = np.tril(sla.lapack.dpotri(fac.chol[0], lower=1)[0])
  s_inv = s_inv + np.tril(s_inv, -1).T                                  # [r, r]
  ia, ja, ic, jc = where_a[rows], where_a[cols], where_c[rows], where_c[cols]
  # Put an A position first in mixed pairs (P^-1 is symmetric).
  swap = (ia < 0) & (ja >= 0)
  ia, ja = np.where(swap, ja, ia), np.where(swap, ia, ja)
  ic, jc = np.where(swap, jc, ic), np.where(swap, ic, jc)
  used_a, first = np.unique(ia[ia >= 0], return_inverse=True)
  h = np.asarray(fac.b[used_a] @ s_inv)                                 # [u, r]
  row_h = np.zeros(len(rows), np.int64)
  row_h[ia >= 0] = first
  out = np.zeros(len(rows))
  cc = ia < 0
  out[cc] = s_inv[ic[cc], jc[cc]]
  ac = (ia >= 0) & (ja < 0)
  out[ac] = -h[row_h[ac], jc[ac]] / fac.a[ia[ac]]
  aa = (ia >= 0) & (ja >= 0)
  if np.any(aa):
    hb = np.asarray(fac.b[ja[aa]].multiply(h[row_h[aa]]).sum(1)).ravel()
    out[aa] = (ia[aa] == ja[aa]) / fac.a[ia[aa]] + hb / (fac.a[ia[aa]] * fac.a[ja[aa]])
  return out


def predictive_variance(fac: Factorization, positions) -> np.ndarray:
  """Var[sum_k u[positions[:, k]] | y] for positions [n, K] in u (-1: skip), [n]."""
  positions = np.asarray(positions, np.int64)
  n, k = positions.shape
  point = np.repeat(np.arange(n), k * k)
  rows = np.repeat(positions, k, axis=1).reshape(-1)                    # p_k for each (k, j)
  cols = np.tile(positions, (1, k)).reshape(-1)                         # p_j
  keep = (rows >= 0) & (cols >= 0)
  return np.bincount(point[keep], covariance_entries(fac, rows[keep], cols[keep]), n)


class Posterior(NamedTuple):
  """u | y ~ N(mean, P^-1) and what EM and the marginal need from it."""
  mean: np.ndarray          # [Q]
  traces: np.ndarray        # [K] tr(P^-1)_kk
  trace_se: np.ndarray      # [K] standard errors of `traces` (0 when exact)
  log_prob: float           # log p(y | params) (NaN on the CG path)
  residual: np.ndarray      # [N] r = y - X beta


def posterior(x, y, z, ztz, num_levels, beta, variances, noise_variance,
              max_dense: int = MAX_DENSE, num_probes: int = 64, seed: int = 0) -> Posterior:
  """Exact (or CG/Hutchinson) posterior of u and the marginal log p(y)."""
  fac = factorize(ztz, num_levels, variances, noise_variance, max_dense)
  r = y - x @ beta
  b = z.T @ r / noise_variance
  mean = solve(fac, b)
  traces, se = factor_traces(fac, num_probes, seed)
  n = len(y)
  quad = float(r @ r) / noise_variance - float(b @ mean)
  log_v = float(np.sum(np.asarray(num_levels) * np.log(variances))) + log_det(fac) \
      + n * math.log(noise_variance)
  log_prob = -0.5 * (n * math.log(2. * math.pi) + log_v + quad)
  return Posterior(mean, traces, se, log_prob, r)


def profiled_posterior(x, y, z, ztz, num_levels, variances, noise_variance,
                       max_dense: int = MAX_DENSE):
  """(GLS beta-hat, exact Posterior at it) for the given variances.

  X^T V^-1 X = (X^T X - X_z^T P^-1 X_z sigma^2) / sigma^2 with X_z = Z^T X / sigma^2,
  and the same for X^T V^-1 y.
  """
  fac = factorize(ztz, num_levels, variances, noise_variance, max_dense)
  if not fac.exact:
    raise ValueError(f"the NLL path needs the exact factorization: {len(fac.index_c)} levels "
                     f"outside the largest factor exceed max_dense={max_dense}")
  xz, yz = z.T @ x / noise_variance, z.T @ y / noise_variance
  pxz = solve(fac, np.column_stack([xz, yz]))                           # [Q, p+1]
  gram = x.T @ x / noise_variance - xz.T @ pxz[:, :-1]
  rhs = x.T @ y / noise_variance - xz.T @ pxz[:, -1]
  beta = sla.solve(gram, rhs, assume_a="pos") if x.shape[1] else np.zeros(0)
  r = y - x @ beta
  mean = pxz[:, -1] - pxz[:, :-1] @ beta
  b = yz - xz @ beta
  traces, se = factor_traces(fac)
  n = len(y)
  log_v = float(np.sum(num_levels * np.log(variances))) + log_det(fac) \
      + n * math.log(noise_variance)
  quad = float(r @ r) / noise_variance - float(b @ mean)
  return beta, Posterior(mean, traces, se, -0.5 * (n * math.log(2. * math.pi) + log_v + quad), r)


def exact_limit_ok(num_levels, max_dense: int) -> bool:
  """Whether `factorize` is exact for these level counts."""
  num_levels = np.asarray(num_levels)
  return int(num_levels.sum() - num_levels.max()) <= max_dense


# ---------------------------------------------------------------------------
# Predictions of a fitted model.

class PosteriorPrecision(NamedTuple):
  """The training data's P = D^-1 + Z^T Z / sigma^2 at the fitted variances."""
  ztz: sp.csr_matrix        # [Q, Q] Z^T Z of the training rows
  num_levels: np.ndarray    # [K]
  variances: np.ndarray     # [K] sigma_k^2
  noise_variance: float     # sigma^2
  max_dense: int

  def factorize(self):
    return factorize(*self)


class CrossedPredictions:
  """`random_effects` and `predict_interval` of a fitted K-factor model.

  Needs `levels_`, `blups_`, `precision_` (a `PosteriorPrecision`) and
  `predict(X, clusters)`.
  """

  def random_effects(self, k: int) -> dict:
    """{label: BLUP} of factor k."""
    val.check_is_fitted(self, "blups_")
    return dict(zip(self.levels_[k], self.blups_[k]))

  def predict_interval(self, X, clusters=None, level: float = 0.95):
    """Normal predictive interval for a new observation, [n, 2] (lower, upper).

    The variance is sigma^2 + Var[sum_k u_k(level_k) | y] over the factors
    whose level was seen in fit (the exact posterior covariance, cross-factor
    terms included) + sigma_k^2 for each unseen factor. The uncertainty of f
    (beta or the network) is not included.
    """
    level = val.check_interval_level(level)
    mean = self.predict(X, clusters)
    positions = level_positions(self.levels_, clusters, len(mean))
    prec = self.precision_
    var = prec.noise_variance + np.sum(np.where(positions < 0, prec.variances, 0.), axis=1)
    if np.any(positions >= 0):
      var = var + predictive_variance(prec.factorize(), positions)
    half = sps.norm.ppf(0.5 + level / 2.) * np.sqrt(var)
    return np.stack([mean - half, mean + half], axis=-1)
