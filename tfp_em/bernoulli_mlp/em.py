"""Exact EM for the MLP with Bernoulli hidden units, and its estimator.

The model (`models.bernoulli_mlp`) has m binary hidden units per point. EM
enumerates all K = 2^m hidden configurations:

  E-step: log tau_j(z) = log p(z | x_j) + log p(y_j | z) - loglik_j, with
    loglik_j = logsumexp_z of the same sum. Vectorized as one
    [N, m+C] x [m+C, K] matmul, chunked over N (a `tf.while_loop`) to stay
    under a memory budget.
  Stats: hidden targets t_hj = E[z_hj | x_j, y_j] (per point) and the
    configuration-by-class counts C[z, i] = sum_j tau_j(z) y_ji (a sum).
  M-step: (1) m independent logistic regressions of t_h on x~, batched over
    h; (2) a multinomial logistic regression over the K configurations with
    counts C, whose cost does not depend on N. Both are concave and solved by
    damped Newton (`damped_newton`): a full step is kept when it increases Q,
    otherwise the best of the step sizes 1, 1/2, ..., 1/512 and 0, so Q never
    decreases.

The per-point targets keep these statistics from adding over batches or
replicas (`per_point_stats_fields`); `tfp_em.bernoulli_mlp.summed` keeps sums
only and takes one certified Newton step per iteration instead, so it streams,
distributes and fits online.

With `l2 > 0` every non-bias weight gets a Gaussian penalty (l2 / 2) w^2; EM
then increases the penalized objective log p(y | x) - penalty, which is what
`e_step` returns as its loglik (so the engine's monotonicity guard applies to
it), what `expected_log_joint` uses and what `marginal_log_prob` returns.

#### References

[1] S.-K. Ng and G. J. McLachlan. Using the EM algorithm to train neural
    networks: misconceptions and a new algorithm for multiclass
    classification. IEEE Transactions on Neural Networks, 15(3):738-749, 2004.
"""
from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from models import bernoulli_mlp as mlp
from models.bernoulli_mlp import BernoulliMLPParams
from tfp_em.engine import inputs as v
from tfp_em.engine import EMModel, FitResult, RestartTrace, restart_seeds, to_numpy, to_tensors
from tfp_em.bernoulli_mlp.newton import (center_output_weights, damped_newton,
                                          hidden_unit_gradient, hidden_unit_neg_hessian,
                                          hidden_unit_objective, l2_penalty, newton_direction,
                                          output_layer_gradient, output_layer_neg_hessian,
                                          output_layer_objective)
from tfp_em.engine.chunks import equal_chunks, in_chunks
from tfp_em.engine.unconstrained import Flattener, minimize_lbfgs
from tfp_em.verification.exact import ExactPosterior, marginalize_discrete

MAX_HIDDEN = 16
DEFAULT_MEMORY_BUDGET_BYTES = 256 * 2 ** 20
# Largest [rows, 2^m] E-step array: chunks that stay near the cache run about
# twice as fast as 64 MiB ones at m = 12..16 (validation/em_mlp_speed.py).
CACHE_FRIENDLY_BYTES = 16 * 2 ** 20


class BernoulliMLPStats(NamedTuple):
  """E-step output. `config_counts` is a sum over points; `hidden_targets`
  and `inputs` are per point (batches concatenate them along N)."""
  config_counts: tf.Tensor   # [K, C]   sum_j tau_j(z) y_ji
  hidden_targets: tf.Tensor  # [N, m]   E[z_hj | x_j, y_j]
  inputs: tf.Tensor          # [N, D+1] x~_j


def check_num_hidden(num_hidden) -> int:
  """Validates m; above `MAX_HIDDEN` the exact E-step is out of reach."""
  m = v.check_int("n_hidden", num_hidden, minimum=1)
  if m > MAX_HIDDEN:
    raise ValueError(
        f"n_hidden={m} is above the supported limit of {MAX_HIDDEN}: the exact "
        f"E-step enumerates all 2^m = {2 ** m:,} hidden configurations per point, "
        "so time and memory grow as 2^m. Use n_hidden <= 16 (typically 4-10 "
        "suffice), or reduce the inputs (e.g. PCA) instead of widening the layer.")
  return m


