"""`BernoulliMLPClassifier` over tf.data streams, under strategies and online (issue 21),
and the summed model's penalty counted once per pass."""
import warnings

import numpy as np
import pytest
import tensorflow as tf

from tfp_em.bernoulli_mlp.estimator import BernoulliMLPClassifier
from tfp_em.bernoulli_mlp.streamed import summarize_stream
from tfp_em.bernoulli_mlp.summed import BernoulliMLPSummedEM
from tfp_em.engine import fit_em

from test_bernoulli_mlp import synthetic


def _fit(estimator, *args, **kw):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return estimator.fit(*args, **kw)


def _problem(n=101):
  x, y = synthetic(n=n, d=3, m=2, c=3)
  x = x.numpy() * np.array([1., 10., 0.1]) + np.array([0., 5., -3.])  # unstandardized
  return x, y.numpy()


# ---- The penalty is counted once per pass ---------------------------------------

def test_summed_model_needs_total_rows_when_penalized():
  with pytest.raises(ValueError, match="total_rows is required"):
    BernoulliMLPSummedEM(3, 3, l2=0.1)
  BernoulliMLPSummedEM(3, 3)  # no penalty: nothing to share
  x, y = synthetic(n=40, m=2)
  with pytest.raises(ValueError, match="more than total_rows"):
    BernoulliMLPSummedEM(2, 3, l2=0.1, total_rows=30).e_step(
        BernoulliMLPSummedEM(2, 3).initialize((x, y), 0), (x, y))


def test_stream_loglik_is_the_penalized_in_memory_loglik():
  """A pass over 5 batches reports the same penalized loglik as the whole data, and
  marginal_log_prob agrees with it (the penalty once, not 5 times)."""
  data = synthetic(n=100, m=3)
  model = BernoulliMLPSummedEM(3, 3, l2=2., total_rows=100)
  params = model.initialize(data, 0)
  _, whole = model.e_step(params, data)
  parts = [model.e_step(params, (data[0][a:a + 20], data[1][a:a + 20]))[1] for a in range(0, 100, 20)]
  penalized = float(model.marginal_log_prob(params, data))
  np.testing.assert_allclose(float(sum(parts)), float(whole), rtol=1e-12)
  np.testing.assert_allclose(float(whole), penalized, rtol=1e-12)
  unpenalized = float(BernoulliMLPSummedEM(3, 3).marginal_log_prob(params, data))
  assert penalized < unpenalized - 1.  # the penalty is there, once
  stream = tf.data.Dataset.from_tensor_slices(data).batch(20)
  result = fit_em(model, stream, max_iter=0, init_params=params, progress=False)
  np.testing.assert_allclose(result.log_likelihood, penalized, rtol=1e-12)


# ---- The estimator: streams, strategies, online -----------------------------------

def test_streamed_distributed_and_in_memory_fits_agree():
  x, y = _problem()
  kw = dict(n_hidden=2, l2=0.3, max_iter=8, tol=0.)
  memory = _fit(BernoulliMLPClassifier(m_step="summed", **kw), x, y)
  stream = _fit(BernoulliMLPClassifier(**kw),
                tf.data.Dataset.from_tensor_slices((x, y)).batch(17))
  device = _fit(BernoulliMLPClassifier(**kw), x, y,
                strategy=tf.distribute.OneDeviceStrategy("/cpu:0"))
  assert memory.m_step_ == stream.m_step_ == device.m_step_ == "summed"
  assert memory.objective_ > memory.fit_result_.restarts[0].log_likelihood[0] + 1.
  for other in (stream, device):
    assert other.n_samples_seen_ == len(y)
    np.testing.assert_allclose(other.mean_, memory.mean_, rtol=1e-12)
    np.testing.assert_allclose(other.scale_, memory.scale_, rtol=1e-12)
    np.testing.assert_array_equal(other.classes_, memory.classes_)
    for a, b in zip(memory.params_, other.params_):
      np.testing.assert_allclose(b, a, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(other.objective_, memory.objective_, rtol=1e-10)
    np.testing.assert_allclose(other.log_likelihood_, memory.log_likelihood_, rtol=1e-10)
  np.testing.assert_array_equal(stream.predict(x), memory.predict(x))
  # The penalized objective is the one reported, once: ll - (l2 / 2)|w|^2.
  w = memory.params_
  penalty = 0.15 * (np.sum(w.hidden_weights[1:] ** 2) + np.sum(w.output_weights[1:] ** 2))
  np.testing.assert_allclose(stream.objective_, stream.log_likelihood_ - penalty, rtol=1e-10)


def test_auto_m_step_is_exact_in_memory_and_strategy_runs_auto_l2():
  x, y = _problem(n=80)
  plain = _fit(BernoulliMLPClassifier(n_hidden=2, l2=0.3, max_iter=3), x, y)
  assert plain.m_step_ == "exact"
  auto = _fit(BernoulliMLPClassifier(n_hidden=2, max_iter=3), x, y,
              strategy=tf.distribute.OneDeviceStrategy("/cpu:0"))
  assert auto.m_step_ == "summed" and auto.l2_scores_ and auto.l2_ in auto.l2_scores_


def test_online_fit_over_a_stream_raises_the_loglik():
  x, y = _problem(n=200)
  batches = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(200, seed=0).batch(20)
  online = _fit(BernoulliMLPClassifier(n_hidden=2, l2=0.1), batches, online=True)
  assert online.m_step_ == "summed" and online.iteration_seconds_ is None
  start = online.fit_result_.restarts[0].log_likelihood
  assert np.isfinite(online.objective_)
  # The final pass's penalized loglik beats the mean batch loglik of the first epoch's start.
  assert online.objective_ / 200 > start[0] / 20 + 0.05
  assert online.score(x, y) > np.bincount(y).max() / len(y) + 0.1  # beats the majority class


def test_stream_summary_matches_numpy_and_string_labels_work():
  x, y = _problem(n=53)
  labels = np.where(y == 0, "a", np.where(y == 1, "b", "c"))
  summary = summarize_stream(tf.data.Dataset.from_tensor_slices((x, labels)).batch(10))
  assert summary.num_rows == 53
  np.testing.assert_allclose(summary.mean, x.mean(0), rtol=1e-12)
  np.testing.assert_allclose(summary.scale, x.std(0), rtol=1e-12)
  assert summary.classes.tolist() == ["a", "b", "c"]
  fitted = _fit(BernoulliMLPClassifier(n_hidden=2, l2=0.3, max_iter=3),
                tf.data.Dataset.from_tensor_slices((x, labels)).batch(10))
  memory = _fit(BernoulliMLPClassifier(n_hidden=2, l2=0.3, max_iter=3, m_step="summed"), x,
                labels)
  np.testing.assert_allclose(fitted.objective_, memory.objective_, rtol=1e-10)
  np.testing.assert_array_equal(fitted.predict(x), memory.predict(x))
  assert fitted.score(x, labels) == memory.score(x, labels)
