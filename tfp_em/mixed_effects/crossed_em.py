"""Exact EM and marginal-likelihood fits for crossed random intercepts.

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

EM M-step (argmax of Q):

    beta      = (X^T X)^-1 X^T (y - Z m)
    sigma^2   = (||y - X beta - Z m||^2 + tr(Z^T Z P^-1)) / N
    sigma_k^2 = (||m_k||^2 + tr(P^-1)_kk) / q_k

with tr(Z^T Z P^-1) = sigma^2 (sum_k q_k - sum_k tr(P^-1)_kk / sigma_k^2). The
same E-step gives the exact gradient of the marginal (Fisher identity), which
the NLL path (`fit_nll`, LMMNN with linear f) feeds to L-BFGS over the log
variances with beta profiled out by GLS.

#### References

[1] N. M. Laird and J. H. Ware. Random-effects models for longitudinal data.
    Biometrics, 38(4):963-974, 1982.
[2] C. Liu, D. B. Rubin and Y. N. Wu. Parameter expansion to accelerate EM:
    the PX-EM algorithm. Biometrika, 85(4):755-770, 1998.
[3] M. F. Hutchinson. A stochastic estimator of the trace of the influence
    matrix for Laplacian smoothing splines. Commun. Stat. Simul. Comput.,
    19(2):433-450, 1990.
[4] G. Simchoni and S. Rosset. Using random effects to account for
    high-cardinality categorical features and repeated measures in deep neural
    networks. NeurIPS, 2021.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import scipy.linalg as sla
import scipy.optimize as sopt
import scipy.sparse as sp
import tensorflow as tf

from models import crossed_effects as ce
from tfp_em.mixed_effects.em import solve_beta, update_noise_variance

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


# ---------------------------------------------------------------------------
# EM.

class CrossedStats(NamedTuple):
  """Expected sufficient statistics (sums over points and levels).

  `beta_ref` is shared: the beta at which e = y - X beta_ref - Z m was formed.
  """
  xtx: tf.Tensor            # [p, p] X^T X
  xte: tf.Tensor            # [p]    X^T e
  ete: tf.Tensor            # []     e^T e
  trace: tf.Tensor          # []     tr(Z^T Z P^-1)
  second_moment: tf.Tensor  # [K]    ||m_k||^2 + tr(P^-1)_kk
  mean_sum: tf.Tensor       # [K]    sum of m_k (for the PX-EM step)
  num_levels: tf.Tensor     # [K]    q_k
  num_obs: tf.Tensor        # []     N
  beta_ref: tf.Tensor       # [p]    shared


def update_variances(second_moment, num_levels):
  """sigma_k^2 = (||m_k||^2 + tr(P^-1)_kk) / q_k."""
  return second_moment / num_levels


def expected_log_joint(params: ce.CrossedParams, stats: CrossedStats):
  """Q(params | params_old) = E[log p(y, u | params)] under u | y, params_old."""
  d = params.beta - stats.beta_ref
  expected_ss = (stats.ete - 2. * tf.reduce_sum(d * stats.xte)
                 + tf.reduce_sum(d * tf.linalg.matvec(stats.xtx, d)) + stats.trace)
  log2pi = math.log(2. * math.pi)
  lik = -0.5 * (stats.num_obs * (log2pi + tf.math.log(params.noise_variance))
                + expected_ss / params.noise_variance)
  prior = -0.5 * tf.reduce_sum(stats.num_levels * (log2pi + tf.math.log(params.variances))
                               + stats.second_moment / params.variances)
  return lik + prior


def intercept_column(x) -> int | None:
  """Index of a column of x that is all ones, or None."""
  x = np.asarray(x)
  hits = np.flatnonzero(np.all(x == 1., axis=0)) if x.shape[0] else []
  return int(hits[0]) if len(hits) else None


class CrossedEffectsEM:
  """EM for the linear mixed model with K crossed random intercepts (an `EMModel`).

  `data` is a `models.crossed_effects.CrossedData`. The E-step is sparse
  numpy/scipy work, so `compile` is 'eager'.

  Args:
    expand: add the PX-EM step (default True): the M-step also fits a mean
      mu_k of each u_k and moves sum_k mu_k into the intercept, which must be
      column `intercept` of x (ignored when `intercept` is None). Plain EM
      moves a common offset between the intercept and the u_k only by the
      shrinkage fraction per iteration.
    intercept: index of the all-ones column of x, or None (default).
    max_dense: exact-factorization limit on the levels outside the largest
      factor (default 8,000); beyond it the E-step uses CG and Hutchinson
      traces and the log-likelihood is NaN.
    num_probes: Hutchinson probes on that path (default 64).
  """
  name = "CrossedEffectsEM"
  compile = "eager"
  failure_hint = ("Check X for collinear columns and every grouping factor for at least "
                  "two levels; a variance that goes to 0 means the factor explains nothing.")
  component_axes = {}
  generalized_m_step_fields = ()

  def __init__(self, expand: bool = True, intercept: int | None = None,
               max_dense: int = MAX_DENSE, num_probes: int = 64):
    self.expand = bool(expand)
    self.intercept = intercept
    self.max_dense = int(max_dense)
    self.num_probes = int(num_probes)

  def specs(self):
    return ce.param_specs()

  param_specs = property(specs)

  def num_observations(self, data) -> float:
    return float(data.y.shape[0])

  def initialize(self, data: ce.CrossedData, seed: int) -> ce.CrossedParams:
    """OLS beta; the residual variance split equally between noise and factors.

    Each share is jittered by a factor in [0.5, 2] drawn from `seed`.
    """
    x, y = np.asarray(data.x), np.asarray(data.y)
    num_factors = int(data.num_levels.shape[0])
    beta = np.linalg.lstsq(x, y, rcond=None)[0] if x.shape[1] else np.zeros([0], y.dtype)
    var = max(float(np.var(y - x @ beta)), 1e-12)
    jitter = np.exp(np.random.default_rng(seed).uniform(-math.log(2.), math.log(2.),
                                                        num_factors + 1))
    share = var / (num_factors + 1)
    return ce.CrossedParams(beta=tf.constant(beta, y.dtype),
                            variances=tf.constant(share * jitter[:-1], y.dtype),
                            noise_variance=tf.constant(share * jitter[-1], y.dtype))

  def _arrays(self, data):
    x = np.asarray(data.x, np.float64)
    y = np.asarray(data.y, np.float64)
    num_levels = np.asarray(data.num_levels)
    z = design_matrix(np.asarray(data.codes), num_levels)
    return x, y, z, (z.T @ z).tocsr(), num_levels

  def posterior(self, params, data) -> Posterior:
    x, y, z, ztz, num_levels = self._arrays(data)
    return posterior(x, y, z, ztz, num_levels, np.asarray(params.beta, np.float64),
                     np.asarray(params.variances, np.float64),
                     float(params.noise_variance), self.max_dense, self.num_probes)

  def e_step(self, params, data):
    x, y, z, ztz, num_levels = self._arrays(data)
    variances = np.asarray(params.variances, np.float64)
    sigma2 = float(params.noise_variance)
    post = posterior(x, y, z, ztz, num_levels, np.asarray(params.beta, np.float64),
                     variances, sigma2, self.max_dense, self.num_probes)
    return self.stats_from(post, x, z, num_levels, variances, sigma2, params.beta)

  @staticmethod
  def stats_from(post: Posterior, x, z, num_levels, variances, sigma2, beta_ref):
    """(CrossedStats, loglik) from a posterior; tensors in beta_ref's dtype."""
    dtype = beta_ref.dtype
    factor_of = np.repeat(np.arange(len(num_levels)), num_levels)
    e = post.residual - z @ post.mean                                   # [N]
    trace = sigma2 * (float(np.sum(num_levels)) - float(np.sum(post.traces / variances)))
    t = lambda v: tf.constant(v, dtype)
    stats = CrossedStats(
        xtx=t(x.T @ x), xte=t(x.T @ e), ete=t(e @ e), trace=t(trace),
        second_moment=t(np.bincount(factor_of, post.mean ** 2, len(num_levels)) + post.traces),
        mean_sum=t(np.bincount(factor_of, post.mean, len(num_levels))),
        num_levels=t(num_levels.astype(np.float64)), num_obs=t(float(len(e))),
        beta_ref=beta_ref)
    return stats, t(post.log_prob)

  def m_step(self, params, stats: CrossedStats) -> ce.CrossedParams:
    beta, residual_ss = stats.beta_ref, stats.ete
    if stats.beta_ref.shape[0]:
      delta, drop = solve_beta(stats.xtx, stats.xte)
      beta, residual_ss = stats.beta_ref + delta, stats.ete - drop
    noise_variance = update_noise_variance(residual_ss, stats.trace, stats.num_obs)
    second_moment = stats.second_moment
    if self.expand and self.intercept is not None:
      mu = stats.mean_sum / stats.num_levels                             # [K]
      beta = tf.tensor_scatter_nd_add(beta, [[self.intercept]], [tf.reduce_sum(mu)])
      second_moment = second_moment - stats.num_levels * tf.square(mu)
    return ce.CrossedParams(beta=beta, variances=update_variances(second_moment, stats.num_levels),
                            noise_variance=noise_variance)

  def expected_log_joint(self, params, stats):
    return expected_log_joint(params, stats)

  def marginal_log_prob(self, params, data):
    return tf.constant(self.posterior(params, data).log_prob, data.y.dtype)

  def joint_distribution(self, params, data):
    return ce.joint_distribution(params, data)


