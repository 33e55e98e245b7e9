"""The report's HMC cross-check section (see `tfp_em.diagnostics.report`)."""
from __future__ import annotations

import numpy as np

import arviz as az

from tfp_em.diagnostics import hmc_plots, page
from tfp_em.diagnostics.adapters import get_adapter
from tfp_em.diagnostics.hmc import compare_with_em, sample_posterior
from tfp_em.diagnostics.naming import dataset_coords

RHAT_LIMIT = 1.01
ESS_MIN = 400

def hmc_section(fitted, data, out_dir, kwargs, progress, hmc_idata, se, named, feature_names):
  """(HTML, checks) of the NUTS cross-check.

  Args:
    kwargs: arguments for `sample_posterior` (unless `hmc_idata` is given).
    hmc_idata: an InferenceData from `sample_posterior`, or None to sample.
    se: the fit's `StandardErrors` (Hessian); named: its `naming.Entry` list.
    feature_names: the features' names (with the adapter's `coords`, they name the plots'
      panels).
  """
  kwargs = dict(kwargs)
  kwargs.setdefault("progress", progress)
  if not kwargs.get("fixed") and not get_adapter(fitted).hmc_fixed:
    kwargs.setdefault("precondition", se.information)  # the same params: no second Hessian
  if hmc_idata is None:
    hmc_idata = sample_posterior(fitted, data, **kwargs)
  page.write_netcdf(hmc_idata, out_dir / "hmc_posterior.nc")
  table = compare_with_em(fitted, hmc_idata, data, priors=kwargs.get("priors"), em_se=se)
  names = {e.label: e.name for e in named if e.keep}
  table = table.loc[[label for label in table.index if label in names]]
  stats = hmc_idata.sample_stats
  max_rhat = float(table["r_hat"].max())
  checks = [
      (f"HMC: max R-hat < {RHAT_LIMIT}", f"{max_rhat:.4f}", max_rhat < RHAT_LIMIT),
      (f"HMC: min bulk ESS > {ESS_MIN}", f"{table['ess_bulk'].min():.0f}",
       table["ess_bulk"].min() > ESS_MIN),
      ("HMC: divergent transitions", f"{int(stats['diverging'].sum())}",
       int(stats["diverging"].sum()) == 0),
      ("posterior mode at the EM estimate: max |MAP - EM| / SE",
       f"{np.nanmax(np.abs(table['z_map'])):.2e}", np.nanmax(np.abs(table["z_map"])) < 0.05),
  ]
  post = hmc_idata.posterior
  seconds = float(post.attrs["sampling_seconds"])
  warm_up = int(post.attrs.get("num_burnin", post.sizes["draw"]))
  columns = ["em_estimate", "em_se", "post_mean", "post_sd", "map", "z_mean", "z_map", "r_hat",
             "ess_bulk", "ess_tail"]
  rows = [[names[label]] + [table.loc[label, c] for c in columns] for label in table.index]
  shown = _with_names(hmc_idata, get_adapter(fitted).coords(fitted, feature_names))
  body = [
      "<h2>HMC cross-check</h2>",
      f'<p class="note">TFP NUTS on the same marginalized model with weak priors, '
      "preconditioned by the observed information where it is positive definite "
      f"({post.sizes['chain']} chains x {post.sizes['draw']} draws after {warm_up} warm-up, "
      f"{seconds:.1f} s including XLA compilation; mean acceptance "
      f"{float(stats['acceptance_rate'].mean()):.2f}, mean leapfrog steps "
      f"{float(stats['n_steps'].mean()):.1f}). <code>map</code> is the posterior mode found by "
      "L-BFGS started from the posterior mean; <code>z_map</code> and <code>z_mean</code> are its "
      "and the posterior mean's distance from the EM estimate in standard errors. The posterior "
      "mean of a variance sits above its mode (right skew), the mode sits at the EM estimate.</p>",
      label_switching_note(hmc_idata),
      page.table(["parameter"] + columns, rows),
      page.save(hmc_plots.hmc_trace(shown), out_dir, "hmc_trace.png",
           "NUTS draws of every parameter entry, one line per chain (after relabelling to the "
           "EM estimate's labels; red ticks mark relabelled draws)."),
      page.save(hmc_plots.hmc_rank(shown), out_dir, "hmc_rank.png",
           "Rank plots: near-uniform bars for every chain mean the chains mix."),
  ]
  return "".join(body), checks

def label_switching_note(hmc_idata) -> str:
  """A paragraph saying whether (and in which chains) the sampler switched labels."""
  stats = hmc_idata.sample_stats
  if "relabelled" not in stats:
    return ""
  flags = stats["relabelled"].values                                   # [chain, draw]
  if not flags.any():
    return ('<p class="note">Label switching: none. No draw needed its latent labels '
            "(components, hidden units) permuted to match the EM estimate.</p>")
  per_chain = ", ".join(f"chain {c}: {f.mean():.1%}" for c, f in enumerate(flags) if f.any())
  return ('<p class="note"><b>Label switching:</b> the sampler moved to another labelling of '
          f"the latent variables (components, hidden units) in {int(flags.sum())} of "
          f"{flags.size} draws ({per_chain}). The likelihood is the same under any relabelling; "
          "every draw was mapped back to the EM estimate's labelling (Hungarian matching) "
          "before the summaries, R-hat and the plots, so the table describes the mode EM "
          "found.</p>")

def _with_names(hmc_idata, coords):
  """An InferenceData whose coordinates carry the adapter's names (for plot titles)."""
  post = hmc_idata.posterior
  return az.InferenceData(posterior=post.assign_coords(dataset_coords(coords, post.sizes)),
                          sample_stats=hmc_idata.sample_stats)
