"""Readable names for the scalar entries of a fit's parameters (no TensorFlow).

A parameter field has named dims (the adapter's `dims`), e.g. a mixture's
covariances ('component', 'feature', 'feature_bis'). Each scalar entry is
named by its coordinates, with the feature (column) names where known:

    means[1, 0]              ->  means[component 1, waiting]
    covariances[0, 0, 1]     ->  covariances[component 0, eruptions, waiting]

A dim named '<d>_bis' is the second axis of a symmetric [d, d] matrix: its
entry [i, j] with i > j repeats [j, i] and is listed once (`keep=False`).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

BIS = "_bis"


class Entry(NamedTuple):
  """One scalar entry of a parameter field.

  Attributes:
    field: the parameter field ('means').
    index: its index in the field (tuple of ints).
    label: az.summary-style label ('means[1, 0]').
    name: readable label ('means[component 1, waiting]').
    keep: False for the lower-triangle repeat of a symmetric matrix entry.
  """
  field: str
  index: tuple
  label: str
  name: str
  keep: bool


def coordinate_name(dim: str, i: int, coords: dict | None = None) -> str:
  """Name of position `i` along `dim`: coords[dim][i] when given, else '<dim> <i>'.

  '<d>_bis' dims use the coords and the name of `d`.
  """
  base = dim[:-len(BIS)] if dim.endswith(BIS) else dim
  names = (coords or {}).get(base)
  if names is not None and i < len(names):
    return str(names[i])
  return f"{base} {i}"


def is_symmetric_repeat(dims, index) -> bool:
  """True for [.., i, j] with i > j when the last two dims are '<d>', '<d>_bis'."""
  return (len(dims) >= 2 and len(index) == len(dims) and dims[-1] == dims[-2] + BIS
          and index[-2] > index[-1])


def entries(fields, dims: dict, coords: dict | None = None) -> list[Entry]:
  """Every scalar entry of `fields`, in C order field by field.

  Args:
    fields: [(field name, shape)], in the order of the flattened estimate
      (e.g. the trainable fields, as `Flattener.constrained` stacks them).
    dims: {field name: tuple of dim names}, one per axis of its shape.
    coords: {dim: sequence of names} (e.g. {'feature': ['eruptions',
      'waiting']}); dims without coords are numbered.

  Returns:
    A list of `Entry`, one per scalar, same order as the flattened estimate.
  """
  out = []
  for field, shape in fields:
    shape = tuple(int(s) for s in shape)
    field_dims = tuple(dims.get(field, ()))
    if len(field_dims) != len(shape):
      field_dims = tuple(f"{field}_dim_{j}" for j in range(len(shape)))
    for index in np.ndindex(*shape):
      if not shape:
        out.append(Entry(field, (), field, field, True))
        continue
      label = f"{field}[{', '.join(map(str, index))}]"
      named = ", ".join(coordinate_name(d, i, coords) for d, i in zip(field_dims, index))
      name = f"{field}[{named}]"
      out.append(Entry(field, index, label, name, not is_symmetric_repeat(field_dims, index)))
  return out


def dataset_coords(coords: dict, sizes: dict) -> dict:
  """{dim: [str]} for every dim of `sizes` that `coords` names ('<d>_bis' takes d's names).

  Args:
    coords: {dim: sequence of names}, e.g. an adapter's `coords` ({'feature':
      ['eruptions', 'waiting']}, {'effect': ['(Intercept)', 'Days']}).
    sizes: {dim: length} of a dataset (xarray's `sizes`).

  Raises:
    ValueError: a dim's names do not match its length.
  """
  out = {}
  for dim, size in sizes.items():
    base = dim[:-len(BIS)] if dim.endswith(BIS) else dim
    names = coords.get(base)
    if names is None:
      continue
    if len(names) != size:
      what = "feature_names" if base == "feature" else f"the names of {base!r}"
      raise ValueError(f"{what} has {len(names)} names but the data has {size} {base}s")
    out[dim] = [str(n) for n in names]
  return out


def posterior_coords(dataset) -> dict:
  """{dim: list of str} of an xarray Dataset's string-valued coordinates
  (numbered coordinates are left out: they are named '<dim> <i>')."""
  out = {}
  for dim, values in dataset.coords.items():
    values = np.asarray(values)
    if values.dtype.kind in "US" or values.dtype == object:
      out[str(dim)] = [str(v) for v in values]
  return out
