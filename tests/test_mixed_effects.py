"""Mixed effects: against dense TFP MVNs, autodiff, statsmodels, mutants, bad input."""
import warnings

import numpy as np
import pytest
import tensorflow as tf

from models import mixed_effects as me
from models.specs import constrain, unconstrain
from me_mutants import MUTANTS  # tests/ is on sys.path (rootdir-relative import)
from tfp_em.engine import ConvergenceWarning, fit_em
from tfp_em.mixed_effects.em import MixedEffectsEM, maximize_marginal
from tfp_em.mixed_effects.estimator import MixedEffectsRegressor
from tfp_em.mixed_effects.labels import encode_clusters
from tfp_em.mixed_effects.training import cluster_minibatches

COV_TYPES = me.COVARIANCE_TYPES


def _data(x, y, z, cluster, dtype=np.float64):
  cluster = np.asarray(cluster)
  return me.MixedEffectsData(
      x=tf.constant(x, dtype), y=tf.constant(y, dtype), z=tf.constant(z, dtype),
      cluster=tf.constant(cluster, tf.int32), num_clusters=tf.constant(cluster.max() + 1))


def _simulate(seed=0, num_clusters=6, max_size=5, q=2, p=2, singleton=True):
  """Small LMM data with unequal clusters; z = [1, t], x = [1, x1].

  singleton: cluster 0 has one row (default); otherwise every cluster has >= 2.
  """
  rng = np.random.default_rng(seed)
  sizes = rng.integers(1 if singleton else 2, max_size + 1, num_clusters)
  if singleton:
    sizes[0] = 1
  cluster = np.repeat(np.arange(num_clusters), sizes)
  n = cluster.size
  t = rng.uniform(0, 3, n)
  z = me.polynomial_design(t, q - 1)
  x = np.concatenate([np.ones((n, 1)), rng.normal(size=(n, p - 1))], 1)
  u = rng.normal(size=(num_clusters, q)) * [1.5, 0.7][:q]
  y = x @ np.arange(1., p + 1) + np.sum(z * u[cluster], 1) + 0.5 * rng.normal(size=n)
  return _data(x, y, z, cluster)


def _params(cov_type, q=2, p=2, seed=1):
  """A non-optimal parameter point."""
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(q, q))
  cov = a @ a.T + 0.5 * np.eye(q)
  cov = np.diag(cov) if cov_type == "diag" else cov
  return me.MixedEffectsParams(beta=tf.constant(rng.normal(size=p)), covariance=tf.constant(cov),
                               noise_variance=tf.constant(0.7, tf.float64))


def _fresh(params):
  """Copies as new tensors (bijector caches would otherwise cut the gradient)."""
  return type(params)(*[tf.constant(np.asarray(p)) for p in params])


def _grad(fn, params, specs):
  free = _fresh(unconstrain(params, specs))
  with tf.GradientTape() as tape:
    tape.watch(free)
    value = fn(constrain(free, specs))
  return np.concatenate([np.ravel(g) for g in tape.gradient(value, free)])


# ---------------------------------------------------------------------------
# The model against dense TFP distributions.

@pytest.mark.parametrize("cov", COV_TYPES)
def test_marginal_matches_dense_mvn(cov):
  data = _simulate()
  params = _params(cov)
  dense = me.dense_marginal(params, data, cov)
  np.testing.assert_allclose(me.marginal_log_prob(params, data, cov),
                             dense.log_prob(data.y), rtol=1e-12)
  # Per cluster: each block on its own.
  per_cluster = me.marginal_log_prob_per_cluster(params, data, cov).numpy()
  cluster = data.cluster.numpy()
  for i in range(int(data.num_clusters)):
    rows = cluster == i
    sub = _data(data.x.numpy()[rows], data.y.numpy()[rows], data.z.numpy()[rows],
                np.zeros(rows.sum(), int))
    expected = me.dense_marginal(params, sub, cov).log_prob(sub.y)
    np.testing.assert_allclose(per_cluster[i], expected, rtol=1e-12)


