"""Streaming, online EM, tf.distribute (mixture and mixed model) and SQUAREM."""
import json
import os
import random
import subprocess
import sys
import warnings

import numpy as np
import pytest
import tensorflow as tf

from tfp_em import GaussianMixture
from tfp_em.mixture import em as me
from tfp_em.engine.streams import features_dataset, write_tfrecord

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def two_blobs():
  rng = np.random.default_rng(3)
  x = np.concatenate([rng.normal(0, 1, (700, 2)), rng.normal(2.5, 0.6, (500, 2))])
  rng.shuffle(x)
  init = dict(weights_init=np.array([0.5, 0.5]), means_init=x[[0, 1]],
              precisions_init=np.stack([np.eye(2)] * 2))
  return x, init


def _close(a, b, rtol):
  for name in ("weights_", "means_", "covariances_"):
    np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=rtol, err_msg=name)
  np.testing.assert_allclose(a.log_likelihood_, b.log_likelihood_, rtol=rtol)


def _fit_source(source, init, **fit_kw):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return GaussianMixture(2, tol=0.0, max_iter=15, **init).fit(source, **fit_kw)


def test_streamed_dataset_equals_in_memory(two_blobs):
  x, init = two_blobs
  ref = _fit_source(x, init)
  streamed = _fit_source(tf.data.Dataset.from_tensor_slices(x), init, batch_size=128)
  _close(streamed, ref, 1e-10)
  assert streamed.fit_result_.num_observations == len(x)


@pytest.mark.parametrize("fmt", ["csv", "parquet", "tfrecord"])
def test_files_stream_like_in_memory(two_blobs, tmp_path, fmt):
  x, init = two_blobs
  cols = ["a", "b"]
  path = tmp_path / f"data.{fmt}"
  if fmt == "csv":
    np.savetxt(path, np.column_stack([x, np.arange(len(x))]), delimiter=",",
               header="a,b,id", comments="", fmt="%.17g")
  elif fmt == "parquet":
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"a": x[:, 0], "b": x[:, 1]}), path, row_group_size=300)
  else:
    write_tfrecord(path, x, cols)
    x = x.astype(np.float32).astype(np.float64)  # TFRecord stores float32
  ref = _fit_source(x, init)
  streamed = _fit_source(str(path), init, columns=cols, batch_size=200)
  _close(streamed, ref, 1e-10)


def test_csv_columns_in_any_order(tmp_path):
  path = tmp_path / "d.csv"
  path.write_text("a,b,c\n1,2,3\n4,5,6\n")
  ds, names = features_dataset(str(path), columns=["c", "a"], batch_size=10)
  np.testing.assert_array_equal(next(iter(ds)).numpy(), [[3, 1], [6, 4]])
  assert names == ["c", "a"]


@pytest.mark.parametrize("content,match", [("a,b\n1,x\n", "a,b"), ("a,b\n1,nan\n", "NaN")])
def test_bad_streamed_values_are_named(tmp_path, content, match):
  path = tmp_path / "bad.csv"
  path.write_text(content + "".join(f"{i},{i}\n" for i in range(5)))
  with pytest.raises((ValueError, tf.errors.InvalidArgumentError)):
    GaussianMixture(2).fit(str(path))


