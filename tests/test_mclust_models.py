"""mclust's 14 covariance models: against TFP, the verifier, Q within each family, and aliases."""
import warnings

import numpy as np
import pytest
import tensorflow as tf

from models import gaussian_mixture as gm
from tfp_em import GaussianMixture
from tfp_em.mixture import covariance_models as cm
from tfp_em.mixture import em as me
from tfp_em.mixture.initialization import initial_responsibilities
from tfp_em.verification import verify
from tfp_em.verification.api import ALL_CHECKS

MODELS = gm.MCLUST_MODELS
CONSTRAINED = cm.CONSTRAINED_MODELS
K = 3
QUICK_MODELS = ("EEV", "VEV", "EVE")  # orientation in closed form, by alternation, by MM


def _quick_or_slow(models, quick=QUICK_MODELS):
  """The models as pytest params, those not in `quick` marked slow (the four
  aliases' quick checks are test_mixture's, on scikit-learn's names)."""
  return [pytest.param(m, marks=() if m in quick else pytest.mark.slow) for m in models]

QUICK_CHECKS = ("1", "2", "3", "4", "5")  # all but check 6's EM and L-BFGS runs


def _fit(x, model, k=K, **kw):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return GaussianMixture(k, covariance_type=model, verbose=False, **kw).fit(x)


@pytest.fixture(scope="module")
def elongated():
  """Three overlapping, rotated, elongated 3-D clusters: every model's
  likelihood is bounded here (no component can shrink onto one point)."""
  rng = np.random.default_rng(7)
  q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
  parts = [rng.normal(size=(n, 3)) * s @ q.T + c for n, s, c in
           [(80, [2.0, 1.0, 0.5], [0, 0, 0]), (60, [1.5, 0.6, 0.6], [2, 1, 0]),
            (50, [1.0, 1.0, 0.3], [0, 2.5, 1])]]
  return np.concatenate(parts)


def _init(x, w, seed):
  return initial_responsibilities("kmeans++", x, w, K, seed)


def _data(x):
  return me.MixtureData(tf.constant(x), tf.ones([x.shape[0]], tf.float64))


# ----------------------------------------------------------------------------
# Names, parameter counts, the family bijector.

def test_names_and_aliases():
  assert len(MODELS) == 14 and len(set(MODELS)) == 14
  assert set(CONSTRAINED) == set(MODELS) - set(gm.MCLUST_ALIASES)
  for mclust, sklearn in gm.MCLUST_ALIASES.items():
    assert gm.canonical_type(mclust) == gm.canonical_type(sklearn) == sklearn
    assert gm.mclust_name(sklearn) == mclust
    assert gm.n_parameters(mclust, 4, 5) == gm.n_parameters(sklearn, 4, 5)
  with pytest.raises(ValueError, match="mclust"):
    gm.check_covariance_type("XYZ")


def test_n_parameters_equal_mclust_table():
  """mclust's `mapply(nVarParams, mclust.options("emModelNames"), d = 2, G = 3)`."""
  table = dict(EII=1, VII=3, EEI=2, VEI=4, EVI=4, VVI=6, EEE=3, EVE=5, VEE=5, VVE=7, EEV=5,
               VEV=7, EVV=7, VVV=9)
  assert {m: gm.n_covariance_parameters(m, 3, 2) for m in MODELS} == table
  assert gm.n_parameters("VVV", 3, 2) == 9 + 3 * 2 + 2


@pytest.mark.parametrize("model", MODELS)
def test_n_parameters_is_the_dimension_of_the_family(model):
  """The rank of d Sigma / d u of the model's bijector at a random point is
  its number of free covariance parameters (`n_covariance_parameters`)."""
  k, d = 3, 4
  rng = np.random.default_rng(0)
  a = rng.normal(size=(k, d, d))
  layout = gm.covariance_layout(model)
  full = a @ np.swapaxes(a, -1, -2) + d * np.eye(d)
  start = {"full": full, "tied": full[0], "diag": np.diagonal(full, 0, -2, -1),
           "spherical": full[:, 0, 0]}[layout]
  bijector = gm.param_specs(model).covariances.bijector
  u = bijector.inverse(tf.constant(start)).numpy()
  u = u + 0.3 * rng.normal(size=u.shape)
  h = 1e-6 * np.eye(u.size).reshape((u.size,) + u.shape)             # central differences,
  sigma = bijector.forward(tf.constant(np.concatenate([u + h, u - h]))).numpy()  # one batch
  jacobian = (sigma[:u.size] - sigma[u.size:]).reshape(u.size, -1) / 2e-6
  singular = np.linalg.svd(jacobian, compute_uv=False)
  rank = int(np.sum(singular > 1e-6 * singular[0]))
  assert rank == gm.n_covariance_parameters(model, k, d)