def test_marginal_in_float32_is_close():
  data64 = _simulate()
  data32 = me.MixedEffectsData(*[tf.cast(t, tf.float32) if t.dtype == tf.float64 else t
                                 for t in data64])
  params = _params("full")
  p32 = type(params)(*[tf.cast(p, tf.float32) for p in params])
  np.testing.assert_allclose(me.marginal_log_prob(p32, data32, "full"),
                             me.marginal_log_prob(params, data64, "full"), rtol=1e-5)


@pytest.mark.parametrize("cov", COV_TYPES)
def test_posterior_equals_gaussian_conditioning(cov):
  """E[u_i | y_i], Cov[u_i | y_i] from the dense joint of (u_i, y_i)."""
  data = _simulate()
  params = _params(cov)
  post = MixedEffectsEM(cov).posterior(params, data)
  cov_u = me.covariance_matrix(params.covariance, cov).numpy()
  resid = (data.y - me.linear_loc(params, data)).numpy()
  z, cluster = data.z.numpy(), data.cluster.numpy()
  for i in range(int(data.num_clusters)):
    zi, ri = z[cluster == i], resid[cluster == i]
    v = zi @ cov_u @ zi.T + float(params.noise_variance) * np.eye(len(ri))   # Cov(y_i)
    c = cov_u @ zi.T                                                          # Cov(u_i, y_i)
    np.testing.assert_allclose(post["u_mean"][i], c @ np.linalg.solve(v, ri), rtol=1e-10)
    np.testing.assert_allclose(post["u_cov"][i], cov_u - c @ np.linalg.solve(v, c.T),
                               rtol=1e-9, atol=1e-12)


def test_verification_oracle_agrees_with_the_e_step():
  verify_exact = pytest.importorskip("tfp_em.verification.exact")
  data = _simulate()
  params = _params("full")
  model = MixedEffectsEM("full")
  exact = model.verification_oracle(params, data)
  post = model.posterior(params, data)
  np.testing.assert_allclose(exact.log_prob, model.marginal_log_prob(params, data), rtol=1e-10)
  np.testing.assert_allclose(exact.posterior["u_mean"], post["u_mean"], rtol=1e-8, atol=1e-10)
  np.testing.assert_allclose(exact.posterior["u_cov"],
                             verify_exact.dense_covariance(post["u_cov"], 12), rtol=1e-8,
                             atol=1e-10)


def test_joint_distribution_factorizes_into_marginal_and_posterior():
  """log p(u, y) = log p(y) + sum_i log N(u_i | m_i, P_i^-1) for any u."""
  import tensorflow_probability as tfp
  data = _simulate()
  params = _params("full")
  model = MixedEffectsEM("full")
  joint = model.joint_distribution(params, data)
  u = tf.constant(np.random.default_rng(3).normal(size=(int(data.num_clusters), 2)))
  post = model.posterior(params, data)
  log_post = tfp.distributions.MultivariateNormalTriL(
      post["u_mean"], tf.linalg.cholesky(post["u_cov"])).log_prob(u)
  np.testing.assert_allclose(joint.log_prob(u=u, y=data.y),
                             model.marginal_log_prob(params, data) + tf.reduce_sum(log_post),
                             rtol=1e-11)
  sample = joint.sample(seed=(1, 2))
  assert sample["u"].shape == u.shape and sample["y"].shape == data.y.shape


# ---------------------------------------------------------------------------
# EM against autodiff.

