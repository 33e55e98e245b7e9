"""Crossed random intercepts: against dense TFP MVNs, autodiff, the single-factor path, bad input."""
import numpy as np
import pytest
import tensorflow as tf

from models import crossed_effects as ce
from tfp_em.engine import fit_em
from tfp_em.mixed_effects import crossed_em as cx
from tfp_em.mixed_effects import crossed_posterior as cp
from tfp_em.mixed_effects import crossed_predictions as cpr
from tfp_em.mixed_effects.crossed_nll import fit_nll
from tfp_em.mixed_effects.crossed_estimator import CrossedEffectsRegressor
from tfp_em.mixed_effects.estimator import MixedEffectsRegressor
from tfp_em.mixed_effects.labels import is_factor_list

NUM_LEVELS = (5, 7, 3)


def _simulate(seed=0, n=60, num_levels=NUM_LEVELS, scales=(1., 0.5, 2.), noise=0.7):
  """Crossed factors with unbalanced, partly empty level pairs; x = [1, x1]."""
  rng = np.random.default_rng(seed)
  codes = np.stack([rng.integers(0, q, n) for q in num_levels], 1).astype(np.int32)
  x = np.column_stack([np.ones(n), rng.normal(size=n)])
  y = x @ [1., 2.] + noise * rng.normal(size=n)
  for k, (q, s) in enumerate(zip(num_levels, scales)):
    y += (s * rng.normal(size=q))[codes[:, k]]
  return ce.CrossedData(tf.constant(x), tf.constant(y), tf.constant(codes),
                        tf.constant(codes.max(0) + 1, tf.int32))


def _params(beta=(0.5, 1.5), variances=(0.8, 0.3, 1.5), noise=0.6, dtype=tf.float64):
  return ce.CrossedParams(tf.constant(beta, dtype), tf.constant(variances, dtype),
                          tf.constant(noise, dtype))


@pytest.mark.parametrize("seed,max_dense", [(0, cp.MAX_DENSE), (1, cp.MAX_DENSE), (2, 100)])
def test_posterior_equals_dense_mvn_conditioning(seed, max_dense):
  data, params = _simulate(seed), _params(variances=(0.8 + seed, 0.3, 1.5))
  post = cx.CrossedEffectsEM(max_dense=max_dense).posterior(params, data)
  mean, cov = (t.numpy() for t in ce.dense_posterior(params, data))
  factor_of = np.repeat(np.arange(3), data.num_levels.numpy())
  traces = [np.trace(cov[factor_of == k][:, factor_of == k]) for k in range(3)]
  np.testing.assert_allclose(post.mean, mean, atol=1e-10)
  np.testing.assert_allclose(post.traces, traces, rtol=1e-10)
  assert np.all(post.trace_se == 0.)


def test_posterior_equals_tfp_joint_gaussian_conditioning():
  """The same posterior from the JointDistribution alone (autodiff Hessian)."""
  from tfp_em.verification.exact import marginalize_gaussian
  data, params = _simulate(3), _params()
  exact = marginalize_gaussian(ce.joint_distribution(params, data), ["u"], {"y": data.y})
  post = cx.CrossedEffectsEM().posterior(params, data)
  np.testing.assert_allclose(post.mean, np.asarray(exact.posterior["u_mean"]), atol=1e-9)
  np.testing.assert_allclose(post.log_prob, float(exact.log_prob), rtol=1e-10)


@pytest.mark.parametrize("num_levels", [(5, 7, 3), (6,), (4, 9)])
def test_marginal_equals_dense_mvn(num_levels):
  data = _simulate(4, num_levels=num_levels, scales=(1.,) * len(num_levels))
  for variances in ([0.2] * len(num_levels), np.linspace(0.5, 3., len(num_levels))):
    params = _params(variances=variances, noise=1.3)
    got = cx.CrossedEffectsEM().marginal_log_prob(params, data)
    want = ce.dense_marginal(params, data).log_prob(data.y)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-11)


def test_cg_hutchinson_path():
  """Beyond max_dense: CG mean to tolerance, trace estimates within 5 standard errors."""
  data, params = _simulate(5, n=200), _params()
  exact = cx.CrossedEffectsEM().posterior(params, data)
  approx = cx.CrossedEffectsEM(max_dense=2, num_probes=200).posterior(params, data)
  np.testing.assert_allclose(approx.mean, exact.mean, atol=1e-7)
  assert np.all(approx.trace_se > 0)
  assert np.all(np.abs(approx.traces - exact.traces) < 5 * approx.trace_se)
  assert np.isnan(approx.log_prob)


