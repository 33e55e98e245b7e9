"""Numerical robustness: offsets and scales, float32, collapsed and empty
components, near-singular Sigma_u, saturated logits. Never a NaN parameter."""
import warnings

import numpy as np
import pytest
import tensorflow as tf

from tfp_em import GaussianMixture, NumericalFailureError
from tfp_em.mixture import reseed as mr

COV_TYPES = ["full", "tied", "diag", "spherical"]


@pytest.fixture(scope="module")
def two_blobs():
  rng = np.random.default_rng(0)
  return np.concatenate([rng.normal([0, 0], 1, (100, 2)), rng.normal([5, 3], [1, .5], (80, 2))])


def _fit(x, **kw):
  kw = dict(dict(n_components=2, tol=1e-12, max_iter=500, verbose=False), **kw)
  return GaussianMixture(**kw).fit(x)


def _scaled(cov, s):
  return cov * s ** 2


@pytest.mark.parametrize("cov", COV_TYPES)
@pytest.mark.parametrize("offset,scale", [(1e6, 1.0), (0.0, 1e-6), (0.0, 1e6)])
def test_offset_and_scale_fit_in_float64(two_blobs, cov, offset, scale):
  base = _fit(two_blobs, covariance_type=cov, tol=0.0, max_iter=1000)  # to the fixed point
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no spurious decrease or precision warning
    warnings.simplefilter("ignore", DeprecationWarning)  # numpy's, raised inside TFP
    est = _fit(two_blobs * scale + offset, covariance_type=cov, reg_covar=1e-6 * scale ** 2,
               tol=0.0, max_iter=1000)
  order = np.argsort(est.means_[:, 0])
  base_order = np.argsort(base.means_[:, 0])
  np.testing.assert_allclose((est.means_[order] - offset) / scale, base.means_[base_order],
                             rtol=1e-6, atol=1e-6)
  cov_est = est.covariances_ if cov == "tied" else est.covariances_[order]
  cov_base = base.covariances_ if cov == "tied" else base.covariances_[base_order]
  np.testing.assert_allclose(cov_est / scale ** 2, cov_base, rtol=1e-6)
  np.testing.assert_allclose(est.weights_[order], base.weights_[base_order], rtol=1e-6)
  # log p(s x + c) = log p(x) - N D log s.
  n, d = two_blobs.shape
  assert est.log_likelihood_ == pytest.approx(base.log_likelihood_ - n * d * np.log(scale),
                                              rel=1e-9, abs=1e-7)


@pytest.mark.parametrize("cov", COV_TYPES)
@pytest.mark.parametrize("offset,scale", [(1e6, 1.0), (0.0, 1e-6), (0.0, 1e6), (1e4, 1e-3)])
def test_float32_fits_or_recommends_float64_never_nan(two_blobs, cov, offset, scale):
  x = two_blobs * scale + offset
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    try:
      est = _fit(x, covariance_type=cov, reg_covar=1e-6 * scale ** 2, dtype="float32",
                 tol=1e-6)
    except ValueError as e:
      assert "float64" in str(e)
      return
  for p in (est.weights_, est.means_, est.covariances_, est.precisions_cholesky_):
    assert np.all(np.isfinite(p))
  ref = _fit(x, covariance_type=cov, reg_covar=1e-6 * scale ** 2)
  resolution = np.finfo(np.float32).eps * (abs(offset) + 10 * scale)  # float32 spacing of x
  np.testing.assert_allclose(np.sort(est.means_, 0), np.sort(ref.means_, 0),
                             atol=0.05 * scale + 100 * resolution)
  far = abs(offset) / scale > 1e3
  recommends = any("float64" in str(w.message) for w in caught)
  assert recommends == far  # warned exactly when float32 cannot resolve the data


COLLAPSING = np.array([[1.0, 2.0]] * 20 + [[5, 5], [6, 5.5], [5.5, 7], [7, 6]])


@pytest.mark.parametrize("cov", ["full", "diag", "spherical"])
def test_collapse_onto_one_point_names_reg_covar(cov):
  with pytest.raises(NumericalFailureError, match="reg_covar"):
    GaussianMixture(2, covariance_type=cov, reg_covar=0.0, init_params="kmeans").fit(COLLAPSING)
  est = GaussianMixture(2, covariance_type=cov, reg_covar=1e-4, init_params="kmeans").fit(
      COLLAPSING)
  collapsed = np.argmin(np.abs(est.means_[:, 0] - 1.0))
  np.testing.assert_allclose(est.means_[collapsed], [1.0, 2.0], atol=1e-6)
  full = est.covariances_[collapsed]
  np.testing.assert_allclose(np.atleast_1d(np.diag(full) if full.ndim == 2 else full), 1e-4,
                             rtol=1e-6)  # exactly the documented reg_covar * I