@pytest.mark.parametrize("cov", COV_TYPES)
def test_e_step_loglik_and_fisher_identity(cov):
  """grad_theta Q(theta | theta_old) at theta_old == grad l(theta_old), unconstrained."""
  data = _simulate()
  model = MixedEffectsEM(cov)
  params = _params(cov)
  stats, ll = model.e_step(params, data)
  np.testing.assert_allclose(ll, model.marginal_log_prob(params, data), rtol=1e-12)
  specs = model.param_specs
  g_q = _grad(lambda p: model.expected_log_joint(p, stats), params, specs)
  g_l = _grad(lambda p: model.marginal_log_prob(p, data), params, specs)
  assert np.max(np.abs(g_l)) > 1e-2  # a point where the check has teeth
  np.testing.assert_allclose(g_q, g_l, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("cov", COV_TYPES)
def test_m_step_is_stationary_and_increases_q(cov):
  data = _simulate()
  model = MixedEffectsEM(cov)
  params = _params(cov)
  stats, _ = model.e_step(params, data)
  new = model.m_step(params, stats)
  g = _grad(lambda p: model.expected_log_joint(p, stats), new, model.param_specs)
  assert np.max(np.abs(g)) < 1e-9
  assert model.expected_log_joint(new, stats) > model.expected_log_joint(params, stats)


def test_m_step_blocks_directly():
  from tfp_em.mixed_effects import em as mem
  mean = tf.constant([[1., 2.], [0., -1.]], tf.float64)
  cov = tf.constant([[[1., .5], [.5, 2.]]] * 2, tf.float64)
  np.testing.assert_allclose(mem.posterior_second_moment(mean, cov),
                             np.outer([1, 2], [1, 2]) + np.outer([0, -1], [0, -1]) + 2 * cov[0])
  np.testing.assert_allclose(mem.update_covariance(tf.eye(2, dtype=tf.float64) * 4., 2., "diag"),
                             [2., 2.])
  np.testing.assert_allclose(mem.update_noise_variance(3., 1., 8.), 0.5)
  np.testing.assert_allclose(mem.trace_term(cov, cov), 2 * np.trace(cov[0] @ cov[0]))


@pytest.mark.parametrize("cov", COV_TYPES)
def test_em_loglik_is_monotone(cov):
  data = _simulate(seed=4, num_clusters=12)
  with pytest.warns(ConvergenceWarning):  # tol=0: runs all 60 steps
    result = fit_em(MixedEffectsEM(cov), data, max_iter=60, tol=0., on_decrease="raise",
                    progress=False, seed=2)
  ll = result.restarts[0].log_likelihood
  assert np.all(np.diff(ll) >= -1e-10 * np.abs(ll[1:]))
  assert ll[-1] > ll[0] + 1.


@pytest.mark.parametrize("cov", COV_TYPES)
def test_em_and_lbfgs_meet_at_the_same_optimum(cov):
  data = _simulate(seed=5, num_clusters=15, max_size=8)
  model = MixedEffectsEM(cov)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    em = fit_em(model, data, max_iter=3000, tol=1e-14, progress=False)
  params, ll = maximize_marginal(model, data, model.initialize(data, 0))[:2]
  np.testing.assert_allclose(em.log_likelihood, ll, rtol=1e-9)
  for a, b in zip(em.params, params):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert np.max(np.abs(_grad(lambda p: model.marginal_log_prob(p, data), em.params,
                             model.param_specs))) < 1e-4


# ---------------------------------------------------------------------------
# statsmodels on sleepstudy: Reaction ~ Days + (Days | Subject), ML.

@pytest.fixture(scope="module")
def statsmodels_fit(sleepstudy):
  smf = pytest.importorskip("statsmodels.formula.api")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    fit = smf.mixedlm("Reaction ~ Days", sleepstudy, groups=sleepstudy["Subject"],
                      re_formula="~Days").fit(reml=False, method=["bfgs"])
  assert fit.converged
  return dict(llf=fit.llf, sigma2=fit.scale, cov=fit.cov_re.values,
              beta=fit.fe_params.values)


def _rel(a, b):
  return np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b))


def _fit_sleepstudy(d, **kw):
  return MixedEffectsRegressor(random_effects="slopes", **kw).fit(
      d[["Days"]].values, d["Reaction"].values, d["Subject"].values, time=d["Days"].values)


