"""Bernoulli MLP with summed statistics (`BernoulliMLPSummedEM`, issue 21).

Its statistics add over batches and replicas; its M-step takes one certified
step per hidden unit, which never decreases Q (hence the log-likelihood), gains
at most what the exact M-step gains, and follows the exact EM's path.
"""
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import tensorflow as tf

from tfp_em import verify
from tfp_em.bernoulli_mlp.curvature import RADII, remainder_curvature
from tfp_em.bernoulli_mlp.em import BernoulliMLPEM
from tfp_em.bernoulli_mlp.estimator import BernoulliMLPClassifier
from tfp_em.bernoulli_mlp.summed import BernoulliMLPSummedEM
from tfp_em.engine import fit_em, fit_online_em
from tfp_em.engine.passes import add_stats

from mlp_mutants import MUTANTS
from test_bernoulli_mlp import synthetic

HERE = os.path.dirname(os.path.abspath(__file__))


def _fit(model, data, **kw):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return fit_em(model, data, progress=False, **kw)


def _params(result):
  return [np.asarray(p) for p in result.params]


# ---- The bound ----------------------------------------------------------------

def test_remainder_curvature_is_the_sup_over_the_reach():
  """c(xi, R) >= r(xi, e) / e^2 for every |e| <= R, and equals the sup (brute force)."""
  def ratio(xi, e):  # in long double, from the reflected side (all terms small)
    xi, e = np.longdouble(xi), np.asarray(e, np.longdouble)
    if xi > 0:
      xi, e = -xi, -e
    sp = lambda a: np.logaddexp(np.longdouble(0), a)
    return (sp(xi + e) - sp(xi) - e / (1 + np.exp(-xi))) / e ** 2
  for xi in (-40., -6., -1., -0.01, 0.003, 0.5, 3., 25.):
    for reach in (1e-3, 0.05, 1., 4., 100., np.inf):
      c = float(remainder_curvature(tf.constant([xi], tf.float64),
                                    tf.constant([reach], tf.float64))[0])
      span = min(reach, 3. * abs(xi) + 10.)
      grid = np.linspace(-span, span, 4001)
      grid = grid[np.abs(grid) > 1e-4]
      sup = float(np.max(ratio(xi, grid)))
      assert sup <= c * (1 + 1e-9), (xi, reach, sup, c)
      if reach > 1e-3:  # the grid resolves the sup; tiny reaches are the series
        assert c <= sup * (1 + 1e-3), (xi, reach, sup, c)
  assert RADII[-1] == np.inf and list(RADII) == sorted(RADII)


# ---- Statistics that add up ----------------------------------------------------

@pytest.mark.parametrize("l2", [0., 0.5])
def test_stats_add_over_row_blocks_and_chunks(l2):
  data = synthetic(n=90, m=3)
  model = BernoulliMLPSummedEM(3, 3, l2=l2, total_rows=90)  # the penalty: once per pass
  chunked = BernoulliMLPSummedEM(3, 3, l2=l2, total_rows=90, memory_budget_bytes=7 * 8 * (4 * 8 + 2 * 4 ** 2 + 3 * 3 * (len(RADII) + 1)))
  assert chunked.summed_chunk_rows(tf.float64, 3) == 7
  params = model.initialize(data, 1)
  whole, ll = model.e_step(params, data)
  parts = [model.e_step(params, (data[0][a:b], data[1][a:b])) for a, b in ((0, 31), (31, 90))]
  added = add_stats(model, parts[0][0], parts[1][0])
  looped, ll_looped = chunked.e_step(params, data)
  for name, a, b, c in zip(whole._fields, whole, added, looped):
    np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-12, err_msg=name)
    np.testing.assert_allclose(c, a, rtol=1e-12, atol=1e-12, err_msg=name)
  np.testing.assert_allclose(float(ll_looped), float(ll), rtol=1e-13)
  np.testing.assert_allclose(float(parts[0][1] + parts[1][1]), float(ll), rtol=1e-13)
  # The E-step's loglik is the exact model's.
  np.testing.assert_allclose(float(ll), float(BernoulliMLPEM(3, 3, l2=l2).e_step(params, data)[1]),
                             rtol=1e-13)


