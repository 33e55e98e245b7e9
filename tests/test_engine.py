"""The generic fit loop, on a toy model whose M-step we can break on purpose."""
import math
import warnings
from typing import NamedTuple

import numpy as np
import pytest
import tensorflow as tf

from tfp_em.engine import loop as engine
from tfp_em.engine import (ConvergenceWarning, EMModel, LikelihoodDecreaseError,
                           LikelihoodDecreaseWarning, NumericalFailureError, fit_em)


class MeanParams(NamedTuple):
  mu: tf.Tensor


class MeanStats(NamedTuple):
  total: tf.Tensor
  count: tf.Tensor


class RelaxedMean(EMModel):
  """x_n ~ N(mu, 1); the 'M-step' moves mu a fraction `step` of the way to
  the sample mean. step=1 is exact; 0 < step < 2 increases the likelihood;
  step > 2 overshoots and decreases it."""
  name = "RelaxedMean"
  failure_hint = "toy hint"
  compile = "graph"

  def __init__(self, step=1.0, start=10.0):
    self.step, self.start = step, start

  def num_observations(self, data):
    return float(data[0].shape[0])

  def initialize(self, data, seed):
    return MeanParams(tf.constant(self.start + seed % 7, tf.float64))

  def marginal_log_prob(self, params, data):
    x = data[0]
    return tf.reduce_sum(-0.5 * tf.square(x - params.mu) - 0.5 * math.log(2 * math.pi))

  def e_step(self, params, data):
    x = data[0]
    return MeanStats(tf.reduce_sum(x), tf.cast(tf.size(x), x.dtype)), \
        self.marginal_log_prob(params, data)

  def m_step(self, params, stats):
    return MeanParams(params.mu + self.step * (stats.total / stats.count - params.mu))

  def expected_log_joint(self, params, stats):
    return -0.5 * stats.count * params.mu ** 2 + params.mu * stats.total


@pytest.fixture
def data():
  return (tf.constant(np.random.default_rng(0).normal(2.0, 1.0, 100)),)


def _final_matches_marginal(model, data, result):
  np.testing.assert_allclose(result.log_likelihood,
                             model.marginal_log_prob(result.params, data), rtol=1e-12)


def test_exact_step_converges_and_reports_loglik_at_params(data):
  model = RelaxedMean(1.0)
  result = fit_em(model, data, tol=1e-10)
  assert result.converged and result.n_iter <= 2
  np.testing.assert_allclose(result.params.mu, np.mean(data[0]), rtol=1e-12)
  _final_matches_marginal(model, data, result)


def test_slow_step_warns_at_max_iter_naming_model(data):
  model = RelaxedMean(0.05)
  with pytest.warns(ConvergenceWarning, match="RelaxedMean.*max_iter=5"):
    result = fit_em(model, data, max_iter=5, tol=1e-12)
  assert not result.converged and result.n_iter == 5
  assert len(result.restarts[0].log_likelihood) == 6
  _final_matches_marginal(model, data, result)


def test_decrease_raises(data):
  with pytest.raises(LikelihoodDecreaseError, match="decreased"):
    fit_em(RelaxedMean(2.5, start=2.5), data, on_decrease="raise")


def test_decrease_warns_and_is_never_convergence(data):
  model = RelaxedMean(2.5, start=2.5)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    result = fit_em(model, data, on_decrease="warn", max_iter=4, tol=1e9)
  kinds = {w.category for w in caught}
  assert LikelihoodDecreaseWarning in kinds
  assert not result.converged  # a huge tol still does not turn a drop into convergence
  _final_matches_marginal(model, data, result)


def test_decrease_reverts_to_previous_params(data):
  model = RelaxedMean(2.5, start=2.5)
  result = fit_em(model, data, on_decrease="revert")
  trace = result.restarts[0]
  assert trace.stop_reason == "reverted" and not result.converged
  assert len(trace.params) == len(trace.log_likelihood) == 1  # the first step overshoots
  np.testing.assert_allclose(result.params.mu, trace.params[0].mu)
  _final_matches_marginal(model, data, result)


def test_restarts_pick_best_and_keep_every_trace(data):
  model = RelaxedMean(0.5)
  with pytest.warns(ConvergenceWarning):
    result = fit_em(model, data, n_init=4, max_iter=3, seed=5)
  finals = [t.final_log_likelihood for t in result.restarts]
  assert len(finals) == 4 and result.best_restart == int(np.argmax(finals))
  assert result.log_likelihood == max(finals)
  again = fit_em(model, data, n_init=4, max_iter=3, seed=5)
  assert [t.seed for t in again.restarts] == [t.seed for t in result.restarts]


def test_tolerance_is_relative_to_mean_loglik(data):
  model = RelaxedMean(0.5)
  small = fit_em(model, data, tol=1e-6)
  big = fit_em(model, (tf.tile(data[0], [50]),), tol=1e-6)
  assert small.converged and big.converged
  assert abs(small.n_iter - big.n_iter) <= 1


@pytest.mark.parametrize("mode", ["eager", "graph", "xla"])
def test_compile_modes_and_callback(data, mode):
  seen = []
  result = fit_em(RelaxedMean(0.5), data, compile=mode, tol=1e-14,
                  callback=lambda r, it, p, ll: seen.append((r, it, ll)))
  assert [ll for _, _, ll in seen] == list(result.restarts[0].log_likelihood)
  np.testing.assert_allclose(result.params.mu, np.mean(data[0]), rtol=1e-6)


def test_trajectory_can_be_dropped(data):
  result = fit_em(RelaxedMean(0.5), data, keep_trajectory=False, tol=1e-8)
  trace = result.restarts[0]
  assert len(trace.params) == 2 and trace.n_iter > 2
  np.testing.assert_allclose(trace.params[-1].mu, result.params.mu)


class NaNModel(RelaxedMean):
  def m_step(self, params, stats):
    return MeanParams(params.mu * np.nan)


def test_non_finite_loglik_raises_with_hint(data):
  with pytest.raises(NumericalFailureError, match="toy hint"):
    fit_em(NaNModel(), data)


@pytest.mark.parametrize("kwargs,match", [
    (dict(on_decrease="ignore"), "on_decrease"), (dict(max_iter=-1), "max_iter"),
    (dict(n_init=0), "n_init"), (dict(tol=-1.0), "tol"), (dict(compile="jit"), "compile"),
])
def test_bad_options(data, kwargs, match):
  with pytest.raises(ValueError, match=match):
    fit_em(RelaxedMean(), data, **kwargs)


def test_protocol_is_checkable():
  assert isinstance(RelaxedMean(), engine.EMModel)