@pytest.mark.parametrize("method", ["em", "nll"])
def test_matches_statsmodels_on_sleepstudy(sleepstudy, statsmodels_fit, method):
  est = _fit_sleepstudy(sleepstudy, method=method, tol=1e-12)
  ref = statsmodels_fit
  assert _rel(est.log_likelihood_, ref["llf"]) < 1e-8
  assert _rel(est.sigma2_, ref["sigma2"]) < 1e-4
  assert _rel(est.cov_random_effects_, ref["cov"]) < 1e-4
  assert _rel([est.intercept_, *est.coef_], ref["beta"]) < 1e-4
  assert est.fit_result_.converged


def test_n_iter_and_converged_report_the_fit(sleepstudy):
  """n_iter_ is fit_result_'s; converged_ a bool, False when the last stage ran out of iterations."""
  est = _fit_sleepstudy(sleepstudy)
  assert est.n_iter_ == est.fit_result_.n_iter >= 1 and est.converged_ is True
  short = _fit_sleepstudy(sleepstudy, max_iter=1)  # EM stops at once; the polish converges
  assert short.n_iter_ == 1 and not short.fit_result_.converged
  assert short.converged_ is short.polish_.converged is True
  lbfgs = _fit_sleepstudy(sleepstudy, method="nll", max_iter=1)
  assert lbfgs.n_iter_ == lbfgs.fit_result_.n_iter == 1 and lbfgs.converged_ is False
  d = sleepstudy  # two factors, L-BFGS: no fit_result_, the values are crossed_'s
  two = MixedEffectsRegressor(method="nll", max_iter=1).fit(
      d[["Days"]].values, d["Reaction"].values, [d["Subject"].values, d["Days"].values % 3])
  assert two.fit_result_ is None and two.n_iter_ == two.crossed_.n_iter_ >= 1
  assert two.converged_ is two.crossed_.converged_ is False


def test_float32_fit_is_close_to_float64(sleepstudy):
  e64 = _fit_sleepstudy(sleepstudy)
  e32 = _fit_sleepstudy(sleepstudy, dtype="float32", tol=1e-6)
  assert e32.params_.noise_variance.dtype == tf.float32
  assert _rel(e32.log_likelihood_, e64.log_likelihood_) < 1e-5
  assert _rel(e32.cov_random_effects_, e64.cov_random_effects_) < 1e-2
  assert _rel(e32.sigma2_, e64.sigma2_) < 1e-2
  np.testing.assert_allclose(e32.predict(sleepstudy[["Days"]].values, sleepstudy["Subject"],
                                         time=sleepstudy["Days"].values),
                             e64.predict(sleepstudy[["Days"]].values, sleepstudy["Subject"],
                                         time=sleepstudy["Days"].values), rtol=1e-3)


# ---------------------------------------------------------------------------
# Mutants: every one is caught, the correct model passes.

def _checks(model, data, ref):
  """Fisher identity, M-step stationarity, monotone l, and the statsmodels optimum."""
  params = model.initialize(data, 0)
  specs = model.param_specs
  stats, _ = model.e_step(params, data)
  g_q = _grad(lambda p: model.expected_log_joint(p, stats), params, specs)
  g_l = _grad(lambda p: model.marginal_log_prob(p, data), params, specs)
  fisher = np.allclose(g_q, g_l, rtol=1e-6, atol=1e-8)
  new = model.m_step(params, stats)
  g_new = _grad(lambda p: model.expected_log_joint(p, stats), new, specs)
  stationary = np.max(np.abs(g_new)) < 1e-6
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    result = fit_em(model, data, max_iter=300, tol=1e-12, progress=False)
  ll = result.restarts[0].log_likelihood
  monotone = bool(np.all(np.diff(ll) >= -1e-10 * np.abs(ll[1:])))
  optimum = (_rel(result.log_likelihood, ref["llf"]) < 1e-8
             and _rel(result.params.covariance, ref["cov"]) < 1e-4
             and _rel(result.params.noise_variance, ref["sigma2"]) < 1e-4)
  return dict(fisher=fisher, stationary=stationary, monotone=monotone, optimum=optimum)


