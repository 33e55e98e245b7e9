"""The default L2 penalty of `BernoulliMLPClassifier`: chosen on held-out data.

The maximum-likelihood MLP diverges on separable classes (the training
log-likelihood goes to 0 and the held-out one to -inf), so the penalty
matters more than any other setting. It is a Gaussian prior
w ~ N(0, 1 / l2) on every non-bias weight of the standardized inputs and of
the hidden units; its strength does not scale with N, so it fades as data
grow, as a prior does. With `l2='auto'` the estimator

  1. holds out a stratified `HOLDOUT_FRACTION` of the rows (`holdout_split`),
  2. fits the rest at each penalty of `L2_GRID`, strongest first, each fit
     from the same seeded start, and scores it by the held-out
     log-likelihood per point, log p(y | x) (a proper scoring rule that
     also sees over-confidence, unlike accuracy),
  3. stops at the first penalty that scores no better than the best so far
     (`walk_grid`; weaker penalties only overfit further), and
  4. refits all rows at the best penalty, exactly as `l2=<that value>` would.

Every fit is a fixed-penalty fit: EM monitors, and `tfp_em.verify` checks,
the penalized objective log p(y | x) - (l2 / 2) |w|^2 of the chosen `l2_`.
The cost is at most `len(L2_GRID)` fits on 80% of the rows plus the final
fit.

#### References

[1] D. J. C. MacKay. A practical Bayesian framework for backpropagation
    networks. Neural Computation, 4(3):448-472, 1992 (weight decay as a
    Gaussian prior; its strength set by the data).
[2] T. Hastie, R. Tibshirani and J. Friedman. The Elements of Statistical
    Learning, 2nd ed., Springer, 2009, section 7.10 (choosing a penalty by
    held-out log-likelihood).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
from sklearn.model_selection import train_test_split

# Penalties tried by l2='auto', strongest first (half a decade apart). The
# weakest, N(0, 100) on weights of standardized inputs, already allows a logit
# of 10 per standard deviation; weaker priors only let separable classes
# diverge (on wine the walk went on to 0.001 and lost held-out likelihood).
L2_GRID = (10., 3., 1., 0.3, 0.1, 0.03, 0.01)
HOLDOUT_FRACTION = 0.2
# The penalty when a class has too few rows for a stratified held-out split.
SMALL_DATA_L2 = 1.


def holdout_split(labels: np.ndarray, num_classes: int, seed) -> tuple[np.ndarray, np.ndarray] | None:
  """(train, held-out) row indices, stratified by class; None when some class
  has fewer than 2 rows or either part would have fewer rows than classes."""
  n = len(labels)
  held_out = math.ceil(HOLDOUT_FRACTION * n)
  if np.bincount(labels, minlength=num_classes).min() < 2 or min(held_out, n - held_out) < num_classes:
    return None
  return train_test_split(np.arange(n), test_size=held_out, stratify=labels, random_state=seed)


def walk_grid(score: Callable[[float], float], grid=L2_GRID) -> tuple[float, dict[float, float]]:
  """Scores the penalties of `grid` in order until one scores no better than
  the best so far; a non-finite score counts as -inf.

  Returns:
    (the best penalty, {penalty: score} for the penalties tried).
  """
  scores = {}
  for l2 in grid:
    value = float(score(l2))
    value = value if np.isfinite(value) else -np.inf
    if scores and value <= max(scores.values()):
      scores[l2] = value
      break
    scores[l2] = value
  return max(scores, key=scores.get), scores
