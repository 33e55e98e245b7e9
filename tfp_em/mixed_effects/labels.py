"""Cluster and level labels: coding, unseen labels and the BLUP lookup.

A grouping factor is one label per row, any hashable values. `clusters` is
one factor or a list of K factors; a list of one factor is that factor.
Labels are coded against the levels seen in fit; an unseen label gets a code
past them, so a code >= q means "not seen in fit" everywhere.
"""
from __future__ import annotations

import numpy as np


def encode_clusters(clusters, n: int, name: str = "clusters"):
  """Any hashable labels [n] -> (unique labels [G] (object array), codes [n] int32)."""
  if hasattr(clusters, "numpy") and callable(clusters.numpy):
    clusters = clusters.numpy()
  if clusters is None or isinstance(clusters, (str, bytes)) or not hasattr(clusters, "__len__"):
    raise ValueError(f"{name} must give one cluster label per row of X, got {clusters!r}")
  if isinstance(clusters, np.ndarray) and clusters.ndim != 1:
    raise ValueError(f"{name} must be 1-D (one label per row of X), got shape {clusters.shape}")
  values = list(clusters) if not isinstance(clusters, np.ndarray) else clusters
  if len(values) != n:
    raise ValueError(f"{name} has length {len(values)} but X has {n} rows")
  if isinstance(values, np.ndarray) and values.dtype.kind in "biufU":  # fast path, same result
    if values.dtype.kind == "f" and np.isnan(values).any():
      raise ValueError(f"{name} contains a missing label (None or NaN)")
    labels, codes = np.unique(values, return_inverse=True)
    return labels.astype(object), codes.astype(np.int32).reshape(-1)
  arr = np.empty(n, dtype=object)
  arr[:] = list(values) if not isinstance(values, np.ndarray) or values.ndim != 1 else values
  for v in arr:
    if v is None or (isinstance(v, (float, np.floating)) and np.isnan(v)):
      raise ValueError(f"{name} contains a missing label (None or NaN)")
  kinds = {isinstance(v, (str, bytes)) for v in arr if isinstance(v, (str, bytes, int, float,
                                                                        np.number))}
  if len(kinds) == 2:
    raise ValueError(f"{name} mixes string and number labels (such as 0 and '0', which would "
                     "be two clusters); convert them to one type first")
  try:
    labels, codes = np.unique(arr, return_inverse=True)
  except TypeError:  # labels of mixed, unorderable types: first-seen order
    index = {}
    try:
      codes = np.array([index.setdefault(v, len(index)) for v in arr])
    except TypeError as e:
      raise ValueError(f"{name} labels must be hashable values: {e}") from None
    labels = np.empty(len(index), dtype=object)
    labels[:] = list(index)
  return labels, codes.astype(np.int32).reshape(-1)


def is_factor_list(clusters) -> bool:
  """True for a list/tuple of K >= 1 label arrays (not a list of scalar labels)."""
  if not isinstance(clusters, (list, tuple)) or not clusters:
    return False
  return all(hasattr(g, "__len__") and not isinstance(g, (str, bytes)) for g in clusters)


def as_factors(clusters) -> list:
  """`clusters` as a list of grouping factors: a factor list as given, else [clusters]."""
  return list(clusters) if is_factor_list(clusters) else [clusters]


def encode_factors(clusters, n: int, name: str = "clusters"):
  """K label arrays [n] -> (list of K unique-label arrays, codes [n, K] int32).

  Raises ValueError unless `clusters` is a list of K >= 1 factors with one
  label per row and at least two levels each.
  """
  if not is_factor_list(clusters):
    raise ValueError(f"{name} must be a list of K >= 1 grouping factors, each with one "
                     "label per row of X")
  levels, codes = [], []
  for k, g in enumerate(clusters):
    labels, c = encode_clusters(g, n, name=f"{name}[{k}]")
    if len(labels) < 2:
      raise ValueError(f"{name}[{k}] has a single level: its variance cannot be "
                       "separated from the intercept; drop the factor")
    levels.append(labels)
    codes.append(c)
  return levels, np.stack(codes, 1)


def code_labels(levels, clusters, n: int, name: str = "clusters"):
  """Codes [n] int64 of one factor's labels against the `levels` [q] seen in fit.

  A seen label gets its index in `levels`; the unseen labels get q, q + 1, ...
  (in the order `encode_clusters` sorts them). Returns (codes, number of codes).
  """
  labels, codes = encode_clusters(clusters, n, name)
  index = {v: i for i, v in enumerate(levels)}
  mapped, extra = np.empty(len(labels), np.int64), 0
  for j, lab in enumerate(labels):
    if lab in index:
      mapped[j] = index[lab]
    else:
      mapped[j], extra = len(levels) + extra, extra + 1
  return mapped[codes], len(levels) + extra


def code_positions(codes, num_levels) -> np.ndarray:
  """[n, K] position in u = [u_1 ... u_K] of each row's code in each factor;
  -1 for a code >= q_k (a level unseen in fit)."""
  codes, num_levels = np.asarray(codes), np.asarray(num_levels, np.int64)
  offsets = np.concatenate([[0], np.cumsum(num_levels)[:-1]])
  return np.where(codes < num_levels, codes + offsets, -1)


def level_positions(levels, clusters, n: int) -> np.ndarray:
  """[n, K] position in u of each row's level of each factor; -1 for a level
  unseen in fit (all -1 for clusters=None)."""
  if clusters is None:
    return np.full((n, len(levels)), -1, np.int64)
  if not is_factor_list(clusters) or len(clusters) != len(levels):
    raise ValueError(f"clusters must be a list of {len(levels)} grouping factors, as in fit")
  codes = np.stack([code_labels(levels[k], g, n, f"clusters[{k}]")[0]
                    for k, g in enumerate(clusters)], 1)
  return code_positions(codes, [len(v) for v in levels])


def sum_at_positions(positions, mean) -> np.ndarray:
  """sum_k mean[positions[:, k]] per row [n], skipping positions -1."""
  mean = np.asarray(mean, np.float64)
  return np.sum(np.where(positions >= 0, mean[np.maximum(positions, 0)], 0.), axis=1)


def blup_sum(levels, blups, clusters, n: int):
  """sum_k BLUP_k(level) per row [n]: 0 for a level unseen in fit, or for clusters=None."""
  return sum_at_positions(level_positions(levels, clusters, n), np.concatenate(blups))