@pytest.fixture(scope="module")
def sleepstudy_data(sleepstudy):
  labels, codes = encode_clusters(sleepstudy["Subject"].values, len(sleepstudy))
  days = sleepstudy["Days"].values.astype(float)
  x = me.polynomial_design(days, 1)
  return _data(x, sleepstudy["Reaction"].values, x, codes)


def test_correct_model_passes_every_check(sleepstudy_data, statsmodels_fit):
  assert all(_checks(MixedEffectsEM(), sleepstudy_data, statsmodels_fit).values())


@pytest.mark.parametrize("name,expected", [
    ("inner_product_second_moment", "fisher"),
    ("no_trace_noise_variance", "stationary"),
    ("per_observation_covariance", "stationary"),
])
def test_mutant_is_caught(sleepstudy_data, statsmodels_fit, name, expected):
  checks = _checks(MUTANTS[name](), sleepstudy_data, statsmodels_fit)
  assert not checks[expected], checks
  assert not checks["optimum"], checks


# ---------------------------------------------------------------------------
# The estimator: labels, prediction rule, intervals, bad input.

def _lmm_arrays(seed=0, num_clusters=30, size=8, sigma_b=2.):
  rng = np.random.default_rng(seed)
  cluster = np.repeat(np.arange(num_clusters), size)
  x = rng.normal(size=(cluster.size, 2))
  b = rng.normal(0, sigma_b, num_clusters)
  y = 1. + x @ [2., -1.] + b[cluster] + rng.normal(size=cluster.size)
  return x, y, cluster, b


@pytest.mark.parametrize("kw", [dict(), dict(random_effects="slopes"), dict(method="nll")])
def test_one_factor_in_a_list_is_the_same_fit(kw):
  """clusters=[g] runs the single-factor fit: the same numbers to the bit."""
  x, y, cluster, _ = _lmm_arrays()
  time = x[:, 0] if kw.get("random_effects") == "slopes" else None
  a = MixedEffectsRegressor(**kw).fit(x, y, cluster, time=time)
  b = MixedEffectsRegressor(**kw).fit(x, y, [cluster], time=time)
  assert b.crossed_ is None
  np.testing.assert_allclose(b.coef_, a.coef_, rtol=1e-13)
  assert b.intercept_ == pytest.approx(a.intercept_, rel=1e-13)
  np.testing.assert_allclose(b.cov_random_effects_, a.cov_random_effects_, rtol=1e-13)
  assert b.sigma2_ == pytest.approx(a.sigma2_, rel=1e-13)
  assert b.log_likelihood_ == pytest.approx(a.log_likelihood_, rel=1e-13)
  np.testing.assert_allclose(b.predict(x, [cluster], time=time), a.predict(x, cluster, time=time),
                             rtol=1e-13)
  with pytest.raises(ValueError, match="one grouping factor"):
    a.predict(x, [cluster, cluster], time=time)


def test_validation_data_with_linear_f_raises():
  x, y, cluster, _ = _lmm_arrays()
  for clusters in (cluster, [cluster], [cluster, cluster % 7]):
    with pytest.raises(ValueError, match="validation_data .*only used with a network f"):
      MixedEffectsRegressor().fit(x, y, clusters, validation_data=(x, y, clusters))


def test_string_labels_give_the_same_fit_as_integers():
  x, y, cluster, _ = _lmm_arrays()
  names = np.array([f"s{c:02d}" for c in cluster])
  a = MixedEffectsRegressor().fit(x, y, cluster)
  b = MixedEffectsRegressor().fit(x, y, list(names))
  assert a.log_likelihood_ == pytest.approx(b.log_likelihood_, rel=1e-12)
  np.testing.assert_allclose(a.random_effects_[3].mean, b.random_effects_["s03"].mean)
  np.testing.assert_allclose(a.predict(x, cluster), b.predict(x, names))
  mixed = [("a", 1) if c % 2 else 7 for c in cluster]  # unorderable hashables
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", ConvergenceWarning)  # Sigma_u from 2 clusters: slow
    est = MixedEffectsRegressor().fit(x, y, mixed)
  assert set(est.random_effects_) == {("a", 1), 7}


