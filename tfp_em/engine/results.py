"""What a fit returns: one trace per restart and the chosen result."""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import tensorflow as tf


class RestartTrace(NamedTuple):
  """Everything one restart did.

  Attributes:
    seed: the integer seed handed to `model.initialize`.
    log_likelihood: [T+1] loglik at params_0 .. params_T (float64 numpy).
    params: list of params (numpy) at each iteration, or just [initial, final]
      when the trajectory was not kept.
    converged: whether the tolerance was met.
    n_iter: number of M-steps kept (T).
    stop_reason: 'converged', 'max_iter' or 'reverted'.
    seconds: wall time of the restart.
    e_steps: number of E-step passes over the data (SQUAREM uses several per
      iteration; plain EM uses n_iter + 1).
  """
  seed: int
  log_likelihood: np.ndarray
  params: list
  converged: bool
  n_iter: int
  stop_reason: str
  seconds: float
  e_steps: int = 0

  @property
  def final_params(self):
    return self.params[-1]

  @property
  def final_log_likelihood(self) -> float:
    return float(self.log_likelihood[-1])


class FitResult(NamedTuple):
  """Result of `fit_em`: the best restart plus every restart's trace.

  Attributes:
    params: params (as tensors) of the best restart.
    log_likelihood: log p(data | params), exactly at `params`.
    n_iter, converged: of the best restart.
    best_restart: index into `restarts`.
    restarts: tuple of `RestartTrace`, one per restart.
    num_observations: the data's total weight.
  """
  params: Any
  log_likelihood: float
  n_iter: int
  converged: bool
  best_restart: int
  restarts: tuple
  num_observations: float

  @property
  def mean_log_likelihood(self) -> float:
    return self.log_likelihood / self.num_observations


def restart_seeds(seed: int | None, n_init: int) -> list[int]:
  """Independent integer seeds for `n_init` restarts, reproducible from `seed`."""
  children = np.random.SeedSequence(seed).spawn(n_init)
  return [int(c.generate_state(1, dtype=np.uint32)[0]) for c in children]


def to_numpy(params):
  """A params NamedTuple as a NamedTuple of numpy arrays."""
  return type(params)(*[np.array(p) for p in params])


def to_tensors(params):
  """A params NamedTuple (of arrays or tensors) as a NamedTuple of tensors."""
  return type(params)(*[tf.constant(p) for p in params])
