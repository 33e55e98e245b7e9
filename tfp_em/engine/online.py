"""One-pass stochastic (online) EM over a stream of batches.

After batch t, with per-observation stats s_hat_t from the E-step at the
current params:

    s_t = (1 - gamma_t) s_{t-1} + gamma_t s_hat_t,    theta_t = M(s_t)
    gamma_t = (t + t0) ** (-kappa)                        (t = 1, 2, ...)

with kappa in (0.5, 1] (default 0.6) and t0 >= 0 (default 1), so that
sum gamma = inf and sum gamma^2 < inf. The M-step must be invariant to a
common scaling of the stats (true of every model here: counts appear in
ratios). Fields in `model.shared_stats_fields` are re-expressed at the new
batch's value with `model.rebase_stats(old, like=new)` before blending.

#### References

[1] O. Cappé and E. Moulines. On-line expectation-maximization algorithm for
    latent data models. JRSS B, 71(3):593-613, 2009.
"""
from __future__ import annotations

import time

import numpy as np
import tensorflow as tf

from tfp_em.engine.compiling import compile_fn
from tfp_em.engine.passes import StreamPass, check_summable
from tfp_em.engine.results import FitResult, RestartTrace, restart_seeds, to_numpy, to_tensors
from tfp_em.engine.streams import checked_batches


def step_size(t: int, kappa: float = 0.6, t0: float = 1.0) -> float:
  """gamma_t = (t + t0) ** -kappa for t = 1, 2, ..."""
  return float((t + t0) ** (-kappa))


def blend_stats(model, old, new, gamma):
  """(1 - gamma) old + gamma new, shared fields taken from `new`."""
  shared = model.shared_stats_fields
  if old is None:
    return new
  if shared:
    old = model.rebase_stats(old, like=new)
  return type(new)(*[vn if name in shared else (1 - gamma) * vo + gamma * vn
                     for name, vo, vn in zip(new._fields, old, new)])


def scale_stats(model, stats, factor):
  shared = model.shared_stats_fields
  return type(stats)(*[v if name in shared else v * factor
                       for name, v in zip(stats._fields, stats)])


def fit_online_em(model, dataset: tf.data.Dataset, *, epochs: int = 1, kappa: float = 0.6,
                  t0: float = 1.0, seed: int | None = 0, init_params=None,
                  compile: str | None = None, final_pass: bool = True) -> FitResult:
  """Online EM: one M-step per batch, `epochs` passes over `dataset`.

  Args:
    model: an `EMModel` (with `rebase_stats` if it has shared stats fields).
    dataset: a `tf.data.Dataset` of the model's data batches.
    epochs: passes over the data (default 1: one-pass online EM).
    kappa, t0: step-size schedule gamma_t = (t + t0) ** -kappa.
    seed: seed for `model.initialize` (which sees the first batch).
    init_params: start here instead of `model.initialize`.
    compile: 'graph', 'xla' or 'eager'; None (default) uses the model's own `compile`.
    final_pass: run one exact E-pass at the final params so that the
      reported log-likelihood is at the returned params (default True).

  Returns:
    A `FitResult`; its trace holds the mean log-likelihood of each batch at
    the params before that batch's update (times the batch size), and the
    exact total at the end when `final_pass`.
  """
  if not 0.5 < kappa <= 1.0:
    raise ValueError(f"kappa must be in (0.5, 1], got {kappa}")
  if t0 < 0:
    raise ValueError(f"t0 must be >= 0, got {t0}")
  if not isinstance(epochs, int) or epochs < 1:
    raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
  check_summable(model, "across the batches of online EM")
  start = time.perf_counter()
  compile = model.compile if compile is None else compile
  e_step = compile_fn(model.e_step, compile, data_arg=-1)
  m_step = compile_fn(model.m_step, compile)
  first = next(checked_batches(dataset), None)
  if first is None:
    raise ValueError("the dataset is empty: no batches")
  seed_r = restart_seeds(seed, 1)[0]
  params = init_params if init_params is not None else model.initialize(first, seed_r)
  running, t, batch_lls, trajectory = None, 0, [], [to_numpy(params)]
  for _ in range(epochs):
    for batch in checked_batches(dataset):
      t += 1
      stats, ll = e_step(params, batch)
      n = float(model.num_observations(batch))
      batch_lls.append(float(ll))
      running = blend_stats(model, running, scale_stats(model, stats, 1.0 / n),
                            step_size(t, kappa, t0))
      params = m_step(params, running)
      trajectory.append(to_numpy(params))
  lls = np.asarray(batch_lls, np.float64)
  n_obs = None
  if final_pass:
    exact = StreamPass(model, dataset, compile)
    _, ll = exact(params)
    lls = np.append(lls, float(ll))
    n_obs = exact.num_observations
  trace = RestartTrace(seed=seed_r, log_likelihood=lls, params=trajectory, converged=False,
                       n_iter=t, stop_reason="online", seconds=time.perf_counter() - start,
                       e_steps=t + int(final_pass))
  return FitResult(params=to_tensors(params),
                   log_likelihood=float(lls[-1]) if final_pass else float("nan"),
                   n_iter=t, converged=False, best_restart=0, restarts=(trace,),
                   num_observations=n_obs if n_obs is not None else float("nan"))
