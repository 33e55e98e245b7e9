"""`GaussianMixtureEM` for data with entries missing at random (NaN in `MixtureData.x`).

The E-step conditions each row's missing coordinates on its observed ones,
one pattern of missingness at a time (`tfp_em.mixture.missing`); l is the
log-likelihood of the observed coordinates; the statistics are the
complete-data ones, so the M-step, Q and every covariance type are those of
`GaussianMixtureEM`. The reference for the verifier is the TFP mixture of the
observed sub-vectors (`models.gaussian_mixture_missing`).

The E-step groups rows by pattern with dynamic shapes: it runs as a graph,
never under XLA (`jit_chunks` is off).

#### References

[1] R. J. A. Little and D. B. Rubin. Statistical Analysis with Missing Data,
    2nd ed., section 11.2. Wiley, 2002.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from models import gaussian_mixture_missing as gmm_missing
from tfp_em.engine.compiling import compiled
from tfp_em.engine.passes import add_stats
from tfp_em.mixture import missing as mv
from tfp_em.mixture.em import GaussianMixtureEM, MixtureData, default_chunk_size, full_stats
from tfp_em.verification.exact import ExactPosterior


class MissingValuesGaussianMixtureEM(GaussianMixtureEM):
  """EMModel of a Gaussian mixture whose data `x` [N, D] may hold NaN (missing at random).

  Args: as `GaussianMixtureEM`, without `jit_chunks`. Rows with every entry
  missing carry no information; callers reject them (`GaussianMixture.fit`).
  """
  name = "GaussianMixture (missing values)"
  trace_exact_rows = 0  # the E-step loops over patterns whatever N is
  traced_component_axes = {}  # its steps size blocks by K: traced per K

  def __init__(self, n_components: int, covariance_type: str = "full",
               reg_covar: float = 1e-6, init=None, chunk_size: int | None = None,
               compile: str = "graph"):
    super().__init__(n_components, covariance_type, reg_covar, init=init,
                     chunk_size=chunk_size, compile=compile, jit_chunks=False)

  # -- protocol --------------------------------------------------------------
  def initialize(self, data: MixtureData, seed: int):
    """The complete-data start on rows whose gaps hold their column's mean."""
    w = np.asarray(data.weights)
    filled = mv.fill_column_means(np.asarray(data.x), w)                # [N, D]
    resp = self.init(filled, w, seed)                                     # [N, K]
    return self.params_from_responsibilities(MixtureData(tf.constant(filled), data.weights),
                                             tf.constant(resp, data.x.dtype))

  def e_step(self, params, data: MixtureData):
    covariances = mv.dense_covariances(params, self.covariance_type)    # [K, D, D]
    full = full_stats(self.covariance_type)

    def step(acc, b, rows, x0, mask):
      stats, loglik = acc
      cond = self.conditional(params.means, covariances, x0, mask)
      resp, log_norm = mv.responsibilities(cond.log_prob, params.weights)
      w = tf.gather(data.weights, rows)                                  # [n]
      block = mv.expected_stats(resp * w[:, tf.newaxis], cond, params.means, full)
      return add_stats(self, stats, block), loglik + tf.reduce_sum(w * log_norm)

    zero = mv.no_stats(params.means, full)
    (stats, loglik), _ = mv.fold_blocks(data.x, *self._sizes(data.x), step,
                                        (zero, tf.zeros([], params.means.dtype)))
    return stats, loglik

  def marginal_log_prob(self, params, data: MixtureData):
    lp = gmm_missing.observed_log_prob(params, self.covariance_type, data.x)
    return tf.reduce_sum(data.weights * lp)

  # -- helpers ---------------------------------------------------------------
  def conditional(self, means, covariances, x0, mask) -> mv.Conditional:
    """A block's rows x0 [G, R, D] with masks [G, D] given each component
    (`tfp_em.mixture.missing.conditional`): the one place the E-step,
    `log_prob_components` and `conditional_means` condition."""
    return mv.conditional(x0, mask, means, covariances)

  def _sizes(self, x) -> tuple[int, int]:
    """(rows per block, rows from which a pattern gets blocks of its own)."""
    d = x.shape[-1]
    return (self.chunk_size or default_chunk_size(self.n_components, d),
            mv.shared_pattern_rows(self.n_components, d))

  def log_prob_components(self, params, x):
    """log w_k + log N(x_o | mu_ko, Sigma_koo), shape [N, K] (NaN entries of x are missing)."""
    covariances = mv.dense_covariances(params, self.covariance_type)

    def row_fn(rows, x0, mask):
      return self.conditional(params.means, covariances, x0, mask).log_prob
    return (mv.map_rows(x, *self._sizes(x), row_fn, x.dtype, [self.n_components])
            + tf.math.log(params.weights))

  def conditional_means(self, params, x):
    """E[x_n | x_{n,o}] = sum_k p(k | x_{n,o}) E[x_n | x_{n,o}, k], shape [N, D]:
    x where observed, the mixture's conditional mean where missing."""
    covariances = mv.dense_covariances(params, self.covariance_type)

    def row_fn(rows, x0, mask):
      cond = self.conditional(params.means, covariances, x0, mask)
      resp, _ = mv.responsibilities(cond.log_prob, params.weights)       # [n, K]
      return tf.einsum("nk,nkd->nd", resp, cond.mean)
    means = mv.map_rows(x, *self._sizes(x), row_fn, x.dtype, [x.shape[-1]])
    return tf.where(tf.math.is_nan(x), means, x)

  def impute(self, params, x):
    """`conditional_means`, compiled once per configuration."""
    step = compiled(self, "conditional_means", lambda m: m.conditional_means,
                    self.one_off_mode(), data_arg=-1)
    return step(params, x)

  def verification_oracle(self, params, data: MixtureData) -> ExactPosterior:
    """The TFP mixture of the observed sub-vectors, row by row."""
    return ExactPosterior(
        self.marginal_log_prob(params, data),
        {"responsibilities": gmm_missing.observed_responsibilities(
            params, self.covariance_type, data.x)})
