"""Spurious mixture fits: checks before and after a fit, reported by warnings.

The likelihood of a Gaussian mixture is unbounded: a component that shrinks
onto one point, a few close points or a lower-dimensional subspace drives it
up without limit. EM then converges to a *spurious* local maximizer, with a
large (often positive) log-likelihood and no meaning. `reg_covar` keeps the
fit finite but not meaningful. After every fit `fit_findings` flags a
component that

  * holds fewer points' worth of weight than its covariance needs
    (`min_points`: D + 1 where each component has a full covariance of its
    own, 1 where volume and shape are pooled, 2 otherwise), or
  * is orders of magnitude narrower than the others: its covariance
    determinant per dimension, det(Sigma_k)^(1/D), below
    10^-`NARROW_ORDERS` times the median of the other components', or
  * sits on one (possibly repeated) point: its covariance is `reg_covar`
    itself in every direction, or
  * lies on a lower-dimensional subspace: its variance along some direction
    is `reg_covar` itself (or round-off without it), as mclust calls a fit
    singular when a covariance is.

Before a fit `size_findings` flags data too small for the model: as many
components as points, at least as many features as points for full or tied
covariances, or data whose spread is below `reg_covar` (every covariance is
then `reg_covar` itself). Both return phrases, each naming what to try;
`warn` issues them as one `SpuriousSolutionWarning`.

#### References

[1] G. J. McLachlan and D. Peel. Finite Mixture Models, section 3.10
    (spurious local maximizers). Wiley, 2000.
"""
from __future__ import annotations

import warnings

import numpy as np

from models import gaussian_mixture as gm
from tfp_em.mixture.reseed import MIN_COUNT

NARROW_ORDERS = 4.0  # orders of magnitude in det(Sigma_k)^(1/D) below the others' median
FLAT_RATIO = 1e-10   # smallest / largest variance of a component below this: flat (reg_covar=0)
MAX_NAMED = 8        # components named in one message


class SpuriousSolutionWarning(UserWarning):
  """The mixture fit looks degenerate (a spurious maximizer of the likelihood)."""


def min_points(covariance_type: str, n_features: int) -> int:
  """Points a component needs for its covariance to be estimable without reg_covar.

  By mclust's name (Sigma_k = lambda_k D_k A_k D_k^T): D + 1 when the shape
  and the orientation both vary (EVV, VVV = 'full'); 1 when the volume and
  the shape are pooled (EII, EEI, EEE = 'tied', EEV: a component's own part
  is at most an orientation); 2 otherwise (a volume or a diagonal of its own).
  """
  name = gm.mclust_name(covariance_type)
  if name in ("EVV", "VVV"):
    return n_features + 1
  return 1 if name[0] == "E" and name[1] in "EI" else 2


def log_spread(covariances, covariance_type: str, n_features: int) -> np.ndarray:
  """[K] log det(Sigma_k)^(1/D), the log of each component's geometric-mean
  variance ([1] for 'tied')."""
  cov = np.asarray(covariances, np.float64)
  if covariance_type == "full":
    sign, logdet = np.linalg.slogdet(cov)                        # [K]
    return np.where(sign > 0, logdet / n_features, -np.inf)
  if covariance_type == "tied":
    sign, logdet = np.linalg.slogdet(cov)
    return np.array([logdet / n_features if sign > 0 else -np.inf])
  if covariance_type == "diag":
    return np.mean(np.log(cov), axis=-1)                          # [K]
  return np.log(cov)                                              # spherical: [K]


def narrow_components(spread: np.ndarray, orders: float = NARROW_ORDERS) -> np.ndarray:
  """Indices k whose `spread` is `orders` decades below the median of the others'."""
  spread = np.asarray(spread, np.float64)
  if spread.size < 2:
    return np.array([], int)
  others = np.array([np.median(np.delete(spread, k)) for k in range(spread.size)])  # [K]
  return np.flatnonzero(spread < others - orders * np.log(10.0))


def variance_range(covariances, covariance_type: str) -> tuple[np.ndarray, np.ndarray]:
  """([K] smallest, [K] largest) variance of each component along any direction
  ([1] each for 'tied')."""
  cov = np.asarray(covariances, np.float64)
  if covariance_type in ("full", "tied"):
    eigenvalues = np.atleast_2d(np.linalg.eigvalsh(cov))                   # [K, D]
    return eigenvalues[:, 0], eigenvalues[:, -1]
  if covariance_type == "diag":
    return cov.min(axis=-1), cov.max(axis=-1)
  return cov, cov