@pytest.mark.parametrize("model", CONSTRAINED)
def test_bijector_lands_in_the_family_and_round_trips(model):
  k, d = 3, 4
  bijector = gm.param_specs(model).covariances.bijector
  sigma = bijector.forward(tf.constant(np.random.default_rng(1).normal(size=(k, d + 2, d))))
  eigenvalues, vectors = np.linalg.eigh(sigma.numpy())                # ascending
  volume = np.exp(np.mean(np.log(eigenvalues), -1))                  # [K]
  volume_letter, shape_letter, orientation_letter = model
  assert np.ptp(volume) < 1e-12 if volume_letter == "E" else np.ptp(volume) > 1e-3
  if orientation_letter == "I":
    off = sigma.numpy() - np.einsum("kdd->kd", sigma.numpy())[..., None] * np.eye(d)
    assert np.max(np.abs(off)) < 1e-12
    shapes = np.einsum("kdd->kd", sigma.numpy()) / volume[:, None]
  else:
    shapes = eigenvalues / volume[:, None]
  if shape_letter == "I":
    np.testing.assert_allclose(shapes, 1.0, rtol=1e-12)
  elif shape_letter == "E":
    np.testing.assert_allclose(shapes, np.broadcast_to(shapes[0], shapes.shape), rtol=1e-10)
  if orientation_letter == "E":  # one eigenbasis diagonalizes every Sigma_k
    rotated = np.swapaxes(vectors[0], -1, -2) @ sigma.numpy() @ vectors[0]
    assert np.max(np.abs(rotated - np.einsum("kdd->kd", rotated)[..., None] * np.eye(d))) < 1e-10
  again = bijector.forward(tf.identity(bijector.inverse(tf.identity(sigma))))
  np.testing.assert_allclose(again.numpy(), sigma.numpy(), atol=1e-12)


# ----------------------------------------------------------------------------
# Fits: TFP, monotone likelihood, aliases, float32, streams.

@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-10),
                                        pytest.param("float32", 2e-4, marks=pytest.mark.slow)])
@pytest.mark.parametrize("model", _quick_or_slow(MODELS, quick=CONSTRAINED))
def test_scores_match_tfp(elongated, model, dtype, rtol):
  est = _fit(elongated, model, dtype=dtype, max_iter=5)
  x = tf.constant(elongated, dtype)
  np.testing.assert_allclose(est.score_samples(elongated),
                             gm.marginal(est.params_, model).log_prob(x).numpy(), rtol=rtol)
  assert est.params_.covariances.dtype == tf.as_dtype(dtype)
  assert np.all(np.isfinite(est.covariances_))
  if model in CONSTRAINED:
    assert est.covariances_.shape == (K, 3, 3)


@pytest.mark.parametrize("model", _quick_or_slow(MODELS, quick=CONSTRAINED))
def test_loglik_never_decreases_without_regularization(elongated, model):
  est = _fit(elongated, model, reg_covar=0.0, tol=0.0, max_iter=40, on_decrease="raise")
  ll = est.fit_result_.restarts[0].log_likelihood
  assert np.all(np.diff(ll) >= -1e-10 * np.abs(ll[1:])), np.min(np.diff(ll))
  assert ll[-1] > ll[0] + 1.0


@pytest.mark.parametrize("mclust,sklearn", sorted(gm.MCLUST_ALIASES.items()))
def test_aliases_equal_scikit_learn_types(elongated, mclust, sklearn):
  a = _fit(elongated, mclust, n_init=2, max_iter=30)
  b = _fit(elongated, sklearn, n_init=2, max_iter=30)
  for name in ("weights_", "means_", "covariances_", "precisions_cholesky_"):
    np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-12, atol=1e-12,
                               err_msg=name)
  assert abs(a.log_likelihood_ - b.log_likelihood_) <= 1e-12 * abs(b.log_likelihood_)
  assert a.bic(elongated) == pytest.approx(b.bic(elongated), rel=1e-12)


