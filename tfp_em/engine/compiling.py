"""Compiling model steps: modes, the process-wide cache of traced steps, and
tracing with an eager fallback for user code.

A fit's cost on small and medium data is mostly tracing and XLA compilation,
not EM. `compiled` keeps every traced step for the whole process, keyed on
what the step depends on: the model's class and `step_config()`, the step's
name and the compile mode. A fresh estimator, a refit, a restart, a CV fold
or a BIC candidate of a configuration seen before reuses the traced step.
A step's trace leaves the data's leading axis unknown (above the model's
`trace_exact_rows`), so a new number of rows does not trace again, and so
are the axes a model declares as its components (`traced_component_axes`),
so a new number of mixture components does not trace again either. A model's
`traced_settings` (the MLP's penalty) enter the trace as tensors, so a new
penalty does not trace again.
"""
from __future__ import annotations

import collections
import copy
import logging
import os

import tensorflow as tf

MAX_CACHED_STEPS = 512  # least recently used steps are dropped beyond this

_CACHE: collections.OrderedDict = collections.OrderedDict()
_COMPILED_NAMES: set[str] = set()  # qualnames of the functions compile_fn has traced


def compile_fn(fn, mode: str, autograph: bool = True, data_arg: int | None = None,
               exact_rows: int = 0, component_axes=None):
  """`fn` as a `Step` ('graph': a `tf.function`; 'xla': XLA-compiled), or itself ('eager').

  `data_arg`: the position of the argument holding data rows (-1: the last),
  whose leading axis is left unknown in the trace when it has more than
  `exact_rows` rows, so every such data size shares one trace; other
  arguments, and smaller data, are traced at their exact shapes, except
  the `component_axes` ({NamedTuple class: {field: axis}}, as
  `EMModel.traced_component_axes`), always left unknown.
  """
  if mode == "eager":
    return fn
  if mode not in ("graph", "xla"):
    raise ValueError(f"compile mode must be 'eager', 'graph' or 'xla', got {mode!r}")
  _COMPILED_NAMES.add(getattr(fn, "__qualname__", repr(fn)))
  return Step(tf.function(fn, jit_compile=(mode == "xla"), autograph=autograph), data_arg,
              exact_rows, component_axes)


class Step:
  """A traced step: one trace per shape class of its arguments.

  A shape class is the arguments' dtypes and shapes, with the leading axis
  of the data argument unknown when it has more than `exact_rows` rows, and
  the `component_axes` of the NamedTuples they name unknown.
  Under 'xla', XLA still compiles one program per concrete shape it meets.
  """

  def __init__(self, function, data_arg: int | None, exact_rows: int = 0,
               component_axes=None):
    self.function = function
    self.data_arg = data_arg
    self.exact_rows = exact_rows
    self.component_axes = dict(component_axes or {})
    self._classes = set()
    self._seen = set()  # exact argument shapes already dispatched

  def __call__(self, *args):
    if self.data_arg is None and not self.component_axes:  # every axis traced at its size
      return self.function(*args)
    shapes = _exact_shapes(args)
    if shapes in self._seen:  # its shape class is traced: skip building the signature
      return self.function(*args)
    rows_arg = None
    if self.data_arg is not None and _rows(args[self.data_arg]) > self.exact_rows:
      rows_arg = self.data_arg % len(args)
    if rows_arg is not None or self.component_axes:
      signature = tuple(_signature(a, i == rows_arg, self.component_axes)
                        for i, a in enumerate(args))
      try:
        known = signature in self._classes
      except TypeError:  # an unhashable argument: let TensorFlow decide
        known = True
      if not known:
        self.function.get_concrete_function(*signature)  # traces the relaxed class
        self._classes.add(signature)
    if shapes is not None:
      self._seen.add(shapes)
    return self.function(*args)

  def tracing_count(self) -> int:
    return self.function.experimental_get_tracing_count()


def _rows(value) -> int:
  """Leading size of the first tensor in `value` (0 when unknown)."""
  for leaf in tf.nest.flatten(value):
    shape = getattr(leaf, "shape", None)
    if shape is not None and len(shape) and shape[0] is not None:
      return int(shape[0])
  return 0


