"""Plots of grouped data: random effects per group and residuals by group.

Readable with hundreds of groups: every group is drawn as a thin line, and
only a few are labelled (the extremes).

    caterpillar(mean, covariance, labels, effect_names)
    residuals_by_group(fitted_values, residuals, codes, labels, sigma)
"""
from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure
from scipy.stats import norm

ALL_LABELS = 30  # up to this many groups, every group is labelled


def posterior_intervals(mean, covariance, level: float = 0.95):
  """(lower, upper), each [G, q]: mean -+ z sd with sd the square root of the diagonal of
  each group's posterior covariance [G, q, q] (normal posterior: exact)."""
  mean = np.asarray(mean, np.float64)                                           # [G, q]
  var = np.diagonal(np.asarray(covariance, np.float64), axis1=-2, axis2=-1)     # [G, q]
  if mean.shape != var.shape:
    raise ValueError(f"mean {mean.shape} and covariance {np.shape(covariance)} do not match")
  if not 0 < level < 1:
    raise ValueError(f"level must be in (0, 1), got {level}")
  half = norm.ppf(0.5 + level / 2) * np.sqrt(np.maximum(var, 0.0))
  return mean - half, mean + half


def labelled_ranks(count: int, shown: int = 9) -> np.ndarray:
  """Positions (in sorted order) whose group is labelled: all of them up to `ALL_LABELS`
  groups, else `shown` evenly spaced ones from the lowest to the highest (labels of
  neighbouring ranks would overlap)."""
  if count <= ALL_LABELS:
    return np.arange(count)
  return np.unique(np.round(np.linspace(0, count - 1, shown)).astype(int))


def caterpillar(mean, covariance, labels, effect_names, level: float = 0.95,
                group_name: str = "group") -> Figure:
  """One panel per random-effect coordinate: every group's posterior mean (dot) and
  `level` interval (line), sorted by the mean; a few groups labelled.

  Args:
    mean: [G, q] posterior means (BLUPs); covariance: [G, q, q] posterior covariances.
    labels: [G] group labels; effect_names: [q] names of the coordinates.
  """
  mean = np.asarray(mean, np.float64)
  lower, upper = posterior_intervals(mean, covariance, level)
  labels = np.asarray(labels).astype(str)
  g, q = mean.shape
  cols = min(q, 3)
  rows = -(-q // cols)
  height = min(8.0 if rows == 1 else 5.0,
               1.5 + 0.16 * min(g, 60) if g > ALL_LABELS else 1.4 + 0.2 * g)  # one row
  fig = Figure(figsize=(10, 0.4 + height * rows), layout="constrained")
  axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
  thin = g > ALL_LABELS
  for ax in axes[q:]:
    ax.set_visible(False)
  for j, ax in enumerate(axes[:q]):
    order = np.argsort(mean[:, j], kind="stable")
    pos = np.arange(g)
    ax.hlines(pos, lower[order, j], upper[order, j], color="C0", lw=0.6 if thin else 1.2,
              alpha=0.6 if thin else 0.9)
    ax.plot(mean[order, j], pos, "o", color="k", ms=1.5 if thin else 3.5)
    ax.axvline(0.0, color="C3", lw=0.8, ls="--")
    shown = labelled_ranks(g)
    ax.set_yticks(shown, labels[order][shown], fontsize=7)
    ax.set_ylim(-1, g)
    ax.set_xlabel(f"BLUP of {effect_names[j]}", fontsize=9)
    ax.set_title(str(effect_names[j]), fontsize=9)
    ax.tick_params(axis="x", labelsize=8)
  axes[0].set_ylabel(f"{group_name}, sorted by the mean", fontsize=8)
  fig.suptitle(f"Random effects by {group_name}: posterior mean and {level:.0%} interval, "
               f"{g} groups" + (" (every few ranks labelled)" if thin else ""),
               fontsize=10)
  return fig


def residuals_by_group(fitted_values, residuals, codes, labels, sigma: float,
                       group_name: str = "group") -> Figure:
  """Three panels: residual against fitted value; each group's residual median and
  interquartile range (sorted by the median, 2 sigma band); each group's residual SD
  against its size (sigma marked).

  Args:
    fitted_values, residuals: [N]; codes: [N] group of each point in [0, G);
    labels: [G] group labels; sigma: the model's residual SD.
  """
  fitted_values, residuals = np.asarray(fitted_values), np.asarray(residuals)
  codes = np.asarray(codes)
  labels = np.asarray(labels).astype(str)
  g = len(labels)
  groups = [residuals[codes == i] for i in range(g)]
  sizes = np.array([len(r) for r in groups])
  present = np.flatnonzero(sizes)
  quartiles = np.array([np.percentile(groups[i], [25, 50, 75]) for i in present])  # [G', 3]
  spread = np.array([np.std(groups[i], ddof=1) if sizes[i] > 1 else np.nan for i in present])
  fig = Figure(figsize=(10, 3.4), layout="constrained")
  left, middle, right = fig.subplots(1, 3)
  left.scatter(fitted_values, residuals, s=4, alpha=0.35 if len(residuals) > 2000 else 0.6,
               color="C0", linewidths=0)
  left.axhline(0.0, color="k", lw=0.8)
  for band in (-2 * sigma, 2 * sigma):
    left.axhline(band, color="C3", lw=0.8, ls="--")
  left.set(xlabel="fitted value (with the BLUPs)", ylabel="residual",
           title="Residuals against fitted values")
  order = np.argsort(quartiles[:, 1], kind="stable")
  pos = np.arange(len(order))
  thin = len(order) > ALL_LABELS
  middle.vlines(pos, quartiles[order, 0], quartiles[order, 2], color="C0",
                lw=0.6 if thin else 1.5)
  middle.plot(pos, quartiles[order, 1], "o", color="k", ms=1.5 if thin else 3)
  middle.axhspan(-2 * sigma, 2 * sigma, color="C3", alpha=0.08, lw=0)
  middle.axhline(0.0, color="k", lw=0.8)
  shown = labelled_ranks(len(order))
  middle.set_xticks(shown, labels[present][order][shown], fontsize=7, rotation=90)
  middle.set(xlabel=f"{group_name}, sorted by the median", ylabel="residual",
             title=f"Median and IQR by {group_name}")
  right.scatter(sizes[present], spread, s=8, color="C0", alpha=0.7, linewidths=0)
  right.axhline(sigma, color="C3", lw=1, ls="--", label=f"residual SD {sigma:.3g}")
  right.set(xlabel="points in the group", ylabel="residual SD",
            title=f"Spread by {group_name}")
  right.legend(fontsize=8)
  for ax in (left, middle, right):
    ax.title.set_fontsize(9)
  return fig
