"""Spurious mixture fits (McLachlan & Peel): the pure checks, and the warnings a fit issues."""
import warnings

import numpy as np
import pytest
from sklearn.datasets import load_iris

from tfp_em import GaussianMixture
from tfp_em.cli.readers import load_old_faithful
from tfp_em.mixture import spurious
from tfp_em.mixture.spurious import SpuriousSolutionWarning


def test_min_points_and_log_spread():
  assert [spurious.min_points(c, 4) for c in ("full", "diag", "spherical", "tied")] == [5, 2, 2, 1]
  full = np.stack([np.diag([4.0, 1.0]), np.diag([1e-6, 1e-6])])             # [2, 2, 2]
  np.testing.assert_allclose(spurious.log_spread(full, "full", 2), [np.log(2.0), np.log(1e-6)])
  np.testing.assert_allclose(spurious.log_spread([[4.0, 1.0], [1.0, 1.0]], "diag", 2),
                             [np.log(2.0), 0.0])
  np.testing.assert_allclose(spurious.log_spread([2.0, 3.0], "spherical", 5), np.log([2.0, 3.0]))
  np.testing.assert_allclose(spurious.log_spread(np.eye(3) * 2, "tied", 3), [np.log(2.0)])
  assert spurious.log_spread(np.stack([np.eye(2), np.diag([1.0, -1.0])]), "full", 2)[1] == -np.inf


def test_min_points_of_mclust_models_follow_what_each_component_owns():
  """A component with its own full covariance needs D + 1 points; one whose volume and shape
  are pooled needs 1; a volume or diagonal of its own needs 2 (aliases as their types)."""
  needs = {m: spurious.min_points(m, 4) for m in
           ("EII", "VII", "EEI", "VEI", "EVI", "VVI", "EEE", "VEE", "EVE", "VVE", "EEV", "VEV",
            "EVV", "VVV")}
  assert needs == dict(EII=1, VII=2, EEI=1, VEI=2, EVI=2, VVI=2, EEE=1, VEE=2, EVE=2, VVE=2,
                       EEV=1, VEV=2, EVV=5, VVV=5)
  # a 3-point component of an EEV fit in 4-D is not spurious; in VVV it is
  cov = np.stack([np.eye(4), np.eye(4)])
  assert spurious.fit_findings([0.97, 0.03], cov, 100, "EEV", 4, reg_covar=1e-6) == []
  assert "fewer than the 5" in spurious.fit_findings([0.97, 0.03], cov, 100, "VVV", 4,
                                                     reg_covar=1e-6)[0]


def test_narrow_components_compares_with_the_others_median():
  logs = np.log([1.0, 2.0, 0.5, 1e-5])
  assert spurious.narrow_components(logs).tolist() == [3]            # 5 decades below
  assert spurious.narrow_components(np.log([1.0, 2e-4])).tolist() == []   # 3.7 decades: kept
  assert spurious.narrow_components(np.log([1.0, 5e-5])).tolist() == [1]
  assert spurious.narrow_components(np.log([1.0])).tolist() == []    # one component: no others


def test_fit_findings_name_each_reason():
  covariances = np.stack([np.eye(2), np.eye(2) * 1e-6, np.eye(2) * 2.0])  # [3, 2, 2]
  found = spurious.fit_findings([0.5, 0.49, 0.01], covariances, 100, "full", 2, reg_covar=1e-6)
  assert len(found) == 2
  assert found[0].startswith("component 1: its covariance is 6.") and "narrower" in found[0]
  assert "reg_covar=1e-06 itself" in found[0]
  assert found[1] == ("component 2: holds 1 points' worth of weight, fewer than the 3 its full "
                      "covariance needs")
  healthy = spurious.fit_findings([0.5, 0.5], np.stack([np.eye(2), np.eye(2) * 3]), 100, "full",
                                  2, reg_covar=1e-6)
  assert healthy == []
  empty = spurious.fit_findings([1.0, 1e-9], np.stack([np.eye(2), np.eye(2) * 1e-6]), 100,
                                "full", 2, reg_covar=1e-6)
  assert empty == []  # reported as empty by tfp_em.mixture.reseed, not twice
  # tied: one pooled covariance; a component on too few points is still named.
  tied = spurious.fit_findings([0.995, 0.005], np.eye(2), 100, "tied", 2, reg_covar=1e-6)
  assert tied == ["component 1: holds 0.5 points' worth of weight, fewer than the 1 its tied "
                  "covariance needs"]