class BernoulliMLPEM(EMModel):
  """EMModel for the Bernoulli hidden-unit MLP; data = (x [N, D], y [N] int).

  Args:
    num_hidden: m, at most `MAX_HIDDEN` (16).
    num_classes: C >= 2.
    l2: non-negative L2 penalty on non-bias weights (default 0).
    memory_budget_bytes: bound on the E-step's [chunk, 2^m] work arrays
      (default 256 MiB); the E-step loops over chunks of rows.
    compile: how `fit_em` compiles the steps (default 'graph').
    max_newton_iter: Newton iterations per M-step block (default 50).
    init_scale: standard deviation of the initial weights, divided by
      sqrt(D+1) for the hidden layer (default 2).
  """
  name = "BernoulliMLP"
  trace_exact_rows = 2048  # small data: one chunk, no loop in the trace
  per_point_stats_fields = ("hidden_targets", "inputs")  # summed.py: sums only
  traced_settings = ("l2",)  # every penalty shares one trace (l2='auto' tries up to 7)
  summable_hint = ("or use BernoulliMLPSummedEM (tfp_em.bernoulli_mlp.summed; "
                   "BernoulliMLPClassifier(m_step='summed')), whose statistics are sums")
  failure_hint = ("Standardize the inputs, add an L2 penalty (l2 > 0), reduce "
                  "n_hidden, or use float64.")

  def __init__(self, num_hidden: int, num_classes: int, l2: float = 0.,
               memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
               compile: str = "graph", max_newton_iter: int = 50,
               init_scale: float = 2.):
    self.num_hidden = check_num_hidden(num_hidden)
    self.num_classes = v.check_int("num_classes", num_classes, minimum=2)
    self.l2 = v.check_float("l2", l2, minimum=0.)
    self.memory_budget_bytes = v.check_int("memory_budget_bytes", memory_budget_bytes, minimum=1)
    self.compile = v.check_option("compile", compile, ("eager", "graph", "xla"))
    self.max_newton_iter = v.check_int("max_newton_iter", max_newton_iter, minimum=1)
    self.init_scale = v.check_float("init_scale", init_scale, minimum=0.)

  @property
  def param_specs(self) -> BernoulliMLPParams:
    """For SQUAREM and the autodiff checks."""
    return mlp.param_specs()

  @property
  def num_configurations(self) -> int:
    return 2 ** self.num_hidden

  def configurations(self, dtype=tf.float64) -> tf.Tensor:
    """[2^m, m] hidden configurations, in the column order of `tau`."""
    return mlp.hidden_configurations(self.num_hidden, dtype)

  def chunk_rows(self, dtype=tf.float64) -> int:
    """Rows per E-step chunk: four [rows, 2^m] arrays fit the budget."""
    itemsize = tf.as_dtype(dtype).size
    return max(1, self.memory_budget_bytes // (4 * self.num_configurations * itemsize))

  def e_step_rows(self, dtype=tf.float64) -> int:
    """Rows per E-step chunk: `chunk_rows`, at most `CACHE_FRIENDLY_BYTES` per array."""
    itemsize = tf.as_dtype(dtype).size
    cache = max(1, CACHE_FRIENDLY_BYTES // (self.num_configurations * itemsize))
    return min(self.chunk_rows(dtype), cache)

  def penalty_share(self, num_points):
    """The share of the penalty that `num_points` rows carry: all of it, since
    this model sees all the data in every E-step (in memory only)."""
    return tf.ones_like(num_points)

  def penalty(self, params, num_rows):
    """The part of (l2 / 2) |w|^2 that `num_rows` rows carry: what `e_step`,
    `marginal_log_prob` and `verification_oracle` subtract (one rule)."""
    dtype = params.hidden_weights.dtype
    return self.penalty_share(tf.cast(num_rows, dtype)) * l2_penalty(params, self.l2)

  def num_observations(self, data) -> float:
    return float(data[0].shape[0])

  def initialize(self, data, seed: int) -> BernoulliMLPParams:
    x = data[0]
    dim = x.shape[-1]
    rng = np.random.default_rng(seed)
    hidden = rng.normal(0., self.init_scale / np.sqrt(dim + 1), [dim + 1, self.num_hidden])
    output = rng.normal(0., 1., [self.num_hidden + 1, self.num_classes])
    output -= output.mean(axis=-1, keepdims=True)
    return BernoulliMLPParams(tf.constant(hidden, x.dtype), tf.constant(output, x.dtype))

  # -- E-step ---------------------------------------------------------------

  def log_joint(self, params, inputs, labels_onehot, configs):
    """log p(z = configs[k], y_j | x_j) for a chunk, [n, K], one matmul
    (`models.bernoulli_mlp.configuration_log_joint`)."""
    return mlp.configuration_log_joint(tf.matmul(inputs, params.hidden_weights), labels_onehot,
                                       mlp.configuration_log_output(params, configs), configs)

  def normalize(self, log_joint):
    """(tau [n, K], loglik [n]) from the log joint over configurations."""
    peak = tf.stop_gradient(tf.reduce_max(log_joint, axis=-1, keepdims=True))
    unnormalized = tf.exp(log_joint - peak)
    total = tf.reduce_sum(unnormalized, axis=-1, keepdims=True)
    return unnormalized / total, (peak + tf.math.log(total))[:, 0]

  def _chunk_stats(self, params, inputs, labels_onehot, configs):
    tau, loglik = self.normalize(self.log_joint(params, inputs, labels_onehot, configs))
    return (tf.matmul(tau, labels_onehot, transpose_a=True),           # [K, C]
            tf.matmul(tau, configs),                                   # [n, m]
            loglik)

  def e_step(self, params, data):
    x, y = data
    dtype = params.hidden_weights.dtype
    m = self.num_hidden
    configs = self.configurations(dtype)
    inputs = mlp.add_bias(x)
    onehot = tf.one_hot(y, self.num_classes, dtype=dtype)
    rows = self.e_step_rows(dtype)
    n = x.shape[0]
    if n is not None and n <= rows:
      counts, targets, loglik = self._chunk_stats(params, inputs, onehot, configs)
      total = tf.reduce_sum(loglik)
    else:  # Loop over chunks of `rows` points; the last one is zero-padded.
      n = tf.shape(x)[0]
      num_chunks, chunk = equal_chunks(n, rows)
      xs = in_chunks(inputs, num_chunks, chunk)                    # [chunks, chunk, D + 1]
      ys = in_chunks(onehot, num_chunks, chunk)                    # [chunks, chunk, C]
      ws = in_chunks(tf.ones([n], dtype), num_chunks, chunk)       # [chunks, chunk]

      def body(i, counts, total, parts):
        c, t, ll = self._chunk_stats(params, xs[i], ys[i], configs)
        return i + 1, counts + c, total + tf.reduce_sum(ws[i] * ll), parts.write(i, t)

      parts = tf.TensorArray(dtype, size=num_chunks, element_shape=[None, m])
      _, counts, total, parts = tf.while_loop(
          lambda i, *_: i < num_chunks, body,
          (tf.constant(0), tf.zeros([2 ** m, self.num_classes], dtype),
           tf.zeros([], dtype), parts))
      targets = tf.reshape(parts.stack(), [-1, m])[:n]
    stats = BernoulliMLPStats(counts, targets, inputs)
    return stats, total - self.penalty(params, tf.shape(x)[0])

  def posterior(self, params, data) -> dict:
    """Exact posterior over configurations, unchunked (O(N 2^m) memory).

    Returns:
      dict with 'tau' [N, K] (columns ordered as `configurations()`),
      'hidden_marginals' [N, m] = E[z_hj | x_j, y_j] and 'loglik' [N].
    """
    x, y = data
    dtype = params.hidden_weights.dtype
    configs = self.configurations(dtype)
    tau, loglik = self.normalize(self.log_joint(
        params, mlp.add_bias(x), tf.one_hot(y, self.num_classes, dtype=dtype), configs))
    return {"tau": tau, "hidden_marginals": tf.matmul(tau, configs), "loglik": loglik}

  def joint_distribution(self, params, data):
    """The TFP JointDistribution over (z [N, m], y [N]); batch shape [N]."""
    return mlp.joint(params, data[0])

  # -- verification -----------------------------------------------------------

  # The M-step runs damped Newton until the Newton decrement is small, which
  # leaves grad Q(theta_new) ~ 1e-7 of the gradient scale: allow 1e-5.
  verification_tolerances = {"m_step_gradient": 1e-5}

  def verification_oracle(self, params, data) -> ExactPosterior:
    """Enumerates the 2^m hidden configurations of `models.bernoulli_mlp.joint`."""
    exact = marginalize_discrete(self.joint_distribution(params, data), {"z": 2}, {"y": data[1]})
    # Configurations come in the same order (binary digits, most significant first).
    return ExactPosterior(exact.log_prob - self.penalty(params, tf.shape(data[0])[0]),
                          {"tau": exact.posterior["z"], "hidden_marginals": exact.posterior["z_mean"]})

  # -- M-step ---------------------------------------------------------------

  hidden_gradient = staticmethod(hidden_unit_gradient)
  direction = staticmethod(newton_direction)

  def _configs_tilde(self, dtype):
    return mlp.add_bias(self.configurations(dtype))

  def m_step(self, params, stats):
    l2 = self.l2
    inputs, targets = stats.inputs, stats.hidden_targets
    hidden_t = damped_newton(
        lambda w: hidden_unit_objective(w, inputs, targets, l2),
        lambda w: self.hidden_gradient(w, inputs, targets, l2),
        lambda w: hidden_unit_neg_hessian(w, inputs, l2),
        tf.transpose(params.hidden_weights), direction=self.direction,
        max_iter=self.max_newton_iter)
    return BernoulliMLPParams(tf.transpose(hidden_t),
                              self.output_m_step(params.output_weights, stats.config_counts, l2))

  def output_m_step(self, output_weights, counts, l2):
    """argmax_V of the output layer's Q from the configuration counts [K, C]
    with penalty l2 (damped Newton; its cost does not depend on N)."""
    shape = output_weights.shape
    configs_tilde = self._configs_tilde(counts.dtype)

    def unflatten(theta):
      return tf.reshape(theta, tf.concat([tf.shape(theta)[:-1], shape], 0))  # [..., B, A, C]

    output = damped_newton(
        lambda th: output_layer_objective(unflatten(th), configs_tilde, counts, l2),
        lambda th: tf.reshape(output_layer_gradient(unflatten(th)[0], configs_tilde, counts, l2), [1, -1]),
        lambda th: output_layer_neg_hessian(unflatten(th)[0], configs_tilde, counts, l2)[tf.newaxis],
        tf.reshape(output_weights, [1, -1]), direction=self.direction,
        max_iter=self.max_newton_iter)
    return center_output_weights(tf.reshape(output, shape))

  def output_objective(self, output_weights, counts, l2):
    """The output layer's Q from the configuration counts, with penalty l2."""
    return output_layer_objective(output_weights, self._configs_tilde(output_weights.dtype),
                                  counts, l2)

  def expected_log_joint(self, params, stats):
    """Q(params | old) - penalty; differs from the loglik by the entropy of tau."""
    hidden = hidden_unit_objective(tf.transpose(params.hidden_weights), stats.inputs,
                                   stats.hidden_targets, self.l2)
    return tf.reduce_sum(hidden) + self.output_objective(params.output_weights,
                                                         stats.config_counts, self.l2)

  def marginal_log_prob(self, params, data):
    """Penalized log p(y | x) from the TFP model (unchunked, differentiable)."""
    x, y = data
    return tf.reduce_sum(mlp.marginal_log_prob(params, x, y)) - self.penalty(params, tf.shape(x)[0])

  def predict_log_proba(self, params, x):
    """log p(y = i | x_j), [N, C], unchunked."""
    dtype = params.hidden_weights.dtype
    configs = self.configurations(dtype)
    log_prior = mlp.configuration_log_prior(mlp.hidden_logits(params, x), configs)
    log_out = mlp.configuration_log_output(params, configs)
    return tf.reduce_logsumexp(log_prior[:, :, tf.newaxis] + log_out, axis=1)


# ---- Gradient-based fit of the same marginal, for comparison. ---------------

def fit_autodiff(model: BernoulliMLPEM, data, *, max_iter: int = 1000,
                 tol: float = 1e-6, n_init: int = 1, seed: int | None = 0,
                 init_params=None, callback=None) -> FitResult:
  """Maximizes `model.marginal_log_prob` by L-BFGS from `model.initialize`.

  Restart seeds match `fit_em`, so both methods start from the same params.
  The trace holds the objective after every L-BFGS iteration.
  """
  n_obs = model.num_observations(data)
  restarts = []
  for r, s in enumerate(restart_seeds(seed, n_init)):
    params = init_params if (r == 0 and init_params is not None) else model.initialize(data, s)
    restarts.append(_lbfgs_restart(model, data, params, s, r, max_iter, tol, callback))
  best = int(np.argmax([t.final_log_likelihood for t in restarts]))
  chosen = restarts[best]
  return FitResult(
      params=to_tensors(chosen.final_params),
      log_likelihood=chosen.final_log_likelihood, n_iter=chosen.n_iter,
      converged=chosen.converged, best_restart=best, restarts=tuple(restarts),
      num_observations=n_obs)


def _lbfgs_restart(model, data, params, seed, restart, max_iter, tol, callback):
  start = time.perf_counter()
  flat = Flattener(params, model.param_specs)

  def value_and_gradient(u):
    return tfp.math.value_and_gradient(
        lambda w: -model.marginal_log_prob(flat.unflatten(w), data), u)

  lls = [float(model.marginal_log_prob(params, data))]
  if callback is not None:
    callback(restart, 0, params, lls[-1])

  def record(it, position, objective):
    lls.append(-float(objective))
    if callback is not None:
      callback(restart, it, flat.unflatten(position), lls[-1])

  results = minimize_lbfgs(value_and_gradient, flat.u_hat, max_iterations=max_iter,
                           tolerance=0., f_relative_tolerance=tol, compile=True, callback=record)
  final = flat.unflatten(results.position)
  converged = bool(results.converged)
  return RestartTrace(
      seed=seed, log_likelihood=np.asarray(lls), params=[to_numpy(params), to_numpy(final)],
      converged=converged, n_iter=len(lls) - 1,
      stop_reason="converged" if converged else ("failed" if bool(results.failed) else "max_iter"),
      seconds=time.perf_counter() - start)