def test_posterior_means_recover_random_effects_and_prediction_rule():
  x, y, cluster, b = _lmm_arrays()
  est = MixedEffectsRegressor().fit(x, y, cluster)
  m = est.random_effects_mean_[:, 0]
  assert np.corrcoef(m, b)[0, 1] > 0.95
  assert est.cov_random_effects_.shape == (1, 1) and est.random_effects_[0].covariance.shape == (1, 1)
  f_only = est.predict(x)
  np.testing.assert_allclose(est.predict(x, ["unseen"] * len(x)), f_only)
  np.testing.assert_allclose(est.predict(x, cluster) - f_only, m[cluster], rtol=1e-12)
  # Intervals: seen clusters are narrower than unseen; coverage on fresh draws.
  rng = np.random.default_rng(9)
  x_new = rng.normal(size=(4000, 2))
  c_new = rng.integers(0, 30, 4000)
  y_new = 1. + x_new @ [2., -1.] + b[c_new] + rng.normal(size=4000)
  seen = est.predict_interval(x_new, c_new)
  unseen = est.predict_interval(x_new)
  assert np.all(seen[:, 1] - seen[:, 0] < unseen[:, 1] - unseen[:, 0])
  coverage = np.mean((y_new > seen[:, 0]) & (y_new < seen[:, 1]))
  assert 0.92 < coverage < 0.98


def test_inputs_are_not_modified_and_one_point_clusters_work():
  x, y, cluster, _ = _lmm_arrays(size=3)
  cluster = cluster.copy()
  cluster[:2] = [100, 101]  # two clusters of one observation
  copies = [a.copy() for a in (x, y, cluster)]
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", ConvergenceWarning)  # no true slope variance: boundary
    est = MixedEffectsRegressor(random_effects="slopes").fit(x, y, cluster, time=x[:, 0])
  for a, b in zip((x, y, cluster), copies):
    np.testing.assert_array_equal(a, b)
  assert np.all(np.isfinite(est.random_effects_[100].mean))
  assert np.all(np.isfinite(est.predict(x, cluster, time=x[:, 0])))


@pytest.mark.parametrize("change,match", [
    (dict(cluster=lambda c: c[:-1]), "clusters has length"),
    (dict(y=lambda y: y[:-1]), "y has length"),
    (dict(x=lambda x: np.where(np.arange(x.size).reshape(x.shape) == 3, np.nan, x)), "X contains NaN"),
    (dict(y=lambda y: np.where(np.arange(y.size) == 5, np.nan, y)), "y contains NaN"),
    (dict(cluster=lambda c: np.zeros_like(c)), "single level"),
    (dict(cluster=lambda c: [None] + list(c[1:])), "missing label"),
])
def test_bad_input_gets_a_clear_error(change, match):
  x, y, cluster, _ = _lmm_arrays()
  args = dict(x=x, y=y, cluster=cluster)
  for k, fn in change.items():
    args[k] = fn(args[k])
  with pytest.raises(ValueError, match=match):
    MixedEffectsRegressor().fit(args["x"], args["y"], args["cluster"])


def test_bad_options_and_designs():
  x, y, cluster, _ = _lmm_arrays()
  with pytest.raises(ValueError, match="needs time"):
    MixedEffectsRegressor(random_effects="slopes").fit(x, y, cluster)
  with pytest.raises(ValueError, match="needs Z"):
    MixedEffectsRegressor(random_effects="custom").fit(x, y, cluster)
  with pytest.raises(ValueError, match="time has length"):
    MixedEffectsRegressor(random_effects="slopes").fit(x, y, cluster, time=x[:-1, 0])
  with pytest.raises(ValueError, match="needs a network f"):
    MixedEffectsRegressor(random_effects="features").fit(x, y, cluster)
  with pytest.raises(ValueError, match="method must be one of"):
    MixedEffectsRegressor(method="reml").fit(x, y, cluster)
  with pytest.raises(ValueError, match="covariance must be one of"):
    MixedEffectsRegressor(covariance="spherical").fit(x, y, cluster)
  with pytest.raises(ValueError, match="not fitted"):
    MixedEffectsRegressor().predict(x)
  est = MixedEffectsRegressor(random_effects="custom").fit(x, y, cluster, Z=np.ones((len(y), 1)))
  with pytest.raises(ValueError, match="columns"):
    est.predict(x, cluster, Z=np.ones((len(y), 2)))
  with pytest.raises(ValueError, match="features"):
    est.predict(x[:, :1], cluster)


