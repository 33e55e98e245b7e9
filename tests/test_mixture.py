"""Gaussian mixture EM: against TFP, scikit-learn, autodiff, and bad input."""
import warnings

import numpy as np
import pytest
import tensorflow as tf

from models import gaussian_mixture as gm
from models.specs import constrain, unconstrain
from tfp_em import GaussianMixture, NumericalFailureError
from tfp_em.mixture import em as me

COV_TYPES = gm.COVARIANCE_TYPES


def _fit(x, k=3, **kw):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return GaussianMixture(k, **kw).fit(x)


@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-10), ("float32", 2e-4)])
@pytest.mark.parametrize("cov", COV_TYPES)
def test_scores_and_posterior_match_tfp(overlapping, cov, dtype, rtol):
  est = _fit(overlapping, covariance_type=cov, dtype=dtype, max_iter=5)
  marginal = gm.marginal(est.params_, cov)
  x = tf.constant(overlapping, dtype)
  np.testing.assert_allclose(est.score_samples(overlapping), marginal.log_prob(x).numpy(),
                             rtol=rtol)
  np.testing.assert_allclose(est.predict_proba(overlapping),
                             marginal.posterior_marginal(x).probs_parameter().numpy(),
                             rtol=rtol, atol=rtol)
  assert est.params_.means.dtype == tf.as_dtype(dtype)


@pytest.mark.parametrize("cov", COV_TYPES)
def test_loglik_never_decreases_without_regularization(overlapping, cov):
  est = _fit(overlapping, covariance_type=cov, reg_covar=0.0, tol=0.0, max_iter=60,
             on_decrease="raise")
  ll = est.fit_result_.restarts[0].log_likelihood
  assert len(ll) == 61 or est.converged_
  assert np.all(np.diff(ll) >= -1e-10 * np.abs(ll[1:]))
  assert ll[-1] > ll[0] + 1.0


@pytest.mark.parametrize("cov", COV_TYPES)
def test_matches_sklearn_from_same_initialization(overlapping, cov):
  sk_mixture = pytest.importorskip("sklearn.mixture")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    start = sk_mixture.GaussianMixture(3, covariance_type=cov, max_iter=1, random_state=0)
    start.fit(overlapping)
    init = dict(weights_init=start.weights_, means_init=start.means_,
                precisions_init=start.precisions_)
    sk = sk_mixture.GaussianMixture(3, covariance_type=cov, tol=0, max_iter=25, **init)
    sk.fit(overlapping)
  ours = _fit(overlapping, covariance_type=cov, tol=0.0, max_iter=25, **init)
  for name in ("weights_", "means_", "covariances_", "precisions_cholesky_"):
    np.testing.assert_allclose(getattr(ours, name), getattr(sk, name), rtol=1e-6,
                               err_msg=name)
  np.testing.assert_allclose(ours.log_likelihood_ / len(overlapping), sk.score(overlapping),
                             rtol=1e-10)
  np.testing.assert_allclose(ours.predict_proba(overlapping), sk.predict_proba(overlapping),
                             atol=1e-8)


@pytest.mark.parametrize("cov", COV_TYPES)
def test_recovers_known_clusters(blobs, cov):
  from sklearn.metrics import adjusted_rand_score
  x, labels = blobs
  est = _fit(x, covariance_type=cov, n_init=2, seed=3)
  assert adjusted_rand_score(labels, est.predict(x)) > 0.95
  true_means = np.array([[0.0, 0.0], [6.0, 0.0], [0.0, 6.0]])
  match = np.argmin(np.linalg.norm(est.means_[None] - true_means[:, None], axis=-1), axis=1)
  assert sorted(match) == [0, 1, 2]
  np.testing.assert_allclose(est.means_[match], true_means, atol=0.3)
  np.testing.assert_allclose(est.weights_[match], [0.5, 1 / 3, 1 / 6], atol=0.03)


def _unconstrained_grad(fn, params, specs):
  u = [tf.Variable(t) for t in unconstrain(params, specs)]
  with tf.GradientTape() as tape:
    value = fn(constrain(type(params)(*u), specs))
  return np.concatenate([tf.reshape(g, [-1]).numpy() for g in tape.gradient(value, u)])


