"""The generic fit loop.

Every model subclasses `EMModel` (`tfp_em.engine.protocol`); `fit_em` runs restarts, tracks the
log-likelihood at the parameters it returns, guards monotonicity and warns
when the iteration limit is hit.

Loop invariant: `loglik[t]` is log p(data | params_t), computed by the E-step
at params_t. The loop stops *before* an M-step, so the returned parameters are
always the ones at which the returned log-likelihood was computed (unlike
scikit-learn's `lower_bound_`, which lags one M-step).
"""
from __future__ import annotations

import os
import time
import warnings
from typing import Callable

import numpy as np
import tensorflow as tf

from tfp_em.engine import squarem
from tfp_em.engine.checkpoint import Checkpointer, fingerprint
from tfp_em.engine.compiling import compiled
from tfp_em.engine.passes import InMemoryPass, make_pass
from tfp_em.engine.protocol import (ConvergenceWarning, EMModel, LikelihoodDecreaseError,
                                    LikelihoodDecreaseWarning, NumericalFailureError)
from tfp_em.engine.results import FitResult, RestartTrace, restart_seeds, to_numpy, to_tensors

ON_DECREASE_OPTIONS = ("raise", "warn", "revert")


def progress_enabled(progress: bool | None) -> bool:
  """Whether to show a progress bar: `progress`, or when None, on except under pytest."""
  if progress is not None:
    return bool(progress)
  return "PYTEST_CURRENT_TEST" not in os.environ


def default_decrease_tol(dtype) -> float:
  """Relative slack below which a drop in loglik counts as round-off.

  1000 machine epsilons of the compute dtype: 2.2e-13 in float64, 1.2e-4 in
  float32. Sums over N points carry O(log N * eps) relative error.
  """
  return 1e3 * float(np.finfo(np.dtype(dtype)).eps)


