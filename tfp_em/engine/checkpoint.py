"""Checkpoint and resume of `fit_em`'s state with `tf.train.Checkpoint`.

The state is: the restart index, the iteration, the params at the top of the
loop, the log-likelihood trace and trajectory so far, the restarts already
finished, and the restart seeds (all randomness in `fit_em` flows from
them). A checkpoint is written under a fresh prefix and only then named in
`latest.json` (written atomically), so a run killed mid-write resumes from
the previous complete checkpoint.

Resuming replays the same deterministic iterations, so a resumed fit returns
the same parameters as an uninterrupted one. When every restart has ended a
last checkpoint marks the fit complete: resuming it returns the saved result
without fitting again.

Every checkpoint records a fingerprint of the fit it belongs to
(`fingerprint`): the model's class and configuration (its instance
attributes), the loop's settings (seed, n_init, max_iter, tol, ...; a hash of
`init_params`) and the data: per array its shape, dtype, column sums and a
hash of a strided sample of at most `SAMPLE_ROWS` rows (streamed data: of
the first batch). Resuming with any of these different raises a
`CheckpointMismatchError` naming what changed, before anything is written.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import types

import numpy as np
import tensorflow as tf

from tfp_em.engine import outputs
from tfp_em.engine.results import RestartTrace

LATEST = "latest.json"
FORMAT = 2           # of the fingerprint; checkpoints of another format are refused
SAMPLE_ROWS = 1024   # rows hashed per data array (strided over all rows)
MAX_SUMS = 64        # column sums kept in the fingerprint (more columns: hashed only)
MAX_CHANGES = 5      # changes named in a mismatch message
FUNCTIONS = (types.FunctionType, types.BuiltinFunctionType, types.MethodType)


class CheckpointMismatchError(ValueError):
  """The checkpoint to resume belongs to another fit.

  Attributes:
    directory: the checkpoint folder.
    changes: what differs, one phrase each ('n_components 3 -> 2').
    summary: the first `MAX_CHANGES` of them in one line.
  """

  def __init__(self, directory, changes):
    self.directory, self.changes = directory, list(changes)
    more = len(self.changes) - MAX_CHANGES
    self.summary = "; ".join(self.changes[:MAX_CHANGES]) + (f"; and {more} more" if more > 0
                                                             else "")
    super().__init__(f"checkpoint in {directory!r} belongs to another fit: {self.summary}. "
                     "Resume only the same fit: start over with resume=False (the checkpoint is "
                     "replaced) or use another checkpoint_dir")


class Checkpointer:
  """Saves and loads the engine state in `directory` every `every` iterations.

  `fingerprint` (from `fingerprint()`) names the fit; `load` refuses a
  checkpoint with another one.
  """

  def __init__(self, directory, every: int, fingerprint: dict):
    if not isinstance(every, int) or every < 1:
      raise ValueError(f"checkpoint_every must be a positive integer, got {every!r}")
    self.directory = outputs.ensure_writable_dir(directory)
    self.every = every
    self.fingerprint = fingerprint
    self._count = 0

  # -- writing ----------------------------------------------------------------
  def maybe_save(self, state: dict, iteration: int) -> None:
    if iteration % self.every == 0:
      self.save(state)

  def save(self, state: dict, complete: bool = False, num_observations=None) -> None:
    """Writes `state`; `complete` marks a fit whose restarts have all ended."""
    arrays, meta = {}, dict(fingerprint=self.fingerprint, restart=state["restart"],
                            iteration=state["iteration"], seeds=state["seeds"],
                            e_steps=state["e_steps"], finished=[], complete=complete,
                            num_observations=num_observations)
    _put_restart(arrays, "current", state["log_likelihood"], state["trajectory"])
    meta["fields"] = list(state["trajectory"][0]._fields)
    for i, trace in enumerate(state["finished"]):
      _put_restart(arrays, f"finished{i}", trace.log_likelihood, trace.params)
      meta["finished"].append(dict(seed=trace.seed, converged=trace.converged,
                                   n_iter=trace.n_iter, stop_reason=trace.stop_reason,
                                   seconds=trace.seconds, e_steps=trace.e_steps))
    variables = {k: tf.Variable(v, shape=tf.TensorShape(None), trainable=False)
                 for k, v in arrays.items()}
    variables["meta"] = tf.Variable(json.dumps(meta), trainable=False)
    self._count += 1
    prefix = os.path.join(self.directory, f"ckpt-{os.getpid()}-{self._count}")
    written = tf.train.Checkpoint(**variables).write(prefix)
    outputs.write_json(os.path.join(self.directory, LATEST),
                       {"prefix": os.path.basename(written), "complete": complete})
    _remove_others(self.directory, os.path.basename(written))

  def save_complete(self, restarts, seeds, num_observations) -> None:
    """Marks the fit complete: every restart's trace, nothing left to run."""
    last = restarts[-1]
    self.save(dict(restart=len(restarts), iteration=last.n_iter, seeds=seeds,
                   e_steps=last.e_steps, log_likelihood=last.log_likelihood[-1:],
                   trajectory=last.params[-1:], finished=restarts),
              complete=True, num_observations=num_observations)

  # -- reading ----------------------------------------------------------------
  def load(self, params_type):
    """The saved state (dict), or None when the directory has no checkpoint.

    Raises:
      CheckpointMismatchError: the checkpoint belongs to another fit.
      ValueError: the checkpoint cannot be read.
    """
    pointer = os.path.join(self.directory, LATEST)
    if not os.path.exists(pointer):
      return None
    try:
      with open(pointer, encoding="utf-8") as f:
        prefix = os.path.join(self.directory, json.load(f)["prefix"])
      reader = tf.train.load_checkpoint(prefix)
      get = lambda name: reader.get_tensor(f"{name}/.ATTRIBUTES/VARIABLE_VALUE")
      meta = json.loads(get("meta").decode() if isinstance(get("meta"), bytes) else get("meta"))
    except (OSError, ValueError, KeyError, TypeError, tf.errors.OpError) as e:
      first = (str(e).strip().splitlines() or [type(e).__name__])[0][:150]
      raise ValueError(f"checkpoint in {self.directory!r} cannot be read ({first}); delete "
                       "it to start afresh") from None
    changes = describe_changes(meta["fingerprint"], self.fingerprint)
    if changes:
      raise CheckpointMismatchError(self.directory, changes)
    finished = []
    for i, info in enumerate(meta["finished"]):
      ll, traj = _get_restart(get, f"finished{i}", params_type, meta["fields"])
      finished.append(RestartTrace(log_likelihood=ll, params=traj, **info))
    ll, traj = _get_restart(get, "current", params_type, meta["fields"])
    return dict(restart=meta["restart"], iteration=meta["iteration"], seeds=meta["seeds"],
                e_steps=meta["e_steps"], log_likelihood=list(ll), trajectory=traj,
                finished=finished, complete=meta["complete"],
                num_observations=meta["num_observations"])


