"""Random slopes on several crossed factors, and REML for crossed factors (#16).

Against dense TFP oracles (`models.crossed_effects`: the joint MVN of (u, y),
the N x N marginal and the restricted likelihood), autodiff (Fisher
identity), EM's monotonicity, and EM = NLL at the optimum.
"""
import warnings

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from models import crossed_effects as ce
from tfp_em.engine import fit_em
from tfp_em.mixed_effects import crossed_em as cx
from tfp_em.mixed_effects import crossed_posterior as cp
from tfp_em.mixed_effects import crossed_predictions as cpr
from tfp_em.engine.unconstrained import newton_steps
from tfp_em.mixed_effects.crossed_nll import ProfiledObjective, fit_nll
from tfp_em.mixed_effects.crossed_estimator import CrossedEffectsRegressor
from tfp_em.mixed_effects.estimator import MixedEffectsRegressor

NUM_LEVELS = (6, 5)
NUM_EFFECTS = (2, 2)


def _simulate(seed=0, n=80, num_levels=NUM_LEVELS, num_effects=NUM_EFFECTS):
  """y = 1 + 2 x + 0.5 t + sum_k [1, t] u_k + eps, crossed factors, unbalanced."""
  rng = np.random.default_rng(seed)
  codes = np.stack([rng.integers(0, q, n) for q in num_levels], 1).astype(np.int32)
  t = rng.uniform(-1., 1., n)
  x = np.column_stack([np.ones(n), rng.normal(size=n), t])
  y = x @ [1., 2., 0.5] + 0.5 * rng.normal(size=n)
  effects = []
  for k, (q, d) in enumerate(zip(num_levels, num_effects)):
    z = np.column_stack([np.ones(n), t][:d])                             # [n, d]
    chol = np.linalg.cholesky(0.5 * np.eye(d) + 0.3)
    u = rng.normal(size=(q, d)) @ chol.T                                 # [q, d]
    y += np.sum(z * u[codes[:, k]], 1)
    effects.append(z)
  return ce.CrossedData(tf.constant(x), tf.constant(y), tf.constant(codes),
                        tf.constant(num_levels, tf.int32),
                        tf.constant(np.concatenate(effects, 1)), tf.constant(num_effects, tf.int32))


def _params(data, covs=([[0.8, 0.2], [0.2, 0.5]], [[1.2, -0.3], [-0.3, 0.4]]), noise=0.4):
  return ce.CrossedParams(tf.constant([0.5, 1.5, 0.2], tf.float64),
                          tf.constant(ce.pack_covariances(covs)), tf.constant(noise, tf.float64))


def _model(**kw):
  return cx.CrossedEffectsEM(num_effects=NUM_EFFECTS, **kw)


def test_pack_and_blocks_round_trip():
  covs = [np.array([[2., 0.5], [0.5, 1.]]), np.array([[3.]]), np.eye(3) + 0.1]
  packed = ce.pack_covariances(covs)
  assert packed.shape == (3 + 1 + 6,)
  for got, want in zip(ce.covariance_blocks(packed, (2, 1, 3)), covs):
    np.testing.assert_array_equal(got.numpy(), want)


@pytest.mark.parametrize("max_dense", [cp.MAX_DENSE, 3])
def test_posterior_and_marginal_equal_dense_mvn(max_dense):
  """Mean, per-factor covariance blocks and log p(y) against TFP's MultivariateNormalFullCovariance."""
  data = _simulate(1)
  params = _params(data)
  post = _model(max_dense=max_dense, num_probes=400).posterior(params, data)
  mean, cov = (t.numpy() for t in ce.dense_posterior(params, data))
  np.testing.assert_allclose(post.mean, mean, atol=1e-7 if max_dense == 3 else 1e-10)
  start = 0
  for k, (q, d) in enumerate(zip(NUM_LEVELS, NUM_EFFECTS)):
    want = sum(cov[start + l * d:start + (l + 1) * d, start + l * d:start + (l + 1) * d]
               for l in range(q))
    if max_dense == 3:  # Hutchinson: the trace within 5 standard errors
      assert abs(np.trace(post.blocks[k]) - np.trace(want)) < 5 * post.trace_se[k]
    else:
      np.testing.assert_allclose(post.blocks[k], want, rtol=1e-10)
    start += q * d
  marginal = ce.dense_marginal(params, data)
  assert isinstance(marginal, ce.tfd.MultivariateNormalFullCovariance)
  if max_dense == 3:
    assert np.isnan(post.log_prob)
  else:
    np.testing.assert_allclose(post.log_prob, float(marginal.log_prob(data.y)), rtol=1e-12)


