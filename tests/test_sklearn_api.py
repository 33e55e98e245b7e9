"""The estimators follow scikit-learn's conventions (issue 15).

`parametrize_with_checks` runs scikit-learn's whole estimator-check suite on
GaussianMixture and BernoulliMLPClassifier (small max_iter: the checks test
the API, not the optimum; marked slow: 20-60 s together). Nothing is listed in `expected_failed_checks`.
With scikit-learn 1.9.1: GaussianMixture 47 passed, 1 skipped (48 checks);
BernoulliMLPClassifier 54 passed, 1 skipped (55 checks). Skipped checks, and why:
  * check_array_api_input: scikit-learn skips it itself unless the
    SCIPY_ARRAY_API environment variable is set; the estimators compute in
    TensorFlow and take array-API inputs only as NumPy converts them.
MixedEffectsRegressor's `fit` needs the grouping factor (`clusters`), which
scikit-learn's checks never pass, so it runs the checks that do not fit
(`MIXED_EFFECTS_CHECKS`) plus the fitted behaviour tested directly below.
"""
import pickle
import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning as SklearnConvergenceWarning
from sklearn.exceptions import NotFittedError
import sklearn
from sklearn.model_selection import GridSearchCV, KFold, cross_validate
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils import estimator_checks as ec
from sklearn.utils.estimator_checks import parametrize_with_checks

import tfp_em
from tfp_em import (BernoulliMLPClassifier, CrossedEffectsRegressor, GaussianMixture,
                    MixedEffectsRegressor)


@pytest.mark.slow  # the set takes 20-60 s on two shared cores
@parametrize_with_checks([GaussianMixture(max_iter=20, verbose=False),
                          BernoulliMLPClassifier(n_hidden=3, max_iter=30)])
def test_scikit_learn_estimator_checks(estimator, check):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", SklearnConvergenceWarning)  # max_iter is small on purpose
    check(estimator)


# Checks that need no call to fit(X, y) without groups.
MIXED_EFFECTS_CHECKS = [
    ec.check_estimator_cloneable, ec.check_estimator_repr, ec.check_no_attributes_set_in_init,
    ec.check_estimators_unfitted, ec.check_do_not_raise_errors_in_init_or_set_params,
    ec.check_get_params_invariance, ec.check_set_params, ec.check_parameters_default_constructible,
    ec.check_mixin_order, ec.check_estimator_tags_renamed, ec.check_valid_tag_types,
]


@pytest.mark.parametrize("estimator", [MixedEffectsRegressor(), CrossedEffectsRegressor()],
                         ids=lambda e: type(e).__name__)
@pytest.mark.parametrize("check", MIXED_EFFECTS_CHECKS, ids=lambda c: c.__name__)
def test_mixed_effects_api_checks(estimator, check):
  check(type(estimator).__name__, estimator)


