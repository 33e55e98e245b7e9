"""Bernoulli hidden-unit MLP: exact EM against the TFP model and autodiff.

The checks below (posterior by enumeration, Fisher identity, M-step
stationarity, monotone loglik, stationary fixed point) are run on the correct
model and on every mutant in tests/mlp_mutants.py: the correct model passes
them all and each mutant fails at least the ones it is expected to fail.
"""
import warnings

import numpy as np
import pytest
import tensorflow as tf

from models import bernoulli_mlp as mlp
from models.specs import constrain, unconstrain
from tfp_em.bernoulli_mlp import em as bm
from tfp_em.bernoulli_mlp import newton
from tfp_em.bernoulli_mlp.estimator import BernoulliMLPClassifier
from tfp_em.engine import fit_em

from mlp_mutants import CORRECT, EXPECTED_CATCHES, MUTANTS

POSTERIOR_TOL = 1e-10
FISHER_TOL = 1e-8
M_STEP_TOL = 1e-6
FIXED_POINT_TOL = 1e-4


def synthetic(n=80, d=3, m=3, c=3, seed=0, dtype=tf.float64):
  """Data sampled from the model itself, every class at least n / (3c) times."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d))
  for attempt in range(200):
    params = mlp.BernoulliMLPParams(tf.constant(rng.normal(0., 1.5, (d + 1, m))),
                                    tf.constant(rng.normal(0., 3., (m + 1, c))))
    y = mlp.joint(params, tf.constant(x)).sample(seed=(seed, attempt))["y"]
    if np.bincount(y.numpy(), minlength=c).min() >= n // (3 * c):
      return tf.constant(x, dtype), tf.cast(y, tf.int32)
  raise RuntimeError("no balanced sample found")


def _quiet_fit(model, data, **kw):
  kw.setdefault("compile", "graph")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return fit_em(model, data, progress=False, **kw)


def _gradient(fn, params):
  """Autodiff gradient of fn(params) in unconstrained coordinates."""
  specs = mlp.param_specs()
  free = unconstrain(params, specs)
  with tf.GradientTape() as tape:
    tape.watch(free)
    value = fn(constrain(free, specs))
  return [g.numpy() for g in tape.gradient(value, free)]


def _max_abs(arrays):
  return max(float(np.max(np.abs(a))) for a in arrays)


# ---- The checks, applicable to any model with the BernoulliMLPEM interface. --

def posterior_error(model, params, data):
  """Max |tau - brute force| where brute force enumerates the JD's log_prob."""
  x, y = data
  configs = model.configurations(params.hidden_weights.dtype)         # [K, m]
  k, n = configs.shape[0], x.shape[0]
  z = tf.broadcast_to(configs[:, tf.newaxis, :], [k, n, model.num_hidden])
  log_joint = model.joint_distribution(params, data).log_prob(dict(z=z, y=y))  # [K, N]
  tau = tf.transpose(tf.nn.softmax(log_joint, axis=0))
  post = model.posterior(params, data)
  loglik = tf.reduce_logsumexp(log_joint, axis=0)
  _, total = model.e_step(params, data)
  penalized = tf.reduce_sum(loglik) - newton.l2_penalty(params, model.l2)
  return max(_max_abs([post["tau"] - tau]),
             _max_abs([post["hidden_marginals"] - tf.matmul(tau, configs)]),
             _max_abs([post["loglik"] - loglik]),
             abs(float(total - penalized)) / (1. + abs(float(penalized))))


def fisher_error(model, params, data):
  """grad Q(. | params) at params vs grad of the TFP marginal, relative."""
  stats, _ = model.e_step(params, data)
  grad_q = _gradient(lambda p: model.expected_log_joint(p, stats), params)
  grad_l = _gradient(lambda p: model.marginal_log_prob(p, data), params)
  return _max_abs([a - b for a, b in zip(grad_q, grad_l)]) / (1. + _max_abs(grad_l))


def m_step_gradient(model, params, data):
  """|grad Q(new | params)| after the M-step, relative to before it."""
  stats, _ = model.e_step(params, data)
  new = model.m_step(params, stats)
  before = _max_abs(_gradient(lambda p: model.expected_log_joint(p, stats), params))
  after = _max_abs(_gradient(lambda p: model.expected_log_joint(p, stats), new))
  return after / before