def test_custom_design_equals_intercept_design():
  x, y, cluster, _ = _lmm_arrays()
  a = MixedEffectsRegressor().fit(x, y, cluster)
  b = MixedEffectsRegressor(random_effects="custom").fit(x, y, cluster, Z=np.ones((len(y), 1)))
  assert a.log_likelihood_ == pytest.approx(b.log_likelihood_, rel=1e-12)


def test_diag_covariance_has_zero_off_diagonal(sleepstudy):
  est = _fit_sleepstudy(sleepstudy, covariance="diag")
  full = _fit_sleepstudy(sleepstudy)
  assert est.cov_random_effects_[0, 1] == 0.
  assert est.log_likelihood_ <= full.log_likelihood_ + 1e-8


# ---------------------------------------------------------------------------
# Network f: MeNets EM and LMMNN NLL (small and fast).

def test_cluster_minibatches_hold_whole_clusters():
  rng = np.random.default_rng(0)
  cluster = rng.integers(0, 40, 500)
  cluster[cluster == 7] = 8  # an empty cluster id
  order, starts, ends, local = cluster_minibatches(rng, cluster, 40, 64)
  assert np.array_equal(np.sort(order), np.arange(500))
  assert starts[0] == 0 and ends[-1] == 500 and np.all(starts[1:] == ends[:-1])
  seen = set()
  for s, e in zip(starts, ends):
    c, loc = cluster[order[s:e]], local[s:e]
    assert not seen & set(c)  # no cluster is split across batches
    seen |= set(c)
    assert np.array_equal(np.unique(loc), np.arange(loc.max() + 1))
    assert all(len(set(c[loc == k])) == 1 for k in np.unique(loc))


@pytest.fixture(scope="module")
def nn_data():
  rng = np.random.default_rng(0)
  n, num_clusters = 900, 30
  x = rng.uniform(-1, 1, (n, 3))
  cluster = rng.integers(0, num_clusters, n)
  b = rng.normal(0, 2., num_clusters)
  y = np.sin(2 * x[:, 0]) + x[:, 1] * x[:, 2] + b[cluster] + 0.5 * rng.normal(size=n)
  return x, y, cluster


@pytest.mark.parametrize("method", ["em", "nll"])
@pytest.mark.parametrize("design", ["intercept", "features"])
def test_network_paths_fit_and_use_the_clusters(nn_data, method, design):
  x, y, cluster = nn_data
  tr, va = slice(0, 700), slice(700, None)
  est = MixedEffectsRegressor(f="mlp", hidden_units=(16, 8), dropout=0., method=method,
                              random_effects=design, max_iter=6, batch_size=64,
                              learning_rate=1e-2, seed=1)
  est.fit(x[tr], y[tr], cluster[tr], validation_data=(x[va], y[va], cluster[va]))
  q = 1 if design == "intercept" else 9
  assert est.cov_random_effects_.shape == (q, q)
  assert est.random_effects_mean_.shape == (30, q)
  hist = est.history_
  assert len(hist["log_likelihood"]) <= 7 and hist["best_iteration"] == np.argmin(hist["criterion"])
  assert est.n_iter_ == est.fit_result_.n_iter == hist["best_iteration"]
  assert est.converged_ is (hist["stop_reason"] == "early_stopping")  # False: it ran max_iter
  # The variances are refitted exactly given the returned network: l only rises.
  assert est.log_likelihood_ >= hist["log_likelihood"][hist["best_iteration"]] * (1 + 1e-7)
  staged = design == "features" and method == "em"  # MeNets: random intercepts first
  trained = hist["pretraining"].trace if staged else hist["log_likelihood"]
  assert np.max(trained) > trained[0]
  mse_seen = np.mean((est.predict(x[va], cluster[va]) - y[va]) ** 2)
  mse_f = np.mean((est.predict(x[va]) - y[va]) ** 2)
  assert mse_seen < 0.5 * mse_f  # the BLUPs carry the cluster effects (sigma_b^2 = 4)
  assert 0.1 < est.sigma2_ < 2.
  lo, hi = est.predict_interval(x[va], cluster[va]).T
  assert np.all(lo < hi)


