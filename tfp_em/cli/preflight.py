"""Checks of the command line's arguments and files, in plain Python.

They run before TensorFlow is imported (15-25 s on a loaded machine), so a
missing file, a bad column or an occupied output folder is reported at once.
Each raises a ValueError whose message names the option and the problem.
"""
from __future__ import annotations

import argparse
import os

# First bytes of the two netCDF formats: HDF5 (netCDF-4) and classic netCDF.
NETCDF_MAGIC = (b"\x89HDF\r\n\x1a\n", b"CDF")


def int_at_least(minimum: int, name: str | None = None):
  """An argparse `type`: an integer >= `minimum`, else a one-line error naming
  the estimator's parameter `name` (e.g. n_components) when given."""
  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"invalid int value {text!r}") from None
    if value < minimum:
      what = f" ({name})" if name else ""
      raise argparse.ArgumentTypeError(f"must be at least {minimum}{what}, got {value}")
    return value
  parse.__name__ = f"integer >= {minimum}"
  return parse


def output_folder(path, writes, overwrite: bool = False, keep=()) -> str:
  """Checks that `path` is, or can be made, a folder to write a run into.

  Args:
    path: the --out folder.
    writes: names of the files and folders the command writes there.
    overwrite: allow replacing them (--overwrite).
    keep: names among `writes` that may be there already (a checkpoint that
      --resume continues from).

  Returns:
    The absolute path.

  Raises:
    ValueError: the path is a file, sits under a file, is not writable, or
      holds another run's outputs and `overwrite` is False.
  """
  path = os.path.abspath(os.fspath(path))
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f"--out {path!r} is a file, not a directory")
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise ValueError(f"--out {path!r} cannot be created: {existing!r} is a file")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise ValueError(f"--out {path!r}: {existing!r} is not writable")
  if existing == path and not overwrite:
    found = sorted(n for n in writes if n not in keep and os.path.exists(os.path.join(path, n)))
    if found:
      raise ValueError(f"--out {path!r} holds another run ({', '.join(found)}); pass --overwrite "
                       "to replace it, or choose another folder")
  return path


def existing_file(path) -> str:
  """`path` as a string, if it names a file."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ValueError(f"{path!r} does not exist or is not a file")
  return path


def netcdf_file(path) -> str:
  """Checks that `path` is a file that starts like a netCDF file."""
  path = existing_file(path)
  with open(path, "rb") as f:
    head = f.read(8)
  if not any(head.startswith(m) for m in NETCDF_MAGIC):
    raise ValueError(f"{path!r} is not a netCDF file (expected the inference_data.nc that "
                     "`tfp-em fit` or a report writes)")
  return path


def python_file(path) -> str:
  """Checks that `path` is a Python file that compiles (syntax only; nothing runs)."""
  path = existing_file(path)
  try:
    with open(path, "rb") as f:
      compile(f.read(), path, "exec", dont_inherit=True)
  except SyntaxError as e:
    raise ValueError(f"{path}, line {e.lineno}: SyntaxError: {e.msg}") from None
  except ValueError as e:  # null bytes
    raise ValueError(f"{path}: not Python source ({e})") from None
  return path


def components(k: int, n_points: int, data: str) -> int:
  """Checks --components against the number of data rows."""
  if k > n_points:
    raise ValueError(f"--components {k} needs at least as many points; {data} has {n_points}")
  return k