def _blobs(n=90, seed=0):
  rng = np.random.default_rng(seed)
  centres = np.array([[0., 0.], [6., 0.], [0., 6.]])
  X = np.concatenate([c + rng.normal(size=(n // 3, 2)) for c in centres])
  return X[rng.permutation(n)]  # shuffled: KFold's folds then hold every blob


def _lmm_data(n_clusters=8, per=6, seed=0):
  rng = np.random.default_rng(seed)
  clusters = np.repeat(np.arange(n_clusters), per)
  X = rng.normal(size=(n_clusters * per, 2))
  y = X @ [1., -0.5] + rng.normal(size=n_clusters)[clusters] + 0.3 * rng.normal(size=len(X))
  return X, y, clusters


def test_convergence_warning_is_scikit_learns():
  assert issubclass(tfp_em.ConvergenceWarning, SklearnConvergenceWarning)
  with pytest.warns(SklearnConvergenceWarning, match="max_iter=2"):
    GaussianMixture(2, max_iter=2, tol=0., verbose=False).fit(_blobs())


@pytest.mark.parametrize("make", [
    lambda: GaussianMixture(2), lambda: BernoulliMLPClassifier(), lambda: MixedEffectsRegressor(),
    lambda: CrossedEffectsRegressor()], ids=["gmm", "mlp", "lmm", "crossed"])
def test_not_fitted_error_before_fit(make):
  with pytest.raises(NotFittedError, match="not fitted"):
    make().predict(np.zeros((3, 2)))


def test_clone_copies_parameters_not_the_fit():
  gmm = GaussianMixture(3, covariance_type="diag", max_iter=30, seed=4, verbose=False)
  gmm.fit(_blobs())
  copy = clone(gmm)
  assert copy.get_params() == gmm.get_params()
  assert not hasattr(copy, "means_")
  copy.set_params(n_components=2)
  assert copy.n_components == 2 and gmm.n_components == 3


def test_grid_search_over_n_components_picks_the_true_k():
  search = GridSearchCV(GaussianMixture(max_iter=50, verbose=False),
                        {"n_components": [1, 2, 3]}, cv=3)
  search.fit(_blobs(seed=1))
  assert search.best_params_ == {"n_components": 3}
  scores = search.cv_results_["mean_test_score"]
  assert scores[0] < scores[1] < scores[2]  # mean held-out log-likelihood per point


def test_pipeline_scaler_then_mixture_equals_mixture_on_scaled_data():
  X = _blobs() * [1., 100.] + [0., 5e3]
  pipe = make_pipeline(StandardScaler(), GaussianMixture(3, max_iter=50, verbose=False)).fit(X)
  scaled = StandardScaler().fit_transform(X)
  alone = GaussianMixture(3, max_iter=50, verbose=False).fit(scaled)
  np.testing.assert_array_equal(pipe.predict(X), alone.predict(scaled))
  np.testing.assert_allclose(pipe.score(X), alone.score(scaled), rtol=1e-12)


@pytest.mark.parametrize("kind", ["gmm", "mlp", "lmm"])
def test_pickle_round_trip_predicts_the_same(kind):
  X = _blobs()
  if kind == "gmm":
    est = GaussianMixture(3, max_iter=30, verbose=False).fit(X)
    args = (X,)
  elif kind == "mlp":
    y = (X[:, 0] > 3).astype(int)
    est = BernoulliMLPClassifier(n_hidden=2, max_iter=10).fit(X, y)
    args = (X,)
  else:
    X, y, clusters = _lmm_data()
    est = MixedEffectsRegressor(max_iter=50).fit(X, y, clusters)
    args = (X, clusters)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", SklearnConvergenceWarning)
    back = pickle.loads(pickle.dumps(est))
  np.testing.assert_array_equal(back.predict(*args), est.predict(*args))
  assert back.get_params() == est.get_params()


@pytest.mark.parametrize("kind", ["gmm", "mlp", "lmm"])
def test_feature_names_checked_as_scikit_learn_does(kind):
  X = _blobs()
  frame = pd.DataFrame(X, columns=["waiting", "eruptions"])
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", SklearnConvergenceWarning)
    if kind == "gmm":
      est = GaussianMixture(3, max_iter=10, verbose=False).fit(frame)
      extra = ()
    elif kind == "mlp":
      est = BernoulliMLPClassifier(n_hidden=2, max_iter=5).fit(frame, (X[:, 0] > 3).astype(int))
      extra = ()
    else:
      _, y, clusters = _lmm_data(n_clusters=9, per=10)
      est = MixedEffectsRegressor(max_iter=20).fit(frame, y, clusters)
      extra = (clusters,)
  np.testing.assert_array_equal(est.feature_names_in_, ["waiting", "eruptions"])
  assert est.n_features_in_ == 2
  reordered = frame[["eruptions", "waiting"]]
  with pytest.raises(ValueError, match="same order as they were in fit"):
    est.predict(reordered, *extra)
  with pytest.raises(ValueError, match="unseen at fit time"):
    est.predict(frame.rename(columns={"waiting": "wait"}), *extra)
  with pytest.warns(UserWarning, match="does not have valid feature names"):
    from_array = est.predict(X, *extra)
  np.testing.assert_array_equal(from_array, est.predict(frame, *extra))


def test_dataframe_after_an_array_fit_warns():
  X = _blobs()
  gmm = GaussianMixture(3, max_iter=10, verbose=False).fit(X)
  assert not hasattr(gmm, "feature_names_in_")
  with pytest.warns(UserWarning, match="fitted without feature names"):
    gmm.predict(pd.DataFrame(X, columns=["a", "b"]))


def test_warm_start_continues_from_the_last_fit():
  X = _blobs(seed=2)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", SklearnConvergenceWarning)
    straight = GaussianMixture(3, max_iter=6, tol=0., verbose=False).fit(X)
    warm = GaussianMixture(3, max_iter=3, tol=0., warm_start=True, n_init=1, verbose=False)
    warm.fit(X)
    first = warm.log_likelihood_
    warm.fit(X)
  assert warm.log_likelihood_ > first
  np.testing.assert_allclose(warm.means_, straight.means_, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(warm.log_likelihood_, straight.log_likelihood_, rtol=1e-12)
  with pytest.raises(ValueError, match="warm_start"):
    warm.set_params(n_components=2).fit(X)


def test_groups_reach_the_mixed_model_through_metadata_routing():
  X, y, clusters = _lmm_data(n_clusters=10, per=8)
  cv = KFold(4, shuffle=True, random_state=0)  # every cluster in every training fold
  with sklearn.config_context(enable_metadata_routing=True):
    plain = MixedEffectsRegressor(max_iter=50).set_fit_request(clusters=True)
    population = cross_validate(plain.set_score_request(clusters=False, sample_weight=False),
                                X, y, params={"clusters": clusters}, cv=cv)["test_score"]
    blup = MixedEffectsRegressor(max_iter=50).set_fit_request(clusters=True)
    blup.set_score_request(clusters=True, sample_weight=False)
    with_groups = cross_validate(blup, X, y, params={"clusters": clusters}, cv=cv)["test_score"]
  assert np.all(with_groups > population)  # the BLUPs of seen clusters help on held-out rows
