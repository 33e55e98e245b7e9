"""SQUAREM (the fused cycle against the step-by-step one, the safeguard, every
model) and the speed paths: compiled steps reused across fits, the LMM fit's setup."""
import copy
import pickle
import warnings

import numpy as np
import pytest
import tensorflow as tf

from models import bernoulli_mlp as mlp
from models import crossed_effects as ce
from models import mixed_effects as lmm
from tfp_em.bernoulli_mlp import em as bm
from tfp_em.mixed_effects import crossed_em as cx
from tfp_em.mixture import em as mixture_em
from tfp_em.engine import squarem as squarem
from tfp_em.mixed_effects import estimator as mx
from tfp_em.engine import fit_em
from tfp_em.engine.loop import Iteration
from tfp_em.mixed_effects.em import MixedEffectsEM


def _mixture():
  """A poorly separated 2-D pair of blobs (plain EM needs hundreds of steps)."""
  rng = np.random.default_rng(5)
  x = np.concatenate([rng.normal(0, 1, (150, 2)), rng.normal(1.2, 1, (150, 2))])
  data = mixture_em.MixtureData(tf.constant(x), tf.ones([len(x)], tf.float64))
  model = mixture_em.GaussianMixtureEM(2, "full", init=lambda x, w, seed: np.random.default_rng(
      seed).dirichlet([1., 1.], size=len(x)))
  return model, data


def _mixed_effects(seed=0):
  """Random intercept + slope, 12 clusters of 2..7 rows; plain EM (no PX step)."""
  rng = np.random.default_rng(seed)
  cluster = np.repeat(np.arange(12), rng.integers(2, 8, 12))
  n = cluster.size
  t = rng.uniform(0, 3, n)
  z = lmm.polynomial_design(t, 1)
  x = np.column_stack([np.ones(n), rng.normal(size=n)])
  y = x @ [1., 2.] + np.sum(z * (rng.normal(size=(12, 2)) * [1.5, 0.5])[cluster], 1) + rng.normal(size=n)
  data = lmm.MixedEffectsData(tf.constant(x), tf.constant(y), tf.constant(z),
                              tf.constant(cluster, tf.int32), tf.constant(12, tf.int32))
  return MixedEffectsEM("full"), data


def _bernoulli_mlp():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(60, 2))
  params = mlp.BernoulliMLPParams(tf.constant(rng.normal(0., 1.5, (3, 2))),
                                  tf.constant(rng.normal(0., 3., (3, 2))))
  y = mlp.joint(params, tf.constant(x)).sample(seed=(1, 2))["y"].numpy()
  y = np.where(rng.uniform(size=60) < 0.2, 1 - y, y)  # label noise: no perfect fit
  return bm.BernoulliMLPEM(2, 2, l2=0.1), (tf.constant(x), tf.constant(y, tf.int32))


MODELS = {"mixture": _mixture, "mixed_effects": _mixed_effects, "bernoulli_mlp": _bernoulli_mlp}


def _unfused(model):
  """A copy of `model` with `fuse_steps = False`: SQUAREM goes step by step."""
  unfused = copy.copy(model)
  unfused.fuse_steps = False
  return unfused


def _fit(model, data, **kw):
  kw = dict(dict(max_iter=12, tol=0., accelerate="squarem", seed=3, compile="graph",
                 progress=False), **kw)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return fit_em(model, data, **kw).restarts[0]


def _assert_monotone(trace):
  ll = trace.log_likelihood
  assert np.all(np.diff(ll) >= -1e-12 * (np.abs(ll[1:]) + 100)), np.diff(ll).min()


def _assert_same_iterates(a, b, rtol=1e-12):
  assert len(a.params) == len(b.params)
  for pa, pb in zip(a.params, b.params):
    for fa, fb in zip(pa, pb):
      np.testing.assert_allclose(fa, fb, rtol=rtol, atol=rtol)
  np.testing.assert_allclose(a.log_likelihood, b.log_likelihood, rtol=rtol)


