"""Params as dicts or NamedTuples, matched by name; unconstrained coordinates.

The verifier takes params in whatever form the user's steps use: a dict or a
NamedTuple of arrays. Every params value a step returns is matched to the
start's fields by name (`conform`), never by position, and checked for shape
and precision, so a dict returned in another key order is the same params and
a missing or misshapen field is a one-line `ValueError`.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from models.specs import ParamSpec
from tfp_em.engine.unconstrained import Flattener


def field_names(params) -> list:
  """The params' field names, in order."""
  if hasattr(params, "_fields"):
    return list(params._fields)
  if isinstance(params, dict):
    return list(params)
  raise ValueError(f"params must be a NamedTuple or a dict of arrays, got {type(params).__name__}")


def field_values(params) -> list:
  return [params[k] for k in params] if isinstance(params, dict) else list(params)


def pack(template, values):
  """`values` (in the template's field order) in the template's container."""
  if isinstance(template, dict):
    return dict(zip(template, values))
  return type(template)(*values)


def to_float64(params):
  return pack(params, [tf.cast(tf.convert_to_tensor(v), tf.float64) for v in field_values(params)])


def _as_mapping(params, source: str) -> dict:
  if hasattr(params, "_asdict"):
    return params._asdict()
  if isinstance(params, dict):
    return params
  raise ValueError(f"{source} must return params as a dict (or NamedTuple) keyed by parameter "
                   f"name, got {type(params).__name__}")


def conform(template, params, source: str, strict: bool = False):
  """`params` as the template's fields, matched by name, in float64.

  Args:
    template: the start params (dict or NamedTuple), float64.
    params: params returned by a user step.
    source: what returned them, for messages ('m_step').
    strict: also refuse floating values in a precision below float64 (the
      first call of each step); later calls cast silently.

  Returns:
    Params of the template's kind and field order.

  Raises:
    ValueError: a missing or unknown field, a wrong shape, or (strict) a
      float32/float16 value.
  """
  names = field_names(template)
  given = _as_mapping(params, source)
  missing = [n for n in names if n not in given]
  extra = [n for n in given if n not in names]
  if missing or extra:
    raise ValueError(f"{source} returned parameters {sorted(given)}, expected {names} "
                     "(params are matched by name)"
                     + (f"; missing {missing}" if missing else "")
                     + (f"; unknown {extra}" if extra else ""))
  values = []
  for n, ref in zip(names, field_values(template)):
    v = tf.convert_to_tensor(given[n])
    if strict and v.dtype.is_floating and v.dtype != tf.float64:
      raise ValueError(f"{source} returned {n!r} as {v.dtype.name}: the verifier compares with "
                       "float64 references at ~1e-9, so compute in float64 (the data and "
                       "init_params reach your steps as float64; avoid float32 constants)")
    if v.shape.is_fully_defined() and v.shape != ref.shape:
      raise ValueError(f"{source} returned {n!r} with shape {v.shape.as_list()}, but init_params "
                       f"has shape {ref.shape.as_list()}")
    values.append(tf.cast(v, tf.float64))
  return pack(template, values)


def check_precision(structure, source: str) -> None:
  """Raises a one-line ValueError for floating tensors below float64 in `structure`."""
  for path, leaf in _flat_with_paths(structure):
    dtype = getattr(leaf, "dtype", None)
    if dtype is None:
      continue
    dtype = tf.as_dtype(dtype)
    if dtype.is_floating and dtype != tf.float64:
      raise ValueError(f"{source} returned {path or 'its value'} as {dtype.name}: the verifier "
                       "compares with float64 references at ~1e-9, so compute in float64 (the "
                       "data and init_params reach your steps as float64)")