def fit_findings(weights, covariances, n_points: float, covariance_type: str,
                 n_features: int, reg_covar: float) -> list[str]:
  """One phrase per component that looks spurious (empty list: none).

  Besides the two checks above, a component whose variance in every
  direction is below twice `reg_covar` sits on one (possibly repeated) point:
  its covariance is reg_covar itself. Empty components (below
  `reseed.MIN_COUNT` of a point) are left to the `EmptyComponentWarning`.

  Args:
    weights: [K] mixing weights.
    covariances: stored as `models.gaussian_mixture.covariance_layout` says.
    covariance_type: scikit-learn's or mclust's name.
    n_points: the number of data points (with sample weights: of points
      with positive weight; weights count in units of their mean).
    reg_covar: what the fit added to the covariance diagonals.
  """
  counts = np.asarray(weights, np.float64) * n_points             # [K] points' worth
  needed = min_points(covariance_type, n_features)
  layout = gm.covariance_layout(covariance_type)
  spread = log_spread(covariances, layout, n_features)
  narrow = set(narrow_components(spread).tolist())
  smallest, largest = variance_range(covariances, layout)           # [K] or [1]
  on_point = largest < 2 * reg_covar
  # flat: reg_covar itself along some direction (or, without it, round-off)
  flat = ~on_point & (smallest < np.maximum(2 * reg_covar, FLAT_RATIO * largest))
  findings = []
  for k in range(counts.size):
    if counts[k] < MIN_COUNT:  # empty: `reseed` reports it (EmptyComponentWarning)
      continue
    why = []
    if counts[k] < needed:
      why.append(f"holds {counts[k]:.3g} points' worth of weight, fewer than the {needed} its "
                 f"{covariance_type} covariance needs")
    if k in narrow:
      gap = (np.median(np.delete(spread, k)) - spread[k]) / np.log(10.0)
      why.append(f"its covariance is {gap:.1f} orders of magnitude narrower per dimension "
                 "than the others' (det(Sigma)^(1/D))")
    who = "the tied covariance" if layout == "tied" else "its covariance"
    if on_point[min(k, on_point.size - 1)]:
      why.append(f"{who} is reg_covar={reg_covar:g} itself (it sits on one, possibly "
                 "repeated, point)")
    elif flat[min(k, flat.size - 1)]:
      why.append(f"{who} has variance {smallest[min(k, smallest.size - 1)]:.3g} along one "
                 f"direction, reg_covar={reg_covar:g} or round-off (its points lie on a "
                 "lower-dimensional subspace, e.g. share a value of a column)")
    if why:
      findings.append(f"component {k}: " + "; ".join(why))
  return findings


def size_findings(n_points: int, n_features: int, n_components: int, covariance_type: str,
                  largest_variance: float, reg_covar: float) -> list[str]:
  """Phrases naming why the data cannot support the model, found before fitting."""
  findings = []
  if n_components >= n_points > 1:
    findings.append(f"n_components={n_components} for {n_points} points: each component can "
                    "hold a single point (use fewer components)")
  if covariance_type in ("full", "tied") and n_features >= n_points:
    findings.append(f"X has {n_features} features but only {n_points} points: a {covariance_type} "
                    "covariance is singular without reg_covar (use covariance_type='diag', "
                    "fewer features or more points)")
  if 0 < reg_covar and largest_variance < reg_covar and n_points > 1:
    findings.append(f"X's largest feature variance ({largest_variance:.3g}) is below "
                    f"reg_covar={reg_covar:g}, so every covariance is reg_covar itself "
                    "(standardize X, or lower reg_covar)")
  return findings


LEADS = {"before": "these data cannot support a non-degenerate fit",
         "after": "the fit looks like a spurious solution (McLachlan & Peel)"}
ADVICE = {"before": "", "after": " Try a larger reg_covar, fewer components, or more restarts "
                                 "(n_init) to find a non-degenerate maximizer."}


def warn(findings: list[str], stage: str, stacklevel: int = 2) -> None:
  """One `SpuriousSolutionWarning` listing `findings` (nothing when empty);
  `stage` is 'before' or 'after' the fit."""
  if not findings:
    return
  named = "; ".join(findings[:MAX_NAMED]) + (
      f"; and {len(findings) - MAX_NAMED} more" if len(findings) > MAX_NAMED else "")
  warnings.warn(f"GaussianMixture: {LEADS[stage]}: {named}.{ADVICE[stage]}",
                SpuriousSolutionWarning, stacklevel=stacklevel + 1)
