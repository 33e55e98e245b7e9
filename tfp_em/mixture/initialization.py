"""Initial responsibilities for mixtures: every strategy returns [N, K].

The initial params are then the M-step of these responsibilities, as in
scikit-learn. Sample weights are honoured by every strategy.

#### References

[1] D. Arthur and S. Vassilvitskii. k-means++: the advantages of careful
    seeding. SODA 2007.
"""
from __future__ import annotations

import dataclasses

import numpy as np

INIT_METHODS = ("kmeans++", "kmeans", "random", "random_from_data")


def _sq_dist(x, centers):
  """Squared Euclidean distances, shape [N, K]."""
  d2 = (np.sum(x * x, 1)[:, None] - 2.0 * x @ centers.T + np.sum(centers * centers, 1)[None])
  return np.maximum(d2, 0.0)


def _one_hot(labels, k, dtype):
  resp = np.zeros((labels.shape[0], k), dtype=dtype)
  resp[np.arange(labels.shape[0]), labels] = 1.0
  return resp


def kmeans_plusplus(x, weights, k, rng):
  """k-means++ centres (weighted D^2 sampling), shape [K, D]."""
  p = weights / weights.sum()
  centers = [x[rng.choice(len(x), p=p)]]
  closest = _sq_dist(x, np.array(centers))[:, 0]
  for _ in range(1, k):
    score = weights * closest
    total = score.sum()
    idx = rng.choice(len(x), p=score / total) if total > 0 else rng.choice(len(x), p=p)
    centers.append(x[idx])
    closest = np.minimum(closest, _sq_dist(x, x[idx][None])[:, 0])
  return np.array(centers)


def lloyd(x, weights, centers, max_iter=100, tol=1e-6):
  """Weighted Lloyd iterations from `centers`; returns (centers, labels)."""
  scale = np.mean(np.var(x, axis=0)) + 1e-300
  labels = np.argmin(_sq_dist(x, centers), 1)
  for _ in range(max_iter):
    new = centers.copy()
    for j in range(len(centers)):
      mask = labels == j
      w = weights[mask]
      if w.sum() > 0:
        new[j] = (w[:, None] * x[mask]).sum(0) / w.sum()
    shift = np.sum((new - centers) ** 2) / scale
    centers = new
    labels = np.argmin(_sq_dist(x, centers), 1)
    if shift <= tol:
      break
  return centers, labels


def initial_responsibilities(method: str, x, weights, k: int, seed: int):
  """Responsibilities [N, K] from `method` (one of `INIT_METHODS`)."""
  rng = np.random.default_rng(seed)
  x = np.asarray(x, np.float64)
  x = x - np.average(x, axis=0, weights=weights)  # distances in float64, about the mean
  weights = np.asarray(weights, np.float64)
  if method == "random":
    resp = rng.uniform(size=(len(x), k))
    return resp / resp.sum(1, keepdims=True)
  if method == "random_from_data":
    idx = rng.choice(len(x), size=k, replace=False, p=weights / weights.sum()
                     if np.count_nonzero(weights) >= k else None)
    centers = x[idx]
  elif method in ("kmeans++", "kmeans"):
    centers = kmeans_plusplus(x, weights, k, rng)
  else:
    raise ValueError(f"init_params must be one of {INIT_METHODS}, got {method!r}")
  if method == "kmeans":
    _, labels = lloyd(x, weights, centers)
  else:
    labels = np.argmin(_sq_dist(x, centers), 1)
  return _one_hot(labels, k, np.float64)


@dataclasses.dataclass(frozen=True)
class Initializer:
  """`(x, weights, seed) -> responsibilities [N, K]` by `method`.

  Equal by value, so models holding equal initializers share their compiled
  steps (`tfp_em.EMModel.step_config`). It runs in numpy, never traced;
  `GaussianMixtureEM` leaves it (and K) out of its `step_config`.
  """
  method: str
  n_components: int

  def __call__(self, x, weights, seed):
    return initial_responsibilities(self.method, x, weights, self.n_components, seed)
