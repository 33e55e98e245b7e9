"""Compiling model steps: modes, the per-model memo of traced functions, and
tracing with an eager fallback for user code."""
from __future__ import annotations

import tensorflow as tf


def compile_fn(fn, mode: str, autograph: bool = True):
  if mode == "eager":
    return fn
  if mode not in ("graph", "xla"):
    raise ValueError(f"compile mode must be 'eager', 'graph' or 'xla', got {mode!r}")
  return tf.function(fn, jit_compile=(mode == "xla"), reduce_retracing=True,
                     autograph=autograph)


_MEMO = "_tfp_em_compiled"  # where `compiled` keeps a model's functions


class _Memo(dict):
  """A model's compiled functions, by key. Copies and pickles of the model get
  an empty one (a `tf.function` neither pickles nor belongs to the copy)."""

  def __init__(self, owner=None):
    super().__init__()
    self.owner = owner

  def __reduce__(self):
    return _Memo, ()


def compiled(model, name: str, build, mode: str):
  """`compile_fn(build(), mode)`, kept on `model` for its later fits.

  `build()` must return a function of `model` and of its arguments only (data
  passed in, never captured), so a later fit with the same model instance
  reuses the traced function: no tracing, no graph optimization. The key is
  `(name, mode, the model's attributes)`: setting an attribute, or a method on
  the instance, gives a new function. Like any `tf.function`, it does not see
  later edits of module globals or class methods. Copies and pickles of the
  model start with no functions. Models whose attributes are not hashable,
  and mode 'eager', are not memoized. A model attribute
  `autograph = False` (default True) traces without AutoGraph's source
  conversion, for steps without Python control flow on tensors.
  """
  if mode == "eager":
    return build()
  autograph = model.autograph
  try:
    state = vars(model)
    key = (name, mode, tuple(sorted((k, v) for k, v in state.items() if k != _MEMO)))
    hash(key)
  except TypeError:  # no __dict__, or an unhashable attribute
    return compile_fn(build(), mode, autograph)
  memo = state.get(_MEMO)
  if memo is None or memo.owner is not model:  # first fit, or a copy of a fitted model
    memo = state[_MEMO] = _Memo(model)
  if key not in memo:
    memo[key] = compile_fn(build(), mode, autograph)
  return memo[key]


def compiled_e_step(model, mode: str):
  return compiled(model, "e_step", lambda: model.e_step, mode)


def compiled_or_eager(fn):
  """`tf.function(fn)`, falling back to `fn` itself from the first call that fails.

  For user-written functions (the verifier's targets, objectives handed to
  `minimize_lbfgs`) that may hold code TensorFlow cannot trace (numpy calls,
  Python control flow on tensors): they then run eagerly, slower but
  correct. A genuine error is raised again by the eager call.
  """
  compiled = tf.function(fn, reduce_retracing=True)
  traceable = [True]

  def call(*args):
    if traceable[0]:
      try:
        return compiled(*args)
      except Exception:  # untraceable: eager from now on
        traceable[0] = False
    return fn(*args)
  return call