def fit_em(model: EMModel, data, *, max_iter: int = 100, tol: float = 1e-5,
           n_init: int = 1, seed: int | None = 0, init_params=None,
           on_decrease: str = "warn", decrease_tol: float | None = None,
           compile: str | None = None, keep_trajectory: bool = True,
           progress: bool | None = None, callback: Callable | None = None,
           accelerate: str | None = None, strategy=None,
           checkpoint_dir=None, checkpoint_every: int = 10,
           resume: bool = False) -> FitResult:
  """Fits `model` to `data` by EM with restarts.

  Args:
    model: an `EMModel`.
    data: what the model's steps take (a NamedTuple of tensors), or a
      `tf.data.Dataset` of such batches: each iteration is then one pass that
      adds the per-batch stats, with memory bounded by the batch size, and
      `model.initialize` sees the first batch.
    max_iter: maximum number of M-steps per restart.
    tol: convergence when 0 <= mean_t - mean_{t-1} <= tol * max(1, |mean_t|),
      where mean_t is the log-likelihood per observation. Relative, so it
      does not depend on N.
    n_init: number of restarts; the best final log-likelihood wins.
    seed: integer seed; restart i gets `restart_seeds(seed, n_init)[i]`.
    init_params: params to start the first restart from (others still use
      `model.initialize`).
    on_decrease: what to do when loglik drops by more than round-off:
      'raise' (LikelihoodDecreaseError), 'warn' (warn, keep iterating, never
      call it convergence) or 'revert' (return the params before the drop).
    decrease_tol: relative round-off slack; defaults to
      `default_decrease_tol(dtype)`.
    compile: 'eager', 'graph' (tf.function) or 'xla' (jit_compile=True);
      None (default) uses the model's own `compile`.
    keep_trajectory: keep the params of every iteration (for diagnostics).
    progress: show a progress bar; None means on, except under pytest.
    callback: optional `callback(restart, iteration, params, loglik)`.
    accelerate: None (plain EM) or 'squarem' (`tfp_em.squarem`; needs the
      model's `param_specs`). SQUAREM iterations use several E-steps each;
      `RestartTrace.e_steps` counts them.
    strategy: a `tf.distribute` strategy; the E-step runs on every replica
      and the stats are all-reduced by SUM.
    checkpoint_dir: save the engine state there (`tfp_em.checkpoint`) every
      `checkpoint_every` iterations and when a restart starts; a last
      checkpoint marks the fit complete.
    resume: continue from the checkpoint in `checkpoint_dir` if there is
      one, otherwise start afresh. The checkpoint must belong to the same
      fit (model, configuration, settings and data: see
      `tfp_em.engine.checkpoint.fingerprint`); a complete fit is returned as
      saved, without fitting again.

  Returns:
    A `FitResult`.

  Raises:
    CheckpointMismatchError: `resume=True` with a checkpoint of another fit
      (a ValueError naming what changed); nothing is written.
    LikelihoodDecreaseError: on a decrease with `on_decrease='raise'`.
    NumericalFailureError: when the loglik becomes non-finite or a
      factorization fails; the message carries the model's hint.
  """
  if not isinstance(model, EMModel):
    raise TypeError(f"fit_em needs a tfp_em.EMModel instance (subclass tfp_em.EMModel), got "
                    f"{type(model).__name__}")
  compile = model.compile if compile is None else compile
  if on_decrease not in ON_DECREASE_OPTIONS:
    raise ValueError(f"on_decrease must be one of {ON_DECREASE_OPTIONS}, got {on_decrease!r}")
  if not isinstance(max_iter, (int, np.integer)) or max_iter < 0:
    raise ValueError(f"max_iter must be a non-negative integer, got {max_iter!r}")
  if not isinstance(n_init, (int, np.integer)) or n_init < 1:
    raise ValueError(f"n_init must be a positive integer, got {n_init!r}")
  if not (np.isfinite(tol) and tol >= 0):
    raise ValueError(f"tol must be a non-negative number, got {tol!r}")
  if accelerate not in (None, "squarem"):
    raise ValueError(f"accelerate must be None or 'squarem', got {accelerate!r}")

  iteration = Iteration(model, data, compile, accelerate, strategy)
  show = progress_enabled(progress)

  seeds = restart_seeds(seed, n_init)
  saver, saved = None, None
  if checkpoint_dir is not None:
    settings = dict(seed=seed, n_init=n_init, max_iter=max_iter, tol=tol, accelerate=accelerate,
                    keep_trajectory=keep_trajectory, init_params=init_params,
                    on_decrease=on_decrease, decrease_tol=decrease_tol)
    saver = Checkpointer(checkpoint_dir, checkpoint_every,
                         fingerprint(model, iteration.e_pass.first_batch(), settings))
    saved = saver.load(_params_type(model, init_params)) if resume else None
  elif resume:
    raise ValueError("resume=True needs a checkpoint_dir")

  restarts = list(saved["finished"]) if saved else []
  for r in range(len(restarts), n_init):
    resume_state = saved if saved and saved["restart"] == r else None
    if resume_state is not None:
      params = to_tensors(resume_state["trajectory"][-1])
    else:
      params = (init_params if (r == 0 and init_params is not None)
                else model.initialize(iteration.e_pass.first_batch(), seeds[r]))
    restarts.append(_run_restart(
        model, iteration, params, seeds[r], r, max_iter, tol,
        on_decrease, decrease_tol, keep_trajectory, show, callback,
        _Saver(saver, seeds, restarts, keep_trajectory), resume_state))

  n_obs = iteration.e_pass.num_observations
  if saved and saved["complete"]:  # nothing ran: a stream's size is the saved one
    n_obs = saved["num_observations"] if n_obs is None else n_obs
  elif saver is not None:
    saver.save_complete(restarts, seeds, n_obs)
  best = int(np.argmax([t.final_log_likelihood for t in restarts]))
  chosen = restarts[best]
  if not chosen.converged and max_iter > 0 and chosen.stop_reason == "max_iter":
    warnings.warn(
        f"{model.name}: EM did not converge in max_iter={max_iter} iterations "
        f"(tol={tol:g}; last change in mean loglik "
        f"{_last_mean_change(chosen, n_obs):.3g}). Increase max_iter, loosen tol, "
        "or try another initialization.", ConvergenceWarning, stacklevel=2)
  return FitResult(
      params=to_tensors(chosen.final_params),
      log_likelihood=chosen.final_log_likelihood, n_iter=chosen.n_iter,
      converged=chosen.converged, best_restart=best, restarts=tuple(restarts),
      num_observations=n_obs)


