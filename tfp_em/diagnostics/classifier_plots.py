"""A classifier's fit on its training data: confusion matrix, calibration, and a
predictive check of the class counts.

    class_summary(probs, labels, replicated)      per-class counts, intervals, recall, precision
    calibration(probs, labels)                    reliability curve and points per bin (binary:
                                                  P(class 1); more: the top class's probability)
    classifier_figure(probs, labels, replicated, class_names)
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from matplotlib.figure import Figure
from sklearn.calibration import calibration_curve
from sklearn.metrics import confusion_matrix


class ClassSummary(NamedTuple):
  """Per class, arrays [C]: observed and expected counts, the replicated counts' 95%
  interval, recall and precision of the most probable class."""
  observed: np.ndarray
  expected: np.ndarray
  replicated_lower: np.ndarray
  replicated_upper: np.ndarray
  recall: np.ndarray
  precision: np.ndarray


def _check(probs, labels):
  probs, labels = np.asarray(probs, np.float64), np.asarray(labels)
  if probs.ndim != 2 or labels.shape != probs.shape[:1]:
    raise ValueError(f"probs [N, C] and labels [N] do not match: {probs.shape}, {labels.shape}")
  return probs, labels


def class_summary(probs, labels, replicated) -> ClassSummary:
  """Args: probs [N, C] p(y = c | x); labels [N] class codes; replicated [S, N] class codes
  drawn from the fitted model (the posterior predictive)."""
  probs, labels = _check(probs, labels)
  c = probs.shape[1]
  counts = np.stack([np.bincount(r, minlength=c) for r in np.asarray(replicated)])  # [S, C]
  matrix = confusion_matrix(labels, np.argmax(probs, axis=1), labels=np.arange(c))  # [C, C]
  with np.errstate(invalid="ignore", divide="ignore"):
    recall = np.diag(matrix) / matrix.sum(axis=1)
    precision = np.diag(matrix) / matrix.sum(axis=0)
  lower, upper = np.percentile(counts, [2.5, 97.5], axis=0)
  return ClassSummary(np.bincount(labels, minlength=c), probs.sum(axis=0), lower, upper,
                      recall, precision)


def calibration(probs, labels, n_bins: int = 10):
  """(predicted probability, observed frequency, points, what) per non-empty bin of
  `n_bins` equal bins: for two classes P(class 1) against the share of class 1, else the
  top class's probability against the share of points it classifies right."""
  probs, labels = _check(probs, labels)
  if probs.shape[1] == 2:
    hit, score, what = labels == 1, probs[:, 1], "P(class 1)"
  else:
    hit, score, what = np.argmax(probs, axis=1) == labels, probs.max(axis=1), "top-class P"
  score = np.clip(score, 0, 1)
  observed, predicted = calibration_curve(hit.astype(int), score, n_bins=n_bins)
  # sklearn's uniform bins: the same edges and side, so the counts line up with its bins
  counts = np.bincount(np.searchsorted(np.linspace(0, 1, n_bins + 1)[1:-1], score),
                       minlength=n_bins)
  return predicted, observed, counts[counts > 0], what


def classifier_figure(probs, labels, replicated, class_names) -> Figure:
  """Three panels: the confusion matrix (counts, shaded by the share of each true class),
  the calibration curve, and each class's observed count against its replicated counts."""
  probs, labels = _check(probs, labels)
  c = probs.shape[1]
  names = [str(n) for n in class_names]
  fig = Figure(figsize=(10, 3.5), layout="constrained")
  conf, cal, ppc = fig.subplots(1, 3)
  matrix = confusion_matrix(labels, np.argmax(probs, axis=1), labels=np.arange(c))
  share = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
  conf.imshow(share, cmap="Blues", vmin=0, vmax=1)
  if c <= 12:
    for i in range(c):
      for j in range(c):
        conf.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=8,
                  color="white" if share[i, j] > 0.6 else "black")
  ticks = np.arange(c) if c <= 12 else np.linspace(0, c - 1, 12).astype(int)
  conf.set_xticks(ticks, [names[t] for t in ticks], fontsize=7, rotation=45 if c > 4 else 0)
  conf.set_yticks(ticks, [names[t] for t in ticks], fontsize=7)
  conf.set(xlabel="predicted class", ylabel="true class", title="Confusion matrix (training)")
  predicted, observed, counts, what = calibration(probs, labels)
  cal.plot([0, 1], [0, 1], color="0.6", ls="--", lw=1, label="perfect calibration")
  cal.plot(predicted, observed, "-", color="C0", lw=1)
  cal.scatter(predicted, observed, s=12 + 150 * counts / counts.max(), color="C0", zorder=3,
              label="fitted model (area: points)")
  cal.set(xlim=(-0.04, 1.04), ylim=(-0.04, 1.04), xlabel=f"predicted {what}",
          ylabel="observed frequency", title="Calibration (10 bins)")
  cal.legend(fontsize=7, loc="upper left", markerscale=0.5)
  summary = class_summary(probs, labels, replicated)
  pos = np.arange(c)
  ppc.vlines(pos, summary.replicated_lower, summary.replicated_upper, color="C0", lw=6,
             alpha=0.5, label="replicated 95% range")
  ppc.plot(pos, summary.observed, "o", color="k", ms=5, label="observed")
  ppc.set_xticks(ticks, [names[t] for t in ticks], fontsize=7, rotation=45 if c > 4 else 0)
  top = max(summary.replicated_upper.max(), summary.observed.max())
  bottom = min(summary.replicated_lower.min(), summary.observed.min())
  ppc.set(xlabel="class", ylabel="points", title="Class counts: predictive check",
          xlim=(-0.6, c - 0.4), ylim=(bottom - 0.1 * (top - bottom) - 1,
                                      top + 0.45 * (top - bottom) + 1))
  ppc.legend(fontsize=7, loc="upper center", ncol=2)
  for ax in (conf, cal, ppc):
    ax.title.set_fontsize(9)
  return fig