def test_tied_covariance_survives_a_collapse_without_reg_covar():
  est = GaussianMixture(2, covariance_type="tied", reg_covar=0.0,
                        init_params="kmeans").fit(COLLAPSING)
  assert np.all(np.isfinite(est.covariances_)) and np.all(np.linalg.eigvalsh(est.covariances_) > 0)


def test_empty_component_is_reseeded_with_a_warning():
  x = np.random.default_rng(0).normal(size=(60, 2))
  with pytest.warns(mr.EmptyComponentWarning, match=r"component\(s\) \[1\] lost all"):
    est = GaussianMixture(2, means_init=[[0, 0], [1e3, 1e3]], verbose=False).fit(x)
  assert not mr.empty_components(est.weights_, np.ones(len(x))).any()
  for p in (est.weights_, est.means_, est.covariances_):
    assert np.all(np.isfinite(p))
  first, last = est.fit_result_.restarts[0], est.fit_result_.restarts[-1]
  assert len(est.fit_result_.restarts) == 2 and est.fit_result_.best_restart == 1
  assert first.final_params.weights[1] < 1e-10  # the plain fit had an empty component
  assert est.log_likelihood_ == last.final_log_likelihood > first.final_log_likelihood
  assert np.all(np.diff(last.log_likelihood) >= -1e-9)  # the continuation is still EM
  np.testing.assert_allclose(est.score(x) * len(x), est.log_likelihood_, rtol=1e-10)


def test_empty_component_without_reg_covar_names_reg_covar():
  x = np.random.default_rng(0).normal(size=(60, 2))
  with pytest.raises(NumericalFailureError, match="reg_covar"):
    GaussianMixture(2, means_init=[[0, 0], [1e3, 1e3]], reg_covar=0.0).fit(x)


def test_identical_points_give_finite_params_and_a_warning():
  with pytest.warns(mr.EmptyComponentWarning):
    est = GaussianMixture(2, verbose=False).fit(np.ones((30, 2)))
  np.testing.assert_allclose(est.means_, 1.0)
  np.testing.assert_allclose(est.covariances_, np.stack([1e-6 * np.eye(2)] * 2))


def test_reseed_puts_the_component_on_the_worst_fitted_point():
  from tfp_em.mixture.em import GaussianMixtureEM
  from models.gaussian_mixture import GaussianMixtureParams
  x = np.array([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [4.0, 4.0]])
  w = np.array([1.0, 1.0, 1.0, 2.0])
  params = GaussianMixtureParams(tf.constant([1.0 - 1e-20, 1e-20], tf.float64),
                                 tf.constant([[0.0, 0.0], [9e3, 9e3]], tf.float64),
                                 tf.constant(np.stack([np.eye(2)] * 2), tf.float64))
  empty = mr.empty_components(params.weights, w)
  np.testing.assert_array_equal(empty, [False, True])
  model = GaussianMixtureEM(2, "full", 1e-6)
  new = mr.reseed(params, model.log_prob_components, x, w, empty, "full", 1e-6)
  np.testing.assert_array_equal(new.means[1], [4.0, 4.0])
  np.testing.assert_allclose(new.weights, np.array([1.0, 2 / 5]) / 1.4)
  xc = x - np.average(x, axis=0, weights=w)
  np.testing.assert_allclose(new.covariances[1], (w[:, None] * xc).T @ xc / 5 + 1e-6 * np.eye(2))
  np.testing.assert_array_equal(new.covariances[0], np.eye(2))


# ---- Mixed effects: Sigma_u on the boundary. ----------------------------------

def _slopes_data(slope_ratio):
  rng = np.random.default_rng(0)
  g, n = 15, 8
  cluster = np.repeat(np.arange(g), n)
  t = np.tile(np.arange(n, dtype=float), g)
  x = rng.normal(size=(g * n, 2))
  b = rng.normal(0, 1, g)
  # u_i = b_i (1, slope_ratio): Sigma_u has rank one.
  y = x @ [1., -1.] + b[cluster] * (1 + slope_ratio * t) + 0.3 * rng.normal(size=g * n)
  return x, y, cluster, t


