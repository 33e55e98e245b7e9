"""TensorFlow's C++ start-up logs kept off stderr, for library users and the `tfp-em` command.

On its first import TensorFlow 2.21 writes absl-formatted lines to stderr:

    WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
    I0000 00:00:1796537772.988153   28481 port.cc:153] oneDNN custom operations are on. ...
    I0000 00:00:1796537772.988476   28481 cudart_stub.cc:31] Could not find cuda drivers ...

and later, at its first op, 'failed call to cuInit' on a machine without a GPU.
TF_CPP_MIN_LOG_LEVEL filters the later lines but not the start-up ones (absl's
log is not initialized yet). `quiet_tensorflow_startup`, called when `tfp_em`
is imported (before TensorFlow loads: `import tfp_em` does not load it), makes
the start-up lines obey TF_CPP_MIN_LOG_LEVEL too:

  - TF_CPP_MIN_LOG_LEVEL defaults to 3 (os.environ.setdefault: a user's
    value is kept);
  - TensorFlow's first import (by tfp_em or by the user) runs with file
    descriptor 2 captured; afterwards the captured text goes back to stderr
    less the start-up lines below that level (I = 0, W = 1, E = 2; level 0
    keeps them all, and nothing is captured). Anything else written
    meanwhile (a Python warning, another thread's output) is kept, and all
    of it when the import fails.

Nothing is done when TensorFlow is imported already. Python's `logging`
configuration is not touched.
"""
from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import os
import re
import sys
import tempfile

LEVEL_VARIABLE = "TF_CPP_MIN_LOG_LEVEL"
QUIET_LEVEL = "3"

# absl ('I0000 00:00:1796537772.98 28481 port.cc:153] ...') and TSL ('2024-01-01 12:00:00.1: I
# tensorflow/...') lines; the absl preamble and the CPU-instructions tail count as I.
SEVERITY = {"I": 0, "W": 1, "E": 2}
STARTUP_LINE = re.compile(
    r"^(?:(?P<absl>[IWE])\d{4} \d+:\d+:\d+\.\d+\s+\d+ \S+:\d+\] "
    r"|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: (?P<tsl>[IWE]) "
    r"|WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|To enable the following instructions: .* rebuild TensorFlow)")


def startup_severity(line: str) -> int | None:
  """0 (info), 1 (warning) or 2 (error) for a line TensorFlow's C++ start-up writes; None
  for any other line."""
  found = STARTUP_LINE.match(line)
  if not found:
    return None
  return SEVERITY[found["absl"] or found["tsl"] or "I"]


def min_log_level() -> int:
  """TF_CPP_MIN_LOG_LEVEL as TensorFlow reads it (0 when unset or not a number)."""
  try:
    return int(os.environ.get(LEVEL_VARIABLE, "0"))
  except ValueError:
    return 0


def quiet_tensorflow_startup() -> None:
  """Defaults TF_CPP_MIN_LOG_LEVEL to 3 and filters TensorFlow's first import by it (see
  the module docstring). Does nothing once TensorFlow is imported; idempotent."""
  if "tensorflow" in sys.modules:
    return
  os.environ.setdefault(LEVEL_VARIABLE, QUIET_LEVEL)
  if min_log_level() > 0 and not any(isinstance(f, _QuietFirstImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _QuietFirstImport())


class _QuietFirstImport(importlib.abc.MetaPathFinder):
  """Finds `tensorflow` once, with its loader's `exec_module` wrapped in `_captured_stderr`;
  removes itself from `sys.meta_path` on that first look-up."""

  def find_spec(self, name, path=None, target=None):
    if name != "tensorflow":
      return None
    sys.meta_path.remove(self)
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    if spec is None or not isinstance(spec.loader, importlib.abc.Loader):
      return spec
    loader, execute = spec.loader, spec.loader.exec_module

    def exec_module(module):
      try:
        with _captured_stderr():
          execute(module)
      finally:
        del loader.exec_module  # the loader's own method again
    loader.exec_module = exec_module
    return spec


@contextlib.contextmanager
def _captured_stderr():
  """File descriptor 2 redirected to a temporary file; afterwards the captured lines are
  written back to stderr, less TensorFlow's start-up lines below TF_CPP_MIN_LOG_LEVEL (all
  of them if the import failed)."""
  sys.stderr.flush()
  saved = os.dup(2)
  failed = True
  with tempfile.TemporaryFile() as capture:
    os.dup2(capture.fileno(), 2)
    try:
      yield
      failed = False
    finally:
      try:
        sys.stderr.flush()
      finally:
        os.dup2(saved, 2)
        os.close(saved)
      capture.seek(0)
      lines = capture.read().decode("utf-8", "replace").splitlines(keepends=True)
      level = min_log_level()
      kept = [line for line in lines
              if failed or (startup_severity(line) is None or startup_severity(line) >= level)]
      if kept:
        sys.stderr.write("".join(kept))
        sys.stderr.flush()
