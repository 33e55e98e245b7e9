"""EM for the Bernoulli-hidden-unit MLP from statistics that are sums over points.

`BernoulliMLPEM` keeps the soft hidden targets of every point, so its M-step
can maximize Q exactly but its statistics cannot be added over batches or
replicas. `BernoulliMLPSummedEM` keeps only sums, at the E-step's weights w0:

  config_counts      C[z, i] = sum_j tau_j(z) y_ji                       [K, C]
  hidden_gradient    g_h = sum_j (t_hj - u_hj) x~_j  (dQ_h/dw_h at w0)    [m, P]
  hidden_curvatures  [0]: -d2Q_h/dw_h^2 = sum_j u(1 - u) x~ x~^T;
                     [1 + r]: the bounds A_h(RADII[r]) of `curvature`     [1 + R, m, P, P]
  hidden_q           Q_h(w0 | w0) = sum_j t_hj a_hj - softplus(a_hj)      [m]
  num_points         sum_j 1                                              []
  anchor             w0 (shared: the same in every batch)                [P, m]

M-step (an ECM / generalized M-step): the output layer is maximized exactly
from the counts, as in `BernoulliMLPEM`; each hidden unit takes one step
from w0, the best of the Newton steps s d (s = 1, 1/2, ..., 2^-9; d solves
(-H + l2 I') d = g), the Jaakkola-Jordan MM step and 0, judged by a certified
lower bound on its gain in Q (`curvature.certified_gain`). The bound is exact
(no approximation: Q(w0 + delta) - Q(w0) >= the bound for every delta), so Q,
and with it the log-likelihood, never decreases, and everything the M-step
needs comes from one pass of summed statistics.

`expected_log_joint` returns that lower bound, Q~(w | w0) <= Q(w | w0), equal
to Q with the same gradient at w0 (so Fisher's identity holds there) and the
function the M-step increases. Q itself is not a function of finite sums.

The L2 penalty (l2 / 2)|w|^2 (a log prior) belongs to the whole data set.
A batch or a replica carries the share num_points / total_rows of it, so
that a pass over batches or replicas subtracts it once, and online EM's
per-point statistics carry 1 / total_rows of it. So `total_rows` (N) is
required when l2 > 0: without it a stream of B batches would report a loglik
with the penalty counted B times. `e_step`, `marginal_log_prob` and the
verifier's oracle all subtract `penalty(params, rows)` (`BernoulliMLPEM`),
so on all N rows they give the penalized objective.

Online EM blends statistics of different anchors: `rebase_stats` moves them
to the newest anchor along their quadratic model (g -= H delta); there the
certificate is approximate, as online EM is.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import tensorflow as tf

from models import bernoulli_mlp as mlp
from models.bernoulli_mlp import BernoulliMLPParams
from tfp_em.bernoulli_mlp.curvature import RADII, certified_gain, remainder_curvature
from tfp_em.bernoulli_mlp.em import BernoulliMLPEM
from tfp_em.bernoulli_mlp.newton import NUM_HALVINGS, penalty_mask
from tfp_em.engine import inputs as v
from tfp_em.engine.chunks import equal_chunks, in_chunks


class BernoulliMLPSummedStats(NamedTuple):
  """E-step output of `BernoulliMLPSummedEM`: every field but `anchor` is a sum."""
  anchor: tf.Tensor             # [P, m]      hidden weights at the E-step (shared)
  config_counts: tf.Tensor      # [K, C]
  hidden_gradient: tf.Tensor    # [m, P]
  hidden_curvatures: tf.Tensor  # [1 + R, m, P, P]
  hidden_q: tf.Tensor           # [m]
  num_points: tf.Tensor         # []


class BernoulliMLPSummedEM(BernoulliMLPEM):
  """`BernoulliMLPEM` with summed statistics and a one-step certified M-step.

  Streams over `tf.data`, runs under `tf.distribute` and fits online.

  Args:
    num_hidden, num_classes, l2, memory_budget_bytes, compile,
      max_newton_iter, init_scale: as `BernoulliMLPEM` (`max_newton_iter`
      applies to the output layer).
    total_rows: N, the rows the penalty is spread over (each row carries
      1 / N of it); required when l2 > 0 (a ValueError otherwise). May be
      None when l2 = 0.
  """
  name = "BernoulliMLP(summed)"
  per_point_stats_fields = ()
  shared_stats_fields = ("anchor",)
  generalized_m_step_fields = ("hidden_weights",)

  def __init__(self, num_hidden: int, num_classes: int, l2: float = 0.,
               total_rows: int | None = None, **kwargs):
    super().__init__(num_hidden, num_classes, l2=l2, **kwargs)
    if total_rows is None and self.l2 > 0:
      raise ValueError(
          f"{self.name}: total_rows is required when l2 > 0 (got l2={self.l2}): the penalty "
          "belongs to the whole data set and each batch or replica subtracts its share "
          "rows / total_rows, so that a pass over a stream counts it once; give "
          "total_rows=N, the number of rows of the data")
    self.total_rows = None if total_rows is None else v.check_int("total_rows", total_rows,
                                                                   minimum=1)

  def penalty_share(self, num_points):
    """The share of the penalty that `num_points` rows carry: num_points / N
    (1 when l2 = 0 and N is not given: there is no penalty to share)."""
    if self.total_rows is None:
      return tf.ones_like(num_points)
    return num_points / self.total_rows

  def summed_chunk_rows(self, dtype, num_inputs: int) -> int:
    """Rows per chunk: the [rows, 2^m] arrays and the [rows, P^2] outer
    products fit the memory budget."""
    itemsize = tf.as_dtype(dtype).size
    p = num_inputs + 1
    per_row = 4 * self.num_configurations + 2 * p * p + 3 * self.num_hidden * (len(RADII) + 1)
    return max(1, min(self.memory_budget_bytes // (per_row * itemsize), self.e_step_rows(dtype)))

  # -- E-step ---------------------------------------------------------------

  def _chunk_sums(self, params, inputs, onehot, weights, configs):
    """Summed statistics of one chunk (padding rows have weight 0 and x~ = 0)."""
    tau, loglik = self.normalize(self.log_joint(params, inputs, onehot, configs))
    targets = tf.matmul(tau, configs)                                  # [n, m]
    logits = tf.matmul(inputs, params.hidden_weights)                  # [n, m]
    weights_t = tf.transpose(params.hidden_weights)
    gradient = self.hidden_gradient(weights_t, inputs, targets, 0.)     # [m, P]
    q = tf.linalg.matvec(tf.transpose(targets * logits - tf.nn.softplus(logits)), weights)
    norms = tf.norm(inputs, axis=-1)                                   # [n]
    finite = tf.constant(RADII[:-1], inputs.dtype)
    reach = tf.concat([norms[:, tf.newaxis] * finite,
                       tf.fill([tf.shape(norms)[0], 1], tf.constant(np.inf, inputs.dtype))], -1)
    probs = tf.sigmoid(logits)
    curv = tf.concat([(probs * (1. - probs))[:, :, tf.newaxis],
                      remainder_curvature(logits[:, :, tf.newaxis], reach[:, tf.newaxis, :])],
                     -1)                                               # [n, m, 1 + R]
    p = inputs.shape[-1]
    outer = tf.reshape(inputs[:, :, tf.newaxis] * inputs[:, tf.newaxis, :], [-1, p * p])
    n = tf.shape(inputs)[0]
    mats = tf.matmul(tf.reshape(curv, [n, -1]), outer, transpose_a=True)  # [m (1 + R), P^2]
    mats = tf.transpose(tf.reshape(mats, [self.num_hidden, len(RADII) + 1, p, p]), [1, 0, 2, 3])
    return (tf.matmul(tau, onehot, transpose_a=True), gradient, mats, q,
            tf.reduce_sum(weights * loglik))

  def e_step(self, params, data):
    x, y = data
    dtype = params.hidden_weights.dtype
    configs = self.configurations(dtype)
    inputs = mlp.add_bias(x)
    onehot = tf.one_hot(y, self.num_classes, dtype=dtype)
    rows = self.summed_chunk_rows(dtype, x.shape[-1])
    n = x.shape[0]
    if n is not None and self.total_rows is not None and n > self.total_rows:
      raise ValueError(f"{self.name}: the data have {n} rows, more than total_rows="
                       f"{self.total_rows}; give the number of rows of the whole data set")
    if n is not None and n <= rows:
      sums = self._chunk_sums(params, inputs, onehot, tf.ones([n], dtype), configs)
    else:  # Loop over chunks of at most `rows` points; the last one is zero-padded.
      n = tf.shape(x)[0]
      num_chunks, chunk = equal_chunks(n, rows)
      xs = in_chunks(inputs, num_chunks, chunk)                    # [chunks, chunk, D + 1]
      ys = in_chunks(onehot, num_chunks, chunk)                    # [chunks, chunk, C]
      ws = in_chunks(tf.ones([n], dtype), num_chunks, chunk)       # [chunks, chunk]
      p, m = inputs.shape[-1], self.num_hidden
      zeros = (tf.zeros([2 ** m, self.num_classes], dtype), tf.zeros([m, p], dtype),
               tf.zeros([len(RADII) + 1, m, p, p], dtype), tf.zeros([m], dtype),
               tf.zeros([], dtype))

      def body(i, *totals):
        part = self._chunk_sums(params, xs[i], ys[i], ws[i], configs)
        return (i + 1,) + tuple(a + b for a, b in zip(totals, part))

      sums = tf.while_loop(lambda i, *_: i < num_chunks, body, (tf.constant(0),) + zeros)[1:]
    counts, gradient, curvatures, q, total = sums
    points = tf.cast(tf.shape(x)[0], dtype)
    stats = BernoulliMLPSummedStats(params.hidden_weights, counts, gradient, curvatures, q, points)
    return stats, total - self.penalty(params, points)

  def rebase_stats(self, stats, like):
    """`stats` moved to the anchor of `like` along their quadratic model."""
    delta = tf.transpose(like.anchor - stats.anchor)                   # [m, P]
    hessian = stats.hidden_curvatures[0]
    h_delta = tf.linalg.matvec(hessian, delta)
    q = (stats.hidden_q + tf.reduce_sum(stats.hidden_gradient * delta, -1)
         - 0.5 * tf.reduce_sum(delta * h_delta, -1))
    return stats._replace(anchor=like.anchor, hidden_gradient=stats.hidden_gradient - h_delta,
                          hidden_q=q)

  # -- M-step ---------------------------------------------------------------

  def hidden_step(self, stats):
    """The certified step of every hidden unit from the anchor, [m, P]."""
    anchor = tf.transpose(stats.anchor)                                # [m, P]
    dtype = anchor.dtype
    l2 = self.l2 * self.penalty_share(stats.num_points)
    l2_diag = l2 * penalty_mask(anchor.shape[-1], dtype)               # [P]
    gradient = stats.hidden_gradient - l2_diag * anchor
    bounds = stats.hidden_curvatures[1:]
    newton = self.direction(gradient, stats.hidden_curvatures[0] + tf.linalg.diag(l2_diag))
    newton = tf.where(tf.reduce_all(tf.math.is_finite(newton), -1, keepdims=True), newton, gradient)
    majorized = self.direction(gradient, 2. * bounds[-1] + tf.linalg.diag(l2_diag))
    steps = tf.constant(0.5 ** np.arange(NUM_HALVINGS), dtype)
    candidates = tf.concat([steps[:, tf.newaxis, tf.newaxis] * newton,
                            majorized[tf.newaxis], tf.zeros_like(anchor)[tf.newaxis]], 0)
    gains = certified_gain(candidates, gradient, bounds, l2_diag)      # [S, m]
    gains = tf.where(tf.math.is_finite(gains), gains, tf.constant(-np.inf, dtype))
    best = tf.argmax(gains, axis=0, output_type=tf.int32)              # [m]
    return tf.gather(tf.transpose(candidates, [1, 0, 2]), best, batch_dims=1)

  def m_step(self, params, stats):
    hidden = tf.transpose(stats.anchor) + self.hidden_step(stats)
    output = self.output_m_step(params.output_weights, stats.config_counts,
                                self.l2 * self.penalty_share(stats.num_points))
    return BernoulliMLPParams(tf.transpose(hidden), output)

  def expected_log_joint(self, params, stats):
    """Q~(params | anchor) - penalty: Q's certified lower bound (equal at the anchor)."""
    delta = tf.transpose(params.hidden_weights - stats.anchor)         # [m, P]
    zero = tf.zeros([delta.shape[-1]], delta.dtype)
    hidden = stats.hidden_q + certified_gain(delta, stats.hidden_gradient,
                                             stats.hidden_curvatures[1:], zero)
    l2 = self.l2 * self.penalty_share(stats.num_points)
    penalty = 0.5 * l2 * tf.reduce_sum(tf.square(params.hidden_weights[1:]))
    return (tf.reduce_sum(hidden) - penalty
            + self.output_objective(params.output_weights, stats.config_counts, l2))


