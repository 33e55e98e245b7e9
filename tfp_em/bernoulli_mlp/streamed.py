"""Streamed (x, y) input for `BernoulliMLPClassifier`: one summary pass, then
standardized batches.

    summary = summarize_stream(dataset)          # rows, column mean/std, classes
    batches = standardized_stream(dataset, summary, tf.float64)

`dataset` yields (x [B, D], y [B]) batches. The summary pass holds one batch
at a time: the column means and variances are merged batch by batch (Chan et
al.), and the class labels are the union of each batch's distinct labels.
The standardized stream maps every batch on the fly with the same mean,
scale and label codes that an in-memory fit of the same rows would use.

#### References

[1] T. F. Chan, G. H. Golub and R. J. LeVeque. Algorithms for computing the
    sample variance: analysis and recommendations. The American
    Statistician, 37(3):242-247, 1983.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import tensorflow as tf

from tfp_em.engine.streams import PREFETCH, checked_batches


class StreamSummary(NamedTuple):
  num_rows: int
  mean: np.ndarray     # [D] column means
  scale: np.ndarray    # [D] column standard deviations (1 where constant)
  classes: np.ndarray  # [C] sorted distinct labels (str for tf.string labels)


def check_element_spec(dataset: tf.data.Dataset) -> None:
  """Refuses a dataset whose elements are not (x [B, D], y [B]) batches."""
  spec = dataset.element_spec
  if not (isinstance(spec, tuple) and len(spec) == 2
          and all(isinstance(s, tf.TensorSpec) for s in spec)
          and spec[0].shape.rank == 2 and spec[1].shape.rank == 1):
    raise ValueError("a dataset for BernoulliMLPClassifier.fit must yield (x, y) batches, x of "
                     f"shape [B, D] and y of shape [B] (use .batch()), got element_spec {spec}")


def summarize_stream(dataset: tf.data.Dataset) -> StreamSummary:
  """Rows, column means and standard deviations, and sorted distinct labels of
  a stream of (x [B, D], y [B]) batches, in one pass with one batch in memory."""
  check_element_spec(dataset)
  count, mean, m2, classes = 0, None, None, None
  for x, y in checked_batches(dataset):
    x, y = np.asarray(x, np.float64), np.asarray(y)
    if x.shape[0] != y.shape[0]:
      raise ValueError(f"a batch has {x.shape[0]} rows of x but {y.shape[0]} labels")
    if mean is not None and x.shape[1] != mean.shape[0]:
      raise ValueError(f"a batch has {x.shape[1]} features, earlier ones {mean.shape[0]}")
    if not np.all(np.isfinite(x)):
      raise ValueError("the data contain NaN or inf in x")
    if y.dtype.kind == "f" and not np.all(np.isfinite(y)):
      raise ValueError("y contains NaN or inf; every row needs a class label")
    n = x.shape[0]
    if n == 0:
      continue
    batch_mean = x.mean(axis=0)
    batch_m2 = np.sum(np.square(x - batch_mean), axis=0)
    if mean is None:
      count, mean, m2, classes = n, batch_mean, batch_m2, np.unique(y)
      continue
    delta = batch_mean - mean
    total = count + n
    mean = mean + delta * (n / total)
    m2 = m2 + batch_m2 + np.square(delta) * (count * n / total)
    count, classes = total, np.union1d(classes, np.unique(y))
  if count < 2:
    raise ValueError(f"the dataset has {count} rows; BernoulliMLPClassifier needs at least 2")
  if classes.dtype == object:  # tf.string labels arrive as bytes
    classes = np.array([c.decode() for c in classes])
  scale = np.sqrt(m2 / count)
  return StreamSummary(count, mean, np.where(scale > 0, scale, 1.), classes)


def label_codes_fn(classes: np.ndarray):
  """y [B] -> int32 codes in the sorted `classes` (every label must be one)."""
  if classes.dtype.kind in "iuf":
    keys = tf.constant(classes.astype(np.float64))
    return lambda y: tf.searchsorted(keys, tf.cast(y, tf.float64), out_type=tf.int32)
  table = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
      tf.constant(classes), tf.range(len(classes), dtype=tf.int32)), -1)
  return table.lookup


def standardized_stream(dataset: tf.data.Dataset, summary: StreamSummary, dtype):
  """The (x standardized in `dtype`, label codes int32) batches of `dataset`."""
  mean = tf.constant(summary.mean, tf.float64)
  scale = tf.constant(summary.scale, tf.float64)
  codes = label_codes_fn(summary.classes)
  return dataset.map(lambda x, y: (tf.cast((tf.cast(x, tf.float64) - mean) / scale, dtype),
                                   codes(y))).prefetch(PREFETCH)