def monotone_violation(model, data, seed=0, max_iter=25):
  """Largest drop in loglik, or in Q within an M-step, along an EM run."""
  result = _quiet_fit(model, data, max_iter=max_iter, tol=0., seed=seed)
  ll = result.restarts[0].log_likelihood
  drops = [float(np.max(-np.diff(ll), initial=0.))]
  for old in result.restarts[0].params[:5]:
    old = type(old)(*[tf.constant(p) for p in old])
    stats, _ = model.e_step(old, data)
    new = model.m_step(old, stats)
    drops.append(float(model.expected_log_joint(old, stats) - model.expected_log_joint(new, stats)))
  return max(drops) / (1. + abs(ll[-1]))


def fixed_point_gradient(model, data, seed=0):
  """|grad marginal| at EM convergence, relative to the initial gradient."""
  start = model.initialize(data, seed)
  result = _quiet_fit(model, data, max_iter=3000, tol=1e-12, init_params=start)
  before = _max_abs(_gradient(lambda p: model.marginal_log_prob(p, data), start))
  after = _max_abs(_gradient(lambda p: model.marginal_log_prob(p, data), result.params))
  return after / before


def run_checks(model, data, seed=0):
  params = model.initialize(data, seed)
  return {
      "posterior": posterior_error(model, params, data) <= POSTERIOR_TOL,
      "fisher": fisher_error(model, params, data) <= FISHER_TOL,
      "m_step_stationary": m_step_gradient(model, params, data) <= M_STEP_TOL,
      "monotone": monotone_violation(model, data, seed) <= 1e-12,
      "fixed_point": fixed_point_gradient(model, data, seed) <= FIXED_POINT_TOL,
  }


# ---- Tests ------------------------------------------------------------------

@pytest.mark.parametrize("m", [1, 3, 6])
def test_posterior_matches_joint_distribution_enumeration(m):
  data = synthetic(n=40, m=m)
  model = bm.BernoulliMLPEM(m, 3, l2=0.3)
  for seed in range(2):
    assert posterior_error(model, model.initialize(data, seed), data) <= POSTERIOR_TOL


def test_marginal_matches_tfp_mixture():
  data = synthetic(n=30, m=3)
  params = bm.BernoulliMLPEM(3, 3).initialize(data, 1)
  direct = mlp.marginal_log_prob(params, *data)
  mixture = mlp.marginal(params, data[0]).log_prob(data[1])
  np.testing.assert_allclose(direct.numpy(), mixture.numpy(), rtol=1e-12)
  probs = tf.exp(bm.BernoulliMLPEM(3, 3).predict_log_proba(params, data[0]))
  np.testing.assert_allclose(tf.reduce_sum(probs, -1).numpy(), 1., rtol=1e-12)


def test_configurations_are_all_binary_states_in_product_order():
  import itertools
  configs = mlp.hidden_configurations(4).numpy()
  np.testing.assert_array_equal(configs, np.array(list(itertools.product([0, 1], repeat=4))))


@pytest.mark.parametrize("l2", [0., 0.7])
@pytest.mark.parametrize("m", [1, 3])
def test_fisher_identity(m, l2):
  data = synthetic(n=50, m=m)
  model = bm.BernoulliMLPEM(m, 3, l2=l2)
  for seed in range(2):
    assert fisher_error(model, model.initialize(data, seed), data) <= FISHER_TOL


@pytest.mark.parametrize("l2", [0., 0.7])
@pytest.mark.parametrize("m", [2, 4])
def test_m_step_is_stationary_and_increases_q(m, l2):
  data = synthetic(n=60, m=m)
  model = bm.BernoulliMLPEM(m, 3, l2=l2)
  params = model.initialize(data, 3)
  assert m_step_gradient(model, params, data) <= M_STEP_TOL
  stats, _ = model.e_step(params, data)
  new = model.m_step(params, stats)
  assert model.expected_log_joint(new, stats) > model.expected_log_joint(params, stats)
  # Output weights stay centred across classes (the softmax's free shift).
  np.testing.assert_allclose(tf.reduce_sum(new.output_weights, -1).numpy(), 0., atol=1e-10)


