"""The process-wide cache of compiled steps: fresh estimators, refits and new
data sizes of a configuration seen before do not trace again."""
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from tfp_em import BernoulliMLPClassifier, GaussianMixture, MixedEffectsRegressor
from tfp_em.engine import compiling
from tfp_em.mixture.em import GaussianMixtureEM


def _blobs(n, d=2, seed=0):
  rng = np.random.default_rng(seed)
  return np.concatenate([rng.normal(-2, 1, (n // 2, d)), rng.normal(2, 1, (n - n // 2, d))])


def _traces_per_fit(make_and_fit, sizes):
  """Traces made by each fit, one fresh estimator per data size."""
  counts = []
  for n in sizes:
    before = compiling.tracing_count()
    make_and_fit(n)
    counts.append(compiling.tracing_count() - before)
  return counts


def test_fresh_mixtures_of_one_configuration_trace_once_for_every_n():
  compiling.clear_cache()  # so that the first fit traces
  fit = lambda n: GaussianMixture(3, covariance_type="diag", max_iter=3, tol=0, compile="graph",
                                  verbose=False).fit(_blobs(n))
  counts = _traces_per_fit(fit, [3000, 3001, 6000, 3001, 9999])  # above trace_exact_rows
  assert counts[0] > 0                # a new configuration traces
  assert counts[1:] == [0, 0, 0, 0]   # with N left unknown: no trace for another N


def test_another_configuration_traces_again():
  fit = lambda reg: GaussianMixture(2, covariance_type="spherical", reg_covar=reg, max_iter=2,
                                    tol=0, compile="graph", verbose=False).fit(_blobs(200))
  fit(1.5e-6)
  before = compiling.tracing_count()
  fit(2.5e-6)
  assert compiling.tracing_count() > before


@pytest.mark.parametrize("n, cov, compile", [
    (300, "tied", "graph"),       # one chunk or several, chosen in the trace by K
    (300, "VEV", "graph"),        # an iterative mclust M-step
    (3000, "spherical", "graph"),  # N unknown too: the chunk loop
    (3000, "EEI", "xla"),          # XLA chunk programs
])
def test_a_new_number_of_components_does_not_trace_and_fits_as_eagerly(n, cov, compile):
  x = _blobs(n, d=3)
  fit = lambda k, mode: GaussianMixture(k, covariance_type=cov, max_iter=4, tol=0, n_init=2,
                                        compile=mode, verbose=False).fit(x)
  fit(2, compile)
  before = compiling.tracing_count()
  fitted = {k: fit(k, compile) for k in (1, 5)}
  assert compiling.tracing_count() == before  # every K shares the steps traced at K=2
  for k, est in fitted.items():
    eager = fit(k, "eager")  # traces nothing: K is a Python number there
    assert est.params_[0].shape == (k,)
    assert abs(est.log_likelihood_ - eager.log_likelihood_) <= 1e-12 * abs(eager.log_likelihood_)
    for got, want in zip(est.params_, eager.params_):
      np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(est.predict_proba(x), eager.predict_proba(x), atol=1e-12)


def test_steps_cached_across_k_equal_a_fit_with_the_cache_cleared():
  x = _blobs(500, d=2, seed=1)
  fit = lambda k: GaussianMixture(k, covariance_type="full", max_iter=5, tol=0,
                                  compile="graph", verbose=False).fit(x)
  fit(2)
  reused = fit(3)
  compiling.clear_cache()
  fresh = fit(3)
  assert reused.log_likelihood_ == fresh.log_likelihood_
  for got, want in zip(reused.params_, fresh.params_):
    np.testing.assert_array_equal(got, want)


def test_equal_models_share_steps_and_unhashable_ones_do_not():
  a, b = GaussianMixtureEM(2, "full"), GaussianMixtureEM(2, "full")
  assert a.step_config() == b.step_config()
  assert compiling.compiled(a, "m_step", lambda m: m.m_step, "graph") is \
      compiling.compiled(b, "m_step", lambda m: m.m_step, "graph")
  c = GaussianMixtureEM(2, "full")
  c.table = np.zeros(3)  # not hashable: this model gets its own step
  assert c.step_config() is None
  assert compiling.compiled(c, "m_step", lambda m: m.m_step, "graph") is not \
      compiling.compiled(a, "m_step", lambda m: m.m_step, "graph")


@pytest.mark.slow
def test_refits_of_the_other_estimators_do_not_trace():
  rng = np.random.default_rng(0)

  def mixed(n):
    groups = rng.integers(0, max(n // 50, 2), n)
    t = rng.uniform(0, 5, n)
    y = 1 + t + rng.normal(size=n) + rng.normal(size=groups.max() + 1)[groups]
    MixedEffectsRegressor("slopes", max_iter=5).fit(t[:, None], y, groups, time=t)

  def mlp(n):
    x = rng.normal(size=(n, 3))
    # A fixed penalty: l2='auto' traces each penalty it tries once per size class
    # (held-out fits of <= 2048 rows at their exact size), see test_mlp_defaults.
    BernoulliMLPClassifier(n_hidden=3, max_iter=3, l2=1.).fit(x, (x[:, 0] > 0).astype(int))

  compiling.clear_cache()
  for fit in (mixed, mlp):
    _traces_per_fit(fit, [2100, 2101, 4000, 3000])
  # Each step traced once, whichever fit used it first (SQUAREM's backtracking
  # trial only runs when an extrapolation fails); no new size traced it again.
  counts = compiling.tracing_counts()
  assert {"MixedEffectsEM", "BernoulliMLPEM"} <= {cls for cls, _ in counts}
  assert max(counts.values()) == 1, counts   # 0: compiled but not run (fused into em_step)


def _retracing_record(name):
  message = (f"5 out of the last 6 calls to <function {name} at 0x7f> triggered "
             "tf.function retracing.")
  return logging.LogRecord("tensorflow", logging.WARNING, __file__, 1, message, None, None)


def test_retracing_warnings_about_tfp_em_steps_are_dropped_and_users_kept():
  GaussianMixture(2, max_iter=1, verbose=False).fit(_blobs(50))  # compiles the steps
  quiet = compiling.RETRACING_FILTER
  assert quiet in logging.getLogger("tensorflow").filters
  assert not quiet.filter(_retracing_record("_em_step.<locals>.step"))
  assert quiet.filter(_retracing_record("my_own_function"))


def test_persistent_cache_keeps_a_directory_the_user_set(monkeypatch, tmp_path):
  monkeypatch.setenv("TF_XLA_FLAGS", "--tf_xla_auto_jit=0 --tf_xla_persistent_cache_directory=/mine")
  assert compiling.use_persistent_cache(str(tmp_path)) == "/mine"
  monkeypatch.setenv("TF_XLA_FLAGS", "--tf_xla_auto_jit=0")
  assert compiling.use_persistent_cache(str(tmp_path / "xla")) == str(tmp_path / "xla")
  assert os.environ["TF_XLA_FLAGS"].split() == [
      "--tf_xla_auto_jit=0", f"--tf_xla_persistent_cache_directory={tmp_path / 'xla'}"]


@pytest.mark.slow
def test_persistent_cache_writes_the_xla_programs_of_a_fit(tmp_path):
  code = ("import numpy as np; from tfp_em.engine import compiling; "
          "d = compiling.use_persistent_cache(); from tfp_em import GaussianMixture; "
          "GaussianMixture(2, max_iter=2, compile='xla', verbose=False)"
          ".fit(np.random.default_rng(0).normal(size=(300, 2))); print(d)")
  env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path), TF_CPP_MIN_LOG_LEVEL="3")
  env.pop("TF_XLA_FLAGS", None)
  env.pop("TFP_EM_XLA_CACHE", None)
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       check=True)
  directory = out.stdout.strip().splitlines()[-1]
  assert directory == str(tmp_path / "tfp_em" / "xla")
  assert any(name.endswith(".pb") for name in os.listdir(directory))


def test_persistent_cache_can_be_turned_off_or_moved(monkeypatch, tmp_path):
  monkeypatch.delenv("TF_XLA_FLAGS", raising=False)
  monkeypatch.setenv("TFP_EM_XLA_CACHE", "off")
  assert compiling.use_persistent_cache() is None
  assert "TF_XLA_FLAGS" not in os.environ
  monkeypatch.setenv("TFP_EM_XLA_CACHE", str(tmp_path / "here"))
  assert compiling.use_persistent_cache() == str(tmp_path / "here")


def test_traced_settings_share_one_trace_and_equal_the_eager_steps():
  """The MLP's penalty reaches the compiled steps as a tensor: a second penalty
  traces nothing, and each penalty's E- and M-step equal the eager ones."""
  import tensorflow as tf
  from tfp_em.bernoulli_mlp.em import BernoulliMLPEM
  rng = np.random.default_rng(0)
  data = (tf.constant(rng.normal(size=(40, 3))), tf.constant(rng.integers(0, 3, 40), tf.int32))
  first = BernoulliMLPEM(2, 3, l2=0.3)
  assert first.step_config() == BernoulliMLPEM(2, 3, l2=7.).step_config()
  step = compiling.compiled(first, "em_step_test", lambda m: lambda p, d: m.m_step(p, m.e_step(p, d)[0]),
                            "graph", data_arg=-1)
  step(first.initialize(data, 0), data)
  traced = step.tracing_count()
  for l2 in (0.3, 7., 0.):
    model = BernoulliMLPEM(2, 3, l2=l2)
    params = model.initialize(data, 1)
    graph = compiling.compiled(model, "em_step_test",
                               lambda m: lambda p, d: m.m_step(p, m.e_step(p, d)[0]), "graph",
                               data_arg=-1)(params, data)
    eager = model.m_step(params, model.e_step(params, data)[0])
    for got, want in zip(graph, eager):
      np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-10, atol=1e-12)
    assert float(model.e_step(params, data)[1]) != pytest.approx(
        float(BernoulliMLPEM(2, 3, l2=l2 + 1.).e_step(params, data)[1]))  # the penalty matters
  assert step.tracing_count() == traced
