"""Input checks shared by every estimator and the CLI.

Each check returns a fresh array (the caller's input is never modified) or
raises a `ValueError` whose message names the argument and the problem
(scikit-learn's conventions where its estimator checks fix the type: a
`TypeError` for an object array holding non-numbers, a `NotFittedError` before
fit).
"""
from __future__ import annotations

from numbers import Integral, Real

import numpy as np
from scipy import sparse
from sklearn.exceptions import NotFittedError
from sklearn.utils.validation import validate_data

DTYPES = {"float64": np.float64, "float32": np.float32}


def check_dtype(dtype) -> np.dtype:
  """'float64' | 'float32' | np/tf dtype -> numpy dtype."""
  name = getattr(dtype, "name", None) or getattr(dtype, "__name__", None) or str(dtype)
  name = {"double": "float64", "float": "float32"}.get(name, name)
  if name not in DTYPES:
    raise ValueError(f"dtype must be 'float64' or 'float32', got {dtype!r}")
  return np.dtype(DTYPES[name])


def check_option(name: str, value, allowed) -> str:
  if not isinstance(value, str) or value not in allowed:
    raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")
  return value


def check_int(name: str, value, minimum: int = None, maximum: int = None) -> int:
  if isinstance(value, bool) or not isinstance(value, Integral):
    raise ValueError(f"{name} must be an integer, got {value!r}")
  if minimum is not None and value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value}")
  if maximum is not None and value > maximum:
    raise ValueError(f"{name} must be <= {maximum}, got {value}")
  return int(value)


def check_float(name: str, value, minimum: float = None, strict: bool = False) -> float:
  if isinstance(value, bool) or not isinstance(value, Real) or not np.isfinite(value):
    raise ValueError(f"{name} must be a finite number, got {value!r}")
  if minimum is not None and (value < minimum or (strict and value == minimum)):
    raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum}, got {value}")
  return float(value)


def check_interval_level(level) -> float:
  """A predictive-interval level in (0, 1)."""
  level = check_float("level", level, minimum=0., strict=True)
  if level >= 1.:
    raise ValueError(f"level must be < 1, got {level}")
  return level


def check_seed(seed):
  if seed is None:
    return None
  return check_int("seed", seed, minimum=0)


def check_array(X, name: str = "X", *, ndim: int = 2, dtype=np.float64,
                min_rows: int = 1, allow_nonfinite: bool = False, allow_nan: bool = False,
                nan_hint: str = "") -> np.ndarray:
  """Validates a numeric array and returns a C-contiguous copy in `dtype`.

  `allow_nan`: NaN (and pandas' missing values) are kept, as NaN; `nan_hint`
  ends the message that rejects them otherwise.
  """
  if sparse.issparse(X):
    raise ValueError(f"{name} is a scipy sparse matrix: sparse matrices are not supported; call "
                     f"{name}.toarray() for a dense array")
  if hasattr(X, "numpy") and callable(X.numpy):
    X = X.numpy()
  if _is_pandas(X) and allow_nan:
    X = _pandas_with_nan(X)
  elif _is_pandas(X):
    _check_no_missing(X, name, nan_hint)
  try:
    arr = np.array(X, copy=True)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{name} could not be read as an array: {e}") from None
  if arr.dtype == object:  # numbers held in an object array are read as numbers
    arr = _object_as_float(arr, name)
  if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
    raise ValueError(f"{name} must be numeric, got an array of dtype {arr.dtype}")
  if np.iscomplexobj(arr):
    raise ValueError(f"{name} must be real-valued (Complex data not supported), got dtype "
                     f"{arr.dtype}")
  if arr.ndim != ndim:
    shape_hint = (f" (Reshape your data with {name}.reshape(-1, 1) if it has a single feature)"
                  if ndim == 2 and arr.ndim == 1 else "")
    raise ValueError(f"{name} must be {ndim}-D, got shape {arr.shape}{shape_hint}")
  if arr.shape[0] < min_rows:
    raise ValueError(f"{name} needs at least {min_rows} rows, got n_samples={arr.shape[0]}")
  if ndim == 2 and arr.shape[1] < 1:
    raise ValueError(f"{name} needs at least one column: 0 feature(s) (shape={arr.shape}) while "
                     "a minimum of 1 is required.")
  target = np.dtype(dtype)
  if not allow_nonfinite:  # checked before the cast, which would overflow with a warning
    _check_finite_and_in_range(arr, name, target, allow_nan, nan_hint)
  return np.ascontiguousarray(arr, dtype=target)