def _exact_shapes(args):
  """The shapes and dtypes of the tensors in `args` and their other leaves,
  as a hashable key (None when a leaf is not hashable)."""
  key = tuple((tuple(leaf.shape), leaf.dtype) if tf.is_tensor(leaf) else leaf
              for leaf in tf.nest.flatten(args))
  try:
    hash(key)
  except TypeError:
    return None
  return key


def _signature(value, relax_rows: bool, component_axes: dict):
  """TensorSpecs of the tensors in `value` (leading axis unknown if
  `relax_rows`; in a NamedTuple of a class in `component_axes`, its fields'
  component axes unknown); other leaves (Python numbers, None) as they are."""
  axes = component_axes.get(type(value))
  if axes is not None:
    return type(value)(*(tf.nest.map_structure(
        lambda leaf, axis=axes.get(name): _spec(leaf, relax_rows, axis), field)
                         for name, field in zip(value._fields, value)))
  if isinstance(value, (list, tuple)) and component_axes:
    items = [_signature(item, relax_rows, component_axes) for item in value]
    return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
  return tf.nest.map_structure(lambda leaf: _spec(leaf, relax_rows, None), value)


def _spec(leaf, relax_rows: bool, component_axis: int | None):
  """A TensorSpec of `leaf`, leading and component axes unknown as asked."""
  if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
    return leaf
  shape = tf.TensorShape(leaf.shape)
  if shape.rank is None:
    return tf.TensorSpec(shape, tf.as_dtype(leaf.dtype))
  dims = shape.as_list()
  if relax_rows and dims:
    dims[0] = None
  if component_axis is not None and component_axis < len(dims):
    dims[component_axis] = None
  return tf.TensorSpec(dims, tf.as_dtype(leaf.dtype))


def compiled(model, name: str, build, mode: str, data_arg: int | None = None):
  """`compile_fn(build(model), mode, data_arg=...)`, shared by every model of the same configuration.

  `build(m)` must return a function of model m's configuration and of its
  arguments only (data passed in, never captured): it is traced once per
  shape class, with the first model of its configuration, and serves every
  later model whose `step_config()` is equal. A model's `traced_settings`
  reach the trace as tensors (`SettingsBound`), so they are not part of the
  configuration. Models whose `step_config()` is None (not hashable), and
  mode 'eager', are not cached. Like any `tf.function`, a cached step does
  not see later edits of module globals or class methods.
  """
  if mode == "eager":
    return build(model)
  settings = model.traced_settings
  def make():
    if settings:  # the settings come first: a data argument counted from the front moves
      counted_from_front = data_arg is not None and data_arg >= 0
      fn, arg = with_settings(model, build), data_arg + 1 if counted_from_front else data_arg
    else:
      fn, arg = build(model), data_arg
    return compile_fn(fn, mode, model.autograph, arg, model.trace_exact_rows,
                      model.traced_component_axes)
  config = model.step_config()
  if config is None:
    step = make()
  else:
    key = (type(model), name, mode, data_arg, config)
    step = _CACHE.get(key)
    if step is None:
      step = _CACHE[key] = make()
      if len(_CACHE) > MAX_CACHED_STEPS:
        _CACHE.popitem(last=False)
    else:
      _CACHE.move_to_end(key)
  return SettingsBound(step, model) if settings else step


def compiled_e_step(model, mode: str):
  return compiled(model, "e_step", lambda m: m.e_step, mode, data_arg=-1)


def with_settings(model, build):
  """`build`'s step as a function of (settings, *args): traced with a copy of
  `model` whose `traced_settings` are the tensors in `settings` (a tuple in
  their order: hashable, so the signature of a relaxed trace is too)."""
  def step(settings, *args):
    twin = copy.copy(model)
    vars(twin).update(zip(model.traced_settings, settings))
    return build(twin)(*args)
  return step