def test_pure_newton_pieces_match_autodiff():
  rng = np.random.default_rng(4)
  inputs = tf.constant(np.c_[np.ones(20), rng.normal(size=(20, 3))])
  targets = tf.constant(rng.uniform(size=(20, 2)))
  w = tf.constant(rng.normal(size=(2, 4)))
  with tf.GradientTape() as outer:
    outer.watch(w)
    with tf.GradientTape() as inner:
      inner.watch(w)
      f = tf.reduce_sum(newton.hidden_unit_objective(w, inputs, targets, 0.5))
    g = inner.gradient(f, w)
  h = outer.jacobian(g, w)                                             # [2, 4, 2, 4]
  np.testing.assert_allclose(newton.hidden_unit_gradient(w, inputs, targets, 0.5), g, rtol=1e-10)
  for unit in range(2):
    np.testing.assert_allclose(newton.hidden_unit_neg_hessian(w, inputs, 0.5)[unit],
                               -h[unit, :, unit, :], rtol=1e-10, atol=1e-12)
  configs = mlp.add_bias(mlp.hidden_configurations(2))
  counts = tf.constant(rng.uniform(size=(4, 3)) * 5)
  v = tf.constant(rng.normal(size=(3, 3)))
  with tf.GradientTape() as outer:
    outer.watch(v)
    with tf.GradientTape() as inner:
      inner.watch(v)
      f = newton.output_layer_objective(v, configs, counts, 0.5)
    g = inner.gradient(f, v)
  h = tf.reshape(outer.jacobian(g, v), [9, 9])
  np.testing.assert_allclose(newton.output_layer_gradient(v, configs, counts, 0.5), g, rtol=1e-10)
  np.testing.assert_allclose(newton.output_layer_neg_hessian(v, configs, counts, 0.5), -h,
                             rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("l2", [0., 0.5])
@pytest.mark.parametrize("m", [1, 3, 6])
def test_loglik_is_monotone(m, l2):
  data = synthetic(n=60, m=m, c=2 if m == 1 else 3, seed=m)
  model = bm.BernoulliMLPEM(m, 2 if m == 1 else 3, l2=l2)
  result = _quiet_fit(model, data, max_iter=25, tol=0., on_decrease="raise")
  ll = result.restarts[0].log_likelihood
  assert ll[-1] > ll[0] + 1.
  assert monotone_violation(model, data) <= 1e-12


def test_fixed_point_is_stationary():
  data = synthetic(n=80, m=3)
  assert fixed_point_gradient(bm.BernoulliMLPEM(3, 3, l2=1.), data) <= FIXED_POINT_TOL


def test_em_and_autodiff_reach_the_same_loglik():
  data = synthetic(n=80, m=3)
  model = bm.BernoulliMLPEM(3, 3, l2=1.)
  start = model.initialize(data, 0)
  em = _quiet_fit(model, data, max_iter=3000, tol=1e-12, init_params=start)
  ad = bm.fit_autodiff(model, data, max_iter=500, tol=1e-14, init_params=start)
  assert em.converged and ad.converged
  np.testing.assert_allclose(em.log_likelihood, ad.log_likelihood, rtol=1e-7)
  # Weights agree only up to unit permutations and z_h -> 1 - z_h flips;
  # the predictive distributions must agree.
  np.testing.assert_allclose(model.predict_log_proba(em.params, data[0]),
                             model.predict_log_proba(ad.params, data[0]), atol=1e-4)


def test_chunked_e_step_matches_unchunked():
  data = synthetic(n=37, m=4)
  whole = bm.BernoulliMLPEM(4, 3, l2=0.2)
  chunked = bm.BernoulliMLPEM(4, 3, l2=0.2, memory_budget_bytes=4 * 16 * 8 * 5)
  assert chunked.chunk_rows() == 5   # 8 chunks, the last one padded
  params = whole.initialize(data, 0)
  (s1, l1), (s2, l2) = whole.e_step(params, data), tf.function(chunked.e_step)(params, data)
  np.testing.assert_allclose(l2, l1, rtol=1e-12)
  for a, b in zip(s1, s2):
    np.testing.assert_allclose(b, a, rtol=1e-11, atol=1e-13)


@pytest.mark.slow
def test_xla_compiled_steps_match_eager():
  data = synthetic(n=30, m=3)
  model = bm.BernoulliMLPEM(3, 3, l2=0.5, memory_budget_bytes=4 * 8 * 8 * 7)
  params = model.initialize(data, 0)
  stats, ll = model.e_step(params, data)
  stats_x, ll_x = tf.function(model.e_step, jit_compile=True)(params, data)
  np.testing.assert_allclose(ll_x, ll, rtol=1e-12)
  new, new_x = model.m_step(params, stats), tf.function(model.m_step, jit_compile=True)(params, stats)
  # The Newton loops may stop one step apart; both are within ~1e-9 of the optimum.
  np.testing.assert_allclose(model.expected_log_joint(new_x, stats),
                             model.expected_log_joint(new, stats), rtol=1e-12)
  for a, b in zip(new, new_x):
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-8)


