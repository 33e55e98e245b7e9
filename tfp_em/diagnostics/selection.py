"""Model selection and classification summaries for latent-class fits (numpy, matplotlib).

    model_selection_figure(rows, chosen)   BIC (and ICL) against K, a line per
                                           covariance type, the chosen model marked
    classification_table(resp)             cluster sizes and how sure the assignments are
    classification_figure(resp)            the same as bars and a histogram

`rows` is a model search's table, one dict per candidate with keys `k`,
`covariance_type`, `bic` and optionally `icl`, lower is better, NaN for a
candidate that failed (`tfp_em.select_mixture(...).report_rows()` writes it;
`write_report(model_selection=rows)` puts it in the report).

#### References

[1] G. Schwarz. Estimating the dimension of a model. Annals of Statistics
    6(2):461-464, 1978.
[2] C. Biernacki, G. Celeux and G. Govaert. Assessing a mixture model for
    clustering with the integrated completed likelihood. IEEE TPAMI
    22(7):719-725, 2000.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

MARKERS = "os^Dv<>ph"  # with 10 colours: distinct pairs for up to 90 lines (mclust has 14)
SURE = 0.9  # an assignment with max posterior probability below this counts as uncertain


def model_selection_figure(rows, chosen: tuple) -> Figure:
  """BIC (and ICL when every row has it) against K, one line per covariance type.

  When some candidates are far worse, the y axis shows the best 10% (at least 20
  units) above the lowest value; the table of the report lists them all.

  Args:
    rows: see the module docstring.
    chosen: (k, covariance_type) of the fitted model, marked with a ring.
  """
  metrics = ["bic"] + (["icl"] if all("icl" in r for r in rows) else [])
  fig = Figure(figsize=(5 * len(metrics), 3.8), layout="constrained")
  axes = np.atleast_1d(fig.subplots(1, len(metrics)))
  types = list(dict.fromkeys(r["covariance_type"] for r in rows))
  for ax, metric in zip(axes, metrics):
    fitted = [r for r in rows if np.isfinite(r[metric])]  # failed candidates left out
    values = np.array([r[metric] for r in fitted], float)
    low = values.min()
    top = low + max(0.1 * abs(low), 20.0)  # zoom on the competitive models
    zoom = values.max() > top
    for j, cov in enumerate(types):
      sel = sorted((r["k"], r[metric]) for r in fitted if r["covariance_type"] == cov)
      if not sel:
        continue
      ks, vals = zip(*sel)
      off = zoom and min(vals) > top
      ax.plot(ks, vals, marker=MARKERS[j % len(MARKERS)], color=f"C{j % 10}",
              label=f"{cov} (off the scale: >= {min(vals):.0f})" if off else cov)
    if zoom:
      ax.set_ylim(low - 0.05 * (top - low), top)
    best = [r for r in rows if (r["k"], r["covariance_type"]) == tuple(chosen)]
    if best:
      ax.plot(best[0]["k"], best[0][metric], "o", ms=16, mfc="none", mec="k", mew=2,
              label=f"chosen: K={chosen[0]}, {chosen[1]}")
    ax.set(xlabel="number of components K", ylabel=metric.upper(),
           title=f"{metric.upper()} (lower is better)")
    ax.set_xticks(sorted({r["k"] for r in rows}))
    ax.legend(fontsize=8, title="covariance type", title_fontsize=8)
  return fig


def classification_table(resp) -> pd.DataFrame:
  """Per component: points assigned (largest posterior probability), expected
  size (sum of probabilities), and how many of its points are assigned with
  max probability below `SURE`.

  Args:
    resp: [N, K] posterior probabilities of the components.
  """
  resp = np.asarray(resp)
  label, top = resp.argmax(1), resp.max(1)
  k = resp.shape[1]
  return pd.DataFrame({
      "assigned points": np.bincount(label, minlength=k),
      "expected size": resp.sum(0),
      f"assigned with p < {SURE}": np.bincount(label[top < SURE], minlength=k),
      "mean max probability": [top[label == j].mean() if np.any(label == j) else np.nan
                               for j in range(k)],
  }, index=pd.Index([f"component {j}" for j in range(k)]))


def classification_figure(resp) -> Figure:
  """Left: assigned points and expected size per component. Right: histogram
  of each point's largest posterior probability (1 = assigned for sure)."""
  resp = np.asarray(resp)
  table = classification_table(resp)
  fig = Figure(figsize=(10, 3.4), layout="constrained")
  left, right = fig.subplots(1, 2)
  pos = np.arange(resp.shape[1])
  left.bar(pos - 0.2, table["assigned points"], 0.4, label="assigned points", color="C0")
  left.bar(pos + 0.2, table["expected size"], 0.4, label="expected size (sum of probabilities)",
           color="C1")
  left.set(xticks=pos, xticklabels=table.index, ylabel="points", title="Cluster sizes")
  left.legend(fontsize=8)
  top = resp.max(1)
  lowest = min(1.0 / resp.shape[1], 0.99)  # K = 1: every point at 1
  right.hist(top, bins=np.linspace(lowest, 1, 26), color="0.5")
  right.axvline(SURE, color="C3", ls="--",
                label=f"{np.mean(top < SURE):.1%} of points below {SURE}")
  right.set(xlabel="largest posterior probability of a point", ylabel="points",
            title="Classification uncertainty")
  right.legend(fontsize=8)
  return fig
