"""Diagnostic plots for EM fits.

Every function returns a `matplotlib.figure.Figure` built without pyplot (no
global state, no GUI backend needed); save it with `fig.savefig(path)`.

    loglik_traces(em_idata)            l per iteration for every restart
    parameter_traces(em_idata)         EM trajectories, one panel per named entry
    mixture_ellipses(fitted, data)     1- and 2-sigma ellipses over the data
    posterior_predictive(em_idata)     observed vs replicated data (needs
                                       add_posterior_predictive): densities per
                                       feature, contours for 2-D data, pairs beyond
    hidden_unit_heatmap(fitted, data)

HMC plots are in `tfp_em.diagnostics.hmc_plots`; model selection and
classification in `tfp_em.diagnostics.selection`; random effects and residuals
by group in `group_plots`; a classifier's fit in `classifier_plots`.
"""
from __future__ import annotations

import textwrap

import numpy as np
import xarray as xr
from matplotlib.figure import Figure
from matplotlib.patches import Ellipse

import arviz as az

from models.gaussian_mixture import covariance_layout
from tfp_em.diagnostics.adapters import get_adapter
from tfp_em.diagnostics.naming import entries, posterior_coords

COLORS = ["C0", "C1", "C2", "C3", "C4", "C5", "C6", "C7", "C8", "C9"]
STYLES = ["-", "--", ":", "-."]  # overlapping restarts stay visible


def named_scalars(dataset, max_panels: int | None = None):
  """[(readable name, variable, index)] of every scalar of an xarray Dataset
  with dims (chain, draw, ...), symmetric repeats left out; and the total count.

  Names come from `tfp_em.diagnostics.naming` ('means[component 1, waiting]').
  """
  fields = [(n, dataset[n].shape[2:]) for n in dataset.data_vars]
  dims = {n: dataset[n].dims[2:] for n in dataset.data_vars}
  kept = [e for e in entries(fields, dims, posterior_coords(dataset)) if e.keep]
  return kept[:max_panels] if max_panels else kept, len(kept)