M_STEPS = {"exact": BernoulliMLPEM, "summed": BernoulliMLPSummedEM}
M_STEP_OPTIONS = ("auto",) + tuple(M_STEPS)


def resolve_m_step(m_step: str, batched: bool) -> str:
  """The M-step that `m_step` ('auto', 'exact' or 'summed') names for data that
  come in batches or replicas (`batched`: a tf.data stream or a strategy) or
  not: 'auto' is 'summed' when batched, else 'exact' (faster in memory)."""
  m_step = v.check_option("m_step", m_step, M_STEP_OPTIONS)
  if m_step == "exact" and batched:
    raise ValueError("m_step='exact' keeps per-point statistics, which cannot be added over the "
                     "batches of a tf.data.Dataset or the replicas of a strategy; use "
                     "m_step='summed' (or 'auto')")
  if m_step == "auto":
    return "summed" if batched else "exact"
  return m_step


def model_class(m_step: str) -> type:
  """The EMModel class of an M-step: 'exact' (`BernoulliMLPEM`: the hidden
  units' Newton M-step run to convergence on per-point soft targets, faster
  in memory) or 'summed' (`BernoulliMLPSummedEM`: statistics that add up, for
  tf.data streams, tf.distribute and online EM)."""
  return M_STEPS[v.check_option("m_step", m_step, tuple(M_STEPS))]