@pytest.mark.parametrize("max_dense", [cp.MAX_DENSE, 0])
def test_predictive_variance_equals_dense_posterior(max_dense):
  """Var[sum_j w_j u_j | y] for weighted slope positions, some levels unseen."""
  data, params = _simulate(2), None
  params = _params(data)
  x, y, z, ztz, num_levels = _model().arrays(data)
  fac = cp.factorize(ztz, num_levels, params.variances.numpy(), float(params.noise_variance),
                     max_dense, NUM_EFFECTS)
  _, cov = (t.numpy() for t in ce.dense_posterior(params, data))
  rng = np.random.default_rng(0)
  rows, cols = rng.integers(0, cov.shape[0], (2, 200))
  np.testing.assert_allclose(cpr.covariance_entries(fac, rows, cols), cov[rows, cols], atol=1e-12)
  labels = [np.arange(q) for q in NUM_LEVELS]
  clusters = [data.codes.numpy()[:, 0], np.where(np.arange(80) < 5, 99, data.codes.numpy()[:, 1])]
  positions = cpr.effect_positions(labels, NUM_EFFECTS, clusters, 80)
  weights = data.effects.numpy()
  assert np.all(positions[:5, 2:] == -1) and np.all(positions[5:] >= 0)
  dense_w = np.zeros((80, cov.shape[0]))
  for i in range(80):
    keep = positions[i] >= 0
    dense_w[i, positions[i][keep]] = weights[i][keep]
  np.testing.assert_allclose(cpr.predictive_variance(fac, positions, weights),
                             np.einsum("nq,qr,nr->n", dense_w, cov, dense_w), rtol=1e-10)


@pytest.mark.parametrize("reml", [False, True])
def test_fisher_identity(reml):
  """grad Q at theta_old == grad of the (restricted) log-likelihood, dense TFP and autodiff."""
  data = _simulate(3)
  params = _params(data)
  model = _model(reml=reml)
  stats, ll = model.e_step(params, data)
  stats = stats._replace(beta_ref=tf.constant(stats.beta_ref.numpy()))
  if reml:  # Q is maximized in beta at beta_GLS: compare at it
    params = params._replace(beta=stats.beta_ref)
  with tf.GradientTape(persistent=True) as tape:
    tape.watch(params)
    q = model.expected_log_joint(params, stats)
    dense = (ce.dense_restricted_log_prob if reml else
             lambda p, d: ce.dense_marginal(p, d).log_prob(d.y))(params, data)
  np.testing.assert_allclose(float(ll), float(dense), rtol=1e-12)
  fields = ("variances", "noise_variance") if reml else ce.CrossedParams._fields
  for name in fields:
    gq = tape.gradient(q, getattr(params, name))
    gl = tape.gradient(dense, getattr(params, name))
    np.testing.assert_allclose(gq.numpy(), gl.numpy(), rtol=1e-8, atol=1e-10, err_msg=name)


@pytest.mark.filterwarnings("ignore:.*did not converge")
@pytest.mark.parametrize("reml", [False, True])
def test_em_monotone(reml):
  data = _simulate(4)
  model = _model(reml=reml, expand_columns=((0, 2), (0, 2)))
  result = fit_em(model, data, max_iter=40, tol=0., seed=0, init_params=model.initialize(data, 0),
                  on_decrease="raise")
  lls = np.asarray(result.restarts[0].log_likelihood)
  assert np.all(np.diff(lls) >= -1e-9 * np.abs(lls[1:]))
  assert lls[-1] > lls[0] + 1.


def _max_relative_difference(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)) / np.maximum(np.abs(y), 1e-3)))
             for x, y in zip(a, b))


