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


def boundary_fit(cov_u, sigma2: float, names, tol: float = SINGULAR_TOL):
  """(descriptions of the boundary components, Sigma_u on the boundary) for Sigma_u [q, q].

  The relative Cholesky factor L (Sigma_u = sigma^2 L L^T) is formed column
  by column; a diagonal entry below `tol` is set to 0 with the rest of its
  column (and, for a variance of 0, its row), so the returned Sigma_u has
  those variances exactly 0 and those correlations exactly +-1. With no
  boundary component the descriptions are [] and Sigma_u is returned as is.

  Args:
    cov_u: [q, q] Sigma_u. sigma2: the noise variance. names: [q] names of
      the random effects. tol: threshold on the relative Cholesky diagonal.
  """
  cov = np.asarray(cov_u, np.float64) / float(sigma2)
  q = cov.shape[0]
  chol = np.zeros((q, q))
  found, zero = [], []
  for j in range(q):
    if np.sqrt(max(cov[j, j], 0.)) < tol:
      found.append(f"variance of {names[j]} is 0")
      zero.append(j)
      continue
    pivot = cov[j, j] - chol[j, :j] @ chol[j, :j]  # Var(u_j | earlier) / sigma^2
    if np.sqrt(max(pivot, 0.)) < tol:
      partners = ", ".join(names[i] for i in range(j) if chol[i, i] > 0.)
      found.append(f"correlation of {names[j]} with {partners} is +-1")
      continue
    chol[j, j] = np.sqrt(pivot)
    below = slice(j + 1, q)
    chol[below, j] = (cov[below, j] - chol[below, :j] @ chol[j, :j]) / chol[j, j]
  if not found:
    return found, np.asarray(cov_u)
  chol[zero, :] = 0.
  return found, float(sigma2) * chol @ chol.T


def warn_if_singular(cov_u, sigma2: float, names, tol: float = SINGULAR_TOL):
  """`boundary_fit`, with one `SingularFitWarning` naming every boundary component."""
  found, boundary = boundary_fit(cov_u, sigma2, names, tol)
  if found:
    warnings.warn("boundary (singular) fit: " + "; ".join(found), SingularFitWarning,
                  stacklevel=3)
  return found, boundary