@pytest.mark.parametrize("slope_ratio,cov", [(0.0, "full"), (0.5, "full"), (0.0, "diag")])
def test_near_singular_sigma_u_is_handled(slope_ratio, cov):
  from tfp_em.mixed_effects.estimator import MixedEffectsRegressor
  x, y, cluster, t = _slopes_data(slope_ratio)
  fits = {}
  for method in ("em", "nll"):
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # EM approaches the boundary slowly
      fits[method] = MixedEffectsRegressor(random_effects="slopes", covariance=cov,
                                           method=method, max_iter=300).fit(x, y, cluster, time=t)
  for est in fits.values():
    eig = np.linalg.eigvalsh(est.cov_random_effects_)
    # On the boundary (a singular fit): PSD up to round-off, one eigenvalue ~ 0.
    assert np.all(np.isfinite(eig)) and eig.min() >= -1e-12 * eig.max()
    assert eig.min() < 1e-3 * eig.max()
    np.linalg.cholesky(est.random_effects_covariance_)  # every posterior covariance is PD
    assert np.isfinite(est.log_likelihood_) and est.sigma2_ > 0
    assert np.all(np.isfinite(est.predict(x, cluster, time=t)))
  # EM creeps to the boundary; it ends close to, never above, the direct maximum.
  assert fits["em"].log_likelihood_ <= fits["nll"].log_likelihood_ + 1e-6
  assert fits["em"].log_likelihood_ == pytest.approx(fits["nll"].log_likelihood_, abs=0.1)


# ---- Bernoulli MLP: saturated logits. -----------------------------------------

def _mlp_data():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(80, 2))
  y = (x[:, 0] + x[:, 1] > 0).astype(int) + (x[:, 0] > 1).astype(int)
  return x, y


@pytest.mark.parametrize("factor", [1e3, 1e6])
def test_mlp_logits_saturate_without_overflow(factor):
  from models.bernoulli_mlp import BernoulliMLPParams
  from tfp_em.bernoulli_mlp.em import BernoulliMLPEM
  x, y = _mlp_data()
  model = BernoulliMLPEM(3, 3)
  params = model.initialize((tf.constant(x), tf.constant(y)), seed=1)
  big = BernoulliMLPParams(*[p * factor for p in params])  # logits of order factor
  data = (tf.constant(x), tf.constant(y, tf.int32))
  stats, ll = model.e_step(big, data)
  post = model.posterior(big, data)
  assert np.isfinite(float(ll)) and float(ll) <= 0
  np.testing.assert_allclose(tf.reduce_sum(post["tau"], -1), 1.0, rtol=1e-12)
  assert np.all(np.isfinite(stats.config_counts)) and np.all(np.isfinite(stats.hidden_targets))
  log_proba = model.predict_log_proba(big, tf.constant(x))
  assert np.all(np.isfinite(log_proba)) and np.all(np.asarray(log_proba) <= 1e-12)
  np.testing.assert_allclose(tf.reduce_logsumexp(log_proba, -1), 0.0, atol=1e-12)
  assert float(model.marginal_log_prob(big, data)) == pytest.approx(float(ll), rel=1e-9)
  new = model.m_step(big, stats)  # Newton from saturated weights stays finite
  assert all(np.all(np.isfinite(p)) for p in new)
  assert float(model.expected_log_joint(new, stats)) >= float(model.expected_log_joint(big, stats))


def test_mlp_on_inputs_scaled_by_1e3_and_separable_classes():
  from tfp_em.bernoulli_mlp.estimator import BernoulliMLPClassifier
  x, y = _mlp_data()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    a = BernoulliMLPClassifier(n_hidden=3, max_iter=60).fit(x, y)
    b = BernoulliMLPClassifier(n_hidden=3, max_iter=60).fit(x * 1e3 + 1e3, y)
  np.testing.assert_array_equal(a.predict(x), b.predict(x * 1e3 + 1e3))
  assert b.log_likelihood_ == pytest.approx(a.log_likelihood_, rel=1e-6)
  # Separable classes: weights grow, but every number stays finite.
  sep = np.where(x[:, :1] > 0, 5.0, -5.0) + 0.01 * x
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    est = BernoulliMLPClassifier(n_hidden=2, max_iter=200).fit(sep, (x[:, 0] > 0).astype(int))
  assert all(np.all(np.isfinite(p)) for p in est.params_)
  assert np.isfinite(est.log_likelihood_) and est.score(sep, (x[:, 0] > 0).astype(int)) == 1.0
  assert np.all(np.isfinite(est.predict_proba(sep * 1e3)))


def test_empty_component_in_a_streamed_fit_is_reported(tmp_path):
  x = np.random.default_rng(0).normal(size=(60, 2))
  ds = tf.data.Dataset.from_tensor_slices(x).batch(20)
  with pytest.warns(mr.EmptyComponentWarning, match="streamed fits are not re-seeded"):
    est = GaussianMixture(2, means_init=[[0, 0], [1e3, 1e3]], verbose=False).fit(ds)
  assert np.all(np.isfinite(est.means_)) and np.all(np.isfinite(est.covariances_))