def _flat_with_paths(structure, prefix: str = "") -> list:
  """[(path, leaf)] of a nest of dicts, NamedTuples, lists and tuples: 'n', 'a/b', 'c/0'."""
  if hasattr(structure, "_asdict"):
    structure = structure._asdict()
  if isinstance(structure, dict):
    items = [(str(k), structure[k]) for k in sorted(structure, key=str)]
  elif isinstance(structure, (list, tuple)):
    items = [(str(i), v) for i, v in enumerate(structure)]
  else:
    return [(prefix, structure)]
  out = []
  for key, value in items:
    out += _flat_with_paths(value, f"{prefix}/{key}" if prefix else key)
  return out


def leaf_paths(structure) -> list:
  """[(path, leaf)] of a nest: 'n', 'sx', 'a/b'."""
  return _flat_with_paths(structure)


def normalize_specs(params, specs) -> list:
  """Specs (dict / NamedTuple of ParamSpec, bijector or None) -> list of ParamSpec.

  Matched to the params by name when `specs` is a dict or NamedTuple.
  """
  names = field_names(params)
  if specs is None:
    raise ValueError("param_specs are required: one ParamSpec (or TFP bijector onto the "
                     f"parameter's support) per parameter {names}")
  if hasattr(specs, "_asdict") and hasattr(params, "_asdict") and type(specs) is not type(params):
    specs = specs._asdict()
  if isinstance(specs, dict):
    missing = [n for n in names if n not in specs]
    if missing:
      raise ValueError(f"param_specs has no entry for parameters {missing}")
    extra = [n for n in specs if n not in names]
    if extra:
      raise ValueError(f"param_specs names {extra}, which are not in init_params ({names})")
    raw = [specs[n] for n in names]
  else:
    raw = list(specs)
    if len(raw) != len(names):
      raise ValueError(f"param_specs has {len(raw)} entries for {len(names)} parameters {names}")
  out = []
  for n, s in zip(names, raw):
    if isinstance(s, ParamSpec):
      out.append(s)
    elif s is None:
      out.append(ParamSpec(False))
    elif isinstance(s, tfp.bijectors.Bijector):
      out.append(ParamSpec(True, s))
    else:
      raise ValueError(f"param_specs[{n!r}] must be a ParamSpec, a tfp bijector or None, got {s!r}")
  return out


class _Fields(tuple):
  """The params' field values in order: the NamedTuple-like view `Flattener`
  takes, since params may be dicts."""

  def __new__(cls, *values):
    return super().__new__(cls, values)


class Coordinates:
  """Unconstrained coordinates u [P] of the trainable fields around a template.

  The engine's `Flattener`, on dict params too: `unflatten` returns params of
  the template's kind, with the template's fixed fields.

  Args:
    specs: list of ParamSpec, parallel to the params' fields.
    template: params (NamedTuple or dict); `u_hat` is u there.
  """

  def __init__(self, specs: list, template):
    self.template = template
    self.specs = specs
    self.flattener = Flattener(_Fields(*field_values(template)), specs)
    self.u_hat = self.flattener.u_hat
    self.names = [n for n, s in zip(field_names(template), specs) if s.trainable]

  def flatten(self, params):
    return self.flattener.flatten(_Fields(*field_values(params)))

  def unflatten(self, u):
    return pack(self.template, list(self.flattener.unflatten(u)))

  def per_field(self, vector) -> list:
    """A [P] vector cut into one array per trainable field."""
    parts = np.split(np.asarray(vector), np.cumsum(self.flattener.sizes)[:-1])
    return [p.reshape(tuple(s)) for p, s in zip(parts, self.flattener.shapes)]

  def worst_field(self, vector):
    """(name, max |entry|) of the trainable field where |vector| is largest."""
    return worst_field(self.names, self.per_field(vector))


def max_abs(arrays) -> float:
  return max([float(np.max(np.abs(a))) if np.size(a) else 0.0 for a in arrays] + [0.0])


def worst_field(names, arrays):
  values = [float(np.max(np.abs(a))) if np.size(a) else 0.0 for a in arrays]
  if not values:
    return "-", 0.0
  bad = [i for i, v in enumerate(values) if not np.isfinite(v)]
  i = bad[0] if bad else int(np.argmax(values))
  return names[i], values[i]
