"""Singular (boundary) fits of a linear mixed model, as lme4's `isSingular` finds them.

With Sigma_u = sigma^2 L L^T (L the relative Cholesky factor, lme4's
Lambda), the fit is on the boundary of the parameter space when a diagonal
entry of L is below `tol` (lme4's default 1e-4): entry j is
sqrt(Var(u_j | u_1..u_{j-1}) / sigma^2), so it is 0 when the variance of u_j
is 0 or when u_j is perfectly correlated (+-1) with the earlier effects.

#### References

[1] D. Bates, M. Maechler, B. Bolker and S. Walker. Fitting linear
    mixed-effects models using lme4. Journal of Statistical Software 67(1),
    2015 (section 3.7.2 and `?isSingular`).
"""
from __future__ import annotations

import warnings

import numpy as np

from tfp_em.engine import ConvergenceWarning

SINGULAR_TOL = 1e-4


class SingularFitWarning(ConvergenceWarning):
  """A variance component is 0 or a correlation is +-1 at the estimate (lme4's
  "boundary (singular) fit")."""


def singular_components(cov_u, sigma2: float, names, tol: float = SINGULAR_TOL) -> list:
  """Descriptions of the boundary components of Sigma_u [q, q], [] when none.

  Args:
    cov_u: [q, q] Sigma_u. sigma2: the noise variance. names: [q] names of
      the random effects. tol: threshold on the relative Cholesky diagonal.
  """
  cov = np.asarray(cov_u, np.float64) / float(sigma2)
  sd = np.sqrt(np.maximum(np.diag(cov), 0.))
  found = []
  for j in range(cov.shape[0]):
    if sd[j] < tol:
      found.append(f"variance of {names[j]} is 0")
      continue
    # Var(u_j | earlier) / sigma^2 by the Schur complement (pivoting on earlier nonzero sds)
    keep = [i for i in range(j) if sd[i] >= tol]
    conditional = cov[j, j]
    if keep:
      block = cov[np.ix_(keep, keep)]
      cross = cov[keep, j]
      conditional -= cross @ np.linalg.lstsq(block, cross, rcond=None)[0]
    if np.sqrt(max(conditional, 0.)) < tol:
      partners = ", ".join(names[i] for i in keep)
      found.append(f"correlation of {names[j]} with {partners} is +-1")
  return found


def warn_if_singular(cov_u, sigma2: float, names, tol: float = SINGULAR_TOL) -> bool:
  """One `SingularFitWarning` naming every boundary component; True if any."""
  found = singular_components(cov_u, sigma2, names, tol)
  if found:
    warnings.warn("boundary (singular) fit: " + "; ".join(found), SingularFitWarning,
                  stacklevel=3)
  return bool(found)
