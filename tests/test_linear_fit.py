"""Linear-f fits that finish: EM + polish equals NLL to 1e-8 in every parameter; singular
(boundary) fits are detected, warned about once and returned on the boundary."""
import warnings

import numpy as np
import pytest

from tfp_em.engine import ConvergenceWarning
from tfp_em.mixed_effects.estimator import MixedEffectsRegressor
from tfp_em.mixed_effects.singular import SingularFitWarning, boundary_fit


def _fit(X, y, g, t=None, **options):
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    est = MixedEffectsRegressor("slopes" if t is not None else "intercept", **options).fit(
        X, y, g, time=t)
  return est, [w for w in caught if issubclass(w.category, (UserWarning, RuntimeWarning))]


def _params(est):
  return np.concatenate([[est.intercept_], est.coef_, est.cov_random_effects_.ravel(),
                         [est.sigma2_]])


def _unbalanced(seed=0):
  """Clusters of sizes 1..200 (20,100 rows), random intercept and slope, correlation 0.5."""
  rng = np.random.default_rng(seed)
  sizes = rng.permutation(np.arange(1, 201))
  g = np.repeat(np.arange(sizes.size), sizes)
  n = g.size
  t = rng.uniform(0, 5, n)
  X = rng.normal(size=(n, 2))
  u = rng.multivariate_normal([0, 0], [[4., 0.5], [0.5, 0.25]], sizes.size)
  y = 1. + X @ [0.5, -1.] + u[g, 0] + u[g, 1] * t + rng.normal(size=n)
  return X, y, g, t


def _zero_variance(seed=0):
  """A random intercept whose ML (and REML) estimate is exactly 0: the noise has
  cluster means 0, so the cluster means show less spread than the noise alone."""
  rng = np.random.default_rng(seed)
  g = np.repeat(np.arange(30), 8)
  X = rng.normal(size=(g.size, 1))
  e = rng.normal(size=g.size)
  e -= (np.bincount(g, e) / 8)[g]
  return X, 1. + 2. * X[:, 0] + e, g


@pytest.mark.parametrize("reml", [False, True], ids=["ml", "reml"])
def test_em_equals_nll_on_sleepstudy(sleepstudy, reml):
  data = (sleepstudy[["Days"]].values, sleepstudy["Reaction"].values,
          sleepstudy["Subject"].values, sleepstudy["Days"].values)
  em, em_warnings = _fit(*data, method="em", reml=reml)
  nll, _ = _fit(*data, method="nll", reml=reml)
  np.testing.assert_allclose(_params(em), _params(nll), rtol=1e-8)
  np.testing.assert_allclose(em.log_likelihood_, nll.log_likelihood_, rtol=1e-12)
  assert em.polish_.converged and em.polish_.gain >= 0. and em.polish_.n_iter >= 0
  assert nll.polish_ is None
  assert not em.singular_ and not nll.singular_ and not em_warnings


@pytest.mark.slow
def test_em_equals_nll_on_unbalanced_clusters():
  X, y, g, t = _unbalanced()
  em, em_warnings = _fit(X, y, g, t, method="em")
  nll, _ = _fit(X, y, g, t, method="nll")
  np.testing.assert_allclose(_params(em), _params(nll), rtol=1e-8)
  assert not em_warnings


def test_polish_finishes_an_em_stopped_early(sleepstudy):
  """EM cut at 3 iterations: the polish gains l, drops EM's ConvergenceWarning, and ends
  at the NLL optimum."""
  data = (sleepstudy[["Days"]].values, sleepstudy["Reaction"].values,
          sleepstudy["Subject"].values, sleepstudy["Days"].values)
  short, caught = _fit(*data, method="em", max_iter=3)
  nll, _ = _fit(*data, method="nll")
  assert short.polish_.gain > 1e-6 and short.polish_.n_iter > 0
  assert not any(issubclass(w.category, ConvergenceWarning) for w in caught)
  np.testing.assert_allclose(_params(short), _params(nll), rtol=1e-8)


