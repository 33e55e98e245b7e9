"""Property tests (hypothesis) over random shapes, parameters and seeds.

Kept small (few examples, tiny data): each example compiles a fresh graph.
"""
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SETTINGS = settings(max_examples=4, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


def _monotone(ll, n):
  ll = np.asarray(ll)
  assert np.all(np.isfinite(ll))
  slack = 1e-10 * (np.abs(ll[:-1]) + n)
  assert np.all(np.diff(ll) >= -slack), np.diff(ll).min()


@SETTINGS
@given(k=st.integers(1, 3), d=st.integers(1, 3), n_per=st.integers(4, 15),
       cov=st.sampled_from(["full", "tied", "diag", "spherical"]), seed=st.integers(0, 2 ** 16),
       spread=st.floats(0.5, 5.0))
def test_gmm_properties(k, d, n_per, cov, seed, spread):
  from tfp_em import GaussianMixture
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(k * n_per, d)) + spread * rng.normal(size=(k, d)).repeat(n_per, 0)
  kw = dict(n_components=k, covariance_type=cov, max_iter=25, seed=seed, verbose=False,
            reg_covar=1e-4)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    a = GaussianMixture(**kw).fit(x)
    b = GaussianMixture(**kw).fit(x)
  trace = a.fit_result_.restarts[a.fit_result_.best_restart].log_likelihood
  _monotone(trace, len(x))
  proba = a.predict_proba(x)
  np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-12)
  np.testing.assert_array_equal(a.predict(x), np.argmax(proba, 1))
  assert a.score(x) * len(x) == pytest.approx(a.log_likelihood_, rel=1e-10)
  for p, q in zip((a.weights_, a.means_, a.covariances_), (b.weights_, b.means_, b.covariances_)):
    np.testing.assert_array_equal(p, q)  # the same seed gives an identical result
  assert np.all(np.isfinite(a.covariances_)) and np.all(a.weights_ > 0)


@SETTINGS
@given(g=st.integers(3, 8), n_per=st.integers(3, 6), q=st.integers(1, 2),
       cov=st.sampled_from(["full", "diag"]), seed=st.integers(0, 2 ** 16),
       sd_u=st.floats(0.0, 3.0))
def test_mixed_model_properties(g, n_per, q, cov, seed, sd_u):
  from tfp_em.mixed_effects.estimator import MixedEffectsRegressor
  rng = np.random.default_rng(seed)
  n = g * n_per
  cluster = np.repeat(np.arange(g), n_per)
  x = rng.normal(size=(n, 2))
  t = rng.uniform(0, 3, n)
  z = np.stack([np.ones(n), t][:q], 1)
  u = sd_u * rng.normal(size=(g, q))
  y = x @ [1.0, -2.0] + np.sum(z * u[cluster], 1) + 0.5 * rng.normal(size=n)
  kw = dict(random_effects="custom", covariance=cov, max_iter=40, seed=seed)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    a = MixedEffectsRegressor(**kw).fit(x, y, cluster, Z=z)
    b = MixedEffectsRegressor(**kw).fit(x, y, cluster, Z=z)
  _monotone(a.fit_result_.restarts[0].log_likelihood, n)
  post = a.random_effects_covariance_
  np.testing.assert_allclose(post, np.swapaxes(post, 1, 2), atol=1e-12)
  np.linalg.cholesky(post)  # every posterior covariance positive definite
  assert np.all(np.linalg.eigvalsh(a.cov_random_effects_) >= 0)
  np.testing.assert_array_equal(a.predict(x, cluster, Z=z), b.predict(x, cluster, Z=z))
  # Unseen clusters get the population mean f(x).
  np.testing.assert_allclose(a.predict(x, Z=z), a.intercept_ + x @ a.coef_, rtol=1e-12)


@SETTINGS
@given(m=st.integers(1, 3), classes=st.integers(2, 3), n=st.integers(12, 40),
       seed=st.integers(0, 2 ** 16), l2=st.sampled_from([0.0, 0.5]))
def test_bernoulli_mlp_properties(m, classes, n, seed, l2):
  from tfp_em.bernoulli_mlp.estimator import BernoulliMLPClassifier
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 2))
  y = np.arange(n) % classes  # every class present
  kw = dict(n_hidden=m, max_iter=15, l2=l2, seed=seed)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    a = BernoulliMLPClassifier(**kw).fit(x, y)
    b = BernoulliMLPClassifier(**kw).fit(x, y)
  _monotone(a.fit_result_.restarts[0].log_likelihood, n)
  proba = a.predict_proba(x)
  np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-12)
  np.testing.assert_array_equal(a.predict(x), a.classes_[np.argmax(proba, 1)])
  assert a.log_likelihood_ == pytest.approx(np.sum(np.log(proba[np.arange(n), y])), rel=1e-9)
  for p, q in zip(a.params_, b.params_):
    np.testing.assert_array_equal(p, q)


CELL = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr),
                 st.sampled_from(["", "x", "nan", "1e400", " 3 ", "\"1\"", "é"]))


@settings(max_examples=60, deadline=None, derandomize=True)
@given(header=st.lists(st.sampled_from(["a", "b", "c", " b"]), min_size=1, max_size=3),
       rows=st.lists(st.lists(CELL, max_size=4), max_size=5),
       columns=st.sampled_from([None, ["a"], ["a", "b"]]))
def test_csv_loader_returns_finite_numbers_or_a_named_error(tmp_path_factory, header, rows,
                                                            columns):
  from tfp_em.cli import readers
  path = tmp_path_factory.mktemp("csv") / "f.csv"
  path.write_text("\n".join([",".join(header)] + [",".join(r) for r in rows]), encoding="utf-8")
  try:
    x, names = readers.load_csv(path, columns)
  except ValueError as e:
    assert str(path) in str(e) or "does not exist" in str(e)  # names the file
    return
  kept = [r for r in rows if len(r) > 1 or (r and r[0].strip())]  # blank lines are skipped
  assert x.shape == (len(kept), len(names)) and np.all(np.isfinite(x))
  assert names == (columns or [h.strip() for h in header])