def test_the_fused_cycle_is_used_in_memory_and_not_for_streams():
  model, data = _mixture()
  assert Iteration(model, data, "graph", "squarem", None).fused is not None
  assert Iteration(_unfused(model), data, "graph", "squarem", None).fused is None
  assert Iteration(model, data, "eager", "squarem", None).fused is None
  stream = tf.data.Dataset.from_tensor_slices(data).batch(100)
  assert Iteration(model, stream, "graph", "squarem", None).fused is None


@pytest.mark.parametrize("name", sorted(MODELS))
def test_one_fused_cycle_equals_the_unfused_cycle(name):
  # From the same theta_0 (several points of a trajectory), the fused call plus
  # `finish` and the step-by-step stepper agree to round-off, E-steps included.
  model, data = MODELS[name]()
  fused = Iteration(model, data, "graph", "squarem", None)
  unfused = Iteration(_unfused(model), data, "graph", "squarem", None)
  for params0 in _fit(model, data, max_iter=6, accelerate=None, keep_trajectory=True).params[::2]:
    params0 = type(params0)(*[tf.constant(p) for p in params0])
    _, ll0, cycle, used = fused.evaluate(params0, last=False)
    a, extra_a = fused.advance(params0, None, float(ll0), cycle)
    stats, ll0_b, _, _ = unfused.evaluate(params0, last=False)
    b, extra_b = unfused.advance(params0, stats, float(ll0_b), None)
    np.testing.assert_allclose(float(ll0), float(ll0_b), rtol=1e-14)
    assert used + extra_a == 1 + extra_b
    for fa, fb in zip(a, b):
      np.testing.assert_allclose(fa, fb, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_fused_and_unfused_fits_give_the_same_iterates(name):
  # Round-off differences of one cycle (1e-14) grow by alpha^2 in later
  # extrapolations, so whole trajectories agree to 1e-9.
  model, data = MODELS[name]()
  fused, unfused = _fit(model, data), _fit(_unfused(model), data)
  _assert_same_iterates(fused, unfused, rtol=1e-9)
  _assert_monotone(fused)
  # Stopped at max_iter (a plain E-pass last): both did the same E-steps, 3 or more per cycle.
  assert fused.stop_reason == unfused.stop_reason == "max_iter"
  assert fused.e_steps == unfused.e_steps >= 3 * fused.n_iter + 1


def test_fused_cycle_counts_its_three_e_steps_when_the_loop_stops():
  model, data = _mixture()
  fused = _fit(model, data, max_iter=10000, tol=1e-9)
  unfused = _fit(_unfused(model), data, max_iter=10000, tol=1e-9)
  assert fused.converged and unfused.converged
  _assert_same_iterates(fused, unfused, rtol=1e-8)
  # The last cycle's E(theta_1) and E(theta') were computed before the loop stopped.
  assert fused.e_steps == unfused.e_steps + squarem.FUSED_E_STEPS - 1


def test_squarem_needs_fewer_e_steps_to_the_same_optimum():
  model, data = _mixture()
  plain = _fit(model, data, max_iter=10000, tol=1e-12, accelerate=None)
  fast = _fit(model, data, max_iter=10000, tol=1e-12)
  assert plain.converged and fast.converged
  np.testing.assert_allclose(fast.final_log_likelihood, plain.final_log_likelihood, rtol=1e-9)
  assert 2 * fast.e_steps < plain.e_steps
  _assert_monotone(fast)


def test_rejected_candidates_fall_back_to_the_double_em_step(monkeypatch):
  # Every candidate rejected: each cycle returns theta_2 = M(M(theta_0)), so the
  # SQUAREM iterates are every other plain EM iterate.
  model, data = _mixture()
  calls = []
  monkeypatch.setattr(squarem, "accept", lambda ll_c, ll0: calls.append(ll_c) and False)
  fast = _fit(model, data, max_iter=6)
  plain = _fit(model, data, max_iter=12, accelerate=None)
  every_other = plain._replace(params=plain.params[::2], log_likelihood=plain.log_likelihood[::2])
  _assert_same_iterates(fast, every_other, rtol=1e-11)
  # Honest count: 3 per fused cycle, one per backtrack (each rejected candidate but
  # the fused one), one for the last pass.
  assert len(calls) >= 6
  assert fast.e_steps == 3 * 6 + (len(calls) - 6) + 1


def test_overshooting_candidates_are_rejected_and_l_never_decreases(monkeypatch):
  # An alpha 30x too long lowers l: the safeguard backtracks towards -1.
  model, data = _mixture()
  sqs3 = squarem.sqs3_alpha
  monkeypatch.setattr(squarem, "sqs3_alpha", lambda r, v: 30. * sqs3(r, v))
  searched = []
  search = squarem.SquaremStepper._search
  monkeypatch.setattr(squarem.SquaremStepper, "_search",
                      lambda self, *a, **k: searched.append(a[-1]) or search(self, *a, **k))
  fused = _fit(model, data, max_iter=15, on_decrease="raise")
  assert searched, "the safeguard never triggered"
  _assert_monotone(fused)
  searched.clear()
  unfused = _fit(_unfused(model), data, max_iter=15, on_decrease="raise")
  _assert_same_iterates(fused, unfused, rtol=1e-9)


def test_finish_accepts_an_improving_candidate_and_backtracks_otherwise():
  model, data = _mixture()
  it = Iteration(model, data, "graph", "squarem", None)
  params0 = model.initialize(data, 0)
  cycle = it.fused(params0, data)
  ll0 = float(cycle.loglik0)
  assert float(cycle.loglik1) >= ll0
  nxt, extra = it.stepper.finish(params0, ll0, cycle._replace(loglik_candidate=tf.constant(ll0, tf.float64)))
  assert extra == 0 and nxt is cycle.next_params
  worse = cycle._replace(loglik_candidate=tf.constant(ll0 - 1., tf.float64))
  nxt, extra = it.stepper.finish(params0, ll0, worse)
  backtracks = len(squarem.backtracking_alphas(float(cycle.extrapolation.alpha))) - 1
  assert min(backtracks, 1) <= extra <= backtracks
  assert float(it.e_pass(nxt)[1]) >= ll0
  nan = cycle._replace(loglik1=tf.constant(np.nan, tf.float64))
  assert it.stepper.finish(params0, ll0, nan) == (cycle.params1, 0)


def test_sqs3_alpha_and_backtracking_schedule():
  r, v = tf.constant([3., 4.], tf.float64), tf.constant([0., 1.], tf.float64)
  assert float(squarem.sqs3_alpha(r, v)) == -5.
  assert float(squarem.sqs3_alpha(r, 10. * v)) == -1.   # clamped at -1
  assert float(squarem.sqs3_alpha(r, 0. * v)) == -1.    # |v| = 0
  assert float(squarem.sqs3_alpha(0. * r, 0. * v)) == -1.
  assert squarem.backtracking_alphas(-5.) == [-5., -3., -2., -1.5, -1.25]
  assert squarem.backtracking_alphas(-1.) == [-1.]


def test_candidate_at_alpha_minus_one_is_the_double_step():
  model, data = _mixture()
  it = Iteration(model, data, "graph", "squarem", None)
  p0 = model.initialize(data, 0)
  p1 = it.m_step(p0, it.e_pass(p0)[0])
  p2 = it.m_step(p1, it.e_pass(p1)[0])
  line = squarem.extrapolate(model.param_specs, p0, p1, p2)
  for got, want in zip(squarem.candidate(model.param_specs, p0, line, tf.constant(-1., tf.float64)),
                       p2):
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("compile", ["xla", "eager"])
def test_other_compile_modes_give_the_same_iterates(compile):
  model, data = _mixture()
  _assert_same_iterates(_fit(model, data, compile=compile, max_iter=8),
                        _fit(model, data, max_iter=8), rtol=1e-9)


def test_crossed_effects_squarem_is_monotone_and_reaches_plain_em():
  rng = np.random.default_rng(0)
  codes = np.stack([rng.integers(0, q, 60) for q in (5, 7)], 1).astype(np.int32)
  x = np.column_stack([np.ones(60), rng.normal(size=60)])
  y = (x @ [1., 2.] + rng.normal(size=60) + rng.normal(size=5)[codes[:, 0]]
       + 0.7 * rng.normal(size=7)[codes[:, 1]])
  data = ce.CrossedData(tf.constant(x), tf.constant(y), tf.constant(codes),
                           tf.constant([5, 7], tf.int32))
  model = cx.CrossedEffectsEM(intercept=0)
  assert Iteration(model, data, model.compile, "squarem", None).fused is None  # eager E-step
  fast = _fit(model, data, compile=model.compile, max_iter=300, tol=1e-11)
  plain = _fit(model, data, compile=model.compile, max_iter=300, tol=1e-11, accelerate=None)
  assert fast.converged and plain.converged
  _assert_monotone(fast)
  np.testing.assert_allclose(fast.final_log_likelihood, plain.final_log_likelihood, rtol=1e-8)


# -- compiled steps reused across fits (`tfp_em.engine.compiling.compiled`) ---------------

def _same_fit(a, b, rtol=1e-12):
  np.testing.assert_allclose(a.log_likelihood, b.log_likelihood, rtol=rtol)
  for fa, fb in zip(a.params, b.params):
    np.testing.assert_allclose(fa, fb, rtol=rtol, atol=rtol)


@pytest.mark.filterwarnings("ignore:.*did not converge")
@pytest.mark.parametrize("accelerate", [None, "squarem"])
def test_a_refit_on_new_data_reuses_the_traced_step_and_sees_the_new_data(accelerate):
  model, data = _mixed_effects(0)
  other = data._replace(y=data.y + tf.constant(np.random.default_rng(1).normal(
      size=data.y.shape), tf.float64))  # same shapes, other values
  kw = dict(max_iter=5, tol=0., accelerate=accelerate, progress=False)
  fit_em(model, data, **kw)
  step = Iteration(model, data, "graph", accelerate, None).fused
  traces = step.tracing_count()
  again = fit_em(model, other, **kw)
  assert Iteration(model, other, "graph", accelerate, None).fused is step
  assert step.tracing_count() == traces
  _same_fit(again, fit_em(MixedEffectsEM("full"), other, **kw))


@pytest.mark.filterwarnings("ignore:.*did not converge")
def test_changed_attributes_and_instance_methods_get_new_functions():
  model, data = _mixed_effects()
  kw = dict(max_iter=5, tol=0., progress=False)
  step = Iteration(model, data, "graph", None, None).fused
  model.expand = True
  assert Iteration(model, data, "graph", None, None).fused is not step
  _same_fit(fit_em(model, data, **kw), fit_em(MixedEffectsEM("full", expand=True), data, **kw))
  model.m_step = lambda params, stats: params  # a step that does nothing
  stuck = fit_em(model, data, **kw)
  assert np.ptp(stuck.restarts[0].log_likelihood) == 0.
  model.tags = ["unhashable"]  # not memoized, still correct
  del model.m_step
  first = Iteration(model, data, "graph", None, None).fused
  assert Iteration(model, data, "graph", None, None).fused is not first
  _same_fit(fit_em(model, data, **kw), fit_em(MixedEffectsEM("full", expand=True), data, **kw))


@pytest.mark.filterwarnings("ignore:.*did not converge")
def test_copies_and_pickles_of_a_fitted_model_share_its_compiled_steps():
  model, data = _mixed_effects()
  kw = dict(max_iter=4, tol=0., progress=False)
  ref = fit_em(model, data, **kw)
  step = Iteration(model, data, "graph", None, None).fused
  traces = step.tracing_count()
  for other in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model), copy.copy(model)):
    assert other.step_config() == model.step_config()
    assert Iteration(other, data, "graph", None, None).fused is step  # the process-wide cache
    _same_fit(fit_em(other, data, **kw), ref)
  assert step.tracing_count() == traces