@pytest.mark.parametrize("reml", [False, True], ids=["ml", "reml"])
def test_zero_variance_design_warns_once_and_returns_the_boundary(reml):
  X, y, g = _zero_variance()
  em, em_warnings = _fit(X, y, g, method="em", reml=reml)
  nll, _ = _fit(X, y, g, method="nll", reml=reml)
  assert [w.category for w in em_warnings] == [SingularFitWarning]
  assert "boundary (singular) fit: variance of (Intercept) is 0" in str(em_warnings[0].message)
  assert em.singular_ and nll.singular_
  assert em.cov_random_effects_[0, 0] == 0. and nll.cov_random_effects_[0, 0] == 0.
  np.testing.assert_allclose(em.sigma2_, nll.sigma2_, rtol=1e-8)
  np.testing.assert_allclose([em.intercept_, *em.coef_], [nll.intercept_, *nll.coef_],
                             rtol=1e-8)
  # on the boundary the model is OLS: sigma^2 = RSS / n (ML) or RSS / (n - p) (REML)
  design = np.c_[np.ones(len(y)), X]
  rss = np.sum((y - design @ np.linalg.lstsq(design, y, rcond=None)[0]) ** 2)
  np.testing.assert_allclose(em.sigma2_, rss / (len(y) - 2 * reml), rtol=1e-8)


def test_boundary_fit_finds_a_correlation_of_one_and_a_zero_variance():
  names = ("(Intercept)", "time", "time^2")
  sd = np.array([2., 0.5, 1.])
  corr = np.array([[1., 1., 0.2], [1., 1., 0.2], [0.2, 0.2, 1.]])
  found, boundary = boundary_fit(corr * np.outer(sd, sd), 1., names)
  assert found == ["correlation of time with (Intercept) is +-1"]
  np.testing.assert_allclose(boundary, corr * np.outer(sd, sd), atol=1e-12)
  cov = np.diag([2., 1e-12, 1.])
  found, boundary = boundary_fit(cov, 1., names)
  assert found == ["variance of time is 0"]
  assert boundary[1, 1] == 0. and boundary[0, 1] == 0.
  np.testing.assert_allclose(boundary[[0, 2], [0, 2]], [2., 1.], rtol=1e-12)
  assert boundary_fit(np.diag([2., 1e-6, 1.]), 1., names)[0] == []  # sd 1e-3 > tol


@pytest.mark.parametrize("reml", [False, True], ids=["ml", "reml"])
def test_x_scaled_by_1e140_is_the_same_fit_rescaled(reml):
  X, y, g, _ = _unbalanced()
  keep = g < 12
  X, y, g = X[keep], y[keep], g[keep]
  plain, _ = _fit(X, y, g, reml=reml)
  scaled, caught = _fit(X * 1e140, y, g, reml=reml)
  assert not caught
  np.testing.assert_allclose(scaled.coef_ * 1e140, plain.coef_, rtol=1e-8)
  np.testing.assert_allclose(scaled.sigma2_, plain.sigma2_, rtol=1e-8)
  np.testing.assert_allclose(scaled.cov_random_effects_, plain.cov_random_effects_, rtol=1e-8)
  # l is invariant to the units of X; l_R moves by -1/2 log|S^2| (S = diag(1e140, 1e140))
  shift = -2. * np.log(1e140) if reml else 0.
  np.testing.assert_allclose(scaled.log_likelihood_, plain.log_likelihood_ + shift, rtol=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("reml", [False, True], ids=["ml", "reml"])
def test_correlation_at_one_em_equals_nll_and_warns(reml):
  """True correlation 0.99 between intercept and slope: the estimate is on the
  boundary (correlation 1); EM + polish and NLL meet there and both say so."""
  rng = np.random.default_rng(3)
  sizes = rng.integers(3, 15, 40)
  g = np.repeat(np.arange(40), sizes)
  t = rng.uniform(0, 4, g.size)
  X = rng.normal(size=(g.size, 1))
  u = rng.multivariate_normal([0, 0], [[1., 0.495], [0.495, 0.25]], 40)
  y = 1 + X[:, 0] + u[g, 0] + u[g, 1] * t + 0.5 * rng.normal(size=g.size)
  em, em_warnings = _fit(X, y, g, t, reml=reml)
  nll, _ = _fit(X, y, g, t, reml=reml, method="nll")
  assert [w.category for w in em_warnings] == [SingularFitWarning]
  assert "correlation of time with (Intercept) is +-1" in str(em_warnings[0].message)
  assert em.polish_.converged
  # on the boundary the optimum is at infinity in the unconstrained coordinates: l agrees to
  # round-off of its approach (4e-10 of 350), the parameters to 1e-8
  np.testing.assert_allclose(em.log_likelihood_, nll.log_likelihood_, rtol=1e-11)
  np.testing.assert_allclose(_params(em), _params(nll), rtol=1e-8)
  c = em.cov_random_effects_
  np.testing.assert_allclose(c[0, 1] / np.sqrt(c[0, 0] * c[1, 1]), 1., rtol=1e-12)