def test_keras_model_f_is_cloned_not_modified(nn_data):
  import keras
  x, y, cluster = nn_data
  model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="relu"),
                            keras.layers.Dense(1)])
  before = [w.copy() for w in model.get_weights()]
  est = MixedEffectsRegressor(f=model, max_iter=2, batch_size=128).fit(x, y, cluster)
  for a, b in zip(model.get_weights(), before):
    np.testing.assert_array_equal(a, b)
  assert est.network_.model is not model


# ---------------------------------------------------------------------------
# PX-EM (the estimator's linear EM): same optimum, monotone, far fewer steps.

def test_px_em_is_monotone_and_faster_with_the_same_optimum():
  """Unequal clusters and x correlated with the cluster: OLS starts far from GLS."""
  rng = np.random.default_rng(0)
  cluster = np.repeat(np.arange(30), rng.integers(1, 100, 30))
  x = rng.normal(size=(cluster.size, 2)) + 0.5 * rng.normal(size=30)[cluster][:, None]
  y = 1. + x @ [2., -1.] + rng.normal(0, 3., 30)[cluster] + rng.normal(size=cluster.size)
  design = np.concatenate([np.ones((len(y), 1)), x], 1)
  data = _data(design, y, np.ones((len(y), 1)), cluster)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    plain = fit_em(MixedEffectsEM(), data, max_iter=300, tol=1e-12, progress=False)
    px = fit_em(MixedEffectsEM(expand=True), data, max_iter=300, tol=1e-12, progress=False,
                on_decrease="raise")
  assert px.converged and not plain.converged
  assert px.n_iter < 30 and plain.n_iter == 300
  ll = px.restarts[0].log_likelihood
  assert np.all(np.diff(ll) >= -1e-10 * np.abs(ll[1:]))
  best = maximize_marginal(MixedEffectsEM(), data, px.params).log_likelihood
  assert px.log_likelihood == pytest.approx(best, rel=1e-10)
  assert px.log_likelihood > plain.log_likelihood


def test_px_em_is_plain_em_when_z_is_outside_the_span_of_x():
  data = _simulate(seed=4, num_clusters=12)
  data = data._replace(x=data.x[:, 1:])  # no intercept: z = [1, t] is not in span(x)
  params = _params("full", p=1)
  plain, px = MixedEffectsEM(), MixedEffectsEM(expand=True)
  stats, _ = plain.e_step(params, data)
  for a, b in zip(plain.m_step(params, stats), px.m_step(params, stats)):
    np.testing.assert_allclose(a, b, rtol=1e-12)


def test_stats_add_up_over_batches_of_whole_clusters():
  data = _simulate(seed=6, num_clusters=10)
  model = MixedEffectsEM()
  params = _params("full")
  full, ll = model.e_step(params, data)
  cluster = data.cluster.numpy()
  parts, lls = [], []
  for keep in (cluster < 4, cluster >= 4):
    local = np.unique(cluster[keep], return_inverse=True)[1]  # numbered within the batch
    sub = _data(data.x.numpy()[keep], data.y.numpy()[keep], data.z.numpy()[keep], local)
    stats, part_ll = model.e_step(params, sub)
    parts.append(stats)
    lls.append(part_ll)
  summed = [a if name in model.shared_stats_fields else a + b
            for name, a, b in zip(full._fields, *parts)]
  for a, b in zip(summed, full):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(sum(lls), ll, rtol=1e-12)