@pytest.mark.parametrize("max_dense", [cp.MAX_DENSE, 0])
def test_covariance_entries_equal_dense_mvn_posterior(max_dense):
  """Selected entries of P^-1 and Var[sum_k u_k] equal the dense TFP posterior covariance."""
  data, params = _simulate(5), _params()
  x, y, z, ztz, num_levels = cx.CrossedEffectsEM().arrays(data)
  fac = cp.factorize(ztz, num_levels, params.variances.numpy(), float(params.noise_variance),
                     max_dense)
  assert fac.exact == (max_dense > 0)
  _, cov = (t.numpy() for t in ce.dense_posterior(params, data))
  rng = np.random.default_rng(0)
  rows, cols = rng.integers(0, cov.shape[0], (2, 300))
  np.testing.assert_allclose(cpr.covariance_entries(fac, rows, cols), cov[rows, cols], atol=1e-12)
  positions = data.codes.numpy() + np.concatenate([[0], np.cumsum(num_levels)[:-1]])
  positions[:5, 1] = -1                                                 # factor 1 unseen
  weights = np.zeros((len(positions), cov.shape[0]))
  for i, row in enumerate(positions):
    weights[i, row[row >= 0]] = 1.
  np.testing.assert_allclose(cpr.predictive_variance(fac, positions),
                             np.einsum("nq,qr,nr->n", weights, cov, weights), rtol=1e-10)


def test_fisher_identity():
  """grad Q(theta | theta_old) at theta_old == grad log p(y | theta) (dense TFP, autodiff)."""
  data, params = _simulate(6), _params()
  model = cx.CrossedEffectsEM()
  stats, _ = model.e_step(params, data)
  stats = stats._replace(beta_ref=tf.constant(stats.beta_ref.numpy()))  # a constant of Q
  with tf.GradientTape(persistent=True) as tape:
    tape.watch(params)
    q = model.expected_log_joint(params, stats)
    ll = ce.dense_marginal(params, data).log_prob(data.y)
  for gq, gl in zip(tape.gradient(q, params), tape.gradient(ll, params)):
    np.testing.assert_allclose(gq.numpy(), gl.numpy(), rtol=1e-8, atol=1e-10)


def test_m_step_maximizes_q():
  """Plain EM (no expansion): the gradient of Q vanishes at the M-step's output."""
  data, params = _simulate(7), _params()
  model = cx.CrossedEffectsEM(expand=False)
  stats, _ = model.e_step(params, data)
  new = model.m_step(params, stats)
  with tf.GradientTape() as tape:
    tape.watch(new)
    q = model.expected_log_joint(new, stats)
  for g in tape.gradient(q, new):
    np.testing.assert_allclose(g.numpy(), 0., atol=1e-8)


@pytest.mark.filterwarnings("ignore:.*did not converge")
@pytest.mark.parametrize("expand", [False, True])
def test_em_monotone(expand):
  data = _simulate(8)
  model = cx.CrossedEffectsEM(expand=expand, intercept=0)
  res = fit_em(model, data, max_iter=60, tol=0., compile=model.compile, on_decrease="raise")
  lls = res.restarts[0].log_likelihood
  assert lls[-1] > lls[0] + 1.
  assert np.all(np.diff(lls) >= -1e-9 * np.abs(lls[1:]))


def test_em_and_nll_meet():
  data = _simulate(9, n=120)
  model = cx.CrossedEffectsEM(intercept=0)
  em = fit_em(model, data, max_iter=3000, tol=1e-14, compile=model.compile)
  nll_params, nll_ll, converged, _ = fit_nll(model, data, model.initialize(data, 1))
  assert converged and em.converged
  assert abs(em.log_likelihood - nll_ll) < 1e-6
  for a, b in zip(em.params, nll_params):
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-3, atol=1e-4)
  # the NLL optimum is a maximum: moving any variance lowers l
  for k in range(3):
    moved = nll_params._replace(variances=tf.tensor_scatter_nd_update(
        nll_params.variances, [[k]], [nll_params.variances[k] * 1.05]))
    assert float(model.marginal_log_prob(moved, data)) < nll_ll