# ---------------------------------------------------------------------------
# The NLL path: L-BFGS on the exact marginal, beta profiled out by GLS.

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


def fit_nll(model: CrossedEffectsEM, data: ce.CrossedData, init_params: ce.CrossedParams,
            *, max_iter: int = 500, tol: float = 1e-12):
  """Maximizes the exact marginal over log(sigma_k^2), log(sigma^2) by L-BFGS-B.

  beta is profiled out (GLS) and the gradient is exact, from the E-step by the
  Fisher identity: d l / d log sigma_k^2 = (||m_k||^2 + tr_k) / (2 sigma_k^2) - q_k / 2,
  d l / d log sigma^2 = (||e||^2 + tr(Z^T Z P^-1)) / (2 sigma^2) - N / 2.

  Returns `(params, loglik, converged, num_evaluations)`.
  """
  x, y, z, ztz, num_levels = model._arrays(data)
  n = float(len(y))
  dtype = data.y.dtype

  def objective(theta):
    variances, sigma2 = np.exp(theta[:-1]), float(np.exp(theta[-1]))
    beta, post = profiled_posterior(x, y, z, ztz, num_levels, variances, sigma2, model.max_dense)
    stats, ll = CrossedEffectsEM.stats_from(post, x, z, num_levels, variances, sigma2,
                                            tf.constant(beta, tf.float64))
    grad = np.concatenate([
        0.5 * (stats.second_moment.numpy() / variances - num_levels),
        [0.5 * ((stats.ete.numpy() + stats.trace.numpy()) / sigma2 - n)]])
    return -float(ll) / n, -grad / n

  start = np.log(np.concatenate([np.asarray(init_params.variances, np.float64),
                                 [float(init_params.noise_variance)]]))
  res = sopt.minimize(objective, start, jac=True, method="L-BFGS-B",
                      options=dict(maxiter=max_iter, ftol=tol, gtol=tol * 1e-2, maxcor=20))
  variances, sigma2 = np.exp(res.x[:-1]), float(np.exp(res.x[-1]))
  beta, post = profiled_posterior(x, y, z, ztz, num_levels, variances, sigma2, model.max_dense)
  params = ce.CrossedParams(beta=tf.constant(beta, dtype), variances=tf.constant(variances, dtype),
                            noise_variance=tf.constant(sigma2, dtype))
  return params, post.log_prob, bool(res.success), int(res.nfev)


def fit_em_large(model: CrossedEffectsEM, data: ce.CrossedData, init_params: ce.CrossedParams,
                 *, max_iter: int = 200, tol: float = 1e-4):
  """EM beyond the exact limit: CG means, Hutchinson traces, no log-likelihood.

  The probes are the same at every iteration (seed 0), so the update is a
  deterministic map; it stops when every variance and sigma^2 moves by less
  than `tol` (relative). Returns `(params, num_iterations, trace_se [K])`,
  the standard errors of the last trace estimates.
  """
  x, y, z, ztz, num_levels = model._arrays(data)
  params = init_params
  for it in range(1, max_iter + 1):
    variances = np.asarray(params.variances, np.float64)
    sigma2 = float(params.noise_variance)
    post = posterior(x, y, z, ztz, num_levels, np.asarray(params.beta, np.float64), variances,
                     sigma2, model.max_dense, model.num_probes)
    stats, _ = model.stats_from(post, x, z, num_levels, variances, sigma2, params.beta)
    new = model.m_step(params, stats)
    old = np.append(variances, sigma2)
    change = np.abs(np.append(new.variances.numpy(), float(new.noise_variance)) - old) / old
    params = new
    if np.all(change < tol):
      break
  return params, it, post.trace_se