def test_stream_source_errors(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    GaussianMixture(2).fit(str(tmp_path / "none.csv"))
  (tmp_path / "x.txt").write_text("a\n1\n")
  with pytest.raises(ValueError, match="format"):
    GaussianMixture(2).fit(str(tmp_path / "x.txt"))
  tfrecord = tmp_path / "x.tfrecord"
  write_tfrecord(tfrecord, np.zeros((3, 1)), ["a"])
  with pytest.raises(ValueError, match="columns"):
    GaussianMixture(2).fit(str(tfrecord))
  with pytest.raises(ValueError, match="online"):
    GaussianMixture(2).fit(np.zeros((10, 2)), online=True)


def test_online_em_one_pass_is_close_to_exact(two_blobs):
  x, init = two_blobs
  big = np.concatenate([x] * 10)
  np.random.default_rng(0).shuffle(big)
  exact = _fit_source(big, init)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    online = GaussianMixture(2, **init).fit(tf.data.Dataset.from_tensor_slices(big),
                                            online=True, batch_size=100)
  assert online.fit_result_.n_iter == 120  # one M-step per batch, one pass
  np.testing.assert_allclose(online.log_likelihood_, online.score_samples(big).sum(), rtol=1e-10)
  assert abs(online.log_likelihood_ - exact.log_likelihood_) / len(big) < 5e-3
  np.testing.assert_allclose(np.sort(online.means_, 0), np.sort(exact.means_, 0), atol=0.1)


def test_rebase_stats_is_exact(two_blobs):
  x, _ = two_blobs
  model = me.GaussianMixtureEM(2, "full")
  rng = np.random.default_rng(0)
  resp = tf.constant(rng.dirichlet([1, 1], size=len(x)))
  c1, c2 = tf.constant(rng.normal(size=(2, 2))), tf.constant(rng.normal(size=(2, 2)))
  w = tf.ones(len(x), tf.float64)
  about1 = model._stats_from_resp(resp, tf.constant(x), w, c1)
  about2 = model._stats_from_resp(resp, tf.constant(x), w, c2)
  rebased = model.rebase_stats(about1, like=about2)
  for a, b in zip(rebased, about2):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)


def test_squarem_reaches_plain_em_optimum_with_fewer_e_steps():
  rng = np.random.default_rng(5)
  x = np.concatenate([rng.normal(0, 1, (600, 2)), rng.normal(1.2, 1, (600, 2))])  # poorly separated
  init = dict(weights_init=np.array([0.5, 0.5]), means_init=np.array([[-1.0, 0], [1.0, 1]]),
              precisions_init=np.stack([np.eye(2)] * 2))
  kw = dict(tol=1e-12, max_iter=20000, reg_covar=0.0, on_decrease="raise", **init)
  plain = GaussianMixture(2, **kw).fit(x)
  fast = GaussianMixture(2, accelerate="squarem", **kw).fit(x)
  assert plain.converged_ and fast.converged_
  assert fast.log_likelihood_ >= plain.log_likelihood_ - 1e-6
  ll = fast.fit_result_.restarts[0].log_likelihood
  assert np.all(np.diff(ll) >= -1e-9 * np.abs(ll[1:]))  # monotone across cycles
  assert fast.fit_result_.restarts[0].e_steps * 2 < plain.fit_result_.restarts[0].e_steps
  np.testing.assert_allclose(np.sort(fast.means_, 0), np.sort(plain.means_, 0), atol=2e-3)


def _run(mode, out, problem, env=None):
  return subprocess.Popen([sys.executable, os.path.join(HERE, "distributed_fit.py"), mode,
                           str(out), problem], env=dict(os.environ, **(env or {})),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _compare(single, other, rtol=1e-10):
  a, b = json.loads(single.read_text()), json.loads(other.read_text())
  assert b["replicas"] == 2
  assert set(a) == set(b) and len(a) > 2
  for key in a:
    if key != "replicas":
      np.testing.assert_allclose(b[key], a[key], rtol=rtol, err_msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("problem", ["gmm", "lmm"])
def test_mirrored_strategy_equals_single_device(tmp_path, problem):
  procs = [_run("single", tmp_path / "single.json", problem),
           _run("mirrored", tmp_path / "m.json", problem)]
  for p in procs:
    assert p.wait(timeout=300) == 0, p.stderr.read()[-2000:]
  _compare(tmp_path / "single.json", tmp_path / "m.json")


@pytest.mark.slow
@pytest.mark.parametrize("problem", ["gmm", "lmm"])
def test_multi_worker_strategy_equals_single_device(tmp_path, problem):
  port = random.randint(20000, 29000)
  workers = [f"localhost:{port}", f"localhost:{port + 1}"]
  procs = [_run("single", tmp_path / "single.json", problem)]
  for i in range(2):
    config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}}
    procs.append(_run("multiworker", tmp_path / f"w{i}.json", problem,
                      {"TF_CONFIG": json.dumps(config)}))
  for p in procs:
    assert p.wait(timeout=400) == 0, p.stderr.read()[-2000:]
  for i in range(2):
    _compare(tmp_path / "single.json", tmp_path / f"w{i}.json")