def holds_complete_fit(directory) -> bool:
  """Whether `directory` holds a checkpoint of a fit whose restarts all ended
  (which fit is checked on resume, by the fingerprint)."""
  try:
    with open(os.path.join(directory, LATEST), encoding="utf-8") as f:
      return json.load(f).get("complete") is True
  except (OSError, ValueError, AttributeError):
    return False


# -- fingerprints ---------------------------------------------------------------

def fingerprint(model, data, settings: dict) -> dict:
  """What a checkpoint belongs to, as plain JSON values.

  Args:
    model: the `EMModel`; its class and instance attributes are recorded.
    data: the model's data (a tuple of arrays or tensors), or the first batch
      of streamed data.
    settings: the loop's settings (seed, n_init, ...); arrays among them
      (init params) are recorded by a hash.
  """
  cls = type(model)
  record = dict(format=FORMAT, model=f"{cls.__module__}.{cls.__qualname__}",
                config={k: _plain(v) for k, v in sorted(vars(model).items())},
                settings={k: _plain(v) for k, v in sorted(settings.items())},
                data=data_fingerprint(data))
  return json.loads(json.dumps(record))  # as it reads back: tuples become lists


def data_fingerprint(data) -> dict:
  """{name: {shape, dtype, column_sums, sample}} for each array in `data`.

  Column sums (over rows, each array seen as [N, -1]) are kept when there
  are at most `MAX_SUMS` columns, else hashed; `sample` hashes every
  ceil(N / SAMPLE_ROWS)-th row. Cost: one pass over the data.
  """
  arrays = tf.nest.flatten(data)
  fields = getattr(type(data), "_fields", ())  # NamedTuples name their arrays
  names = list(fields) if len(fields) == len(arrays) else [f"data[{i}]" for i in
                                                           range(len(arrays))]
  return {name: _array_fingerprint(np.asarray(a)) for name, a in zip(names, arrays)}


