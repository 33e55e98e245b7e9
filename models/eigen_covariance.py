"""mclust's covariance families as a TFP bijector onto them.

Sigma_k = lambda_k D_k A_k D_k^T [1]: volume lambda_k > 0, shape A_k diagonal
with |A_k| = 1, orientation D_k orthogonal. A model name has one letter for
each of the three, in that order: E (equal for all k), V (varying with k) or
I (the identity; shape and orientation only). `EigenCovariance(name)` maps an
unconstrained u [K, D + 2, D] onto K covariances [K, D, D] of that family:

    u[k, 0, 0]   log lambda_k
    u[k, 1, :]   log-shape: A_k = diag(exp(s - mean(s)))
    u[k, 2:, :]  M_k; D_k is the Q factor of M_k = Q R (diag(R) > 0)

An E part reads component 0's slot only; an I part reads nothing. The map is
onto the family, smooth, but not one-to-one (unused slots, the scale of s,
the R of M_k), so it has no log-Jacobian: it serves the verifier's and the
optimizers' unconstrained coordinates (a redundant direction has zero
gradient), not densities over covariances. `inverse` returns one preimage:
forward(inverse(Sigma)) = Sigma for every Sigma in the family.

#### References

[1] G. Celeux and G. Govaert. Gaussian parsimonious clustering models.
    Pattern Recognition, 28(5):781-793, 1995.
"""
import tensorflow as tf
import tensorflow_probability as tfp

tfb = tfp.bijectors


def orthonormal(m):
  """The Q factor of m = Q R with diag(R) >= 0, [..., D, D]: smooth in m, and
  Q = m when m is already orthogonal."""
  q, r = tf.linalg.qr(m)
  diag = tf.linalg.diag_part(r)
  sign = tf.where(diag < 0, -tf.ones_like(diag), tf.ones_like(diag))
  return q * sign[..., tf.newaxis, :]


def rotate(orientation, eigenvalues):
  """D diag(e) D^T, symmetrized: [..., D, D] from [..., D, D] and [..., D]."""
  sigma = tf.matmul(orientation * eigenvalues[..., tf.newaxis, :], orientation, transpose_b=True)
  return 0.5 * (sigma + tf.linalg.matrix_transpose(sigma))


def common_orientation(sigma):
  """Eigenvectors [..., D, D] shared by the covariances sigma [..., K, D, D]
  (exact when they have common eigenvectors): those of a generic
  combination sum_k c_k Sigma_k / tr(Sigma_k)."""
  k = tf.shape(sigma)[-3]
  weights = 1.0 / (tf.cast(tf.range(k), sigma.dtype) + 1.4142135623730951)   # [K]
  scale = tf.linalg.trace(sigma)[..., tf.newaxis, tf.newaxis]
  combined = tf.reduce_sum(weights[:, tf.newaxis, tf.newaxis] * sigma / scale, -3)
  return tf.linalg.eigh(combined)[1]


def _first_for_all(t, axis):
  """Component 0's value broadcast over the component axis (an E part)."""
  first = tf.gather(t, [0], axis=axis)
  return tf.broadcast_to(first, tf.shape(t))


def _first_only(t, axis):
  """Zeros except component 0 (the slot an E part reads)."""
  k = tf.shape(t)[axis]
  mask = tf.cast(tf.range(k) == 0, t.dtype)
  trailing = -axis - 1 if axis < 0 else len(t.shape) - axis - 1
  mask = tf.reshape(mask, [-1] + [1] * trailing)
  return t * mask


class EigenCovariance(tfb.Bijector):
  """u [..., K, D + 2, D] -> Sigma [..., K, D, D] in mclust family `model`.

  Args:
    model: a three-letter mclust name such as 'VEV' (see the module docstring).
  """

  def __init__(self, model: str, validate_args: bool = False, name: str | None = None):
    parameters = dict(locals())
    if len(model) != 3 or model[0] not in "EV" or model[1] not in "EVI" or model[2] not in "EVI":
      raise ValueError(f"model must be an mclust name such as 'VEV', got {model!r}")
    self.model = model
    self.volume, self.shape_part, self.orientation = model
    super().__init__(forward_min_event_ndims=3, inverse_min_event_ndims=3,
                     is_constant_jacobian=False, validate_args=validate_args,
                     parameters=parameters, name=name or f"EigenCovariance{model}")

  def _forward(self, u):
    log_volume = u[..., :, 0, 0]                                  # [..., K]
    if self.volume == "E":
      log_volume = _first_for_all(log_volume, -1)
    s = u[..., :, 1, :]                                           # [..., K, D]
    if self.shape_part == "I":
      log_shape = tf.zeros_like(s)
    else:
      log_shape = s - tf.reduce_mean(s, -1, keepdims=True)
      if self.shape_part == "E":
        log_shape = _first_for_all(log_shape, -2)
    m = u[..., :, 2:, :]                                          # [..., K, D, D]
    if self.orientation == "I":
      orientation = tf.eye(tf.shape(m)[-1], batch_shape=tf.shape(m)[:-2], dtype=u.dtype)
    else:
      orientation = orthonormal(_first_for_all(m, -3) if self.orientation == "E" else m)
    return rotate(orientation, tf.exp(log_volume[..., tf.newaxis] + log_shape))

  def _inverse(self, sigma):
    d = tf.shape(sigma)[-1]
    if self.orientation == "I":
      eigenvalues = tf.linalg.diag_part(sigma)                   # [..., K, D]
      orientation = tf.zeros_like(sigma)                          # unused
    elif self.orientation == "E":
      common = common_orientation(sigma)                          # [..., D, D]
      eigenvalues = tf.linalg.diag_part(
          tf.matmul(common[..., tf.newaxis, :, :], sigma, transpose_a=True)
          @ common[..., tf.newaxis, :, :])
      orientation = _first_only(tf.broadcast_to(common[..., tf.newaxis, :, :], tf.shape(sigma)), -3)
    else:
      eigenvalues, orientation = tf.linalg.eigh(sigma)
    log_eigenvalues = tf.math.log(eigenvalues)                    # [..., K, D]
    log_volume = tf.reduce_mean(log_eigenvalues, -1)              # [..., K]
    log_shape = log_eigenvalues - log_volume[..., tf.newaxis]
    if self.volume == "E":
      log_volume = _first_only(log_volume, -1)
    if self.shape_part == "I":
      log_shape = tf.zeros_like(log_shape)
    elif self.shape_part == "E":
      log_shape = _first_only(log_shape, -2)
    volume_row = log_volume[..., tf.newaxis, tf.newaxis] * tf.one_hot(0, d, dtype=sigma.dtype)
    return tf.concat([volume_row, log_shape[..., tf.newaxis, :], orientation], axis=-2)

  def _forward_event_shape(self, input_shape):
    return input_shape[:-2].concatenate([input_shape[-1], input_shape[-1]])

  def _forward_event_shape_tensor(self, input_shape):
    return tf.concat([input_shape[:-2], input_shape[-1:], input_shape[-1:]], 0)

  def _inverse_event_shape(self, output_shape):
    d = output_shape[-1]
    return output_shape[:-2].concatenate([None if d is None else d + 2, d])

  def _inverse_event_shape_tensor(self, output_shape):
    return tf.concat([output_shape[:-2], output_shape[-1:] + 2, output_shape[-1:]], 0)
