"""The M-step of the Bernoulli-hidden-unit MLP as small pure functions.

Both parts of the M-step are concave and solved by damped Newton:
  (1) m weighted logistic regressions of the soft hidden targets on x~,
      batched over the hidden units (weights as [m, D+1]);
  (2) a multinomial logistic regression of the class counts on the 2^m hidden
      configurations (weights V [m+1, C]); its cost does not depend on N.
With `l2 > 0` every non-bias weight carries the penalty (l2 / 2) w^2.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from models.bernoulli_mlp import BernoulliMLPParams

NUM_HALVINGS = 10


def penalty_mask(num_rows: int, dtype) -> tf.Tensor:
  """[num_rows] ones with a zero for the bias row 0."""
  return tf.concat([tf.zeros([1], dtype), tf.ones([num_rows - 1], dtype)], 0)


def l2_penalty(params: BernoulliMLPParams, l2: float) -> tf.Tensor:
  """(l2 / 2) * sum of squared non-bias weights."""
  return 0.5 * l2 * (tf.reduce_sum(tf.square(params.hidden_weights[1:]))
                     + tf.reduce_sum(tf.square(params.output_weights[1:])))


# ---- Hidden units: m weighted logistic regressions, weights as [m, D+1]. ----

def hidden_unit_objective(weights_t, inputs, targets, l2=0.):
  """Per-unit Q: sum_j t log s(a) + (1 - t) log s(-a) - (l2/2)|w[1:]|^2.

  Args:
    weights_t: [..., m, D+1] (unit first; leading dims batch candidates).
    inputs: [N, D+1] x~.
    targets: [N, m] soft targets t.
    l2: penalty on non-bias weights.

  Returns:
    [..., m].
  """
  m, p = weights_t.shape[-2], weights_t.shape[-1]
  batch = tf.shape(weights_t)[:-2]
  a = tf.matmul(inputs, tf.reshape(weights_t, [-1, p]), transpose_b=True)  # [N, S m]
  a = tf.reshape(a, [tf.shape(inputs)[0], -1, m])                        # [N, S, m]
  fit = tf.reduce_sum(targets[:, tf.newaxis, :] * a - tf.nn.softplus(a), axis=0)  # [S, m]
  fit = tf.reshape(fit, tf.concat([batch, [m]], 0))
  return fit - 0.5 * l2 * tf.reduce_sum(tf.square(weights_t[..., 1:]), -1)


def hidden_unit_gradient(weights_t, inputs, targets, l2=0.):
  """d Q_h / d w_h = sum_j (t_hj - u_hj) x~_j - l2 w_h[1:], shape [m, D+1]."""
  probs = tf.sigmoid(tf.matmul(inputs, weights_t, transpose_b=True))   # [N, m]
  mask = penalty_mask(weights_t.shape[-1], weights_t.dtype)
  return tf.matmul(targets - probs, inputs, transpose_a=True) - l2 * mask * weights_t


def hidden_unit_neg_hessian(weights_t, inputs, l2=0.):
  """-d^2 Q_h / d w_h^2 = X~^T diag(u (1 - u)) X~ + l2 I', shape [m, D+1, D+1]."""
  probs = tf.sigmoid(tf.matmul(inputs, weights_t, transpose_b=True))   # [N, m]
  curvature = probs * (1. - probs)                                     # [N, m]
  weighted = tf.transpose(curvature)[:, :, tf.newaxis] * inputs         # [m, N, D+1]
  hess = tf.matmul(weighted, inputs, transpose_a=True)                 # [m, D+1, D+1]
  return hess + l2 * tf.linalg.diag(penalty_mask(weights_t.shape[-1], weights_t.dtype))


# ---- Output layer: multinomial regression over configurations, V [m+1, C]. --

def output_layer_objective(weights, configs_tilde, counts, l2=0.):
  """Q_V = sum_{z, i} C[z, i] log softmax(z~^T V)_i - (l2/2)|V[1:]|^2.

  Args:
    weights: [..., m+1, C].
    configs_tilde: [K, m+1] configurations with the bias column.
    counts: [K, C].
    l2: penalty on non-bias rows.

  Returns:
    [...].
  """
  num_rows, num_classes = weights.shape[-2], weights.shape[-1]
  batch = tf.shape(weights)[:-2]
  flat = tf.reshape(tf.transpose(tf.reshape(weights, [-1, num_rows, num_classes]), [1, 0, 2]),
                    [num_rows, -1])                                    # [A, S C]
  logits = tf.reshape(tf.matmul(configs_tilde, flat),
                      [tf.shape(configs_tilde)[0], -1, num_classes])   # [K, S, C]
  fit = tf.reduce_sum(counts[:, tf.newaxis, :] * tf.nn.log_softmax(logits), axis=[0, 2])
  fit = tf.reshape(fit, batch)
  return fit - 0.5 * l2 * tf.reduce_sum(tf.square(weights[..., 1:, :]), axis=[-2, -1])


def output_layer_gradient(weights, configs_tilde, counts, l2=0.):
  """d Q_V / d V = Z~^T (C - n p) - l2 V[1:], shape [m+1, C]."""
  probs = tf.nn.softmax(tf.matmul(configs_tilde, weights))             # [K, C]
  totals = tf.reduce_sum(counts, -1, keepdims=True)                    # [K, 1]
  mask = penalty_mask(weights.shape[0], weights.dtype)[:, tf.newaxis]
  return tf.matmul(configs_tilde, counts - totals * probs, transpose_a=True) - l2 * mask * weights