def _array_fingerprint(a: np.ndarray) -> dict:
  out = dict(shape=list(a.shape), dtype=str(a.dtype))
  if a.ndim == 0 or a.size == 0:
    out["sample"] = _hash(a)
    return out
  rows = a.reshape(a.shape[0], -1)                              # [N, columns]
  sample = np.ascontiguousarray(rows[::-(-rows.shape[0] // SAMPLE_ROWS)])
  if np.issubdtype(a.dtype, np.number) or a.dtype == bool:
    sums = rows.sum(axis=0, dtype=np.float64)                   # [columns]
    out["column_sums"] = ([float(f"{s:.12g}") for s in sums] if sums.size <= MAX_SUMS
                          else _hash(sums))
  out["sample"] = _hash(sample)
  return out


def describe_changes(saved: dict, current: dict) -> list[str]:
  """What differs between two fingerprints, one phrase each ('' when equal)."""
  if saved.get("format") != current["format"]:
    return ["the checkpoint was written by another version of tfp_em"]
  changes = []
  if saved["model"] != current["model"]:
    changes.append(f"model {saved['model']} -> {current['model']}")
  for part in ("config", "settings"):
    old, new = saved[part], current[part]
    differ = [key for key in set(old) | set(new) if old.get(key) != new.get(key)]
    for key in sorted(differ, key=lambda k: (_is_repr(new.get(k)), k)):  # plain values first
      changes.append(f"{key} {old.get(key)!r} -> {new.get(key)!r}")
  for name in sorted(set(saved["data"]) | set(current["data"])):
    changes += _data_changes(name, saved["data"].get(name), current["data"].get(name))
  return changes


def _data_changes(name, old, new) -> list[str]:
  if old is None or new is None:
    return [f"data array {name!r} {'added' if old is None else 'missing'}"]
  if old["shape"] != new["shape"]:
    return [f"data {name} shape {tuple(old['shape'])} -> {tuple(new['shape'])}"]
  if old["dtype"] != new["dtype"]:
    return [f"data {name} dtype {old['dtype']} -> {new['dtype']}"]
  old_sums, new_sums = old.get("column_sums"), new.get("column_sums")
  if old_sums != new_sums:
    where = ""
    if isinstance(old_sums, list) and isinstance(new_sums, list):
      where = f" in column(s) {[j for j, (a, b) in enumerate(zip(old_sums, new_sums)) if a != b]}"
    return [f"data {name} values changed (column sums differ{where}: other columns, shifted "
            "or edited data?)"]
  if old["sample"] != new["sample"]:
    return [f"data {name} values changed (a sample of rows differs: rows edited or reordered?)"]
  return []


def _is_repr(value) -> bool:
  return isinstance(value, str) and value.endswith(")")


def _plain(value):
  """`value` as a JSON value: numbers, strings and lists as they are, arrays by
  a hash, callables by name, anything else by its repr without addresses."""
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if isinstance(value, dict):
    return {str(k): _plain(v) for k, v in sorted(value.items())}
  if isinstance(value, (np.ndarray, tf.Tensor, tf.Variable)):
    array = np.asarray(value)
    return f"array{list(array.shape)} {array.dtype} #{_hash(array)}"
  if isinstance(value, FUNCTIONS):  # by name, not address
    return f"{value.__module__}.{value.__qualname__}"
  return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(value))[:300]


def _hash(array) -> str:
  array = np.ascontiguousarray(array)
  digest = hashlib.sha256(str((array.shape, array.dtype.str)).encode())
  digest.update(array.tobytes() if array.dtype != object else repr(array.tolist()).encode())
  return digest.hexdigest()[:16]


def _put_restart(arrays, name, lls, trajectory):
  arrays[f"{name}_ll"] = np.asarray(lls, np.float64)
  for field in trajectory[0]._fields:
    arrays[f"{name}_{field}"] = np.stack([np.asarray(getattr(p, field)) for p in trajectory])


def _get_restart(get, name, params_type, fields):
  ll = np.asarray(get(f"{name}_ll"), np.float64)
  stacked = [get(f"{name}_{field}") for field in fields]
  trajectory = [params_type(*[s[t] for s in stacked]) for t in range(stacked[0].shape[0])]
  return ll, trajectory


def _remove_others(directory, keep):
  for path in glob.glob(os.path.join(directory, "ckpt-*")):
    if not os.path.basename(path).startswith(keep + "."):
      try:
        os.remove(path)
      except OSError:
        pass