@pytest.mark.parametrize("method", ["em", "nll"])
def test_single_factor_matches_single_factor_path(method):
  data = _simulate(10, n=80, num_levels=(8,))
  X, y, g = data.x.numpy()[:, 1:], data.y.numpy(), data.codes.numpy()[:, 0]
  ref = MixedEffectsRegressor(random_effects="intercept", method=method, tol=1e-12,
                              max_iter=3000).fit(X, y, g)
  got = CrossedEffectsRegressor(method=method, tol=1e-12, max_iter=3000).fit(X, y, [g])
  assert got.log_likelihood_ == pytest.approx(ref.log_likelihood_, abs=1e-6)
  assert got.variances_[0] == pytest.approx(float(np.ravel(ref.cov_random_effects_)[0]), rel=1e-3)
  assert got.sigma2_ == pytest.approx(ref.sigma2_, rel=1e-4)
  np.testing.assert_allclose(got.predict(X, [g]), ref.predict(X, g), atol=1e-4)


def test_prediction_rule_per_factor():
  data = _simulate(11)
  X, y, codes = data.x.numpy()[:, 1:], data.y.numpy(), data.codes.numpy()
  labels = [np.array([f"f{k}_{c}" for c in codes[:, k]]) for k in range(3)]
  est = CrossedEffectsRegressor().fit(X, y, labels)
  fixed = est.intercept_ + X[:3] @ est.coef_
  seen = [lab[:3] for lab in labels]
  blup = sum(np.array([est.random_effects(k)[v] for v in seen[k]]) for k in range(3))
  np.testing.assert_allclose(est.predict(X[:3], seen), fixed + blup, rtol=1e-12)
  # an unseen level in factor 1 only drops that factor's BLUP
  mixed = [seen[0], np.array(["new"] * 3), seen[2]]
  drop = np.array([est.random_effects(1)[v] for v in seen[1]])
  np.testing.assert_allclose(est.predict(X[:3], mixed), fixed + blup - drop, rtol=1e-12)
  np.testing.assert_allclose(est.predict(X[:3]), fixed, rtol=1e-12)
  assert np.all(np.abs(drop) > 0)


def test_predict_interval_uses_exact_posterior_covariance():
  """Half-width = z_{0.95} sqrt(w^T Cov[u | y] w + sigma^2 + sigma_k^2 of unseen factors)."""
  import scipy.stats as sps
  data = _simulate(16)
  X, y, codes = data.x.numpy()[:, 1:], data.y.numpy(), data.codes.numpy()
  factors = [codes[:, k] for k in range(3)]
  est = CrossedEffectsRegressor().fit(X, y, factors)
  params = ce.CrossedParams(tf.constant(np.r_[est.intercept_, est.coef_]),
                            tf.constant(est.variances_), tf.constant(est.sigma2_, tf.float64))
  _, cov = (t.numpy() for t in ce.dense_posterior(params, data))
  new = [f[:6].copy() for f in factors]
  new[1][:3] = 99                                                      # unseen in factor 1
  offsets = np.concatenate([[0], np.cumsum(data.num_levels.numpy())[:-1]])
  weights = np.zeros((6, cov.shape[0]))
  for i in range(6):
    for k in range(3):
      if not (k == 1 and i < 3):
        weights[i, codes[i, k] + offsets[k]] = 1.
  want = np.einsum("nq,qr,nr->n", weights, cov, weights) + est.sigma2_
  want[:3] += est.variances_[1]
  lower, upper = est.predict_interval(X[:6], new, level=0.9).T
  np.testing.assert_allclose((upper - lower) / (2. * sps.norm.ppf(0.95)), np.sqrt(want), rtol=1e-9)
  np.testing.assert_allclose((upper + lower) / 2., est.predict(X[:6], new), rtol=1e-12)
  lower, upper = est.predict_interval(X[:2]).T                          # no clusters: prior
  np.testing.assert_allclose((upper - lower) / (2. * sps.norm.ppf(0.975)),
                             np.sqrt(est.sigma2_ + est.variances_.sum()), rtol=1e-12)
  with pytest.raises(ValueError, match="level must be < 1"):
    est.predict_interval(X[:2], level=1.)


def test_predict_interval_coverage():
  """About 90% of new observations of seen levels fall in the 90% interval."""
  rng = np.random.default_rng(17)
  n, levels = 6000, (40, 30)
  codes = np.stack([rng.integers(0, q, n) for q in levels], 1)
  u = [rng.normal(size=q) * s for q, s in zip(levels, (1., 0.6))]
  x = rng.normal(size=(n, 1))
  y = 1. + 2. * x[:, 0] + u[0][codes[:, 0]] + u[1][codes[:, 1]] + 0.8 * rng.normal(size=n)
  train, test = slice(0, 3000), slice(3000, None)
  est = CrossedEffectsRegressor().fit(x[train], y[train], [c[train] for c in codes.T])
  lower, upper = est.predict_interval(x[test], [c[test] for c in codes.T], level=0.9).T
  coverage = np.mean((y[test] >= lower) & (y[test] <= upper))
  assert abs(coverage - 0.9) < 0.02