def output_layer_neg_hessian(weights, configs_tilde, counts, l2=0.):
  """-d^2 Q_V / d vec(V)^2 = sum_z n_z (z~ z~^T) kron (diag p_z - p_z p_z^T) + l2 I'.

  vec(V) is row-major (index a * C + i); shape [(m+1) C, (m+1) C].
  """
  num_rows, num_classes = weights.shape[0], weights.shape[1]
  probs = tf.nn.softmax(tf.matmul(configs_tilde, weights))             # [K, C]
  totals = tf.reduce_sum(counts, -1)                                   # [K]
  cov = tf.linalg.diag(probs) - probs[:, :, tf.newaxis] * probs[:, tf.newaxis, :]
  cov = totals[:, tf.newaxis, tf.newaxis] * cov                        # [K, C, C]
  outer = configs_tilde[:, :, tf.newaxis] * configs_tilde[:, tf.newaxis, :]  # [K, A, A]
  k = tf.shape(configs_tilde)[0]
  hess = tf.matmul(tf.reshape(outer, [k, -1]), tf.reshape(cov, [k, -1]), transpose_a=True)
  hess = tf.reshape(hess, [num_rows, num_rows, num_classes, num_classes])
  hess = tf.reshape(tf.transpose(hess, [0, 2, 1, 3]),
                    [num_rows * num_classes, num_rows * num_classes])
  mask = tf.repeat(penalty_mask(num_rows, weights.dtype), num_classes)
  return hess + l2 * tf.linalg.diag(mask)


def center_output_weights(weights):
  """Removes the softmax's free shift: each row of V sums to zero over classes."""
  return weights - tf.reduce_mean(weights, axis=-1, keepdims=True)


# ---- Damped Newton for a batch of independent concave problems. ------------

def newton_direction(gradient, neg_hessian):
  """Solves (-H + delta I) d = g for a batch: [B, P], [B, P, P] -> [B, P].

  delta = 1000 eps max(diag(-H)) only guards singular directions (the
  softmax shift, saturated units); the line search keeps ascent exact.
  """
  dtype = gradient.dtype
  eps = np.finfo(dtype.as_numpy_dtype).eps
  diag = tf.linalg.diag_part(neg_hessian)
  delta = 1e3 * eps * tf.reduce_max(tf.abs(diag), -1) + np.finfo(dtype.as_numpy_dtype).tiny
  system = neg_hessian + delta[:, tf.newaxis, tf.newaxis] * tf.eye(
      tf.shape(gradient)[-1], dtype=dtype)
  return tf.linalg.solve(system, gradient[..., tf.newaxis])[..., 0]


def damped_newton(objective, gradient, neg_hessian, theta, *,
                  direction=newton_direction, max_iter=50):
  """Maximizes B independent concave objectives by damped Newton.

  Each iteration takes the full Newton step if it increases every objective;
  otherwise it tries the step sizes 1, 1/2, ..., 2^-(NUM_HALVINGS-1) and 0
  and keeps, per problem, the best. So the objective never decreases. Stops
  when no problem improved by more than rtol = 100 eps relative, when every
  Newton decrement g.d/2 fell below sqrt(rtol) relative (the step just taken
  then lands within ~rtol of the optimum), or after `max_iter` iterations.

  Args:
    objective: [S, B, P] -> [S, B].
    gradient: [B, P] -> [B, P].
    neg_hessian: [B, P] -> [B, P, P].
    theta: [B, P] starting point.
    direction: (gradient, neg_hessian) -> ascent direction [B, P].
    max_iter: maximum number of Newton iterations.

  Returns:
    theta [B, P] at the last iterate.
  """
  dtype = theta.dtype
  rtol = 100. * np.finfo(dtype.as_numpy_dtype).eps
  steps = tf.constant(np.append(0.5 ** np.arange(NUM_HALVINGS), 0.), dtype)  # [S]
  f0 = objective(theta[tf.newaxis])[0]                                 # [B]

  def line_search(theta, d):
    candidates = theta + steps[:, tf.newaxis, tf.newaxis] * d          # [S, B, P]
    values = objective(candidates)                                     # [S, B]
    # An overflowing step (Hessian ~0 at saturated logits) must lose to step 0.
    values = tf.where(tf.math.is_finite(values), values, tf.constant(-np.inf, dtype))
    best = tf.argmax(values, axis=0, output_type=tf.int32)             # [B]
    return (tf.gather(tf.transpose(candidates, [1, 0, 2]), best, batch_dims=1),
            tf.reduce_max(values, axis=0))

  def body(i, theta, f, _):
    g = gradient(theta)
    d = direction(g, neg_hessian(theta))                               # [B, P]
    # A zero Hessian (every logit saturated) makes d overflow: take g instead.
    d = tf.where(tf.reduce_all(tf.math.is_finite(d), -1, keepdims=True), d, g)
    full = objective((theta + d)[tf.newaxis])[0]                       # [B]
    # The full step is kept when it helps every problem; else search.
    new_theta, new_f = tf.cond(tf.reduce_all(full > f),
                               lambda: (theta + d, full),
                               lambda: line_search(theta, d))
    scale = tf.abs(f) + 1.
    # Stop once no problem improves, or once every Newton decrement g.d/2
    # is below sqrt(rtol): quadratic convergence leaves ~rtol after it.
    improved = new_f - f > rtol * scale
    far = 0.5 * tf.reduce_sum(g * d, -1) > np.sqrt(rtol) * scale
    return i + 1, new_theta, new_f, tf.reduce_any(improved & far)

  _, theta, _, _ = tf.while_loop(
      lambda i, theta, f, still: (i < max_iter) & still, body,
      (tf.constant(0), theta, f0, tf.constant(True)))
  return theta
