"""File input and output: CSV loading with named errors, atomic writes.

Every output file is written to a temporary file in the same folder and then
renamed over the target, so a killed run never leaves a truncated file that
looks valid.
"""
from __future__ import annotations

import contextlib
import csv
import json
import os
import tempfile
from importlib import resources

import numpy as np


def load_old_faithful() -> tuple[np.ndarray, list[str]]:
  """Old Faithful geyser data (272 eruptions; public domain).

  Returns:
    (X [272, 2], ['eruptions', 'waiting']): eruption length in minutes and
    waiting time to the next eruption in minutes.

  #### References

  [1] W. Härdle. Smoothing Techniques with Implementation in S. Springer, 1991.
  """
  path = resources.files("tfp_em") / "data" / "old_faithful.csv"
  with resources.as_file(path) as p:
    return load_csv(p)


def load_csv(path, columns=None) -> tuple[np.ndarray, list[str]]:
  """Reads numeric columns of a CSV file with a header row.

  Args:
    path: the file.
    columns: names of the columns to keep (default: all).

  Returns:
    (array [N, len(columns)] float64, column names).

  Raises:
    ValueError: naming the problem (missing file, empty file, header only,
      missing column, ragged row, non-numeric or non-finite cell).
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise ValueError(f"data file {path!r} does not exist")
  if os.path.isdir(path):
    raise ValueError(f"data file {path!r} is a directory, not a CSV file")
  try:
    with open(path, newline="", encoding="utf-8") as f:
      rows = list(csv.reader(f))
  except UnicodeDecodeError:
    raise ValueError(f"{path}: not a UTF-8 text CSV file") from None
  except csv.Error as e:
    raise ValueError(f"{path}: malformed CSV ({e})") from None
  # Skip blank lines only: a row of empty cells (",,") is missing data, reported below.
  rows = [r for r in rows if len(r) > 1 or (r and r[0].strip())]
  if not rows:
    raise ValueError(f"{path}: the file is empty; expected a header row and data rows")
  header = [h.strip() for h in rows[0]]
  if len(rows) == 1:
    raise ValueError(f"{path}: the file has a header but no data rows")
  if len(set(header)) != len(header):
    raise ValueError(f"{path}: duplicate column names in header {header}")
  wanted = list(columns) if columns else header
  missing = [c for c in wanted if c not in header]
  if missing:
    raise ValueError(f"{path}: column(s) {missing} not found; available: {header}")
  index = [header.index(c) for c in wanted]
  out = np.empty((len(rows) - 1, len(index)))
  for i, row in enumerate(rows[1:], start=2):
    if len(row) != len(header):
      raise ValueError(f"{path}: line {i} has {len(row)} fields but the header has "
                       f"{len(header)}")
    for j, col in enumerate(index):
      cell = row[col].strip()
      try:
        out[i - 2, j] = float(cell)
      except ValueError:
        raise ValueError(f"{path}: line {i}, column {header[col]!r}: {cell!r} is not "
                         "a number") from None
      if not np.isfinite(out[i - 2, j]):
        raise ValueError(f"{path}: line {i}, column {header[col]!r}: {cell!r} is not finite")
  return out, wanted


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
