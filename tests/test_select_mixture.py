"""tfp_em.select_mixture: the table of candidates, ICL, the chosen model, compiled-step reuse.

Its bad-input cases are in robustness_cases.py."""
import math

import numpy as np
import pytest
from scipy.special import logsumexp

import tfp_em
from tfp_em.engine import compiling
from tfp_em.mixture import GaussianMixture


def _blobs(seed=0, n=60):
  rng = np.random.default_rng(seed)
  return np.concatenate([rng.normal(0, 1, (n, 2)), rng.normal([6, 1], [1.0, 0.5], (n, 2))])


@pytest.fixture(scope="module")
def search():
  x = _blobs()
  return x, tfp_em.select_mixture(x, [1, 2, 3], models=["full", "spherical"], n_init=2, seed=3,
                                  progress=False)


def test_table_criteria_are_the_estimators_own(search):
  x, found = search
  table = found.table
  assert list(table[["k", "covariance_type"]].itertuples(index=False, name=None)) == [
      (1, "full"), (2, "full"), (3, "full"), (1, "spherical"), (2, "spherical"),
      (3, "spherical")]
  for row in table.itertuples():
    est = GaussianMixture(row.k, covariance_type=row.covariance_type, n_init=2, seed=3,
                          verbose=False).fit(x)
    assert row.log_likelihood == pytest.approx(est.log_likelihood_, rel=1e-12)
    assert row.bic == pytest.approx(est.bic(x), rel=1e-12)
    assert row.aic == pytest.approx(est.aic(x), rel=1e-12)
    assert row.icl == pytest.approx(est.icl(x), rel=1e-12)
    # p from the criteria's definitions: BIC - AIC = p (log N - 2)
    assert row.n_parameters * (math.log(len(x)) - 2) == pytest.approx(row.bic - row.aic)
  assert table["n_parameters"].tolist() == [5, 11, 17, 3, 7, 11]  # full: 5K, spherical: 4K
  assert table["converged"].all()


def test_icl_is_bic_plus_the_map_entropy_from_predict_proba(search):
  x, found = search
  est = found.best_estimator_
  resp = est.predict_proba(x)  # [N, K]
  score = logsumexp(np.log(est.weights_) + _component_log_pdf(est, x), axis=1)  # [N]
  n, p = len(x), found.best_["n_parameters"]
  bic = -2 * score.sum() + p * math.log(n)
  icl = bic - 2 * np.sum(np.log(resp[np.arange(n), resp.argmax(1)]))
  assert est.bic(x) == pytest.approx(bic, rel=1e-10)
  assert est.icl(x) == pytest.approx(icl, rel=1e-10)
  assert est.icl(x) > est.bic(x)  # two overlapping-free blobs still cost some entropy


def _component_log_pdf(est, x):
  from scipy.stats import multivariate_normal
  covs = (est.covariances_ if est.covariance_type == "full"
          else [c * np.eye(x.shape[1]) for c in est.covariances_])
  return np.stack([multivariate_normal(m, c).logpdf(x) for m, c in zip(est.means_, covs)], 1)


def test_best_row_is_the_lowest_criterion(search):
  x, found = search
  table = found.table
  assert table["best"].sum() == 1
  assert table["bic"].idxmin() == int(np.flatnonzero(table["best"])[0])
  assert (found.best_["k"], found.best_["covariance_type"]) == (2, "full")
  est = found.best_estimator_
  assert (est.n_components, est.covariance_type) == (2, "full")
  assert found.best_["bic"] == pytest.approx(est.bic(x), rel=1e-12)
  rows = found.report_rows()
  assert [r["chosen"] for r in rows] == table["best"].tolist()
  assert all(type(r["k"]) is int and type(r["bic"]) is float for r in rows)


def test_criterion_icl_and_aic_choose_their_own_minimum():
  x = _blobs(1, 40)
  for criterion in ("icl", "aic"):
    found = tfp_em.select_mixture(x, [1, 2, 4], models=["spherical"], criterion=criterion,
                                  progress=False)
    sound = found.table[~found.table["spurious"]]
    assert sound[criterion].idxmin() == int(np.flatnonzero(found.table["best"])[0])
    assert found.criterion == criterion
  # K=4 puts a component on one point: flagged, and not chosen
  spurious = found.table[found.table["spurious"]]
  assert spurious["k"].tolist() == [4] and "SpuriousSolutionWarning" in spurious["notes"].iloc[0]
  assert found.best_["k"] == 2


def test_second_search_traces_nothing():
  x = _blobs(2, 30)
  kwargs = dict(models=["diag"], n_init=2, progress=False)
  tfp_em.select_mixture(x, [1, 2], **kwargs)
  before = compiling.tracing_count()
  tfp_em.select_mixture(x, [2, 1], **kwargs)  # the same configurations
  assert compiling.tracing_count() == before


def test_failed_candidate_gets_nan_and_a_note():
  x = np.concatenate([np.zeros((5, 2)), np.ones((5, 2))])  # K=3 collapses without reg_covar
  found = tfp_em.select_mixture(x, [1, 2, 3], models=["diag"], reg_covar=0.0, progress=False)
  failed = found.table[found.table["notes"].str.startswith("failed")]
  assert len(failed) >= 1 and failed["bic"].isna().all()
  assert not found.table.loc[found.table["best"], "bic"].isna().any()


def test_missing_values_pass_through_to_the_fits():
  x = _blobs(4, 40)
  x[::7, 1] = np.nan
  found = tfp_em.select_mixture(x, [1, 2], models=["diag"], missing="em", progress=False)
  est = found.best_estimator_
  assert est.missing == "em" and found.best_["k"] == 2
  assert found.best_["bic"] == pytest.approx(est.bic(x), rel=1e-12)
  assert found.best_["icl"] == pytest.approx(est.icl(x), rel=1e-12)
  with pytest.raises(ValueError, match="missing='em'"):  # NaN without the option
    tfp_em.select_mixture(x, [1], models=["diag"], progress=False)


@pytest.mark.slow
def test_all_is_mclusts_14_models_and_they_agree_at_one_component():
  x = _blobs(5, 30)
  found = tfp_em.select_mixture(x, [1], progress=False)  # models="all"
  table = found.table.set_index("covariance_type")
  assert list(table.index) == ["EII", "VII", "EEI", "VEI", "EVI", "VVI", "EEE", "VEE", "EVE",
                               "VVE", "EEV", "VEV", "EVV", "VVV"]
  # K=1: volume, shape and orientation have nothing to be equal across, so the
  # spherical, diagonal and ellipsoidal families each reach one l with one p
  for family in (["EII", "VII"], ["EEI", "VEI", "EVI", "VVI"],
                 ["EEE", "VEE", "EVE", "VVE", "EEV", "VEV", "EVV", "VVV"]):
    np.testing.assert_allclose(table.loc[family, "log_likelihood"],
                               table.loc[family[-1], "log_likelihood"], rtol=1e-9)
    assert table.loc[family, "n_parameters"].nunique() == 1
  assert table["n_parameters"].tolist()[::4] == [3, 4, 5, 5]  # EII, EVI, EVE, EVV
  assert found.best_["bic"] == table["bic"].min()
