"""The verifier's compile wrapper: trace a reference computation once per file.

The verifier calls the same few computations (exact marginal and posterior,
value and gradient of loglik and Q, the user's steps) at many parameter
points. Each is built once per `verify` call as a `Compiled`: one
`tf.function` whose trace is reused at every point (the arguments keep their
shapes and structure), so the cost of tracing is paid once per file, not per
point or per call site.

Unlike a blanket fallback, a `Compiled` distinguishes two failures:

* the function cannot be traced (NumPy calls, Python control flow on
  tensors): it runs eagerly from then on, and says so in `notes`;
* a traced call fails at run time (a Cholesky of a singular matrix): that one
  call is repeated eagerly, so the error (or the result) is the eager one,
  with the user's file and line in its traceback; later calls stay compiled.
"""
from __future__ import annotations

import tensorflow as tf


class Compiled:
  """`fn` as a `tf.function` (unless disabled), eager where it cannot be traced.

  Args:
    fn: the function; its tensor arguments must keep their shapes.
    enabled: False runs `fn` eagerly.
    name: how notes name it ('your e_step').
    notes: a list collecting one line per function that had to run eagerly.
  """

  def __init__(self, fn, enabled: bool = True, name: str = "", notes: list | None = None):
    self.fn = fn
    self.name = name or getattr(fn, "__name__", "function")
    self.notes = notes
    # Traced without AutoGraph first (faster); with it when that fails (Python
    # control flow on tensors in the user's code).
    self.graph = tf.function(fn, autograph=False) if enabled else None
    self.autograph = False
    self.ran = False  # a traced call succeeded

  def __call__(self, *args):
    if self.graph is None:
      return self.fn(*args)
    try:
      out = self.graph(*args)
      self.ran = True
      return out
    except tf.errors.OpError:  # a run-time failure: repeat this call eagerly
      return self.fn(*args)
    except Exception as e:  # noqa: BLE001 - untraceable user code
      if self.ran:
        return self.fn(*args)
      if not self.autograph:
        self.graph, self.autograph = tf.function(self.fn, autograph=True), True
        return self(*args)
      self.graph = None
      if self.notes is not None:
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        self.notes.append(f"{self.name} could not be compiled and ran eagerly (slower): "
                          f"{type(e).__name__}: {first}")
      return self.fn(*args)


def value_and_gradient(fn, u):
  """fn(u) and d fn / du, for u [P] (a zero gradient where fn ignores u)."""
  with tf.GradientTape() as tape:
    tape.watch(u)
    value = fn(u)
  grad = tape.gradient(value, u)
  return value, (tf.zeros_like(u) if grad is None else tf.convert_to_tensor(grad))
