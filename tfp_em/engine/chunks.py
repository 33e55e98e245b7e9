"""Rows in equal chunks, for E-steps that loop over data of any (even unknown) size.

    n_chunks, rows = equal_chunks(tf.shape(x)[0], max_rows)
    xs = in_chunks(x, n_chunks, rows)          # [n_chunks, rows, ...], zero-padded

The chunks are as equal as possible, so the padding is under one row per
chunk whatever N is: a traced step whose N is unknown does not pad 100 rows
up to a 65536-row chunk. `fixed_chunks` instead keeps the chunk shape in a
small fixed set (powers of two up to `max_rows`), for XLA, which compiles
one program per shape.
"""
from __future__ import annotations

import tensorflow as tf


def equal_chunks(n, max_rows: int):
  """(number of chunks, rows per chunk): the fewest chunks of at most
  `max_rows` rows covering `n` rows (at least one chunk)."""
  n_chunks = tf.maximum((n + max_rows - 1) // max_rows, 1)
  return n_chunks, (n + n_chunks - 1) // n_chunks


def fixed_chunks(n, max_rows: int, min_rows: int = 256):
  """(number of chunks, rows per chunk) with rows the smallest power of two
  >= n from `min_rows`, capped at `max_rows`: one of about log2(max_rows /
  min_rows) shapes, with less than half the rows padding below `max_rows`."""
  sizes = [min(min_rows, max_rows)]
  while sizes[-1] < max_rows:
    sizes.append(min(2 * sizes[-1], max_rows))
  last = len(sizes) - 1
  sizes = tf.constant(sizes, dtype=tf.convert_to_tensor(n).dtype)
  rows = tf.gather(sizes, tf.minimum(tf.searchsorted(sizes, tf.reshape(n, [1]))[0], last))
  return tf.maximum((n + rows - 1) // rows, 1), rows


def in_chunks(t, n_chunks, rows):
  """[N, ...] -> [n_chunks, rows, ...], padded with zero rows at the end."""
  pad = n_chunks * rows - tf.shape(t)[0]
  padded = tf.pad(t, tf.concat([[[0, pad]], tf.zeros([tf.rank(t) - 1, 2], tf.int32)], 0))
  return tf.reshape(padded, tf.concat([[n_chunks, rows], tf.shape(t)[1:]], 0))
