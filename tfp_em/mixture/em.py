"""Closed-form EM for Gaussian mixtures, derived from `models.gaussian_mixture`.

E-step: r_nk ∝ w_k N(x_n | mu_k, Sigma_k), in log space through the precision
Cholesky factor U_k (Sigma_k^{-1} = U_k U_k^T), so the Mahalanobis term is a
matmul rather than a triangular solve.

Stats are sums over points, taken about the E-step's means c_k (the `center`
field, shared, not summed):

    counts_k  = sum_n w_n r_nk
    dev_k     = sum_n w_n r_nk (x_n - c_k)                 # [K, D]
    sq_dev_k  = sum_n w_n r_nk (x_n - c_k)(x_n - c_k)^T     # [K, D, D] or [K, D]

Centring on the current means keeps the covariance update free of the
cancellation in E[x x^T] - mu mu^T that breaks float32 (scikit-learn #30382).
No N x K x D x D tensor is ever formed; data are processed in chunks so the
largest intermediate is [chunk, K, D].

#### References

[1] A. P. Dempster, N. M. Laird and D. B. Rubin. Maximum likelihood from
    incomplete data via the EM algorithm. JRSS B, 39(1):1-38, 1977.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from models import gaussian_mixture as gm
from models.gaussian_mixture import GaussianMixtureParams
from tfp_em.engine import EMModel
from tfp_em.engine.chunks import equal_chunks, fixed_chunks, in_chunks
from tfp_em.engine.compiling import compiled
from tfp_em.engine.passes import add_stats
from tfp_em.verification.exact import ExactPosterior, marginalize_discrete

MIN_COUNT_EPS = 10.0  # counts get 10*eps added, as in scikit-learn


class GaussianMixtureStats(NamedTuple):
  counts: tf.Tensor   # [K]
  dev: tf.Tensor      # [K, D]
  sq_dev: tf.Tensor   # [K, D, D] (full, tied) or [K, D] (diag, spherical)
  center: tf.Tensor   # [K, D] E-step means; shared across batches, not summed


class MixtureData(NamedTuple):
  x: tf.Tensor        # [N, D]
  weights: tf.Tensor  # [N]


class ResponsibilityRows(NamedTuple):
  x: tf.Tensor        # [N, D]
  weights: tf.Tensor  # [N]
  resp: tf.Tensor     # [N, K]


# ----------------------------------------------------------------------------
# Pure maths.

def precision_cholesky(covariances, covariance_type: str):
  """U with Sigma^{-1} = U U^T (scikit-learn's `precisions_cholesky_`).

  Shapes: full [K, D, D], tied [D, D], diag [K, D], spherical [K].
  """
  if covariance_type in ("full", "tied"):
    chol = tf.linalg.cholesky(covariances)
    eye = tf.eye(tf.shape(covariances)[-1], batch_shape=tf.shape(covariances)[:-2],
                 dtype=covariances.dtype)
    return tf.linalg.matrix_transpose(tf.linalg.triangular_solve(chol, eye, lower=True))
  return tf.math.rsqrt(covariances)


def log_det_precision_cholesky(prec_chol, covariance_type: str, num_features: int):
  """log |U_k| = 0.5 log |Sigma_k^{-1}|, shape [K] (tied: scalar)."""
  if covariance_type in ("full", "tied"):
    return tf.reduce_sum(tf.math.log(tf.linalg.diag_part(prec_chol)), axis=-1)
  if covariance_type == "diag":
    return tf.reduce_sum(tf.math.log(prec_chol), axis=-1)
  return num_features * tf.math.log(prec_chol)


def component_log_prob(x, means, prec_chol, covariance_type: str):
  """log N(x_n | mu_k, Sigma_k), shape [N, K]."""
  d = x.shape[-1]
  log_det = log_det_precision_cholesky(prec_chol, covariance_type, d)
  shift = tf.reduce_mean(means, axis=0)  # a common offset cancels badly in x U - mu U
  x, means = x - shift, means - shift
  if covariance_type == "full":
    y = tf.einsum("nd,kde->nke", x, prec_chol) - tf.einsum("kd,kde->ke", means, prec_chol)
  elif covariance_type == "tied":
    y = (x @ prec_chol)[:, tf.newaxis, :] - (means @ prec_chol)[tf.newaxis]
  elif covariance_type == "diag":
    y = (x[:, tf.newaxis, :] - means[tf.newaxis]) * prec_chol[tf.newaxis]
  else:
    y = (x[:, tf.newaxis, :] - means[tf.newaxis]) * prec_chol[tf.newaxis, :, tf.newaxis]
  mahalanobis = tf.reduce_sum(tf.square(y), axis=-1)  # [N, K]
  return -0.5 * (d * math.log(2 * math.pi) + mahalanobis) + log_det


def estimate_weights(counts):
  """pi_k = N_k / sum N (counts already floored)."""
  return counts / tf.reduce_sum(counts)


def estimate_means(stats: GaussianMixtureStats, counts):
  """mu_k = c_k + dev_k / N_k."""
  return stats.center + stats.dev / counts[:, tf.newaxis]


def scatter_about(stats: GaussianMixtureStats, means, full: bool):
  """sum_n w r_nk (x_n - mu_k)(x_n - mu_k)^T from stats taken about c_k.

  With delta = mu - c: sq_dev - dev delta^T - delta dev^T + N delta delta^T.
  Returns [K, D, D] if `full`, else its diagonal [K, D].
  """
  delta = means - stats.center  # [K, D]
  n = stats.counts
  if full:
    cross = tf.einsum("kd,ke->kde", stats.dev, delta)
    return (stats.sq_dev - cross - tf.linalg.matrix_transpose(cross)
            + n[:, None, None] * tf.einsum("kd,ke->kde", delta, delta))
  return stats.sq_dev - 2.0 * stats.dev * delta + n[:, None] * tf.square(delta)


def estimate_covariances(stats: GaussianMixtureStats, means, counts,
                         covariance_type: str, reg_covar: float):
  """Sigma_k = scatter_k / N_k + reg I (tied: pooled scatter / sum N)."""
  dtype = stats.counts.dtype
  full = covariance_type in ("full", "tied")
  scatter = scatter_about(stats, means, full)
  if covariance_type == "full":
    d = tf.shape(means)[-1]
    return scatter / counts[:, None, None] + reg_covar * tf.eye(d, dtype=dtype)
  if covariance_type == "tied":
    d = tf.shape(means)[-1]
    return tf.reduce_sum(scatter, 0) / tf.reduce_sum(counts) + reg_covar * tf.eye(d, dtype=dtype)
  diag = scatter / counts[:, None] + reg_covar
  return diag if covariance_type == "diag" else tf.reduce_mean(diag, axis=-1)


def expected_log_joint(params: GaussianMixtureParams, stats: GaussianMixtureStats,
                       covariance_type: str):
  """Q(params | old) = E_{z ~ p(z | x, old)} log p(x, z | params), from stats."""
  d = params.means.shape[-1]
  full = covariance_type in ("full", "tied")
  scatter = scatter_about(stats, params.means, full)
  prec_chol = precision_cholesky(params.covariances, covariance_type)
  half_log_det_prec = log_det_precision_cholesky(prec_chol, covariance_type, d)  # [K] or []
  if covariance_type == "full":
    quad = tf.linalg.trace(tf.linalg.matrix_transpose(prec_chol) @ scatter @ prec_chol)
  elif covariance_type == "tied":
    quad = tf.linalg.trace(tf.linalg.matrix_transpose(prec_chol)[None] @ scatter @ prec_chol[None])
  elif covariance_type == "diag":
    quad = tf.reduce_sum(scatter * tf.square(prec_chol), -1)
  else:
    quad = tf.reduce_sum(scatter, -1) * tf.square(prec_chol)
  n = stats.counts
  per_component = (n * tf.math.log(params.weights)
                   - 0.5 * n * d * math.log(2 * math.pi)
                   + n * half_log_det_prec - 0.5 * quad)
  return tf.reduce_sum(per_component)


def stats_about_centres(rw, x, center, full: bool) -> GaussianMixtureStats:
  """Stats of weighted responsibilities rw [N, K], each component centred on
  its own c_k: no cancellation whatever the dtype. Forms [N, K, D]."""
  xc = x[:, tf.newaxis, :] - center[tf.newaxis]              # [N, K, D]
  counts = tf.reduce_sum(rw, 0)                              # [K]
  dev = tf.einsum("nk,nkd->kd", rw, xc)                      # [K, D]
  if full:
    sq_dev = tf.einsum("nkd,nke->kde", rw[..., tf.newaxis] * xc, xc)  # [K, D, D]
  else:
    sq_dev = tf.einsum("nk,nkd->kd", rw, tf.square(xc))      # [K, D]
  return GaussianMixtureStats(counts, dev, sq_dev, center)


def stats_by_matmul(rw, x, center) -> GaussianMixtureStats:
  """The full/tied stats from one [D, N] x [N, K D] matmul about the mean m
  of the centres, moved to each centre c_k exactly (2-3x faster than
  `stats_about_centres`). The move costs |c_k - m|^2 / sigma_k^2 of
  relative precision: harmless in float64, not in float32."""
  k, d = tf.shape(center)[0], x.shape[-1]
  shift = tf.reduce_mean(center, 0)
  dx = x - shift                                                      # [N, D]
  delta = center - shift                                              # [K, D]
  counts = tf.reduce_sum(rw, 0)                                       # [K]
  first = tf.matmul(rw, dx, transpose_a=True)                         # [K, D]
  weighted = tf.reshape(rw[:, :, tf.newaxis] * dx[:, tf.newaxis], [-1, k * d])   # [N, K D]
  about_shift = tf.transpose(tf.reshape(tf.matmul(dx, weighted, transpose_a=True),
                                        [d, k, d]), [1, 0, 2])        # [K, D, D]
  cross = delta[:, :, tf.newaxis] * first[:, tf.newaxis]              # [K, D, D]
  sq_dev = (about_shift - cross - tf.linalg.matrix_transpose(cross)
            + counts[:, tf.newaxis, tf.newaxis] * delta[:, :, tf.newaxis] * delta[:, tf.newaxis])
  return GaussianMixtureStats(counts, first - counts[:, tf.newaxis] * delta, sq_dev, center)


def default_chunk_size(n_components: int, n_features: int) -> int:
  """Power of two near 2**19 / (K * D) points, at least 256."""
  return max(256, 2 ** int(round(math.log2(2 ** 19 / (n_components * n_features)))))


# ----------------------------------------------------------------------------
# The EMModel.

class GaussianMixtureEM(EMModel):
  """EMModel for `models.gaussian_mixture` (see `tfp_em.engine.EMModel`).

  Args:
    n_components: K.
    covariance_type: 'full', 'tied', 'diag' or 'spherical'.
    reg_covar: added to covariance diagonals after each M-step. With
      `reg_covar > 0` the M-step is no longer the exact argmax of Q.
    init: callable `(x [N, D] numpy, weights [N], seed) -> responsibilities
      [N, K]`; the initial params are the M-step of those (as scikit-learn).
    chunk_size: points per chunk in the E-step (bounds memory to
      chunk_size * K * D numbers). Default: the power of two nearest
      2**19 / (K * D), at least 256, which keeps the [chunk, K, D]
      intermediates in cache (2x faster than 65536-point chunks at
      N=200k, D=K=8, and at N=1M, D=K=16).
    compile: how `fit_em` should compile the steps ('eager'|'graph'|'xla').
    jit_chunks: run the E-step's per-chunk work as an XLA program of a few
      fixed shapes (chunks padded to powers of two), compiled once per
      process and configuration: as fast as compiling the whole step with
      XLA, without compiling again for every new N. Use with compile='graph'.
  """
  name = "GaussianMixture"
  autograph = False  # no Python control flow on tensors in the steps
  trace_exact_rows = 2048  # small data: one chunk, no loop in the trace
  shared_stats_fields = ("center",)
  failure_hint = ("Some components have an ill-defined covariance (collapsed onto a few "
                  "points or duplicates): increase reg_covar, reduce n_components, or "
                  "use dtype='float64'.")

  def __init__(self, n_components: int, covariance_type: str = "full",
               reg_covar: float = 1e-6, init=None, chunk_size: int | None = None,
               compile: str = "graph", jit_chunks: bool = False):
    self.n_components = n_components
    self.covariance_type = gm.check_covariance_type(covariance_type)
    self.reg_covar = reg_covar
    self.init = init
    self.chunk_size = chunk_size  # None: default_chunk_size(K, D)
    self.compile = compile
    self.jit_chunks = bool(jit_chunks)

  @property
  def param_specs(self) -> GaussianMixtureParams:
    return gm.param_specs(self.covariance_type)

  # -- protocol --------------------------------------------------------------
  def num_observations(self, data: MixtureData) -> float:
    return float(tf.reduce_sum(data.weights))

  def initialize(self, data: MixtureData, seed: int) -> GaussianMixtureParams:
    resp = self.init(np.asarray(data.x), np.asarray(data.weights), seed)
    return self.params_from_responsibilities(data, tf.constant(resp, data.x.dtype))

  def e_step(self, params: GaussianMixtureParams, data: MixtureData):
    prec_chol = precision_cholesky(params.covariances, self.covariance_type)
    n, d = data.x.shape
    size = self.chunk_size or default_chunk_size(self.n_components, d)
    if n is not None and n <= size and not self.jit_chunks:
      return self._chunk_stats(params, prec_chol, data.x, data.weights)
    return self._chunked_e_step(params, prec_chol, data, size)  # also for streamed batches

  def m_step(self, params: GaussianMixtureParams, stats: GaussianMixtureStats):
    eps = MIN_COUNT_EPS * np.finfo(stats.counts.dtype.as_numpy_dtype).eps
    counts = stats.counts + eps
    means = estimate_means(stats, counts)
    return GaussianMixtureParams(
        weights=estimate_weights(counts), means=means,
        covariances=estimate_covariances(stats, means, counts, self.covariance_type,
                                         self.reg_covar))

  def expected_log_joint(self, params, stats):
    return expected_log_joint(params, stats, self.covariance_type)

  def rebase_stats(self, stats: GaussianMixtureStats, like: GaussianMixtureStats):
    """The same stats re-expressed about `like.center` (exact algebra)."""
    full = self.covariance_type in ("full", "tied")
    shift = stats.center - like.center  # [K, D]
    return GaussianMixtureStats(
        counts=stats.counts, dev=stats.dev + stats.counts[:, tf.newaxis] * shift,
        sq_dev=scatter_about(stats, like.center, full), center=like.center)

  def marginal_log_prob(self, params, data: MixtureData):
    lp = gm.marginal(params, self.covariance_type).log_prob(data.x)
    return tf.reduce_sum(data.weights * lp)

  # -- helpers ---------------------------------------------------------------
  def one_off_mode(self) -> str:
    """How to run a step called a few times per fit (initialization, predict):
    a cached graph (traced once per configuration), or eagerly under 'eager'."""
    return "eager" if self.compile == "eager" else "graph"

  def log_prob_components(self, params, x):
    """log w_k + log N(x_n | k), shape [N, K]."""
    prec_chol = precision_cholesky(params.covariances, self.covariance_type)
    return (component_log_prob(x, params.means, prec_chol, self.covariance_type)
            + tf.math.log(params.weights))

  def posterior(self, params, data: MixtureData):
    """E-step posterior: {'responsibilities': [N, K]}."""
    log_joint = self.log_prob_components(params, data.x)
    return {"responsibilities": tf.nn.softmax(log_joint, axis=-1)}

  @property
  def component_axes(self):
    """Label switching permutes weights, means and (untied) covariances along axis 0."""
    axes = {"weights": 0, "means": 0}
    if self.covariance_type != "tied":
      axes["covariances"] = 0
    return axes

  def verification_oracle(self, params, data: MixtureData) -> ExactPosterior:
    """Enumerates z in `models.gaussian_mixture.joint`; weighted data use the TFP mixture."""
    exact = marginalize_discrete(lambda: gm.joint(params, self.covariance_type, data.x.shape[0]),
                                 {"z": self.n_components}, {"x": data.x})
    log_prob = exact.log_prob
    if not np.allclose(np.asarray(data.weights), 1.0):
      log_prob = tf.reduce_sum(
          data.weights * gm.marginal(params, self.covariance_type).log_prob(data.x))
    return ExactPosterior(log_prob, {"responsibilities": exact.posterior["z"]})

  def params_from_responsibilities(self, data: MixtureData, resp):
    """M-step of the stats implied by `resp` [N, K] (used for initialization),
    compiled once per configuration (`tfp_em.engine.compiling.compiled`)."""
    step = compiled(self, "params_from_responsibilities",
                    lambda: self._params_from_responsibilities,
                    self.one_off_mode(), data_arg=-1)
    return step(ResponsibilityRows(data.x, data.weights, resp))

  def _params_from_responsibilities(self, rows: ResponsibilityRows):
    """Two passes: the stats are taken about the responsibility-weighted
    means, so no cancellation occurs far from the origin. In the E-step's row
    chunks: an [N, K, D] intermediate would otherwise be the fit's memory
    peak (1 GB at N=262144, K=8, D=16)."""
    rw = rows.resp * rows.weights[:, tf.newaxis]                                # [N, K]
    center = tf.math.divide_no_nan(tf.transpose(rw) @ rows.x,
                                   tf.reduce_sum(rw, 0)[:, tf.newaxis])         # [K, D]
    size = self.chunk_size or default_chunk_size(self.n_components, rows.x.shape[1])
    n_chunks, chunk = equal_chunks(tf.shape(rows.x)[0], size)
    xs, ws, rs = (in_chunks(t, n_chunks, chunk) for t in rows)

    def body(i, acc):
      return i + 1, add_stats(self, acc, self._stats_from_resp(rs[i], xs[i], ws[i], center))

    _, stats = tf.while_loop(lambda i, _: i < n_chunks, body,
                             (tf.constant(0), self._zero_stats(center)))
    return self.m_step(None, stats)

  def _stats_from_resp(self, resp, x, weights, center):
    rw = resp * weights[:, tf.newaxis]                         # [N, K]
    full = self.covariance_type in ("full", "tied")
    if full and x.dtype == tf.float64:
      return stats_by_matmul(rw, x, center)
    return stats_about_centres(rw, x, center, full)

  def _chunk_stats(self, params, prec_chol, x, weights):
    log_joint = (component_log_prob(x, params.means, prec_chol, self.covariance_type)
                 + tf.math.log(params.weights))                 # [N, K]
    log_norm = tf.reduce_logsumexp(log_joint, axis=-1)         # [N]
    resp = tf.exp(log_joint - log_norm[:, tf.newaxis])         # [N, K]
    stats = self._stats_from_resp(resp, x, weights, params.means)
    return stats, tf.reduce_sum(weights * log_norm)

  def _chunked_e_step(self, params, prec_chol, data, size):
    """The E-step over chunks of at most `size` rows (N may be unknown when
    traced); the last chunk is padded with rows of weight 0. With `jit_chunks`,
    each chunk runs one XLA program of a few fixed shapes, compiled once per
    process for every N."""
    n = tf.shape(data.x)[0]
    if self.jit_chunks:
      n_chunks, rows = fixed_chunks(n, size)
      kernel = compiled(self, "chunk_stats", lambda: self._chunk_stats, "xla")
    else:
      n_chunks, rows = equal_chunks(n, size)
      kernel = self._chunk_stats
    x = in_chunks(data.x, n_chunks, rows)                       # [n_chunks, rows, D]
    w = in_chunks(data.weights, n_chunks, rows)                 # [n_chunks, rows]

    def body(i, acc_stats, acc_ll):
      stats, ll = kernel(params, prec_chol, x[i], w[i])
      summed = GaussianMixtureStats(acc_stats.counts + stats.counts, acc_stats.dev + stats.dev,
                                    acc_stats.sq_dev + stats.sq_dev, stats.center)
      return i + 1, summed, acc_ll + ll

    _, stats, ll = tf.while_loop(lambda i, *_: i < n_chunks, body,
                                 (tf.constant(0), self._zero_stats(params.means),
                                  tf.zeros([], params.means.dtype)))
    return stats, ll

  def _zero_stats(self, center) -> GaussianMixtureStats:
    """Stats of no points, about `center` [K, D]."""
    full = self.covariance_type in ("full", "tied")
    sq_dev = (tf.zeros(tf.concat([tf.shape(center), tf.shape(center)[-1:]], 0), center.dtype)
              if full else tf.zeros_like(center))
    return GaussianMixtureStats(tf.zeros_like(center[:, 0]), tf.zeros_like(center), sq_dev, center)
