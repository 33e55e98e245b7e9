"""Bounded memory of streamed input: batch sizes, read-ahead, chunked init."""
import threading
import time

import numpy as np
import pytest
import tensorflow as tf

from tfp_em.mixture import em as me
from tfp_em.engine import streams as streams


def test_parquet_batches_are_bounded_and_exact(tmp_path):
  pa = pytest.importorskip("pyarrow")
  import pyarrow.parquet as pq
  x = np.random.default_rng(0).normal(size=(1000, 3))
  path = tmp_path / "d.parquet"
  # Row groups larger than a batch must still come out in batch-sized pieces.
  pq.write_table(pa.table({"a": x[:, 0], "b": x[:, 1], "c": x[:, 2]}), path, row_group_size=700)
  ds, names = streams.features_dataset(str(path), columns=["c", "a"], batch_size=64)
  sizes = [b.shape[0] for b in ds]
  assert max(sizes) == 64 and sum(sizes) == len(x)
  np.testing.assert_array_equal(np.concatenate(list(ds.as_numpy_iterator())), x[:, [2, 0]])
  assert names == ["c", "a"]


def test_float32_parquet_batches_are_contiguous(tmp_path):
  pa = pytest.importorskip("pyarrow")
  import pyarrow.parquet as pq
  x = np.arange(12.0).reshape(6, 2)
  path = tmp_path / "d.parquet"
  pq.write_table(pa.table({"a": x[:, 0], "b": x[:, 1]}), path)
  ds, _ = streams.features_dataset(str(path), batch_size=4, dtype="float32")
  batches = list(ds.as_numpy_iterator())
  assert [b.dtype for b in batches] == [np.float32] * 2
  np.testing.assert_array_equal(np.concatenate(batches), x.astype(np.float32))


def test_read_ahead_is_bounded():
  """The stream holds at most PREFETCH batches beyond the one being used."""
  pulled = []
  lock = threading.Lock()

  def source():
    for i in range(100):
      with lock:
        pulled.append(i)
      yield np.full((2, 2), float(i))

  ds = tf.data.Dataset.from_generator(source, output_signature=tf.TensorSpec([None, 2],
                                                                             tf.float64))
  iterator = iter(streams.features_dataset(ds)[0])
  first = next(iterator)
  time.sleep(0.5)  # time for an unbounded read-ahead to run far ahead
  with lock:
    ahead = len(pulled) - 1
  assert float(first[0, 0]) == 0.0
  # One batch read ahead (overlaps reading with the E-step); one more may be
  # in flight between stages. AUTOTUNE or a deep buffer would read far ahead.
  assert 1 <= ahead <= 2


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_init_in_chunks_equals_one_chunk(covariance_type):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(1001, 3)) * [1.0, 2.0, 0.5] + 100.0
  w = rng.uniform(0.5, 2.0, 1001)
  resp = tf.constant(rng.dirichlet(np.ones(4), size=1001))
  data = me.MixtureData(tf.constant(x), tf.constant(w))
  chunked = me.GaussianMixtureEM(4, covariance_type, chunk_size=64)  # 1001 = 15 * 64 + 41
  whole = me.GaussianMixtureEM(4, covariance_type, chunk_size=4096)
  a = chunked.params_from_responsibilities(data, resp)
  b = whole.params_from_responsibilities(data, resp)
  for got, want in zip(a, b):
    np.testing.assert_allclose(got, want, rtol=1e-12)
  # And both are the weighted moments of the responsibilities (a wrong chunk sum breaks this).
  rw = resp.numpy() * w[:, None]
  means = rw.T @ x / rw.sum(0)[:, None]
  np.testing.assert_allclose(a.means, means, rtol=1e-12)
  np.testing.assert_allclose(a.weights, rw.sum(0) / rw.sum(), rtol=1e-12)


def test_models_with_per_point_stats_are_neither_streamed_nor_distributed():
  from tfp_em.bernoulli_mlp.em import BernoulliMLPEM
  from tfp_em.engine import fit_online_em
  from tfp_em.engine.passes import InMemoryPass, StreamPass, make_pass
  rng = np.random.default_rng(0)
  data = (tf.constant(rng.normal(size=(40, 2))), tf.constant(rng.integers(0, 2, 40, np.int32)))
  batches = tf.data.Dataset.from_tensor_slices(data).batch(10)
  model = BernoulliMLPEM(2, 2)
  assert model.per_point_stats_fields == ("hidden_targets", "inputs")
  fields = r"BernoulliMLP: its E-step statistics \['hidden_targets', 'inputs'\] are per data point"
  with pytest.raises(ValueError, match=fields + ".*batches of a tf.data.Dataset"):
    make_pass(model, batches)
  with pytest.raises(ValueError, match=fields + ".*replicas of a tf.distribute strategy"):
    make_pass(model, data, strategy=tf.distribute.get_strategy())
  with pytest.raises(ValueError, match=fields + ".*batches of online EM"):
    fit_online_em(model, batches)
  assert isinstance(make_pass(model, data), InMemoryPass)

  class Summable(BernoulliMLPEM):  # what issue 21 flips: the declaration is all that counts
    per_point_stats_fields = ()

  assert isinstance(make_pass(Summable(2, 2), batches), StreamPass)
