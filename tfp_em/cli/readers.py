"""Data files the command line reads: CSV with named errors, and the shipped Old Faithful data."""
from __future__ import annotations

import csv
import os
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
  path = resources.files("tfp_em.cli") / "data" / "old_faithful.csv"
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