def _last_mean_change(trace: RestartTrace, n_obs: float) -> float:
  ll = trace.log_likelihood
  return float((ll[-1] - ll[-2]) / n_obs) if len(ll) > 1 else float("nan")


class Iteration:
  """E-pass, M-step and how to go from one iterate to the next.

  Over in-memory data (compiled, `model.fuse_steps` not False) one compiled
  call does a whole iteration: plain EM returns (M(E(params)), loglik(params));
  SQUAREM returns a `squarem.Cycle` (three E-steps), which the stepper then
  accepts or backtracks from. Plain EM makes the same call on the last
  iteration (`last=True`) and drops the step, so one trace serves the whole
  fit; SQUAREM makes a plain E-pass there. The loop discards the step when it
  stops, so the reported loglik is always at the returned params.
  """

  def __init__(self, model, data, compile, accelerate, strategy):
    self.e_pass = make_pass(model, data, compile, strategy)
    self.m_step = compiled(model, "m_step", lambda m: m.m_step, compile)
    fusable = (isinstance(self.e_pass, InMemoryPass) and compile != "eager"
               and model.fuse_steps)
    self.fused, self.stepper = None, None
    if accelerate == "squarem":
      self.stepper = squarem.SquaremStepper(model, self.e_pass, self.m_step,
                                            fuse=compile if fusable else None)
      if fusable:
        self.fused = compiled(model, "squarem_cycle", squarem.fused_cycle, compile,
                              data_arg=-1)
    elif fusable:
      self.fused = compiled(model, "em_step", _em_step, compile, data_arg=-1)

  def evaluate(self, params, last: bool):
    """(stats or None, loglik at params, fused step or None, E-passes used)."""
    if self.fused is not None and self.stepper is None:
      try:
        new, ll = self.fused(params, self.e_pass.data)
      except tf.errors.InvalidArgumentError:  # the M-step failed: raise, unless it is not needed
        if not last:
          raise
      else:
        return None, ll, None if last else new, 1
    elif self.fused is not None and not last:
      try:
        cycle = self.fused(params, self.e_pass.data)
      except tf.errors.InvalidArgumentError:  # a factorization failed: go step by step
        pass
      else:
        return None, cycle.loglik0, cycle, squarem.FUSED_E_STEPS
    stats, ll = self.e_pass(params)
    return stats, ll, None, 1

  def advance(self, params, stats, ll, new):
    """(next params, extra E-passes used)."""
    if new is not None:
      return self.stepper.finish(params, ll, new) if self.stepper is not None else (new, 0)
    if self.stepper is not None:
      return self.stepper(params, stats, ll)
    return self.m_step(params, stats), 0


def _em_step(model):
  """`(params, data) -> (M(E(params)), loglik(params))`, to be compiled."""
  def step(params, data):
    stats, ll = model.e_step(params, data)
    return model.m_step(params, stats), ll
  return step


def _params_type(model, init_params):
  if init_params is not None:
    return type(init_params)
  specs = model.param_specs
  if specs is None:
    raise ValueError(f"{model.name}: resuming needs `param_specs` or `init_params` to know "
                     "the params type")
  return type(specs)


class _Saver:
  """Packs the loop's state for the checkpointer (no-op without one)."""

  def __init__(self, checkpointer, seeds, finished, keep_trajectory):
    self.checkpointer, self.seeds = checkpointer, seeds
    self.finished, self.keep_trajectory = finished, keep_trajectory

  def __call__(self, restart, it, lls, trajectory, previous, params, e_steps):
    if self.checkpointer is None:
      return
    saved = (trajectory if self.keep_trajectory else
             [trajectory[0]] + ([previous] if previous is not None else []) + [to_numpy(params)])
    self.checkpointer.maybe_save(dict(restart=restart, iteration=it, seeds=self.seeds,
                                      e_steps=e_steps, log_likelihood=lls, trajectory=saved,
                                      finished=self.finished), it)