def test_mixed_effects_regressor_dispatches_factor_lists():
  data = _simulate(12)
  X, y, codes = data.x.numpy()[:, 1:], data.y.numpy(), data.codes.numpy()
  factors = [codes[:, k] for k in range(3)]
  est = MixedEffectsRegressor().fit(X, y, factors)
  ref = CrossedEffectsRegressor().fit(X, y, factors)
  assert est.log_likelihood_ == pytest.approx(ref.log_likelihood_, rel=1e-12)
  np.testing.assert_allclose(est.predict(X, factors), ref.predict(X, factors), rtol=1e-12)
  np.testing.assert_allclose(est.predict_interval(X, factors), ref.predict_interval(X, factors),
                             rtol=1e-12)
  assert is_factor_list(factors) and not is_factor_list(list(codes[:, 0]))


def test_bad_input():
  data = _simulate(13)
  X, y, codes = data.x.numpy()[:, 1:], data.y.numpy(), data.codes.numpy()
  factors = [codes[:, k] for k in range(3)]
  est = CrossedEffectsRegressor()
  with pytest.raises(ValueError, match="clusters\\[1\\] has length"):
    est.fit(X, y, [factors[0], factors[1][:-1]])
  with pytest.raises(ValueError, match="y has length"):
    est.fit(X, y[:-1], factors)
  bad = y.copy()
  bad[3] = np.nan
  with pytest.raises(ValueError, match="NaN"):
    est.fit(X, bad, factors)
  with pytest.raises(ValueError, match="single level"):
    est.fit(X, y, [factors[0], np.zeros(len(y))])
  with pytest.raises(ValueError, match="missing label"):
    est.fit(X, y, [factors[0], [None] + list(factors[1][1:])])
  with pytest.raises(ValueError, match="list of K"):
    est.fit(X, y, "abc")
  fitted = CrossedEffectsRegressor().fit(X, y, factors)
  with pytest.raises(ValueError, match="list of 3"):
    fitted.predict(X, factors[:2])
  assert np.all(np.isfinite(y)) and codes.shape == (60, 3)  # inputs untouched


def test_large_path_em_close_to_exact():
  """Beyond max_dense: CG/Hutchinson EM lands near the exact ML variances; 'nll' refuses."""
  data = _simulate(14, n=300)
  X, y, codes = data.x.numpy()[:, 1:], data.y.numpy(), data.codes.numpy()
  factors = [codes[:, k] for k in range(3)]
  exact = CrossedEffectsRegressor(tol=1e-12).fit(X, y, factors)
  large = CrossedEffectsRegressor(max_dense=2, tol=1e-7).fit(X, y, factors)
  assert np.isnan(large.log_likelihood_) and np.all(large.trace_se_ > 0)
  np.testing.assert_allclose(large.variances_, exact.variances_, rtol=0.1)
  assert large.sigma2_ == pytest.approx(exact.sigma2_, rel=0.02)
  np.testing.assert_allclose(large.predict(X, factors), exact.predict(X, factors), atol=0.02)
  with pytest.raises(ValueError, match="max_dense"):
    CrossedEffectsRegressor(method="nll", max_dense=2).fit(X, y, factors)
  start = CrossedEffectsRegressor(max_dense=2, max_iter=0).fit(X, y, factors)  # as fit_em: the start
  assert start.n_iter_ == 0 and not start.converged_ and np.all(start.trace_se_ > 0)
  assert not np.allclose(start.variances_, large.variances_, rtol=0.1)


def test_float32_matches_float64():
  data64 = _simulate(15)
  data32 = data64._replace(x=tf.cast(data64.x, tf.float32), y=tf.cast(data64.y, tf.float32))
  fits = []
  for data in (data64, data32):
    model = cx.CrossedEffectsEM(intercept=0)
    fits.append(fit_em(model, data, max_iter=200, tol=1e-9, compile=model.compile))
  assert fits[1].params.variances.dtype == tf.float32
  assert fits[1].log_likelihood == pytest.approx(fits[0].log_likelihood, rel=1e-5)
  np.testing.assert_allclose(fits[1].params.variances.numpy(), fits[0].params.variances.numpy(),
                             rtol=1e-2)  # a flat likelihood: float32 stops earlier