def test_correct_model_passes_every_check():
  data = synthetic(n=60, m=3)
  results = run_checks(CORRECT(3, 3, l2=1.), data)
  assert all(results.values()), results


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_every_mutant_is_caught(name):
  data = synthetic(n=60, m=3)
  results = run_checks(MUTANTS[name](3, 3, l2=1.), data)
  caught = [check for check, passed in results.items() if not passed]
  assert caught, f"mutant {name} passed every check"
  assert set(EXPECTED_CATCHES[name]) <= set(caught), (name, results)


# ---- Estimator --------------------------------------------------------------

def _blobs(n_per=25, seed=0):
  rng = np.random.default_rng(seed)
  centres = np.array([[0., 0.], [4., 0.], [0., 4.]]) * 10 + 100.   # far from 0: needs scaling
  labels = np.repeat(np.arange(3), n_per)
  return centres[labels] + rng.normal(size=(3 * n_per, 2)) * 6., labels


def _fit(x, y, **kw):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return BernoulliMLPClassifier(**kw).fit(x, y)


@pytest.mark.parametrize("method", ["em", pytest.param("autodiff", marks=pytest.mark.slow)])
def test_classifier_fits_blobs(method):
  x, y = _blobs()
  x_copy = x.copy()
  est = _fit(x, y, n_hidden=3, max_iter=150, method=method, l2=0.1)
  np.testing.assert_array_equal(x, x_copy)                    # input untouched
  assert est.score(x, y) >= 0.95
  proba = est.predict_proba(x)
  np.testing.assert_allclose(proba.sum(1), 1., rtol=1e-10)
  np.testing.assert_array_equal(est.predict(x), est.classes_[proba.argmax(1)])
  assert est.log_likelihood(x, y) == pytest.approx(est.log_likelihood_, rel=1e-10)
  assert est.log_likelihood_ == pytest.approx(np.log(proba[np.arange(len(y)), y]).sum(), rel=1e-9)
  trace = est.fit_result_.restarts[est.fit_result_.best_restart].log_likelihood
  assert len(trace) == est.n_iter_ + 1 and trace[-1] == pytest.approx(est.objective_)
  assert len(est.iteration_seconds_) == len(trace)
  assert np.all(np.diff(est.iteration_seconds_) >= 0)


def test_string_labels_and_float32():
  x, y = _blobs()
  names = np.array(["setosa", "versicolor", "virginica"])
  ints = _fit(x, y, n_hidden=3, max_iter=40, l2=0.1)
  strs = _fit(x, names[y], n_hidden=3, max_iter=40, l2=0.1)
  np.testing.assert_array_equal(strs.classes_, names)
  np.testing.assert_array_equal(strs.predict(x), names[ints.predict(x)])
  assert strs.score(x, names[y]) == ints.score(x, y)
  # Both converged (float32's SQUAREM takes more iterations: round-off rejects some steps).
  single = _fit(x, names[y], n_hidden=3, max_iter=200, l2=0.1, dtype="float32")
  assert single.params_.hidden_weights.dtype == np.float32
  assert strs.converged_ and single.converged_
  assert single.log_likelihood_ == pytest.approx(strs.log_likelihood_, rel=1e-3)
  trace = single.fit_result_.restarts[0].log_likelihood
  assert np.all(np.diff(trace) >= -1e-4 * np.abs(trace[1:]))