# ---- The certified M-step ------------------------------------------------------

@pytest.mark.parametrize("l2", [0., 0.5])
def test_summed_m_step_gains_q_at_most_the_exact_gain(l2):
  """Q(new) - Q(old) > 0 for the summed step, at most the exact M-step's gain, at
  least its certificate Q~(new) - Q~(old) >= 0; Q~ = Q at the anchor."""
  data = synthetic(n=80, m=3)
  exact, summed = BernoulliMLPEM(3, 3, l2=l2), BernoulliMLPSummedEM(3, 3, l2=l2, total_rows=80)
  run = _fit(exact, data, max_iter=40, tol=0.)   # starts along a run, early and late
  for old in [run.restarts[0].params[i] for i in (0, 3, 15, 40)]:
    old = type(run.params)(*[tf.constant(p) for p in old])
    stats, _ = exact.e_step(old, data)
    sums, _ = summed.e_step(old, data)
    q = lambda p: float(exact.expected_log_joint(p, stats))
    q_tilde = lambda p: float(summed.expected_log_joint(p, sums))
    new = summed.m_step(old, sums)
    gain, best = q(new) - q(old), q(exact.m_step(old, stats)) - q(old)
    certified = q_tilde(new) - q_tilde(old)
    np.testing.assert_allclose(q_tilde(old), q(old), rtol=1e-12)
    assert 0. < certified <= gain * (1 + 1e-9) + 1e-9, (certified, gain)
    assert gain <= best * (1 + 1e-9) + 1e-9, (gain, best)


def test_loglik_never_decreases_and_follows_the_exact_path():
  """From one start both iterations raise the loglik at every step, to the same limit."""
  data = synthetic(n=80, m=3)
  exact, summed = BernoulliMLPEM(3, 3, l2=0.5), BernoulliMLPSummedEM(3, 3, l2=0.5, total_rows=80)
  start = exact.initialize(data, 0)
  runs = [_fit(model, data, max_iter=60, tol=0., init_params=start, on_decrease="raise")
          for model in (exact, summed)]
  lls = [r.restarts[0].log_likelihood for r in runs]
  for ll in lls:
    assert np.all(np.diff(ll) > -1e-12 * np.abs(ll[1:])), ll
  assert np.all(np.diff(lls[1])[:20] > 0)  # strictly up while far from the optimum
  # The same direction: after 60 steps the summed iteration closed most of the exact one's rise.
  assert lls[1][-1] - lls[1][0] >= 0.9 * (lls[0][-1] - lls[0][0])


@pytest.mark.slow
def test_summed_and_exact_em_converge_to_the_same_point():
  data = synthetic(n=120, m=3)
  exact, summed = BernoulliMLPEM(3, 3, l2=0.5), BernoulliMLPSummedEM(3, 3, l2=0.5, total_rows=120)
  start = exact.initialize(data, 0)
  a, b = [_fit(model, data, max_iter=5000, tol=1e-11, init_params=start) for model in (exact, summed)]
  assert a.converged and b.converged
  np.testing.assert_allclose(b.log_likelihood, a.log_likelihood, rtol=1e-8)
  for pa, pb in zip(_params(a), _params(b)):
    np.testing.assert_allclose(pb, pa, atol=1e-3)


# ---- Streams, strategies, online ------------------------------------------------

def test_streamed_and_one_device_strategy_fits_equal_the_in_memory_fit():
  data = synthetic(n=100, m=3)
  model = BernoulliMLPSummedEM(3, 3, l2=0.2, total_rows=100)
  start = model.initialize(data, 0)
  kw = dict(max_iter=10, tol=0., init_params=start)
  memory = _fit(model, data, **kw)
  stream = _fit(model, tf.data.Dataset.from_tensor_slices(data).batch(23), **kw)
  device = _fit(model, data, strategy=tf.distribute.OneDeviceStrategy("/cpu:0"), **kw)
  assert memory.log_likelihood > memory.restarts[0].log_likelihood[0] + 1.
  for other in (stream, device):
    np.testing.assert_allclose(other.log_likelihood, memory.log_likelihood, rtol=1e-10)
    for a, b in zip(_params(memory), _params(other)):
      np.testing.assert_allclose(b, a, rtol=1e-10, atol=1e-10)