@pytest.mark.parametrize("model", CONSTRAINED)
def test_float32_fit_is_the_float64_fit(elongated, model):
  init = dict(means_init=elongated[[0, 100, 170]], weights_init=np.full(K, 1 / K),
              precisions_init=np.stack([np.eye(3)] * K))
  a = _fit(elongated, model, dtype="float32", tol=0.0, max_iter=20, **init)
  b = _fit(elongated, model, dtype="float64", tol=0.0, max_iter=20, **init)
  np.testing.assert_allclose(a.log_likelihood_, b.log_likelihood_, rtol=1e-5)
  np.testing.assert_allclose(a.covariances_, b.covariances_, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("model", _quick_or_slow(CONSTRAINED, quick=("EVE",)))
def test_streamed_dataset_equals_in_memory(elongated, model):
  init = dict(means_init=elongated[[0, 100, 170]], weights_init=np.full(K, 1 / K),
              precisions_init=np.stack([np.eye(3)] * K))
  ref = _fit(elongated, model, tol=0.0, max_iter=10, **init)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    streamed = GaussianMixture(K, covariance_type=model, tol=0.0, max_iter=10, verbose=False,
                               **init).fit(tf.data.Dataset.from_tensor_slices(elongated),
                                           batch_size=64)
  for name in ("weights_", "means_", "covariances_"):
    np.testing.assert_allclose(getattr(streamed, name), getattr(ref, name), rtol=1e-9,
                               atol=1e-10, err_msg=name)
  np.testing.assert_allclose(streamed.log_likelihood_, ref.log_likelihood_, rtol=1e-10)


# ----------------------------------------------------------------------------
# The M-step is the maximum of Q within the family.

@pytest.mark.parametrize("model", CONSTRAINED)
def test_no_perturbation_inside_the_family_increases_q(elongated, model):
  """Q at the M-step's covariances against 3 x 8 random points of the family
  around them (steps of 1e-4, 1e-2 and 0.5 in the bijector's coordinates)."""
  em = me.GaussianMixtureEM(K, model, reg_covar=0.0, init=_init)
  data = _data(elongated)
  old = em.initialize(data, 0)
  stats, _ = em.e_step(old, data)
  new = em.m_step(old, stats)
  q_new = float(em.expected_log_joint(new, stats))
  assert q_new >= float(em.expected_log_joint(old, stats))
  bijector = gm.param_specs(model).covariances.bijector
  u = bijector.inverse(tf.identity(new.covariances)).numpy()
  rng = np.random.default_rng(3)
  slack = 1e-12 * (abs(q_new) + elongated.shape[0])
  worst = -np.inf
  for scale in (1e-4, 1e-2, 0.5):
    for _ in range(8):
      moved = bijector.forward(tf.constant(u + scale * rng.normal(size=u.shape)))
      gain = float(em.expected_log_joint(new._replace(covariances=moved), stats)) - q_new
      worst = max(worst, gain)
  assert worst <= slack, f"{model}: a point of the family has Q higher by {worst:.3g}"


@pytest.mark.parametrize("model", cm.ITERATIVE_MODELS)
def test_iterative_m_steps_start_where_they_left_off(elongated, model):
  """A second M-step from the first one's covariances changes them only by
  the inner loop's tolerance: the loop stops at the argmax."""
  em = me.GaussianMixtureEM(K, model, reg_covar=0.0, init=_init)
  data = _data(elongated)
  old = em.initialize(data, 0)
  stats, _ = em.e_step(old, data)
  first = em.m_step(old, stats)
  second = em.m_step(first, stats)
  np.testing.assert_allclose(second.covariances.numpy(), first.covariances.numpy(),
                             rtol=1e-7, atol=1e-9)


def _verify(model, x, generalized=None, checks=QUICK_CHECKS, n_points=2):
  em = me.GaussianMixtureEM(K, model, reg_covar=0.0, init=_init)
  if generalized is not None:
    em.generalized_m_step_fields = generalized
  return verify(em, _data(x[::2]), checks=checks, n_points=n_points)


@pytest.mark.parametrize("model", _quick_or_slow(CONSTRAINED))
def test_verifier_passes_the_m_step(elongated, model):
  """Checks 1-5 (E-step, Fisher identity, M-step in the family's coordinates);
  EVE and VVE also as exact M-steps (zero gradient, no better neighbour)."""
  report = _verify(model, elongated, generalized=() if model in cm.GENERALIZED_MODELS else None,
                   n_points=1)
  assert report.passed, str(report)
  assert report["4b"].passed and report["4d"].passed


@pytest.mark.slow
@pytest.mark.parametrize("model", CONSTRAINED)
def test_verifier_passes_every_check(elongated, model):
  report = _verify(model, elongated, checks=ALL_CHECKS)
  assert report.passed, str(report)