def _run_restart(model, iteration, params, seed, restart, max_iter, tol,
                 on_decrease, decrease_tol, keep_trajectory, show,
                 callback, save=None, resume_state=None) -> RestartTrace:
  start = time.perf_counter()
  rtol = default_decrease_tol(_params_dtype(params)) if decrease_tol is None else decrease_tol
  lls, trajectory, previous, first, e_steps = [], [to_numpy(params)], None, 0, 0
  if resume_state is not None:
    saved = resume_state["trajectory"]
    lls, first, e_steps = list(resume_state["log_likelihood"]), resume_state["iteration"], \
        resume_state["e_steps"]
    trajectory = list(saved) if keep_trajectory else saved[:1]
    if first > 0 and len(saved) >= 2:
      previous = to_tensors(saved[-2])
  converged, stop_reason = False, "max_iter"
  bar = _progress_bar(show, max_iter, model.name, restart)
  for it in range(first, max_iter + 1):
    if save is not None and (it > first or resume_state is None):
      save(restart, it, lls, trajectory, None if previous is None else to_numpy(previous),
           params, e_steps)
    stats, ll, new, used = _guarded(model, lambda: iteration.evaluate(params, it == max_iter))
    ll, e_steps = float(ll), e_steps + used
    n_obs = iteration.e_pass.num_observations  # known after the first pass
    if not np.isfinite(ll):
      raise NumericalFailureError(
          f"{model.name}: log-likelihood became {ll} at iteration {it}. "
          f"{model.failure_hint}".strip())
    if callback is not None:
      callback(restart, it, params, ll)
    if lls:
      change, slack = ll - lls[-1], rtol * (abs(lls[-1]) + n_obs)
      if change < -slack:
        message = (f"{model.name}: log-likelihood decreased by {-change:.6g} "
                   f"(from {lls[-1]:.10g} to {ll:.10g}) at iteration {it}, "
                   f"beyond round-off slack {slack:.3g}.")
        if on_decrease == "raise":
          raise LikelihoodDecreaseError(message)
        if on_decrease == "revert":
          params, stop_reason = previous, "reverted"
          if keep_trajectory:
            trajectory.pop()
          break
        warnings.warn(message + " Continuing (on_decrease='warn').",
                      LikelihoodDecreaseWarning, stacklevel=3)
      elif change / n_obs <= tol * max(1.0, abs(ll) / n_obs):
        lls.append(ll)
        converged, stop_reason = True, "converged"
        break
    lls.append(ll)
    if bar is not None:
      bar.update(1)
      bar.set_postfix(mean_loglik=f"{ll / n_obs:.6g}")
    if it == max_iter:
      break
    previous = params
    params, extra = _guarded(model, lambda: iteration.advance(params, stats, ll, new))
    e_steps += extra
    if keep_trajectory:
      trajectory.append(to_numpy(params))
  if bar is not None:
    bar.close()
  final = to_numpy(params)
  trajectory = trajectory if keep_trajectory else [trajectory[0], final]
  return RestartTrace(seed=seed, log_likelihood=np.asarray(lls, np.float64),
                      params=trajectory, converged=converged,
                      n_iter=len(lls) - 1, stop_reason=stop_reason,
                      seconds=time.perf_counter() - start, e_steps=e_steps)


def _params_dtype(params):
  first = params[0]
  dtype = getattr(first, "dtype", np.float64)
  return np.dtype(getattr(dtype, "as_numpy_dtype", dtype))


def _guarded(model, thunk):
  try:
    return thunk()
  except tf.errors.InvalidArgumentError as e:
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise NumericalFailureError(
        f"{model.name}: a numerical operation failed ({first_line[:200]}). "
        f"{model.failure_hint}".strip()) from None


def _progress_bar(show: bool, total: int, name: str, restart: int):
  if not show:
    return None
  from tqdm.auto import tqdm
  return tqdm(total=total + 1, desc=f"{name} restart {restart}", delay=2.0,
              leave=False, disable=None)