class SettingsBound:
  """A shared step called with one model's `traced_settings`, as scalar
  tensors in the dtype of the first floating-point tensor among the arguments
  (float64 when there is none)."""

  def __init__(self, step, model):
    self.step = step
    self.values = tuple(vars(model)[name] for name in model.traced_settings)

  def __call__(self, *args):
    dtype = _float_dtype(args)
    return self.step(tuple(tf.constant(value, dtype) for value in self.values), *args)

  def tracing_count(self) -> int:
    return self.step.tracing_count()


def _float_dtype(args) -> tf.DType:
  for leaf in tf.nest.flatten(args):
    if tf.is_tensor(leaf) and leaf.dtype.is_floating:
      return leaf.dtype
  return tf.float64


def clear_cache() -> None:
  """Drops every cached step (the next fit of each configuration traces again)."""
  _CACHE.clear()


def cached_steps() -> int:
  """How many compiled steps the process keeps."""
  return len(_CACHE)


def tracing_count() -> int:
  """Traces made so far by the cached steps (each one costs a graph build)."""
  return sum(step.tracing_count() for step in _CACHE.values())


def tracing_counts() -> dict:
  """{(model class name, step name): traces} of the cached steps."""
  counts = collections.Counter()
  for (model_class, name, *_), step in _CACHE.items():
    counts[model_class.__name__, name] += step.tracing_count()
  return dict(counts)


def compiled_or_eager(fn):
  """`tf.function(fn)`, falling back to `fn` itself from the first call that fails.

  For user-written functions (the verifier's targets, objectives handed to
  `minimize_lbfgs`) that may hold code TensorFlow cannot trace (numpy calls,
  Python control flow on tensors): they then run eagerly, slower but
  correct. A genuine error is raised again by the eager call.
  """
  compiled_fn = tf.function(fn, reduce_retracing=True)
  traceable = [True]

  def call(*args):
    if traceable[0]:
      try:
        return compiled_fn(*args)
      except Exception:  # untraceable: eager from now on
        traceable[0] = False
    return fn(*args)
  return call


PERSISTENT_CACHE_FLAG = "--tf_xla_persistent_cache_directory"


def use_persistent_cache(directory: str | None = None) -> str | None:
  """Keeps XLA programs on disk, so later processes load them instead of compiling.

  Sets TensorFlow's `--tf_xla_persistent_cache_directory` (in TF_XLA_FLAGS),
  which works on CPU: the GMM's E-step kernel then loads in about 0.2 s less
  than it compiles (`validation/bench_fit_time.py`). Call it before the
  process's first XLA compilation (TensorFlow reads the flags then); a
  directory the user already set in TF_XLA_FLAGS is kept.

  Args:
    directory: where to keep the programs; default `$TFP_EM_XLA_CACHE`,
      else `$XDG_CACHE_HOME/tfp_em/xla` (`~/.cache/tfp_em/xla`).
      `TFP_EM_XLA_CACHE=off` turns the cache off.

  Returns:
    The directory in use, or None when it is off or cannot be created.
  """
  flags = os.environ.get("TF_XLA_FLAGS", "")
  for flag in flags.split():
    if flag.startswith(PERSISTENT_CACHE_FLAG + "="):
      return flag.split("=", 1)[1]
  if directory is None and os.environ.get("TFP_EM_XLA_CACHE") == "off":
    return None
  directory = directory or os.environ.get("TFP_EM_XLA_CACHE") or None
  if directory is None:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    directory = os.path.join(base, "tfp_em", "xla")
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError:
    return None
  os.environ["TF_XLA_FLAGS"] = f"{flags} {PERSISTENT_CACHE_FLAG}={directory}".strip()
  return directory


class RetracingFilter(logging.Filter):
  """Drops TensorFlow's "triggered tf.function retracing" warning about
  tfp_em's own steps (their retracing is by design: one trace per data size
  class); the same warning about the user's own functions still shows."""

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    if "triggered tf.function retracing" not in message:
      return True
    return not any(f"{name} at" in message or f"{name} of" in message
                   for name in _COMPILED_NAMES)


RETRACING_FILTER = RetracingFilter()
logging.getLogger("tensorflow").addFilter(RETRACING_FILTER)
