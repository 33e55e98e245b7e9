"""Plots of an HMC cross-check (`tfp_em.diagnostics.hmc.sample_posterior`).

Both draw small multiples, one panel per named parameter entry
('weights[component 0]'), symmetric repeats once; see `plots.small_multiples`.

    hmc_trace(hmc_idata)     draws per chain; relabelled draws marked
    hmc_rank(hmc_idata)      az.plot_rank (uniform bars = well-mixed chains)
"""
from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

import arviz as az

from tfp_em.diagnostics.plots import COLORS, label_small_multiples, named_scalars, small_multiples


def hmc_trace(hmc_idata, max_panels: int = 24) -> Figure:
  """Draws of each chain against the draw number, one panel per entry.

  Draws whose component labels the sampler had switched (relabelled to the EM
  estimate's labels, `sample_stats.relabelled`) are marked with a red tick
  at the bottom of each panel.
  """
  post = hmc_idata.posterior
  shown, total = named_scalars(post, max_panels)
  stats = hmc_idata.sample_stats
  relabelled = (stats["relabelled"].values if "relabelled" in stats
                else np.zeros((post.sizes["chain"], post.sizes["draw"]), bool))  # [C, S]
  fig, axes = small_multiples(len(shown))
  draws = np.arange(post.sizes["draw"])
  for ax, entry in zip(axes, shown):
    values = post[entry.field].values                        # [chain, draw, ...]
    for c in range(values.shape[0]):
      ax.plot(draws, values[(c, slice(None)) + entry.index], color=COLORS[c % 10], lw=0.5,
              alpha=0.7, label=f"chain {c}")
    switched = np.flatnonzero(relabelled.any(axis=0))
    if switched.size:
      ax.plot(switched, np.full(switched.size, ax.get_ylim()[0]), "|", color="red", ms=5,
              label="relabelled draw")
  label_small_multiples(fig, axes, shown, total, "draw (after warm-up)", "NUTS draws per chain")
  return fig


def hmc_rank(hmc_idata, max_panels: int = 16) -> Figure:
  """az.plot_rank of the NUTS draws, one panel per entry (at most `max_panels`)."""
  shown, total = named_scalars(hmc_idata.posterior, max_panels)
  fig, axes = small_multiples(len(shown), height=2.1)
  for ax, entry in zip(axes, shown):
    variable = hmc_idata.posterior[entry.field]
    coords = {dim: variable[dim].values[i] for dim, i in zip(variable.dims[2:], entry.index)}
    az.plot_rank(hmc_idata, var_names=[entry.field], coords=coords, ax=ax, show=False)
    ax.set_xlabel("")
    ax.set_ylabel("chain", fontsize=8)
  label_small_multiples(fig, axes, shown, total, "rank of the draw", "Rank plots per chain")
  return fig
