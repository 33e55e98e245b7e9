"""Checkpoint and resume of `fit_em`'s state with `tf.train.Checkpoint`.

The state is: the restart index, the iteration, the params at the top of the
loop, the log-likelihood trace and trajectory so far, the restarts already
finished, and the restart seeds (all randomness in `fit_em` flows from
them). A checkpoint is written under a fresh prefix and only then named in
`latest.json` (written atomically), so a run killed mid-write resumes from
the previous complete checkpoint.

Resuming replays the same deterministic iterations, so a resumed fit returns
the same parameters as an uninterrupted one.
"""
from __future__ import annotations

import glob
import json
import os

import numpy as np
import tensorflow as tf

from tfp_em.engine import outputs
from tfp_em.engine.results import RestartTrace

LATEST = "latest.json"


class Checkpointer:
  """Saves and loads the engine state in `directory` every `every` iterations."""

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

  def save(self, state: dict) -> None:
    arrays, meta = {}, dict(fingerprint=self.fingerprint, restart=state["restart"],
                            iteration=state["iteration"], seeds=state["seeds"],
                            e_steps=state["e_steps"], finished=[])
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
    outputs.write_json(os.path.join(self.directory, LATEST), {"prefix": os.path.basename(written)})
    _remove_others(self.directory, os.path.basename(written))

  # -- reading ----------------------------------------------------------------
  def load(self, params_type):
    """The saved state (dict), or None when the directory has no checkpoint."""
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
    if meta["fingerprint"] != self.fingerprint:
      raise ValueError(f"checkpoint in {self.directory!r} belongs to another fit "
                       f"({meta['fingerprint']}); expected {self.fingerprint}. "
                       "Use another checkpoint_dir or delete it.")
    finished = []
    for i, info in enumerate(meta["finished"]):
      ll, traj = _get_restart(get, f"finished{i}", params_type, meta["fields"])
      finished.append(RestartTrace(log_likelihood=ll, params=traj, **info))
    ll, traj = _get_restart(get, "current", params_type, meta["fields"])
    return dict(restart=meta["restart"], iteration=meta["iteration"], seeds=meta["seeds"],
                e_steps=meta["e_steps"], log_likelihood=list(ll), trajectory=traj,
                finished=finished)


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