def test_restarts_are_reproducible_and_pick_the_best():
  x, y = _blobs()
  a = _fit(x, y, n_hidden=2, max_iter=30, n_init=3, seed=5)
  b = _fit(x, y, n_hidden=2, max_iter=30, n_init=3, seed=5)
  np.testing.assert_array_equal(a.params_.hidden_weights, b.params_.hidden_weights)
  finals = [t.final_log_likelihood for t in a.fit_result_.restarts]
  assert a.objective_ == max(finals)


@pytest.mark.parametrize("method", ["em", pytest.param("autodiff", marks=pytest.mark.slow)])
def test_l2_objective_is_penalized_loglik(method):
  x, y = _blobs()
  est = _fit(x, y, n_hidden=2, max_iter=30, l2=2., method=method)
  params = bm.BernoulliMLPParams(*[tf.constant(p) for p in est.params_])
  penalty = float(newton.l2_penalty(params, 2.))
  assert est.objective_ == pytest.approx(est.log_likelihood_ - penalty, rel=1e-9)


def test_bad_input_is_rejected():
  x, y = _blobs()
  est = BernoulliMLPClassifier(n_hidden=2, max_iter=5)
  with pytest.raises(ValueError, match="labels but X has"):
    est.fit(x, y[:-1])
  with pytest.raises(ValueError, match="single class"):
    est.fit(x, np.zeros(len(x), int))
  bad = x.copy()
  bad[3, 1] = np.nan
  with pytest.raises(ValueError, match="NaN"):
    est.fit(bad, y)
  with pytest.raises(ValueError, match="NaN"):
    est.fit(x, np.where(np.arange(len(y)) == 2, np.nan, y.astype(float)))
  with pytest.raises(ValueError, match="supported limit of 16.*2\\^m"):
    BernoulliMLPClassifier(n_hidden=17).fit(x, y)
  with pytest.raises(ValueError, match="supported limit"):
    bm.BernoulliMLPEM(20, 3)
  with pytest.raises(ValueError, match="method"):
    BernoulliMLPClassifier(method="sgd").fit(x, y)
  with pytest.raises(ValueError, match="not fitted"):
    est.predict(x)
  fitted = _fit(x, y, n_hidden=2, max_iter=5)
  with pytest.raises(ValueError, match="features"):
    fitted.predict(x[:, :1])
  with pytest.raises(ValueError, match="not seen in fit"):
    fitted.log_likelihood(x, y + 7)


def test_decrease_guard_flags_a_mutant_that_skips_the_line_search():
  class Overshoot(bm.BernoulliMLPEM):
    @staticmethod
    def direction(gradient, neg_hessian):
      return 40. * newton.newton_direction(gradient, neg_hessian)

  data = synthetic(n=60, m=3)
  model = Overshoot(3, 3)
  # The line search rescues even a 40x overshoot: Q and loglik never decrease.
  result = _quiet_fit(model, data, max_iter=10, tol=0., on_decrease="raise")
  ll = result.restarts[0].log_likelihood
  assert np.all(np.diff(ll) >= -1e-10) and ll[-1] > ll[0]


@pytest.mark.slow
def test_m16_e_step_runs_under_a_small_memory_budget():
  data = synthetic(n=20, d=2, m=16, c=2)
  model = bm.BernoulliMLPEM(16, 2, memory_budget_bytes=8 * 2 ** 20)
  assert model.chunk_rows() < 20
  params = model.initialize(data, 0)
  stats, ll = tf.function(model.e_step)(params, data)
  np.testing.assert_allclose(float(ll), float(model.marginal_log_prob(params, data)), rtol=1e-10)
  assert stats.config_counts.shape == (2 ** 16, 2)
  new = model.m_step(params, stats)
  assert model.expected_log_joint(new, stats) > model.expected_log_joint(params, stats)
  # Shapes unknown at trace time take the chunked path too.
  spec = (tf.TensorSpec([None, 2], tf.float64), tf.TensorSpec([None], tf.int32))
  dynamic = tf.function(model.e_step).get_concrete_function(
      mlp.BernoulliMLPParams(*[tf.TensorSpec(p.shape, p.dtype) for p in params]), spec)
  np.testing.assert_allclose(float(dynamic(params, data)[1]), float(ll), rtol=1e-12)