def _check_finite_and_in_range(arr: np.ndarray, name: str, target: np.dtype,
                               allow_nan: bool = False, nan_hint: str = "") -> None:
  """No NaN (unless `allow_nan`) or inf, and for a float `target`, values whose
  squares (summed over the rows) stay finite in it."""
  if arr.dtype == bool:
    return
  bad = np.isinf(arr) if allow_nan else ~np.isfinite(arr)
  if np.any(bad):
    first = np.argwhere(bad)[0]
    kind = "NaN" if np.isnan(arr[tuple(first)]) else "inf"
    raise ValueError(f"{name} contains {kind} (first at index {tuple(int(i) for i in first)}); "
                     "remove or impute non-finite values" + (nan_hint if kind == "NaN" else ""))
  if np.all(np.isnan(arr)):
    return
  if arr.size and np.issubdtype(target, np.floating):
    limit = 1e-4 * float(np.sqrt(np.finfo(target).max))  # sums of N squares must stay finite
    peak = float(np.nanmax(np.abs(arr)))
    if peak > limit:
      raise ValueError(f"{name} has values up to {peak:.3g}, too large for {target} "
                       f"arithmetic (squares overflow above {limit:.1g}); rescale {name}"
                       + (" or use dtype='float64'" if target != np.float64 else ""))


def _is_pandas(X) -> bool:
  return type(X).__module__.partition(".")[0] == "pandas"


def _pandas_with_nan(frame):
  """A pandas DataFrame or Series as float64 with NaN for its missing values
  (NA, None, NaN); as it is when it holds non-numbers (checked later)."""
  try:
    return frame.to_numpy(dtype=np.float64, na_value=np.nan)
  except (TypeError, ValueError):
    return frame


def _check_no_missing(frame, name: str, nan_hint: str = "") -> None:
  """A pandas DataFrame or Series with missing values (NA, None, NaN; nullable
  dtypes such as Float64 hold pd.NA) gets an error naming the first one."""
  missing = np.asarray(frame.isna())
  if missing.any():
    first = np.argwhere(missing)[0]
    column = f", column {frame.columns[first[1]]!r}" if missing.ndim == 2 else ""
    raise ValueError(f"{name} has {int(missing.sum())} missing value(s) (NA, None or NaN; "
                     f"first at row {int(first[0])}{column}); remove or impute them{nan_hint}")


def _object_as_float(arr: np.ndarray, name: str) -> np.ndarray:
  """An object array of numbers as float64; a `TypeError` for an entry that is
  no number or string (scikit-learn's convention), a ValueError for text."""
  try:
    return arr.astype(np.float64)
  except TypeError as e:
    raise TypeError(f"{name} must be numeric: {e}") from None
  except ValueError as e:
    raise ValueError(f"{name} must be numeric, got an object array with {e}") from None


def check_features(estimator, X, *, reset: bool, name: str = "X", dtype=np.float64,
                   min_rows: int = 1, allow_nan: bool = False, nan_hint: str = "") -> np.ndarray:
  """`check_array(X)` plus scikit-learn's bookkeeping of the columns.

  With `reset=True` (fit) sets `estimator.n_features_in_` and, for a
  DataFrame with string column names, `feature_names_in_`; with `reset=False`
  (predict) checks X against them as scikit-learn does: a different number of
  columns or reordered/renamed columns raise a ValueError, names given on one
  side only warn.

  Returns:
    The checked array, as `check_array` returns it.
  """
  arr = check_array(X, name, dtype=dtype, min_rows=min_rows, allow_nan=allow_nan,
                    nan_hint=nan_hint)
  validate_data(estimator, X if hasattr(X, "columns") else arr, reset=reset,
                skip_check_array=True)
  return arr


def check_sample_weight(sample_weight, n: int, dtype=np.float64) -> np.ndarray:
  """None -> ones; else a finite, non-negative, 1-D weight vector of length n."""
  if sample_weight is None:
    return np.ones(n, dtype=dtype)
  w = check_array(sample_weight, "sample_weight", ndim=1, dtype=dtype, min_rows=0)
  if w.shape[0] != n:
    raise ValueError(f"sample_weight has length {w.shape[0]} but X has {n} rows")
  if np.any(w < 0):
    raise ValueError(f"sample_weight must be non-negative; found {int(np.sum(w < 0))} negative values")
  if not np.sum(w) > 0:
    raise ValueError("sample_weight must have a positive sum; all weights are zero")
  return w


def check_n_features(X: np.ndarray, expected: int, name: str = "X") -> None:
  if X.shape[1] != expected:
    raise ValueError(f"{name} has {X.shape[1]} features but the model was fitted with {expected}")


def check_is_fitted(estimator, attribute: str) -> None:
  """Raises scikit-learn's `NotFittedError` (a ValueError) when `attribute` is missing."""
  if not hasattr(estimator, attribute):
    raise NotFittedError(f"this {type(estimator).__name__} is not fitted yet; call fit() first")
