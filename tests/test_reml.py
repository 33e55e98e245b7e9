"""REML (restricted likelihood) for linear f with one factor: the criterion against a
dense numpy formula, EM monotone on it, fits against statsmodels, formula and summary."""
import warnings

import numpy as np
import pytest
import tensorflow as tf

from models import mixed_effects as me
from tfp_em.engine import fit_em
from tfp_em.mixed_effects.estimator import MixedEffectsRegressor
from tfp_em.mixed_effects.reml import RestrictedMixedEffectsEM


def _small(seed=0):
  rng = np.random.default_rng(seed)
  sizes = np.array([1, 3, 2, 5, 4, 6])
  cluster = np.repeat(np.arange(sizes.size), sizes)
  n = cluster.size
  t = rng.uniform(0, 3, n)
  x = np.c_[np.ones(n), rng.normal(size=n)]
  z = np.c_[np.ones(n), t]
  y = x @ [1., -2.] + np.sum(z * rng.normal(size=(sizes.size, 2))[cluster], 1) + rng.normal(size=n)
  data = me.MixedEffectsData(tf.constant(x), tf.constant(y), tf.constant(z),
                             tf.constant(cluster, tf.int32), tf.constant(sizes.size))
  params = me.MixedEffectsParams(beta=tf.constant([0.3, 0.1], tf.float64),
                                 covariance=tf.constant([[1.5, 0.3], [0.3, 0.7]], tf.float64),
                                 noise_variance=tf.constant(0.8, tf.float64))
  return data, params


def test_restricted_log_prob_equals_dense_formula():
  data, params = _small()
  x, y, z, c = (np.asarray(v) for v in data[:4])
  cov_u = np.asarray(params.covariance)
  v = (c[:, None] == c[None, :]) * (z @ cov_u @ z.T) + 0.8 * np.eye(len(y))    # [N, N]
  vinv = np.linalg.inv(v)
  info = x.T @ vinv @ x
  beta = np.linalg.solve(info, x.T @ vinv @ y)
  r = y - x @ beta
  n, p = x.shape
  expected = -0.5 * ((n - p) * np.log(2 * np.pi) + np.linalg.slogdet(v)[1]
                     + np.linalg.slogdet(info)[1] + r @ vinv @ r)
  got = float(me.restricted_log_prob(params, data, "full"))
  np.testing.assert_allclose(got, expected, rtol=1e-12)
  fixed = me.fixed_effects_posterior(params, data, "full")
  np.testing.assert_allclose(np.asarray(fixed.mean), beta, rtol=1e-10)


def test_reml_em_is_monotone_and_reports_the_restricted_likelihood():
  data, _ = _small(1)
  model = RestrictedMixedEffectsEM()
  result = fit_em(model, data, max_iter=200, tol=0., on_decrease="raise", progress=False)
  trace = result.restarts[0].log_likelihood
  assert np.all(np.diff(trace) >= -1e-9 * np.abs(trace[1:]))
  np.testing.assert_allclose(result.log_likelihood,
                             float(model.marginal_log_prob(result.params, data)), rtol=1e-9)


def _statsmodels_reml(sleepstudy, re_formula):
  smf = pytest.importorskip("statsmodels.formula.api")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    # BFGS to |grad| <= 1e-12: statsmodels' default L-BFGS stops ~1e-6 short in the variances
    return smf.mixedlm("Reaction ~ Days", sleepstudy, groups=sleepstudy["Subject"],
                       re_formula=re_formula).fit(reml=True, method="bfgs", gtol=1e-12)


@pytest.mark.parametrize("slopes", [True, False], ids=["slopes", "intercept"])
@pytest.mark.parametrize("method", ["em", "nll"])
def test_reml_matches_statsmodels_on_sleepstudy(sleepstudy, method, slopes):
  reference = _statsmodels_reml(sleepstudy, "~Days" if slopes else "1")
  kind = dict(random_effects="slopes") if slopes else {}
  est = MixedEffectsRegressor(**kind, method=method, reml=True).fit(
      sleepstudy[["Days"]].values, sleepstudy["Reaction"].values, sleepstudy["Subject"],
      time=sleepstudy["Days"].values if slopes else None)
  np.testing.assert_allclose(est.log_likelihood_, reference.llf, rtol=1e-10)
  np.testing.assert_allclose(est.cov_random_effects_, reference.cov_re.values, rtol=1e-8)
  np.testing.assert_allclose(est.sigma2_, reference.scale, rtol=1e-8)
  np.testing.assert_allclose([est.intercept_, *est.coef_], reference.fe_params.values,
                             rtol=1e-8)


def test_formula_reml_and_summary(sleepstudy):
  est = MixedEffectsRegressor.from_formula("Reaction ~ Days + (Days | Subject)", sleepstudy,
                                           REML=True)
  assert est.reml
  text = str(est.summary())
  assert "fit by REML" in text and "REML criterion at convergence: 1743.6" in text
  assert "logLik" not in text
  reference = _statsmodels_reml(sleepstudy, "~Days")
  np.testing.assert_allclose(est.summary().fixed_effects["Std. Error"].to_numpy(),
                             reference.bse_fe.to_numpy(), rtol=1e-7)
  ml = MixedEffectsRegressor.from_formula("Reaction ~ Days + (Days | Subject)", sleepstudy)
  assert "maximum likelihood" in str(ml.summary()) and "REML" not in str(ml.summary())
  with pytest.raises(ValueError, match="REML= or reml="):
    MixedEffectsRegressor.from_formula("Reaction ~ Days + (1 | Subject)", sleepstudy,
                                       REML=True, reml=True)


def test_reml_refused_where_not_available():
  rng = np.random.default_rng(0)
  X, y = rng.normal(size=(40, 1)), rng.normal(size=40)
  g1, g2 = np.arange(40) % 4, np.arange(40) % 5
  assert MixedEffectsRegressor(reml=True).fit(X, y, [g1, g2]).crossed_.reml  # crossed: available
  with pytest.raises(ValueError, match="reml=True applies to linear f"):
    MixedEffectsRegressor(reml=True, f="mlp").fit(X, y, g1)
  with pytest.raises(ValueError, match="reml must be True or False"):
    MixedEffectsRegressor(reml="yes").fit(X, y, g1)


def test_reml_em_fixed_point_is_the_reml_optimum(sleepstudy):
  """EM alone (no polish) started at the L-BFGS REML optimum stays there."""
  est = MixedEffectsRegressor("slopes", method="nll", reml=True).fit(
      sleepstudy[["Days"]].values, sleepstudy["Reaction"].values, sleepstudy["Subject"],
      time=sleepstudy["Days"].values)
  t = sleepstudy["Days"].values.astype(np.float64)
  _, codes = np.unique(sleepstudy["Subject"].values, return_inverse=True)
  data = me.MixedEffectsData(tf.constant(np.c_[np.ones_like(t), t]),
                             tf.constant(sleepstudy["Reaction"].values, tf.float64),
                             tf.constant(np.c_[np.ones_like(t), t]),
                             tf.constant(codes, tf.int32), tf.constant(codes.max() + 1))
  result = fit_em(RestrictedMixedEffectsEM(), data, max_iter=20, tol=0., progress=False,
                  init_params=est.params_)
  np.testing.assert_allclose(np.asarray(result.params.covariance), est.cov_random_effects_,
                             rtol=1e-7)
  np.testing.assert_allclose(float(result.params.noise_variance), est.sigma2_, rtol=1e-8)
  np.testing.assert_allclose(np.asarray(result.params.beta), np.asarray(est.params_.beta),
                             rtol=1e-9)