def _lmm_arrays(seed, n=300, groups=20):
  rng = np.random.default_rng(seed)
  g = rng.integers(0, groups, n)
  t = rng.uniform(0, 3, n)
  x = rng.normal(size=(n, 2))
  b = rng.normal(size=(groups, 2)) * [1., 0.7]
  y = 1 + x @ [0.5, -0.3] + b[g, 0] + b[g, 1] * t + rng.normal(size=n)
  return x, y, g, t


def test_estimator_refits_match_fresh_models_on_unsorted_data():
  est = mx.MixedEffectsRegressor("slopes", tol=1e-10, max_iter=2000)
  for seed in (0, 1):
    x, y, g, t = _lmm_arrays(seed)
    est.fit(x, y, g, time=t)
    _, codes = np.unique(g, return_inverse=True)
    data = lmm.MixedEffectsData(
        tf.constant(np.column_stack([np.ones(len(y)), x])), tf.constant(y),
        tf.constant(lmm.polynomial_design(t, 1)), tf.constant(codes, tf.int32),
        tf.constant(codes.max() + 1, tf.int32))
    ref = fit_em(MixedEffectsEM("full", expand=True), data, max_iter=2000, tol=1e-10,
                 progress=False)
    assert est.fit_result_.converged and ref.converged
    fresh = mx.MixedEffectsRegressor("slopes", tol=1e-10, max_iter=2000).fit(x, y, g, time=t)
    np.testing.assert_allclose(est.log_likelihood_, fresh.log_likelihood_, rtol=1e-12)
    # The estimator's EM ends with the L-BFGS polish: at or just above plain PX-EM's l.
    assert est.log_likelihood_ >= ref.log_likelihood - 1e-12 * abs(ref.log_likelihood)
    np.testing.assert_allclose(est.log_likelihood_, ref.log_likelihood, rtol=1e-8)
    np.testing.assert_allclose(est.coef_, fresh.coef_, rtol=1e-12)
    np.testing.assert_allclose(est.random_effects_mean_, fresh.random_effects_mean_, rtol=1e-12)
    # Plain EM's params lag in flat directions (beta ~1e-6, BLUPs ~3e-4 here) where its
    # l has converged; the polish removes that lag.
    np.testing.assert_allclose(est.coef_, np.asarray(ref.params.beta)[1:], rtol=1e-4)


