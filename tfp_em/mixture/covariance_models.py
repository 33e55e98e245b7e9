"""M-steps of mclust's ten constrained covariance models (`models.eigen_covariance`).

Given the scatter matrices W_k = sum_n r_nk (x_n - mu_k)(x_n - mu_k)^T about
the new means and the counts n_k, the covariance part of Q is

    -1/2 sum_k [n_k log|Sigma_k| + tr(W_k Sigma_k^{-1})],

maximized over Sigma_k = lambda_k D_k A_k D_k^T within the family [1]:

    closed form [1, 2]   EII, EEI, EVI, EEV, EVV
    iterative            VEI, VEE, VEV (volumes, then shape, alternately [1]);
                         EVE, VVE (orientation by the MM step of [3], then
                         volumes and shapes in closed form, alternately)

Every iteration is a block-coordinate or majorize-minimize step, so none
decreases Q; the loop starts at the previous covariances' volumes or
orientation (so the step never decreases Q) and runs until the iterate moves
by less than eps ** `INNER_RTOL_POWER` (relative), at most `MAX_INNER` times.
VEI, VEE and VEV then are the argmax to about 1e-9 of the gradient; the MM
steps of EVE and VVE converge slowly, so those two are declared generalized
M-steps (`GENERALIZED_MODELS`: the verifier checks that Q increases). `reg_covar` adds n_k reg I to each W_k (as scikit-learn's types: for
the four models that are theirs this equals adding reg I to Sigma_k); the
result stays in the family.

#### References

[1] G. Celeux and G. Govaert. Gaussian parsimonious clustering models.
    Pattern Recognition, 28(5):781-793, 1995.
[2] L. Scrucca, M. Fop, T. B. Murphy and A. E. Raftery. mclust 5: clustering,
    classification and density estimation using Gaussian finite mixture
    models. The R Journal, 8(1):289-317, 2016.
[3] R. P. Browne and P. D. McNicholas. Estimating common principal components
    in high dimensions. Advances in Data Analysis and Classification,
    8(2):217-226, 2014.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from models import gaussian_mixture as gm
from models.eigen_covariance import common_orientation, rotate

CONSTRAINED_MODELS = tuple(m for m in gm.MCLUST_MODELS if m not in gm.MCLUST_ALIASES)
ITERATIVE_MODELS = ("VEI", "VEE", "VEV", "EVE", "VVE")
GENERALIZED_MODELS = ("EVE", "VVE")  # not run to the argmax: a generalized M-step
MAX_INNER = 500
ROUND_OFF = 16.0  # eps of |objective|: a rise below this is round-off, not a worse step
INNER_RTOL_POWER = 0.75  # inner loops stop at a relative move of eps ** 0.75 (2e-12 in float64)


# ----------------------------------------------------------------------------
# Small pieces.

def unit_diagonal(diagonal):
  """diagonal / |diagonal|^(1/D) for positive diagonals [..., D]."""
  return diagonal / geometric_mean(diagonal)[..., tf.newaxis]


def geometric_mean(diagonal):
  """|diag|^(1/D) of positive diagonals [..., D] -> [...]."""
  return tf.exp(tf.reduce_mean(tf.math.log(diagonal), -1))


def matrix_unit_determinant(m):
  """m / |m|^(1/D) for symmetric positive definite m [..., D, D]."""
  d = m.shape[-1]
  return m / tf.exp(tf.linalg.logdet(m) / d)[..., tf.newaxis, tf.newaxis]


def diagonal_in(orientation, scatter):
  """diag(D^T W_k D) [K, D] for one orientation D [D, D] and W [K, D, D]."""
  return tf.linalg.diag_part(tf.matmul(orientation, scatter, transpose_a=True) @ orientation)


def objective(log_det, trace, counts):
  """sum_k n_k log|Sigma_k| + tr(W_k Sigma_k^{-1}) (= -2 Q + const; lower is better)."""
  return tf.reduce_sum(counts * log_det + trace)


def iterate(step, state, value):
  """Runs `state = step(state)` [a tensor] while it moves by more than
  eps ** INNER_RTOL_POWER relative to its size and `value(state)` (lower is
  better) does not rise beyond round-off (`ROUND_OFF` eps), at most
  `MAX_INNER` times; a step that would raise it more is not taken."""
  eps = np.finfo(state.dtype.as_numpy_dtype).eps
  tol = eps ** INNER_RTOL_POWER

  def cond(i, state, f, going):
    return going & (i < MAX_INNER)

  def body(i, state, f, going):
    new = step(state)
    f_new = value(new)
    better = f_new <= f + ROUND_OFF * eps * (tf.abs(f) + 1.0)
    moved = tf.reduce_max(tf.abs(new - state)) > tol * tf.reduce_max(tf.abs(state))
    return (i + 1, tf.where(better, new, state), tf.where(better, f_new, f),
            better & moved)

  _, state, _, _ = tf.while_loop(cond, body, (tf.constant(0), state, value(state),
                                              tf.constant(True)))
  return state


# ----------------------------------------------------------------------------
# Closed forms.

def _eii(w, n, previous):
  d = w.shape[-1]
  volume = tf.reduce_sum(tf.linalg.trace(w)) / (tf.reduce_sum(n) * d)
  return volume * tf.eye(d, batch_shape=tf.shape(w)[:1], dtype=w.dtype)  # K may be unknown


def _eei(w, n, previous):
  diagonal = tf.reduce_sum(tf.linalg.diag_part(w), 0) / tf.reduce_sum(n)  # [D]
  return tf.linalg.diag(tf.broadcast_to(diagonal, tf.shape(w)[:-1]))     # [K, D, D]


def _evi(w, n, previous):
  diagonal = tf.linalg.diag_part(w)                                      # [K, D]
  size = geometric_mean(diagonal)                                        # [K]
  volume = tf.reduce_sum(size) / tf.reduce_sum(n)
  return tf.linalg.diag(volume * diagonal / size[:, tf.newaxis])


def _eev(w, n, previous):
  omega, vectors = tf.linalg.eigh(w)                                     # [K, D], [K, D, D]
  pooled = tf.reduce_sum(omega, 0) / tf.reduce_sum(n)                   # [D] = lambda A
  return rotate(vectors, tf.broadcast_to(pooled, tf.shape(omega)))


def _evv(w, n, previous):
  shapes = matrix_unit_determinant(w)                                    # C_k, |C_k| = 1
  volume = tf.reduce_sum(tf.exp(tf.linalg.logdet(w) / w.shape[-1])) / tf.reduce_sum(n)
  return volume * shapes


# ----------------------------------------------------------------------------
# Iterative: volumes lambda_k [K] and a shared shape (A or C), alternately.

def _start_volumes(w, n, previous):
  """log-det / D of the previous covariances; tr(W_k) / (D n_k) without them."""
  d = w.shape[-1]
  if previous is None:
    return tf.linalg.trace(w) / (d * n)
  return tf.exp(tf.linalg.logdet(previous) / d)


def _vei(w, n, previous):
  d = w.shape[-1]
  diagonal = tf.linalg.diag_part(w)                                      # [K, D]

  def step(volume):
    shape = unit_diagonal(tf.reduce_sum(diagonal / volume[:, tf.newaxis], 0))   # [D]
    return tf.reduce_sum(diagonal / shape, -1) / (d * n), shape

  def value(volume):  # Q after one step: tr(W_k Sigma_k^{-1}) = D n_k there
    return objective(d * tf.math.log(step(volume)[0]), d * n, n)

  volume, shape = step(iterate(lambda v: step(v)[0], _start_volumes(w, n, previous), value))
  return tf.linalg.diag(volume[:, tf.newaxis] * shape)


def _vee(w, n, previous):
  d = w.shape[-1]

  def shape_given(volume):
    return matrix_unit_determinant(tf.reduce_sum(w / volume[:, None, None], 0))   # C [D, D]

  def volumes_given(shape):
    return tf.linalg.trace(tf.linalg.solve(tf.broadcast_to(shape, tf.shape(w)), w)) / (d * n)

  def value(volume):  # Q after one step: tr(W_k Sigma_k^{-1}) = D n_k there
    return objective(d * tf.math.log(volumes_given(shape_given(volume))), d * n, n)

  volume = iterate(lambda v: volumes_given(shape_given(v)), _start_volumes(w, n, previous), value)
  shape = shape_given(volume)
  return volumes_given(shape)[:, None, None] * shape


def _vev(w, n, previous):
  d = w.shape[-1]
  omega, vectors = tf.linalg.eigh(w)                                     # ascending

  def step(volume):
    shape = unit_diagonal(tf.reduce_sum(omega / volume[:, tf.newaxis], 0))      # A [D]
    return tf.reduce_sum(omega / shape, -1) / (d * n), shape

  def value(volume):  # Q after one step: tr(W_k Sigma_k^{-1}) = D n_k there
    return objective(d * tf.math.log(step(volume)[0]), d * n, n)

  volume = iterate(lambda v: step(v)[0], _start_volumes(w, n, previous), value)
  new_volume, shape = step(volume)
  return rotate(vectors, new_volume[:, tf.newaxis] * shape)


# ----------------------------------------------------------------------------
# Iterative: a shared orientation D, by majorize-minimize [3].

def procrustes(g):
  """argmax of tr(G^T D) over orthogonal D: U V^T for G = U S V^T."""
  _, u, v = tf.linalg.svd(g)
  return tf.matmul(u, v, transpose_b=True)


def orientation_step(orientation, w, bound, eigenvalues):
  """Two MM steps on D for sum_k tr(W_k D Lambda_k^{-1} D^T), Lambda_k =
  diag(eigenvalues) [K, D] fixed [3]: one majorizes through
  bound_k = omega_k I - W_k (omega_k the largest eigenvalue of W_k), the other
  through alpha_k I - Lambda_k^{-1} (alpha_k = max 1 / Lambda_k); each step is
  D <- procrustes(G) and does not increase the sum."""
  inverse = 1.0 / eigenvalues                                            # [K, D]
  orientation = procrustes(tf.reduce_sum(bound @ orientation * inverse[:, tf.newaxis, :], 0))
  alpha = tf.reduce_max(inverse, -1, keepdims=True)                      # [K, 1]
  return procrustes(tf.reduce_sum(w @ orientation * (alpha - inverse)[:, tf.newaxis, :], 0))


def _common_orientation_fit(w, n, previous, eigenvalues_given):
  """EVE / VVE: Lambda_k given D in closed form, then MM steps on D."""
  start = (tf.linalg.eigh(tf.reduce_sum(w, 0))[1] if previous is None
           else common_orientation(previous))
  omega = tf.linalg.eigvalsh(w)[:, -1]                                   # [K]
  bound = omega[:, None, None] * tf.eye(w.shape[-1], dtype=w.dtype) - w  # [K, D, D]

  def value(orientation):
    diagonal = diagonal_in(orientation, w)                               # [K, D]
    lam = eigenvalues_given(diagonal)
    return objective(tf.reduce_sum(tf.math.log(lam), -1), tf.reduce_sum(diagonal / lam, -1), n)

  def step(orientation):
    return orientation_step(orientation, w, bound,
                            eigenvalues_given(diagonal_in(orientation, w)))

  orientation = iterate(step, start, value)
  lam = eigenvalues_given(diagonal_in(orientation, w))
  return rotate(tf.broadcast_to(orientation, tf.shape(w)), lam)


def _eve(w, n, previous):
  def eigenvalues_given(diagonal):                                       # [K, D]
    size = geometric_mean(diagonal)                                      # [K]
    return tf.reduce_sum(size) / tf.reduce_sum(n) * diagonal / size[:, tf.newaxis]
  return _common_orientation_fit(w, n, previous, eigenvalues_given)


def _vve(w, n, previous):
  return _common_orientation_fit(w, n, previous, lambda diagonal: diagonal / n[:, tf.newaxis])


M_STEPS = {"EII": _eii, "EEI": _eei, "EVI": _evi, "EEV": _eev, "EVV": _evv,
           "VEI": _vei, "VEE": _vee, "VEV": _vev, "EVE": _eve, "VVE": _vve}


def constrained_covariances(model: str, scatter, counts, reg_covar: float, previous=None):
  """argmax of Q over covariances [K, D, D] in mclust family `model`.

  Args:
    model: one of `CONSTRAINED_MODELS`.
    scatter: W_k about the new means, [K, D, D].
    counts: n_k, [K] (floored above 0).
    reg_covar: adds n_k reg_covar I to each W_k.
    previous: the previous covariances [K, D, D] (where the iterative models
      start, so that the step never decreases Q), or None.
  """
  d = scatter.shape[-1]
  w = scatter + (reg_covar * counts)[:, None, None] * tf.eye(d, dtype=scatter.dtype)
  w = 0.5 * (w + tf.linalg.matrix_transpose(w))
  return M_STEPS[model](w, counts, previous)