@pytest.mark.slow
@pytest.mark.parametrize("reml", [False, True])
def test_em_equals_nll_at_optimum(reml):
  """EM (PX-EM) finished by Newton steps and L-BFGS on the exact marginal meet to
  1e-8 in every parameter; EM alone stops about sqrt(eps) off in flat directions."""
  data = _simulate(5, n=150)
  model = _model(reml=reml, expand_columns=((0, 2), (0, 2)))
  init = model.initialize(data, 0)
  em = fit_em(model, data, max_iter=5000, tol=1e-15, seed=0, init_params=init,
              keep_trajectory=False)
  params, ll, converged, _ = fit_nll(model, data, init, max_iter=1000, tol=1e-15)
  objective = ProfiledObjective(model, data)
  raw = objective.params(objective.theta(em.params), tf.float64)  # beta_GLS at EM's variances
  assert _max_relative_difference(raw, params) < 1e-5
  theta, em_ll, _, taken = newton_steps(objective, objective.theta(em.params))
  assert taken >= 1
  assert _max_relative_difference(objective.params(theta, tf.float64), params) < 1e-8
  np.testing.assert_allclose(em_ll, ll, rtol=1e-12)
  np.testing.assert_allclose(em.log_likelihood, ll, rtol=1e-12)


def _frame(seed=6, n=120):
  rng = np.random.default_rng(seed)
  g1, g2 = rng.integers(0, 8, n), rng.integers(0, 6, n)
  t, x = rng.uniform(-1., 1., n), rng.normal(size=n)
  u1 = rng.normal(size=(8, 2)) @ np.array([[0.9, 0.], [0.3, 0.5]]).T
  y = 1. + 2. * x + 0.5 * t + u1[g1, 0] + u1[g1, 1] * t + 0.7 * rng.normal(size=6)[g2] \
      + 0.5 * rng.normal(size=n)
  return pd.DataFrame(dict(y=y, x=x, t=t, g1=[f"a{v}" for v in g1], g2=g2))


SLOPES = "y ~ x + t + (1 + t | g1) + (1 | g2)"


def _dense_check(est, frame, reml):
  """l (or l_R) of the estimator's parameters from the dense TFP marginal."""
  crossed = est.crossed_
  codes = np.stack([np.unique(frame[g], return_inverse=True)[1] for g in ("g1", "g2")], 1)
  x = np.column_stack([np.ones(len(frame)), frame.x, frame.t])
  effects = np.column_stack([np.ones(len(frame)), frame.t, np.ones(len(frame))])
  data = ce.CrossedData(tf.constant(x), tf.constant(frame.y.to_numpy()), tf.constant(codes),
                        tf.constant([8, 6], tf.int32), tf.constant(effects),
                        tf.constant([2, 1], tf.int32))
  params = ce.CrossedParams(tf.constant(np.concatenate([[crossed.intercept_], crossed.coef_])),
                            tf.constant(ce.pack_covariances(crossed.covariances_)),
                            tf.constant(crossed.sigma2_, tf.float64))
  if reml:
    return float(ce.dense_restricted_log_prob(params, data)), None
  marginal = ce.dense_marginal(params, data)
  v_inv = np.linalg.inv(marginal.covariance().numpy())
  return float(marginal.log_prob(data.y)), np.linalg.inv(x.T @ v_inv @ x)


@pytest.mark.slow
@pytest.mark.parametrize("reml", [False, True])
def test_formula_fit_em_equals_nll_and_dense(reml):
  """(1 + t | g1) + (1 | g2) by EM and NLL: the same optimum, l from the dense
  marginal, standard errors from the dense (X^T V^-1 X)^-1, lme4's summary."""
  frame = _frame()
  em = MixedEffectsRegressor.from_formula(SLOPES, frame, REML=reml)
  nll = MixedEffectsRegressor.from_formula(SLOPES, frame, REML=reml, method="nll")
  assert em.crossed_.num_effects_ == (2, 1)
  np.testing.assert_allclose(em.log_likelihood_, nll.log_likelihood_, rtol=1e-12)
  for a, b in [(em.coef_, nll.coef_), (em.intercept_, nll.intercept_), (em.sigma2_, nll.sigma2_)]:
    np.testing.assert_allclose(a, b, rtol=1e-8)
  for a, b in zip(em.covariances_, nll.covariances_):
    np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10)
  dense_ll, beta_cov = _dense_check(em, frame, reml)
  np.testing.assert_allclose(em.log_likelihood_, dense_ll, rtol=1e-10)
  summary = em.summary()
  text = str(summary)
  assert ("REML criterion" in text) == reml
  table = summary.random_effects
  assert list(table.Name) == ["(Intercept)", "t", "(Intercept)", ""]
  assert set(summary.correlations) == {"g1"}
  if not reml:
    np.testing.assert_allclose(summary.fixed_effects["Std. Error"], np.sqrt(np.diag(beta_cov)),
                               rtol=1e-8)