@pytest.mark.parametrize("cov", COV_TYPES)
def test_fisher_identity_and_m_step_stationarity(overlapping, cov):
  est = _fit(overlapping, covariance_type=cov, max_iter=3, reg_covar=0.0)
  model = me.GaussianMixtureEM(3, cov, reg_covar=0.0)
  data = me.MixtureData(tf.constant(overlapping), tf.ones(len(overlapping), tf.float64))
  old = est.params_
  stats, ll = model.e_step(old, data)
  np.testing.assert_allclose(ll, model.marginal_log_prob(old, data), rtol=1e-12)
  grad_q = _unconstrained_grad(lambda p: model.expected_log_joint(p, stats), old,
                               model.param_specs)
  grad_ll = _unconstrained_grad(lambda p: model.marginal_log_prob(p, data), old,
                                model.param_specs)
  assert np.linalg.norm(grad_ll) > 1e-3  # not already at a stationary point
  np.testing.assert_allclose(grad_q, grad_ll, rtol=1e-8, atol=1e-8 * np.abs(grad_ll).max())
  new = model.m_step(old, stats)
  grad_new = _unconstrained_grad(lambda p: model.expected_log_joint(p, stats), new,
                                 model.param_specs)
  assert np.abs(grad_new).max() < 1e-8 * np.abs(grad_ll).max() + 1e-9
  assert model.expected_log_joint(new, stats) >= model.expected_log_joint(old, stats)


def test_m_step_pure_functions_against_numpy(overlapping):
  rng = np.random.default_rng(2)
  resp = rng.dirichlet(np.ones(3), size=len(overlapping))
  x = overlapping
  center = rng.normal(size=(3, 3))
  model = me.GaussianMixtureEM(3, "full", reg_covar=0.0)
  stats = model._stats_from_resp(tf.constant(resp), tf.constant(x),
                                 tf.ones(len(x), tf.float64), tf.constant(center))
  counts = resp.sum(0)
  means = me.estimate_means(stats, stats.counts).numpy()
  np.testing.assert_allclose(means, resp.T @ x / counts[:, None], rtol=1e-12)
  cov = me.estimate_covariances(stats, tf.constant(means), stats.counts, "full", 0.0).numpy()
  for k in range(3):
    diff = x - means[k]
    np.testing.assert_allclose(cov[k], (resp[:, k, None] * diff).T @ diff / counts[k],
                               rtol=1e-10)
  np.testing.assert_allclose(me.estimate_weights(stats.counts), counts / counts.sum())


def test_float32_covariance_is_stable_far_from_origin(blobs):
  x, labels = blobs
  shifted = x * 1e-2 + 1e4  # naive E[x^2] - mu^2 cancels to garbage in float32
  est = _fit(shifted, covariance_type="diag", dtype="float32", max_iter=20)
  assert np.all(est.covariances_ > 0)
  ref = _fit(shifted, covariance_type="diag", dtype="float64", max_iter=20)
  np.testing.assert_allclose(np.sort(est.covariances_.ravel()),
                             np.sort(ref.covariances_.ravel()), rtol=0.05)


def test_sample_weights_equal_duplication(overlapping):
  rng = np.random.default_rng(4)
  counts = rng.integers(1, 4, size=len(overlapping))
  kw = dict(covariance_type="full", tol=0.0, max_iter=10,
            means_init=overlapping[:3], weights_init=np.ones(3) / 3,
            precisions_init=np.stack([np.eye(3)] * 3))
  weighted = GaussianMixture(3, **kw).fit(overlapping, sample_weight=counts.astype(float))
  repeated = GaussianMixture(3, **kw).fit(np.repeat(overlapping, counts, axis=0))
  np.testing.assert_allclose(weighted.means_, repeated.means_, rtol=1e-10)
  np.testing.assert_allclose(weighted.covariances_, repeated.covariances_, rtol=1e-10)
  np.testing.assert_allclose(weighted.log_likelihood_, repeated.log_likelihood_, rtol=1e-12)


@pytest.mark.parametrize("compile", ["eager", "graph", "xla"])
def test_compile_modes_agree(overlapping, compile):
  ref = _fit(overlapping, max_iter=8, tol=0.0, compile="eager")
  est = _fit(overlapping, max_iter=8, tol=0.0, compile=compile)
  np.testing.assert_allclose(est.means_, ref.means_, rtol=1e-10)
  np.testing.assert_allclose(est.log_likelihood_, ref.log_likelihood_, rtol=1e-12)


def test_chunked_e_step_equals_single_pass(overlapping):
  data = me.MixtureData(tf.constant(overlapping), tf.ones(len(overlapping), tf.float64))
  est = _fit(overlapping, covariance_type="tied", max_iter=2)
  whole = me.GaussianMixtureEM(3, "tied").e_step(est.params_, data)
  chunked = me.GaussianMixtureEM(3, "tied", chunk_size=64).e_step(est.params_, data)
  for a, b in zip(tf.nest.flatten(whole), tf.nest.flatten(chunked)):
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_reported_loglik_is_at_returned_params(overlapping):
  est = _fit(overlapping, max_iter=7, tol=0.0)
  np.testing.assert_allclose(est.log_likelihood_, est.score_samples(overlapping).sum(),
                             rtol=1e-12)