@pytest.mark.parametrize("num_shards", [1, 3, 12])
def test_split_by_cluster_keeps_clusters_whole_and_stats_add_up(num_shards):
  """The mixed model's replica shards: whole clusters, every row once, stats summing to the full E-step."""
  sys.path.insert(0, HERE)
  from distributed_fit import lmm_problem
  from models.mixed_effects import split_by_cluster
  from tfp_em.mixed_effects.em import MixedEffectsEM
  from tfp_em.engine.passes import add_stats
  data = lmm_problem()
  keep = np.flatnonzero(data.cluster.numpy() < 10)                     # 10 clusters
  data = type(data)(*[tf.gather(t, keep) for t in data[:4]], tf.constant(10, tf.int32))
  shards = split_by_cluster(data, num_shards)
  assert len(shards) == num_shards
  assert sum(int(s.y.shape[0]) for s in shards) == len(keep)
  assert sum(int(s.num_clusters) for s in shards) == int(data.num_clusters)
  for s in shards:  # local numbering 0..G_s-1, all used
    assert set(np.asarray(s.cluster)) == set(range(int(s.num_clusters)))
  model = MixedEffectsEM()
  params = model.initialize(data, 0)
  full, ll = model.e_step(params, data)
  parts = [model.e_step(params, s) for s in shards]
  total, total_ll = parts[0]
  for stats, part_ll in parts[1:]:
    total, total_ll = add_stats(model, total, stats), total_ll + part_ll
  for a, b in zip(total, full):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(total_ll, ll, rtol=1e-12)


def test_mixed_model_streams_over_batches_of_whole_clusters():
  """fit_em over a tf.data stream of whole-cluster batches equals the in-memory fit."""
  sys.path.insert(0, HERE)
  from distributed_fit import lmm_problem
  from models.mixed_effects import split_by_cluster
  from tfp_em.engine import fit_em
  from tfp_em.mixed_effects.em import MixedEffectsEM
  from tfp_em.engine.passes import dataset_of
  data = lmm_problem()
  model = MixedEffectsEM(expand=True)
  init = model.initialize(data, 0)
  kw = dict(max_iter=12, tol=0.0, init_params=init, progress=False)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # ConvergenceWarning: 12 iterations on purpose
    whole = fit_em(model, data, **kw)
    streamed = fit_em(model, dataset_of(split_by_cluster(data, 4)), **kw)
  for a, b in zip(streamed.params, whole.params):
    np.testing.assert_allclose(a, b, rtol=1e-10)
  np.testing.assert_allclose(streamed.restarts[0].log_likelihood,
                             whole.restarts[0].log_likelihood, rtol=1e-12)


def test_mixed_model_strategy_rejected_where_unsupported():
  sys.path.insert(0, HERE)
  from distributed_fit import lmm_arrays
  from tfp_em import MixedEffectsRegressor
  x, y, cluster, t = lmm_arrays()
  strategy = tf.distribute.get_strategy()
  for est, groups in ((MixedEffectsRegressor(method="nll"), cluster),
                      (MixedEffectsRegressor(f="mlp"), cluster),
                      (MixedEffectsRegressor(), [cluster, cluster % 7])):
    with pytest.raises(ValueError, match="strategy= is supported for linear f"):
      est.fit(x, y, groups, strategy=strategy)