def test_predict_with_unseen_levels():
  """Seen levels add z^T BLUP, unseen ones 0; intervals widen by z^T Sigma_k z."""
  frame = _frame(7, n=80)
  est = MixedEffectsRegressor.from_formula(SLOPES, frame, max_iter=50, tol=1e-6)
  new = frame.iloc[:4].copy()
  new["g1"] = ["new", "new", new.g1.iloc[2], new.g1.iloc[3]]
  got = est.predict_data(new)
  crossed = est.crossed_
  fixed = crossed.intercept_ + new[["x", "t"]].to_numpy() @ crossed.coef_
  blup1 = crossed.random_effects(0)
  blup2 = crossed.random_effects(1)
  want = fixed + np.array([0., 0.] + [blup1[g] @ [1., t] for g, t in zip(new.g1[2:], new.t[2:])]) \
      + np.array([blup2[g] for g in new.g2])
  np.testing.assert_allclose(got, want, rtol=1e-12)
  interval = est.predict_data(new, interval=True)
  width = interval[:, 1] - interval[:, 0]
  assert np.all(np.isfinite(width)) and width[0] > width[2] and width[1] > width[3]
  with pytest.raises(ValueError, match="Z is needed"):
    est.predict(new[["x", "t"]], [new.g1, new.g2])


def test_array_api_and_bad_input():
  frame = _frame(8, n=60)
  X, y = frame[["x", "t"]].to_numpy(), frame.y.to_numpy()
  clusters = [frame.g1.to_numpy(), frame.g2.to_numpy()]
  z1 = np.column_stack([np.ones(60), frame.t])
  est = MixedEffectsRegressor(random_effects="custom", max_iter=100, tol=1e-6).fit(
      X, y, clusters, Z=[z1, None])
  assert [c.shape for c in est.covariances_] == [(2, 2), (1, 1)]
  assert str(est.summary(X, y, clusters, Z=[z1, None])).count("z2") == 1
  with pytest.raises(ValueError, match="Z has"):
    est.predict(X, clusters, Z=[z1[:, :1], None])
  with pytest.raises(ValueError, match="Z must be None or a list of 2"):
    MixedEffectsRegressor(random_effects="custom").fit(X, y, clusters, Z=[z1])
  with pytest.raises(ValueError, match="goes with random_effects='custom'"):
    MixedEffectsRegressor().fit(X, y, clusters, Z=[z1, None])
  with pytest.raises(ValueError, match="SQUAREM|squarem"):
    CrossedEffectsRegressor(accelerate="squarem").fit(X, y, clusters, Z=[z1, None])
  with pytest.raises(ValueError, match="all be correlated"):
    MixedEffectsRegressor.from_formula("y ~ x + (1 + t | g1) + (t || g2)", frame)
  with pytest.raises(ValueError, match="random intercepts"):
    MixedEffectsRegressor.from_formula(SLOPES, frame, f="mlp")
  with pytest.raises(ValueError, match="diagnostics cover one grouping factor"):
    from tfp_em.mixed_effects.adapter import MixedEffectsAdapter  # noqa: F401
    MixedEffectsAdapter().data(est, X, y, clusters)