def test_online_em_raises_the_loglik():
  data = synthetic(n=200, m=2, c=2)
  model = BernoulliMLPSummedEM(2, 2)
  start = model.initialize(data, 0)
  batches = tf.data.Dataset.from_tensor_slices(data).batch(20)
  result = fit_online_em(model, batches, epochs=3, init_params=start, compile="graph")
  before = float(model.e_step(start, data)[1])
  assert np.isfinite(result.log_likelihood)
  assert result.log_likelihood > before + 0.05 * abs(before), (before, result.log_likelihood)


@pytest.mark.slow
@pytest.mark.parametrize("what", ["model", "estimator"])
def test_mirrored_strategy_equals_single_device(tmp_path, what):
  outs = {mode: tmp_path / f"{mode}.json" for mode in ("single", "mirrored")}
  procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "mlp_distributed_fit.py"), mode,
                             str(out), what], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
           for mode, out in outs.items()]
  for p in procs:
    assert p.wait(timeout=300) == 0, p.stderr.read()[-2000:]
  single, mirrored = (json.loads(outs[m].read_text()) for m in ("single", "mirrored"))
  assert mirrored["replicas"] == 2 and single["n_iter"] == mirrored["n_iter"] > 5
  for key in ("hidden_weights", "output_weights", "log_likelihood"):
    np.testing.assert_allclose(mirrored[key], single[key], rtol=1e-10, atol=1e-10, err_msg=key)


# ---- Verifier, estimator -------------------------------------------------------

def test_verifier_passes_the_summed_model():
  data = synthetic(n=60, m=3)
  report = verify(BernoulliMLPSummedEM(3, 3, l2=1., total_rows=60), data, n_points=2, n_steps=3)
  assert report.passed, report


def test_estimator_says_which_m_step_it_used():
  x, y = synthetic(n=60, m=2, c=2)
  kw = dict(n_hidden=2, l2=0.5, max_iter=5)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    exact = BernoulliMLPClassifier(**kw).fit(x.numpy(), y.numpy())
    summed = BernoulliMLPClassifier(m_step="summed", **kw).fit(x.numpy(), y.numpy())
    autodiff = BernoulliMLPClassifier(method="autodiff", **kw).fit(x.numpy(), y.numpy())
  assert (exact.m_step_, summed.m_step_, autodiff.m_step_) == ("exact", "summed", None)
  assert isinstance(summed.em_model(2), BernoulliMLPSummedEM)
  assert summed.objective_ > summed.fit_result_.restarts[0].log_likelihood[0]
  with pytest.raises(ValueError, match="m_step"):
    BernoulliMLPClassifier(m_step="newton", **kw).fit(x.numpy(), y.numpy())


class _SummedPrecedence(BernoulliMLPSummedEM):
  """The summed model with the `a/b - u*x` hidden-gradient bug of tests/mlp_mutants.py."""
  hidden_gradient = staticmethod(MUTANTS["precedence_hidden_gradient"].hidden_gradient)


class _SummedUnnormalizedTau(BernoulliMLPSummedEM):
  """The summed model with tau = p(z, y_j | x_j), never divided by p(y_j | x_j)."""
  normalize = MUTANTS["unnormalized_tau"].normalize


@pytest.mark.slow
@pytest.mark.parametrize("mutant,check", [(_SummedPrecedence, "3"), (_SummedUnnormalizedTau, "2")])
def test_verifier_catches_bugs_in_the_summed_model(mutant, check):
  report = verify(mutant(3, 3, l2=1., total_rows=60), synthetic(n=60, m=3), n_points=2, n_steps=3)
  assert not report.passed
  assert check in report.failed_checks, report