def test_size_findings():
  assert spurious.size_findings(100, 2, 3, "full", 1.0, 1e-6) == []
  k_equals_n = spurious.size_findings(5, 2, 5, "full", 1.0, 1e-6)
  assert k_equals_n == ["n_components=5 for 5 points: each component can hold a single point "
                        "(use fewer components)"]
  wide = spurious.size_findings(10, 50, 2, "full", 1.0, 1e-6)
  assert len(wide) == 1 and "50 features but only 10 points" in wide[0]
  assert spurious.size_findings(10, 50, 2, "diag", 1.0, 1e-6) == []  # diag needs 2 points each
  tiny = spurious.size_findings(40, 2, 2, "full", 1e-600, 1e-6)
  assert len(tiny) == 1 and "below reg_covar=1e-06" in tiny[0]
  assert spurious.size_findings(40, 2, 2, "full", 1e-12, 0.0) == []  # nothing added: no claim


def test_warn_issues_one_warning_with_advice():
  with pytest.warns(SpuriousSolutionWarning, match=r"spurious solution .*: a; b\. Try a larger "
                    r"reg_covar, fewer components"):
    spurious.warn(["a", "b"], "after")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    spurious.warn([], "after")  # nothing found: silent
  with pytest.warns(SpuriousSolutionWarning, match="; and 2 more") as caught:
    spurious.warn([f"c{i}" for i in range(spurious.MAX_NAMED + 2)], "before")
  assert len(caught) == 1


def _spurious_messages(est, x):
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    est.fit(x)
  return [str(w.message) for w in caught if issubclass(w.category, SpuriousSolutionWarning)]


@pytest.mark.parametrize("k,covariance_type", [(2, "full"), (3, "full"), (2, "diag"),
                                               (3, "tied"), (4, "spherical")])
def test_no_warning_on_old_faithful_and_iris(k, covariance_type):
  for x in (load_old_faithful()[0], load_iris().data):
    est = GaussianMixture(k, covariance_type=covariance_type, n_init=2, verbose=False)
    assert _spurious_messages(est, x) == []


def test_degenerate_fits_are_warned():
  rng = np.random.default_rng(0)
  k_equals_n = _spurious_messages(GaussianMixture(6, verbose=False), rng.normal(size=(6, 2)))
  assert any("n_components=6 for 6 points" in m for m in k_equals_n)
  assert any("component 5: holds 1 points' worth" in m for m in k_equals_n)
  wide = _spurious_messages(GaussianMixture(2, verbose=False), rng.normal(size=(10, 50)))
  assert any("50 features but only 10 points" in m for m in wide)
  collapsed = np.r_[[[1.0, 2.0]] * 20, rng.normal(size=(30, 2)) * 3]
  messages = _spurious_messages(GaussianMixture(3, init_params="kmeans", verbose=False),
                                collapsed)
  assert len(messages) == 1 and "orders of magnitude narrower" in messages[0]
  assert "Try a larger reg_covar, fewer components" in messages[0]


def test_a_component_on_a_subspace_is_flagged():
  """Iris, full covariances, K = 4: one component holds 29 points whose petal width is
  nearly one value, so its variance along one direction is reg_covar itself (mclust calls
  such a fit singular and gives it no BIC)."""
  plane = np.stack([np.diag([1.0, 2.0, 1e-6]), np.eye(3)])               # [2, 3, 3]
  found = spurious.fit_findings([0.5, 0.5], plane, 100, "full", 3, reg_covar=1e-6)
  assert found == ["component 0: its covariance has variance 1e-06 along one direction, "
                   "reg_covar=1e-06 or round-off (its points lie on a lower-dimensional "
                   "subspace, e.g. share a value of a column)"]
  flatter = plane - np.diag([0.0, 0.0, 1e-6 - 1e-13])                     # 1e-13 vs 2: round-off
  unregularized = spurious.fit_findings([0.5, 0.5], flatter, 100, "full", 3, reg_covar=0.0)
  assert len(unregularized) == 1 and unregularized[0].startswith("component 0")
  messages = _spurious_messages(GaussianMixture(4, n_init=3, seed=0, verbose=False),
                                load_iris().data)
  assert len(messages) == 1 and "lower-dimensional subspace" in messages[0]