@pytest.mark.slow
def test_reml_crossed_intercepts_equal_statsmodels():
  """(1 | g1) + (1 | g2) by REML equals statsmodels MixedLM(reml=True) with variance components."""
  import statsmodels.formula.api as smf
  frame = _frame(9, n=150)
  frame["one"] = 1
  model = smf.mixedlm("y ~ x + t", frame, groups="one", re_formula="0",
                      vc_formula={"g1": "0 + C(g1)", "g2": "0 + C(g2)"})
  ref = model.fit(reml=True, method="bfgs", gtol=1e-12, maxiter=5000)
  for method in ("em", "nll"):
    est = MixedEffectsRegressor.from_formula("y ~ x + t + (1 | g1) + (1 | g2)", frame, REML=True,
                                             method=method)
    np.testing.assert_allclose(est.log_likelihood_, ref.llf, rtol=1e-9)
    np.testing.assert_allclose(est.variances_, ref.vcomp, rtol=1e-5)
    np.testing.assert_allclose(est.sigma2_, ref.scale, rtol=1e-5)
    np.testing.assert_allclose(np.concatenate([[est.intercept_], est.coef_]), ref.fe_params,
                               rtol=1e-6)


def test_cg_path_close_to_exact():
  """Beyond max_dense the slope fit runs CG means and Hutchinson blocks; it lands near the exact fit."""
  frame = _frame(10, n=150)
  X, y = frame[["x", "t"]].to_numpy(), frame.y.to_numpy()
  clusters = [frame.g1.to_numpy(), frame.g2.to_numpy()]
  Z = [np.column_stack([np.ones(150), frame.t]), None]
  exact = CrossedEffectsRegressor(max_iter=300, tol=1e-8).fit(X, y, clusters, Z)
  large = CrossedEffectsRegressor(max_dense=2, max_iter=300, tol=1e-8).fit(X, y, clusters, Z)
  assert np.isnan(large.log_likelihood_) and np.all(large.trace_se_ > 0)
  np.testing.assert_allclose(large.coef_, exact.coef_, rtol=0.05)
  np.testing.assert_allclose(large.sigma2_, exact.sigma2_, rtol=0.1)
  np.testing.assert_allclose(np.diag(large.covariances_[0]), np.diag(exact.covariances_[0]),
                             rtol=0.3)


def test_nested_slopes_formula_design():
  """(1 + t | g1/g2) is (1 + t | g1) + (1 + t | g1:g2): two factors with [1, t] each."""
  from tfp_em.mixed_effects.formula import formula_design, new_data_inputs
  frame = _frame(11, n=40)
  design = formula_design("y ~ x + t + (1 + t | g1/g2)", frame)
  assert design.options == dict(random_effects="custom", covariance="full", fit_intercept=True)
  assert design.group_names == ("g1", "g1:g2")
  assert design.random_names == (("(Intercept)", "t"), ("(Intercept)", "t"))
  for z in design.Z:
    np.testing.assert_array_equal(z, np.column_stack([np.ones(40), frame.t]))
  again = new_data_inputs(design, frame)
  for z, want in zip(again["Z"], design.Z):
    np.testing.assert_array_equal(z, want)
  labels = np.asarray(design.clusters[1])
  assert labels[0] == f"{frame.g1[0]}:{frame.g2[0]}"


def test_singular_fit_warns_once_and_returns_the_boundary():
  """A factor with no effect: one SingularFitWarning naming it, its variance exactly 0."""
  from tfp_em.mixed_effects.singular import SingularFitWarning
  rng = np.random.default_rng(12)
  g1, g2 = rng.integers(0, 10, 200), rng.integers(0, 8, 200)
  X = rng.normal(size=(200, 1))
  y = X[:, 0] + rng.normal(size=10)[g1] + 0.5 * rng.normal(size=200)
  with pytest.warns(SingularFitWarning, match=r"boundary \(singular\) fit: variance of "
                                              r"clusters\[1\] \(Intercept\) is 0$") as caught:
    est = MixedEffectsRegressor(method="nll").fit(X, y, [g1, g2])
  assert len([w for w in caught if w.category is SingularFitWarning]) == 1
  assert est.singular_ and est.variances_[1] == 0. and est.variances_[0] > 0.1
  with warnings.catch_warnings():
    warnings.simplefilter("error", SingularFitWarning)
    assert not MixedEffectsRegressor(method="nll").fit(X, y + rng.normal(size=8)[g2],
                                                       [g1, g2]).singular_
