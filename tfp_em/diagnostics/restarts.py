"""Did the restarts find one optimum? (numpy only)

A restart that ends below the best log-likelihood either stopped early on
the same optimum (the tolerance ended it while it was still climbing) or
converged to a different one. Telling them apart by the log-likelihood gap
alone fails: slow EM stops a few 1e-3 below the top. The parameters decide:
the restart's final estimate (labels aligned to the best restart) against the
best one, in standard errors of the best. Closer than `SAME_OPTIMUM_SE` in
every entry is the same optimum, for any inference drawn from the fit.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

SAME_OPTIMUM_SE = 0.5
AT_BEST_PER_POINT = 1e-6  # log-likelihood gap per point under which a restart is at the best


class Outcome(NamedTuple):
  """One restart's outcome.

  Attributes:
    kind: 'best', 'stopped early' (same optimum) or 'different optimum'.
    text: a short description for the restarts table.
    gap: best final log-likelihood minus this restart's.
    distance: largest |theta - theta_best| / SE over the entries.
  """
  kind: str
  text: str
  gap: float
  distance: float


def final_estimates(em_idata, fields) -> np.ndarray:
  """[chain, Q]: each restart's final params (the entries of `fields`, flattened
  in C order and stacked field by field, as `Flattener.constrained`)."""
  post, n_iter = em_idata.posterior, em_idata.sample_stats["n_iter"].values
  rows = []
  for c, n in enumerate(n_iter):
    rows.append(np.concatenate([np.ravel(post[f].values[c, int(n)]) for f in fields]))
  return np.stack(rows)


def restart_outcomes(em_idata, fields, se) -> list[Outcome]:
  """Classifies every restart of an EM fit (see the module docstring).

  Args:
    em_idata: `to_inference_data` output (posterior aligned to the best restart).
    fields: the trainable param fields, in the order of `se`.
    se: [Q] standard errors of the best estimate (entries of `fields`).

  Returns:
    One `Outcome` per restart (chain).
  """
  lp = em_idata.sample_stats["lp"].values
  n_iter = em_idata.sample_stats["n_iter"].values
  reasons = em_idata.sample_stats["stop_reason"].values
  n_obs = em_idata.observed_data.sizes["obs"]
  final = lp[np.arange(lp.shape[0]), n_iter]
  best = int(em_idata.posterior.attrs.get("best_restart", np.argmax(final)))
  theta = final_estimates(em_idata, fields)                       # [C, Q]
  se = np.asarray(se)
  scale = np.where(se > 0, se, np.inf)
  out = []
  for c, n in enumerate(n_iter):
    gap = float(final[best] - final[c])
    distance = float(np.max(np.abs(theta[c] - theta[best]) / scale)) if theta.shape[1] else 0.0
    if gap <= AT_BEST_PER_POINT * n_obs:
      out.append(Outcome("best", "at the best optimum", gap, distance))
      continue
    step = float(lp[c, n] - lp[c, n - 1]) if n >= 1 else 0.0
    how = "max_iter reached" if str(reasons[c]) == "max_iter" else "stopped by tol"
    if distance < SAME_OPTIMUM_SE:
      out.append(Outcome("stopped early", f"same optimum, {how} while still climbing (last step "
                         f"+{step:.2g}, {gap:.2g} below the best, {distance:.2g} SE away)",
                         gap, distance))
    else:
      out.append(Outcome("different optimum", f"different optimum: {gap:.4g} below the best, "
                         f"parameters up to {distance:.3g} SE away", gap, distance))
  return out


def restart_check(outcomes) -> tuple[str, str, bool | None]:
  """(check, value, verdict) for the report's checks table: pass when every
  restart found the best optimum (reached it, or stopped early near it); a
  warning (None) when some converged to a different, lower optimum."""
  kinds = [o.kind for o in outcomes]
  at_best, early, other = (kinds.count(k) for k in ("best", "stopped early", "different optimum"))
  value = f"{at_best + early} of {len(kinds)} on the best optimum"
  if early:
    value += f" ({early} stopped early by tol within {SAME_OPTIMUM_SE} SE)"
  if other:
    value += f"; {other} at a different, lower optimum (the best is used)"
  return ("restarts find the best optimum (the same estimate within "
          f"{SAME_OPTIMUM_SE} SE)", value, True if not other else None)