def small_multiples(count: int, cols: int = 4, width: float = 10.0, height: float = 1.9):
  """(Figure, [count] axes) on a grid `cols` wide; unused cells hidden."""
  cols = max(1, min(cols, count))
  rows = -(-count // cols)
  fig = Figure(figsize=(width, 0.6 + height * rows), layout="constrained")
  axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
  for ax in axes[count:]:
    ax.set_visible(False)
  return fig, list(axes[:count])


def label_small_multiples(fig, axes, entries_shown, total: int, xlabel: str, title: str) -> None:
  """Titles each panel with its entry's name, the bottom row's x axes with `xlabel`, the
  figure with `title` (and how many entries are left out), one legend below the panels."""
  for ax, entry in zip(axes, entries_shown):
    ax.set_title(textwrap.fill(entry.name, 34, break_on_hyphens=False), fontsize=8)
    ax.tick_params(labelsize=7)
  for ax in axes[-min(4, len(axes)):]:
    ax.set_xlabel(xlabel, fontsize=8)
  shown = len(entries_shown)
  fig.suptitle(title + (f" (first {shown} of {total} entries)" if total > shown else ""),
               fontsize=10)
  handles, labels = axes[0].get_legend_handles_labels()
  if handles:
    fig.legend(handles, labels, loc="outside lower center", ncol=min(6, len(labels)), fontsize=8)


def _valid(em_idata, chain):
  """Number of real (unpadded) draws of a chain."""
  return int(em_idata.sample_stats["n_iter"].values[chain]) + 1


def loglik_traces(em_idata) -> Figure:
  """Left: l(theta_t) per restart. Right: gap to the best final l (log scale)."""
  lp = em_idata.sample_stats["lp"].values
  best = int(em_idata.posterior.attrs.get("best_restart", np.argmax(lp[:, -1])))
  top = np.max(lp[:, -1])
  fig = Figure(figsize=(10, 3.6), layout="constrained")
  left, right = fig.subplots(1, 2)
  for c in range(lp.shape[0]):
    n = _valid(em_idata, c)
    steps = np.diff(lp[c, :n])
    label = f"restart {c}" + (" (best)" if c == best else "")
    if steps.size and steps.min() < 0:
      label += f", drop {-steps.min():.2g}"
    kw = dict(color=COLORS[c % 10], lw=2.4 if c == best else 1.2, marker="o", ms=3,
              ls="-" if c == best else STYLES[1 + c % 3], zorder=3 if c == best else 2)
    left.plot(np.arange(n), lp[c, :n], label=label, **kw)
    gap = np.maximum(top - lp[c, :n], 1e-12)
    right.semilogy(np.arange(n), gap, **kw)
  left.set(xlabel="EM iteration", ylabel="log-likelihood", title="Log-likelihood per restart")
  right.set(xlabel="EM iteration", ylabel="best final l - l(t)", title="Distance to the best optimum")
  left.legend(fontsize=8)
  return fig


def parameter_traces(em_idata, max_panels: int = 36) -> Figure:
  """Small multiples: one panel per parameter entry (named by component and
  feature; symmetric repeats once), one line per restart, own y scale each.

  At most `max_panels` panels (the first entries, in parameter order).
  """
  post = em_idata.posterior
  shown, total = named_scalars(post, max_panels)
  best = int(post.attrs.get("best_restart", 0))
  fig, axes = small_multiples(len(shown))
  for ax, entry in zip(axes, shown):
    values = post[entry.field].values                 # [chain, draw, ...]
    for c in range(values.shape[0]):
      n = _valid(em_idata, c)
      ax.plot(np.arange(n), values[(c, slice(0, n)) + entry.index], color=COLORS[c % 10],
              lw=2.0 if c == best else 1.1, ls="-" if c == best else STYLES[1 + c % 3],
              zorder=3 if c == best else 2, alpha=0.9,
              label=f"restart {c}" + (" (best)" if c == best else ""))
  label_small_multiples(fig, axes, shown, total, "EM iteration",
                        "EM trajectories, labels aligned to the best restart")
  return fig


def _covariance_matrices(params, covariance_type, k, d):
  cov = np.asarray(params.covariances)
  if covariance_type == "full":
    return cov
  if covariance_type == "tied":
    return np.broadcast_to(cov, (k, d, d))
  if covariance_type == "diag":
    return np.stack([np.diag(c) for c in cov])
  return cov[:, None, None] * np.eye(d)[None]


def mixture_ellipses(fitted, data, features=(0, 1), feature_names=None) -> Figure:
  """Data coloured by most probable component, with 1- and 2-sigma ellipses.

  Uses the first two features (or `features`); a 1-D mixture gets a histogram
  with the weighted component densities.
  """
  x = np.asarray(data.x)
  params = get_adapter(fitted).params(fitted)
  weights, means = np.asarray(params.weights), np.asarray(params.means)
  k, d = means.shape
  covs = _covariance_matrices(params, covariance_layout(fitted.covariance_type), k, d)
  labels = fitted.predict(x)
  names = feature_names or [f"feature {j}" for j in range(d)]
  fig = Figure(figsize=(6.4, 5.2), layout="constrained")
  ax = fig.subplots()
  if d == 1:
    grid = np.linspace(x.min() - 1, x.max() + 1, 400)
    ax.hist(x[:, 0], bins=40, density=True, color="0.8")
    for j in range(k):
      sd = np.sqrt(covs[j, 0, 0])
      dens = weights[j] * np.exp(-0.5 * ((grid - means[j, 0]) / sd) ** 2) / (sd * np.sqrt(2 * np.pi))
      ax.plot(grid, dens, color=COLORS[j % 10], label=f"component {j} (w={weights[j]:.2f})")
    ax.set(xlabel=names[0], ylabel="density", title="Fitted mixture")
    ax.legend(fontsize=8)
    return fig
  a, b = features
  for j in range(k):
    mask = labels == j
    ax.scatter(x[mask, a], x[mask, b], s=10, color=COLORS[j % 10], alpha=0.6)
    sub = covs[j][np.ix_([a, b], [a, b])]
    vals, vecs = np.linalg.eigh(sub)
    angle = np.degrees(np.arctan2(vecs[1, -1], vecs[0, -1]))
    for n_sd, style in ((1, "-"), (2, "--")):
      ax.add_patch(Ellipse((means[j, a], means[j, b]), 2 * n_sd * np.sqrt(vals[-1]),
                           2 * n_sd * np.sqrt(vals[0]), angle=angle, fill=False,
                           ls=style, lw=1.8, color=COLORS[j % 10]))
    ax.plot(means[j, a], means[j, b], "kx", ms=9, mew=2)
    ax.plot([], [], color=COLORS[j % 10], label=f"component {j} (w={weights[j]:.2f})")
  ax.plot([], [], "k-", label="1 sd"), ax.plot([], [], "k--", label="2 sd")
  ax.set(xlabel=names[a], ylabel=names[b], title="Fitted mixture: 1- and 2-sd ellipses")
  ax.legend(fontsize=8)
  return fig


def add_posterior_predictive(em_idata, fitted, data, num_draws: int = 100, seed: int = 0):
  """Adds a posterior_predictive group: `num_draws` data sets from the fitted model.

  Draws come from the fitted JointDistribution at theta_hat (chain=1), each
  with as many points as observed_data.
  """
  adapter = get_adapter(fitted)
  draws = adapter.posterior_predictive(fitted, adapter.params(fitted), data, num_draws, seed)
  group = xr.Dataset(
      {n: (("chain", "draw") + em_idata.observed_data[n].dims, np.asarray(a)[None])
       for n, a in draws.items()},
      coords={"chain": [0], "draw": np.arange(num_draws),
              **{c: em_idata.observed_data.coords[c] for c in em_idata.observed_data.coords}})
  if "posterior_predictive" in em_idata.groups():
    del em_idata.posterior_predictive
  em_idata.add_groups(posterior_predictive=group)
  return em_idata


def posterior_predictive(em_idata, num_pp_samples: int = 50) -> Figure:
  """Observed data against data sets drawn from the fitted model.

  Data with a feature dim: one density panel per feature (replicates thin,
  data thick), then for 2 features the replicates' density contours over the
  observed points, for 3-5 features a pair plot of contours (upper triangle
  of feature pairs). Other data: `az.plot_ppc`.
  """
  obs = em_idata.observed_data
  first = list(obs.data_vars)[0]
  if obs[first].dims != ("obs", "feature"):
    fig = Figure(figsize=(6, 3.6), layout="constrained")
    az.plot_ppc(em_idata, var_names=[first], flatten=["obs"], ax=fig.subplots(),
                num_pp_samples=num_pp_samples, random_seed=0, show=False)
    return fig
  x = obs[first].values                                                 # [N, D]
  reps = em_idata.posterior_predictive[first].values[0][:num_pp_samples]  # [S, N, D]
  names = [str(f) for f in obs.coords["feature"].values]
  d = x.shape[1]
  pairs = [(a, b) for a in range(d) for b in range(a + 1, d)] if 2 <= d <= 5 else []
  panels = d + len(pairs)
  fig, axes = small_multiples(panels, cols=3, width=min(10.0, 3.4 * panels), height=2.9)
  for j, ax in enumerate(axes[:d]):
    bins = np.histogram_bin_edges(np.concatenate([x[:, j], reps[..., j].ravel()]), bins=30)
    mid = 0.5 * (bins[1:] + bins[:-1])
    for s in range(reps.shape[0]):
      ax.plot(mid, np.histogram(reps[s, :, j], bins, density=True)[0], color="C0", alpha=0.12,
              lw=0.8, label="replicated data" if s == 0 else None)
    ax.plot(mid, np.histogram(x[:, j], bins, density=True)[0], color="k", lw=2,
            label="observed data")
    ax.set(xlabel=names[j], ylabel="density")
  for ax, (a, b) in zip(axes[d:], pairs):
    counts, xe, ye = np.histogram2d(reps[..., a].ravel(), reps[..., b].ravel(), bins=40)
    ax.contour(0.5 * (xe[1:] + xe[:-1]), 0.5 * (ye[1:] + ye[:-1]), counts.T, levels=6,
               colors="C0", linewidths=1)
    ax.scatter(x[:, a], x[:, b], s=5, color="k", alpha=0.7)
    ax.set(xlabel=names[a], ylabel=names[b], title="replicated (contours), observed (dots)")
  axes[0].legend(fontsize=8)
  fig.suptitle(f"Posterior predictive check: {reps.shape[0]} data sets drawn at the estimate",
               fontsize=10)
  return fig


def hidden_unit_heatmap(fitted, data) -> Figure:
  """E[z_hj | x_j, y_j] for a Bernoulli-MLP: points (rows, grouped by class)
  by hidden units (columns), with the class of each row in a side strip."""
  adapter = get_adapter(fitted)
  model = adapter.model(fitted)
  post = model.posterior(adapter.params(fitted), data)["hidden_marginals"].numpy()  # [N, m]
  labels = np.asarray(data[1])
  order = np.lexsort((post[:, 0], labels))
  fig = Figure(figsize=(2.2 + 0.6 * post.shape[1], 5.2), layout="constrained")
  strip, ax = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, max(2, post.shape[1])]})
  strip.imshow(labels[order, None], aspect="auto", cmap="tab10", vmin=0, vmax=9,
               interpolation="nearest")
  strip.set(xticks=[], ylabel="data point (sorted by class)", title="class")
  image = ax.imshow(post[order], aspect="auto", cmap="viridis", vmin=0, vmax=1,
                    interpolation="nearest")
  ax.set(xticks=np.arange(post.shape[1]), yticks=[], xlabel="hidden unit",
         title="E[z | x, y]")
  fig.colorbar(image, ax=ax, shrink=0.8)
  return fig
