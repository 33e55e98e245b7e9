"""Output files written atomically.

Every output file is written to a temporary file in the same folder and then
renamed over the target, so a killed run never leaves a truncated file that
looks valid.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile

import numpy as np


def check_output_dir(path) -> str:
  """Checks, without creating anything, that `path` is or can be made a writable folder."""
  path = os.path.abspath(os.fspath(path))
  probe = path
  while not os.path.exists(probe):
    parent = os.path.dirname(probe)
    if parent == probe:
      break
    probe = parent
  if probe != path and not os.path.isdir(probe):
    raise ValueError(f"output directory {path!r} cannot be created: {probe!r} is not a directory")
  if probe == path and not os.path.isdir(path):
    raise ValueError(f"output directory {path!r} exists and is not a directory")
  if not os.access(probe, os.W_OK | os.X_OK):
    raise ValueError(f"output directory {path!r} is not writable")
  return path


def ensure_writable_dir(path) -> str:
  """Creates `path` if needed and checks it is a writable directory."""
  path = check_output_dir(path)
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise ValueError(f"output directory {path!r} cannot be created: {e.strerror}") from None
  return path


@contextlib.contextmanager
def atomic_path(path):
  """Yields a temporary path; on success renames it to `path`."""
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.splitext(path)[1])
  os.close(fd)
  umask = os.umask(0)
  os.umask(umask)
  try:
    yield tmp
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_json(path, obj) -> str:
  """Writes `obj` as indented JSON, atomically."""
  with atomic_path(path) as tmp:
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(obj, f, indent=2, default=_to_builtin)
      f.write("\n")
  return os.fspath(path)


def save_figure(fig, path, **kwargs) -> str:
  """Saves a matplotlib figure as PNG, atomically."""
  with atomic_path(path) as tmp:
    fig.savefig(tmp, format="png", **kwargs)
  return os.fspath(path)


def _to_builtin(obj):
  if isinstance(obj, np.ndarray):
    return obj.tolist()
  if isinstance(obj, np.generic):
    return obj.item()
  raise TypeError(f"cannot serialize {type(obj).__name__}")
