"""Closed-form EM for Gaussian mixtures, derived from `models.gaussian_mixture`.

E-step: r_nk ∝ w_k N(x_n | mu_k, Sigma_k), in log space through the precision
Cholesky factor U_k (Sigma_k^{-1} = U_k U_k^T), so the Mahalanobis term is a
matmul rather than a triangular solve.

The stats (`tfp_em.mixture.stats`) are sums over points about the E-step's
means; the M-step needs nothing else. mclust's ten constrained covariance
models take their M-step from `tfp_em.mixture.covariance_models`. No N x K x D x D tensor is ever formed; data are processed in chunks so the
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
from models.gaussian_mixture import GaussianMixtureParams, covariance_layout
from tfp_em.engine import EMModel
from tfp_em.engine.chunks import equal_chunks, fixed_chunks, in_chunks
from tfp_em.engine.compiling import compiled
from tfp_em.engine.passes import add_stats
from tfp_em.mixture.covariance_models import GENERALIZED_MODELS, constrained_covariances
from tfp_em.mixture.stats import (GaussianMixtureStats, scatter_about, stats_about_centres,
                                  stats_by_matmul)
from tfp_em.verification.exact import ExactPosterior, marginalize_discrete

MIN_COUNT_EPS = 10.0  # counts get 10*eps added, as in scikit-learn


class MixtureData(NamedTuple):
  x: tf.Tensor        # [N, D]
  weights: tf.Tensor  # [N]


class ResponsibilityRows(NamedTuple):
  x: tf.Tensor        # [N, D]
  weights: tf.Tensor  # [N]
  resp: tf.Tensor     # [N, K]


# ----------------------------------------------------------------------------
# Pure maths.

def full_stats(covariance_type: str) -> bool:
  """Whether the stats hold full [K, D, D] second moments (else diagonals)."""
  return covariance_layout(covariance_type) in ("full", "tied")


def precision_cholesky(covariances, covariance_type: str):
  """U with Sigma^{-1} = U U^T (scikit-learn's `precisions_cholesky_`).

  Shapes (`covariance_layout`): full [K, D, D], tied [D, D], diag [K, D], spherical [K].
  """
  if full_stats(covariance_type):
    chol = tf.linalg.cholesky(covariances)
    eye = tf.eye(tf.shape(covariances)[-1], batch_shape=tf.shape(covariances)[:-2],
                 dtype=covariances.dtype)
    return tf.linalg.matrix_transpose(tf.linalg.triangular_solve(chol, eye, lower=True))
  return tf.math.rsqrt(covariances)


def log_det_precision_cholesky(prec_chol, covariance_type: str, num_features: int):
  """log |U_k| = 0.5 log |Sigma_k^{-1}|, shape [K] (tied: scalar)."""
  if full_stats(covariance_type):
    return tf.reduce_sum(tf.math.log(tf.linalg.diag_part(prec_chol)), axis=-1)
  if covariance_layout(covariance_type) == "diag":
    return tf.reduce_sum(tf.math.log(prec_chol), axis=-1)
  return num_features * tf.math.log(prec_chol)


def component_log_prob(x, means, prec_chol, covariance_type: str):
  """log N(x_n | mu_k, Sigma_k), shape [N, K]."""
  d = x.shape[-1]
  log_det = log_det_precision_cholesky(prec_chol, covariance_type, d)
  shift = tf.reduce_mean(means, axis=0)  # a common offset cancels badly in x U - mu U
  x, means = x - shift, means - shift
  layout = covariance_layout(covariance_type)
  if layout == "full":
    y = tf.einsum("nd,kde->nke", x, prec_chol) - tf.einsum("kd,kde->ke", means, prec_chol)
  elif layout == "tied":
    y = (x @ prec_chol)[:, tf.newaxis, :] - (means @ prec_chol)[tf.newaxis]
  elif layout == "diag":
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


def estimate_covariances(stats: GaussianMixtureStats, means, counts,
                         covariance_type: str, reg_covar: float, previous=None):
  """Sigma_k = scatter_k / N_k + reg I (tied: pooled scatter / sum N); mclust's
  constrained models: `constrained_covariances` (which starts from `previous`)."""
  dtype = stats.counts.dtype
  covariance_type = gm.canonical_type(covariance_type)
  scatter = scatter_about(stats, means, full_stats(covariance_type))
  if covariance_layout(covariance_type) != covariance_type:
    return constrained_covariances(covariance_type, scatter, counts, reg_covar, previous)
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
  scatter = scatter_about(stats, params.means, full_stats(covariance_type))
  prec_chol = precision_cholesky(params.covariances, covariance_type)
  half_log_det_prec = log_det_precision_cholesky(prec_chol, covariance_type, d)  # [K] or []
  layout = covariance_layout(covariance_type)
  if layout == "full":
    quad = tf.linalg.trace(tf.linalg.matrix_transpose(prec_chol) @ scatter @ prec_chol)
  elif layout == "tied":
    quad = tf.linalg.trace(tf.linalg.matrix_transpose(prec_chol)[None] @ scatter @ prec_chol[None])
  elif layout == "diag":
    quad = tf.reduce_sum(scatter * tf.square(prec_chol), -1)
  else:
    quad = tf.reduce_sum(scatter, -1) * tf.square(prec_chol)
  n = stats.counts
  per_component = (n * tf.math.log(params.weights)
                   - 0.5 * n * d * math.log(2 * math.pi)
                   + n * half_log_det_prec - 0.5 * quad)
  return tf.reduce_sum(per_component)


MIN_CHUNK_ROWS = 256


def default_chunk_size(n_components, n_features: int):
  """Power of two near 2**19 / (K * D) points, at least `MIN_CHUNK_ROWS`
  (an int32 tensor when K is one)."""
  if not tf.is_tensor(n_components):
    return max(MIN_CHUNK_ROWS, 2 ** int(round(math.log2(2 ** 19 / (n_components * n_features)))))
  log2_size = 19.0 - tf.math.log(tf.cast(n_components * n_features, tf.float64)) / math.log(2.0)
  exponent = tf.maximum(tf.round(log2_size), math.log2(MIN_CHUNK_ROWS))  # round: half to even
  return tf.bitwise.left_shift(1, tf.cast(exponent, tf.int32))


# ----------------------------------------------------------------------------
# The EMModel.

class GaussianMixtureEM(EMModel):
  """EMModel for `models.gaussian_mixture` (see `tfp_em.engine.EMModel`).

  Args:
    n_components: K.
    covariance_type: 'full', 'tied', 'diag', 'spherical' or one of mclust's 14
      models (`models.gaussian_mixture.MCLUST_MODELS`); VII, VVI, EEE and
      VVV are spherical, diag, tied and full.
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
    self.covariance_type = gm.canonical_type(covariance_type)
    if self.covariance_type in GENERALIZED_MODELS:  # an M-step that only increases Q
      self.generalized_m_step_fields = ("covariances",)
    self.reg_covar = reg_covar
    self.init = init
    self.chunk_size = chunk_size  # None: default_chunk_size(K, D)
    self.compile = compile
    self.jit_chunks = bool(jit_chunks)

  @property
  def param_specs(self) -> GaussianMixtureParams:
    return gm.param_specs(self.covariance_type)

  @property
  def traced_component_axes(self):
    """K's axes in params, stats and responsibilities: one trace serves every K
    (under XLA, `jit_chunks`, one program per K is still compiled)."""
    return {GaussianMixtureParams: self.component_axes,
            GaussianMixtureStats: dict.fromkeys(GaussianMixtureStats._fields, 0),
            ResponsibilityRows: {"resp": 1}}

  def step_config(self):
    """The default, less K and the initializer (which holds K) when the steps
    read K from the shapes of their arguments (`traced_component_axes`)."""
    config = super().step_config()
    if config is None or not self.traced_component_axes:  # a subclass that traces per K
      return config
    return tuple((name, value) for name, value in config if name not in ("n_components", "init"))

  def chunk_rows(self, means):
    """Rows per E-step chunk for means [K, D]: `chunk_size`, else
    `default_chunk_size` (a tensor when K is unknown in the trace)."""
    k = means.shape[0] if means.shape[0] is not None else tf.shape(means)[0]
    return self.chunk_size or default_chunk_size(k, means.shape[-1])

  # -- protocol --------------------------------------------------------------
  def num_observations(self, data: MixtureData) -> float:
    return float(tf.reduce_sum(data.weights))

  def initialize(self, data: MixtureData, seed: int) -> GaussianMixtureParams:
    resp = self.init(np.asarray(data.x), np.asarray(data.weights), seed)
    return self.params_from_responsibilities(data, tf.constant(resp, data.x.dtype))

  def e_step(self, params: GaussianMixtureParams, data: MixtureData):
    prec_chol = precision_cholesky(params.covariances, self.covariance_type)
    n = data.x.shape[0]
    size = self.chunk_rows(params.means)
    if n is None or self.jit_chunks:  # also for streamed batches
      return self._chunked_e_step(params, prec_chol, data, size)

    def in_one_chunk():
      return self._chunk_stats(params, prec_chol, data.x, data.weights)

    def chunked():
      return self._chunked_e_step(params, prec_chol, data, size)
    if not tf.is_tensor(size):
      return in_one_chunk() if n <= size else chunked()
    if n <= MIN_CHUNK_ROWS:  # one chunk whatever K
      return in_one_chunk()
    return tf.cond(n <= size, in_one_chunk, chunked)  # K unknown in the trace: both traced

  def m_step(self, params: GaussianMixtureParams, stats: GaussianMixtureStats):
    eps = MIN_COUNT_EPS * np.finfo(stats.counts.dtype.as_numpy_dtype).eps
    counts = stats.counts + eps
    means = estimate_means(stats, counts)
    return GaussianMixtureParams(
        weights=estimate_weights(counts), means=means,
        covariances=estimate_covariances(stats, means, counts, self.covariance_type,
                                         self.reg_covar, None if params is None
                                         else params.covariances))

  def expected_log_joint(self, params, stats):
    return expected_log_joint(params, stats, self.covariance_type)

  def rebase_stats(self, stats: GaussianMixtureStats, like: GaussianMixtureStats):
    """The same stats re-expressed about `like.center` (exact algebra)."""
    shift = stats.center - like.center  # [K, D]
    return GaussianMixtureStats(
        counts=stats.counts, dev=stats.dev + stats.counts[:, tf.newaxis] * shift,
        sq_dev=scatter_about(stats, like.center, full_stats(self.covariance_type)),
        center=like.center)

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
    if covariance_layout(self.covariance_type) != "tied":
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
                    lambda m: m._params_from_responsibilities,
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
    n_chunks, chunk = equal_chunks(tf.shape(rows.x)[0], self.chunk_rows(center))
    xs, ws, rs = (in_chunks(t, n_chunks, chunk) for t in rows)

    def body(i, acc):
      return i + 1, add_stats(self, acc, self._stats_from_resp(rs[i], xs[i], ws[i], center))

    _, stats = tf.while_loop(lambda i, _: i < n_chunks, body,
                             (tf.constant(0), self._zero_stats(center)))
    return self.m_step(None, stats)

  def _stats_from_resp(self, resp, x, weights, center):
    rw = resp * weights[:, tf.newaxis]                         # [N, K]
    full = full_stats(self.covariance_type)
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
    if self.jit_chunks and tf.is_tensor(size):  # K unknown: shapes up to K = 1's size
      _, rows = fixed_chunks(n, default_chunk_size(1, data.x.shape[-1]))
      rows = tf.minimum(rows, size)  # = fixed_chunks(n, size): size is one of its powers of 2
      n_chunks = equal_chunks(n, rows)[0]
      kernel = compiled(self, "chunk_stats", lambda m: m._chunk_stats, "xla")
    elif self.jit_chunks:
      n_chunks, rows = fixed_chunks(n, size)
      kernel = compiled(self, "chunk_stats", lambda m: m._chunk_stats, "xla")
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
    sq_dev = (tf.zeros(tf.concat([tf.shape(center), tf.shape(center)[-1:]], 0), center.dtype)
              if full_stats(self.covariance_type) else tf.zeros_like(center))
    return GaussianMixtureStats(tf.zeros_like(center[:, 0]), tf.zeros_like(center), sq_dev, center)