@pytest.mark.parametrize("labels", [
    np.array([3, 1, 3, 7, 1]), np.array([2.5, -1., 2.5, 0., 0.]), np.array(["b", "a", "b", "c", "a"]),
    np.array([True, False, True, True, False]), np.array([3, 1, 3, 7, 1], np.uint8)])
def test_fast_cluster_encoding_equals_the_generic_one(labels):
  fast = mx.encode_clusters(labels, 5)
  slow = mx.encode_clusters(list(labels.tolist()), 5)  # a list takes the generic path
  assert fast[0].dtype == object and list(fast[0]) == list(slow[0])
  assert [type(v) for v in fast[0]] == [type(v) for v in slow[0]]
  np.testing.assert_array_equal(fast[1], slow[1])
  assert fast[1].dtype == np.int32
  with pytest.raises(ValueError, match="missing label"):
    mx.encode_clusters(np.array([1., np.nan, 2., 1., 1.]), 5)


def test_a_failed_fused_cycle_falls_back_to_the_step_by_step_cycle():
  # In graph mode a failed Cholesky raises; the iteration then redoes the cycle
  # step by step, where a failing candidate only counts as rejected.
  model, data = _mixture()
  it = Iteration(model, data, "graph", "squarem", None)

  def failing(params, data):
    raise tf.errors.InvalidArgumentError(None, None, "Cholesky decomposition was not successful")
  it.fused = failing
  params0 = model.initialize(data, 0)
  stats, ll0, new, used = it.evaluate(params0, last=False)
  assert new is None and used == 1 and stats is not None
  got, extra = it.advance(params0, stats, float(ll0), new)
  want, want_extra = Iteration(_unfused(model), data, "graph", "squarem", None).advance(
      params0, stats, float(ll0), None)
  assert extra == want_extra >= 2
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-12)


def test_float32_squarem_reaches_the_float64_optimum():
  model, data = _mixture()
  data32 = mixture_em.MixtureData(tf.cast(data.x, tf.float32), tf.cast(data.weights, tf.float32))
  fast = _fit(model, data32, max_iter=500, tol=1e-6)
  ref = _fit(model, data, max_iter=500, tol=1e-10)
  assert fast.converged and fast.params[-1].means.dtype == np.float32
  ll = fast.log_likelihood
  assert np.all(np.diff(ll) >= -1e-4 * (np.abs(ll[1:]) + 300))
  np.testing.assert_allclose(fast.final_log_likelihood, ref.final_log_likelihood, rtol=1e-5)