def test_seed_reproducible_and_restarts_kept(overlapping):
  a = _fit(overlapping, n_init=3, seed=11, max_iter=30)
  b = _fit(overlapping, n_init=3, seed=11, max_iter=30)
  np.testing.assert_array_equal(a.means_, b.means_)
  assert len(a.fit_result_.restarts) == 3
  finals = [r.final_log_likelihood for r in a.fit_result_.restarts]
  assert a.log_likelihood_ == max(finals)
  assert len({r.seed for r in a.fit_result_.restarts}) == 3


def test_sample_bic_aic(blobs):
  x, _ = blobs
  est = _fit(x)
  draws, z = est.sample(500, seed=1)
  assert draws.shape == (500, 2) and z.shape == (500,)
  assert set(np.unique(z)) <= {0, 1, 2}
  n_params = 3 * 3 + 3 * 2 + 2
  np.testing.assert_allclose(est.bic(x), -2 * est.log_likelihood_ + n_params * np.log(len(x)))
  np.testing.assert_allclose(est.aic(x), -2 * est.log_likelihood_ + 2 * n_params)
  assert _fit(x, k=1).bic(x) > est.bic(x)


@pytest.mark.parametrize("bad,match", [
    (np.array([[0.0, np.nan]] * 10), "NaN"),
    (np.array([[0.0, np.inf]] * 10), "inf"),
    (np.zeros(10), "2-D"),
    (np.zeros((10, 2, 2)), "2-D"),
    (np.zeros((2, 2)), "at least as many points"),
    (np.array([["a", "b"]] * 10), "numeric"),
])
def test_bad_input_is_named(bad, match):
  with pytest.raises(ValueError, match=match):
    GaussianMixture(3).fit(bad)


@pytest.mark.parametrize("kwargs,match", [
    (dict(n_components=0), "n_components"),
    (dict(covariance_type="banana"), "covariance_type"),
    (dict(init_params="magic"), "init_params"),
    (dict(on_decrease="ignore"), "on_decrease"),
    (dict(reg_covar=-1.0), "reg_covar"),
    (dict(tol=float("nan")), "tol"),
    (dict(dtype="float16"), "dtype"),
    (dict(means_init=np.zeros((2, 2))), "means_init"),
])
def test_bad_options_are_named(blobs, kwargs, match):
  x, _ = blobs
  kw = dict(n_components=3)
  kw.update(kwargs)
  with pytest.raises(ValueError, match=match):
    GaussianMixture(**kw).fit(x)


@pytest.mark.parametrize("weights,match", [(np.ones(5), "length"), (-np.ones(300), "negative")])
def test_bad_sample_weight(blobs, weights, match):
  x, _ = blobs
  with pytest.raises(ValueError, match=match):
    GaussianMixture(3).fit(x, sample_weight=weights)


def test_predict_before_fit_and_wrong_width(blobs):
  x, _ = blobs
  with pytest.raises(ValueError, match="not fitted"):
    GaussianMixture(2).predict(x)
  est = _fit(x, k=2)
  with pytest.raises(ValueError, match="features"):
    est.predict(np.zeros((3, 5)))


def test_collapsed_component_names_reg_covar():
  x = np.array([[1.0, 2.0]] * 20 + [[5.0, 5.0], [6.0, 5.5], [5.5, 7.0], [7.0, 6.0]])
  with pytest.raises(NumericalFailureError, match="reg_covar"):
    GaussianMixture(2, reg_covar=0.0, init_params="kmeans").fit(x)
  est = GaussianMixture(2, reg_covar=1e-3, init_params="kmeans").fit(x)
  assert np.all(np.isfinite(est.covariances_))


def test_input_is_not_modified(blobs):
  x, _ = blobs
  x32 = x.astype(np.float32)
  before, before32 = x.copy(), x32.copy()
  w = np.ones(len(x))
  GaussianMixture(3).fit(x)
  GaussianMixture(3, dtype="float32").fit(x32, sample_weight=w)
  np.testing.assert_array_equal(x, before)
  np.testing.assert_array_equal(x32, before32)
  np.testing.assert_array_equal(w, np.ones(len(x)))


@pytest.mark.parametrize("spread", [1.0, 1e3])
def test_scatter_by_matmul_equals_per_centre_scatter_in_float64(spread):
  rng = np.random.default_rng(3)
  x = tf.constant(rng.normal(size=(500, 4)) + rng.normal(0, spread, 4))
  center = tf.constant(rng.normal(0, spread, (3, 4)))
  rw = tf.nn.softmax(tf.constant(rng.normal(size=(500, 3))), -1)
  fast = me.stats_by_matmul(rw, x, center)
  exact = me.stats_about_centres(rw, x, center, full=True)
  for a, b in zip(fast, exact):
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9 * float(tf.reduce_max(tf.abs(b))))
