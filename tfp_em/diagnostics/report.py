"""Self-contained HTML diagnostic report of an EM fit.

`write_report(fitted_or_netcdf, X, out_dir)` writes into `out_dir`:

    index.html            tables and figures; relative links only
    *.png                 the figures
    inference_data.nc     the EM InferenceData (+ posterior_predictive); it
                          carries everything `write_report` needs, so
                          `write_report("inference_data.nc", out_dir=...)`
                          rebuilds the same report without refitting
    hmc_posterior.nc      the NUTS InferenceData (when hmc=True)

Sections: the model and data; model selection (when the fit came from a
search, `model_selection=`); checks; restarts (reached the best optimum,
stopped early near it, or found another); clusters (latent-class models);
estimates with standard errors and intervals, named by component and feature;
convergence; fit and predictive check; the HMC cross-check (`report_hmc`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import tensorflow as tf

from tfp_em.diagnostics import page, plots, selection
from tfp_em.diagnostics.adapters import get_adapter
from tfp_em.diagnostics.inference_data import (load_fitted, read_netcdf, resolve_data,
                                               set_model_selection, to_inference_data)
from tfp_em.diagnostics.report_hmc import hmc_section
from tfp_em.diagnostics.restarts import restart_check, restart_outcomes
from tfp_em.diagnostics.standard_errors import as_float64, named_entries, standard_errors
from tfp_em.engine import outputs
from tfp_em.engine.unconstrained import Flattener

# NUTS draws of the report's cross-check (4 chains). Preconditioned by the observed
# information, NUTS mixes fast: on the demo's mixture 500 warm-up draws adapt the step
# size and 1000 kept draws give a bulk ESS near 2000 and R-hat 1.002 in about 4 s after
# compilation.
REPORT_HMC = dict(num_results=1000, num_burnin=500)


def em_checks(fitted, em_idata, data) -> list[tuple[str, str, bool]]:
  """(check, measured value, passed: True / False / None for a warning):
  monotone log-likelihood and a stationary point (the restarts' check is
  `restarts.restart_check`)."""
  lp = em_idata.sample_stats["lp"].values
  n_iter = em_idata.sample_stats["n_iter"].values
  adapter = get_adapter(fitted)
  model = adapter.model(fitted)
  n_obs = float(model.num_observations(data))
  drops = [float(-np.min(np.diff(lp[c, :n + 1]))) if n > 0 else 0.0
           for c, n in enumerate(n_iter)]
  slack = 1e-9 * (np.max(np.abs(lp)) + n_obs)
  out = [("log-likelihood never decreases (largest drop over all restarts)",
          f"{max(max(drops), 0.0):.3g} (slack {slack:.2g})", max(drops) <= slack)]
  flat = Flattener(adapter.params(fitted), adapter.param_specs(fitted), dtype=tf.float64)
  u = tf.Variable(flat.u_hat)
  d64 = as_float64(data)
  with tf.GradientTape() as tape:
    loglik = model.marginal_log_prob(flat.unflatten(u), d64)
  grad = float(tf.reduce_max(tf.abs(tape.gradient(loglik, u)))) / n_obs
  out.append(("stationary point: max |d mean-l / du| at the estimate (shrinks with tol)",
              f"{grad:.2e}", grad < 1e-3))
  return out


def write_report(source, X=None, out_dir="tfp_em_report", *, y=None, hmc=True,
                 hmc_kwargs: dict | None = None, n_boot: int = 0, feature_names=None,
                 title: str | None = None, progress: bool | None = None,
                 model_selection=None, **data_kwargs) -> Path:
  """Writes the HTML report; returns the path of `index.html`.

  Args:
    source: a fitted estimator, or the path of a netCDF file written by
      `to_inference_data(...).to_netcdf` / a previous report.
    X, y: the training data (needed for a fitted estimator that does not keep
      it; ignored for netCDF, which carries its data).
    out_dir: output folder (created; default 'tfp_em_report'; files of an
      earlier report there are replaced).
    hmc: True (default) runs the NUTS cross-check; an InferenceData from
      `tfp_em.diagnostics.hmc.sample_posterior` is used as is; False leaves it out.
    hmc_kwargs: arguments for `tfp_em.diagnostics.hmc.sample_posterior`
      (default `REPORT_HMC`: 500 warm-up and 1000 kept draws per chain).
    n_boot: parametric-bootstrap replicates for a bootstrap SE column
      (default 0: none).
    feature_names: names of the features (default from a DataFrame X or
      the data's coords); they name parameters and plot axes.
    title: page title (default '<estimator> diagnostic report').
    progress: progress bars; None means on, except under pytest.
    model_selection: the model search that chose this fit: rows of dicts
      with k, covariance_type, bic (and icl); drawn as a BIC panel (see
      `tfp_em.diagnostics.selection`). Kept in the report's netCDF.
    data_kwargs: further data `fit` took (sample_weight; clusters, time, Z).

  Raises:
    ValueError: a bad output folder, source or data.
  """
  outputs.check_output_dir(out_dir)  # fail before any work; created once the input is read
  if isinstance(source, (str, os.PathLike)):
    em_idata = read_netcdf(source)
    em_idata.load()
    fitted, data = load_fitted(em_idata)
  else:
    fitted = source
    data = resolve_data(fitted, X, y, **data_kwargs)
    if feature_names is None:
      feature_names = _columns(X)
    em_idata = to_inference_data(fitted, data, feature_names=feature_names)
  if model_selection is not None:
    set_model_selection(em_idata, model_selection)
  if feature_names is None and "feature" in em_idata.posterior.coords:
    feature_names = [str(f) for f in em_idata.posterior.coords["feature"].values]
  out_dir = Path(outputs.ensure_writable_dir(out_dir))
  plots.add_posterior_predictive(em_idata, fitted, data, num_draws=100)
  name = type(fitted).__name__
  named = named_entries(fitted, feature_names)

  se_h = standard_errors(fitted, data)
  if [e.label for e in named] != list(se_h.labels):
    raise ValueError(f"{name}: the adapter's dims do not match its params")
  parts = [f"<h1>{page.esc(title or name + ' diagnostic report')}</h1>",
           _model_section(fitted, em_idata, feature_names)]
  parts += _selection_section(em_idata, out_dir)
  checks = em_checks(fitted, em_idata, data)
  outcomes = restart_outcomes(em_idata, _fields(fitted), se_h.se)
  checks.insert(1, restart_check(outcomes))
  estimates, se_checks = _estimates_section(fitted, data, se_h, named, n_boot, progress)
  checks += se_checks
  hmc_html = ""
  unavailable = get_adapter(fitted).hmc_unavailable(fitted)
  if hmc is True and unavailable:
    hmc_html = f'<h2>HMC cross-check</h2><p class="note">Not run: {page.esc(unavailable)}.</p>'
  elif hmc is not False and hmc is not None:
    kwargs = dict(REPORT_HMC, **(hmc_kwargs or {}))
    hmc_html, hmc_checks = hmc_section(fitted, data, out_dir, kwargs, progress,
                                       None if hmc is True else hmc, se_h, named, feature_names)
    checks += hmc_checks
  parts.append("<h2>Checks</h2>" + page.table(
      ["check", "value", "result"], [(c, v, ok) for c, v, ok in checks], {2: page.verdict}))
  parts.append(_restarts_section(em_idata, outcomes))
  parts += _clusters_section(fitted, data, out_dir)
  parts.append(estimates)
  parts.append("<h2>Convergence</h2>")
  parts.append(page.save(
      plots.loglik_traces(em_idata), out_dir, "loglik_traces.png",
      "Log-likelihood at every EM iteration, one line per restart (left), and its distance to "
      "the best restart's final value (right, log scale)."))
  parts.append(page.save(
      plots.parameter_traces(em_idata), out_dir, "parameter_traces.png",
      "EM trajectory of every parameter entry, one panel each with its own scale; one line per "
      "restart, labels aligned to the best restart."))
  parts.append("<h2>Fit</h2>")
  adapter = get_adapter(fitted)
  for table in adapter.tables(fitted, data, feature_names=feature_names):
    parts.append(f"<h3>{page.esc(table.title)}</h3>"
                 f'<p class="note">{page.esc(table.note)}</p>'
                 + page.table(table.header, table.rows))
  for fig, file_name, caption in adapter.figures(fitted, data, feature_names=feature_names):
    parts.append(page.save(fig, out_dir, file_name, caption))
  if adapter.density_check:
    parts.append(page.save(
        plots.posterior_predictive(em_idata), out_dir, "ppc.png",
        "Posterior predictive check: data sets drawn from the fitted JointDistribution at the "
        "estimate (blue) against the observed data (black)."))
  parts.append(hmc_html)

  page.write_netcdf(em_idata, out_dir / "inference_data.nc")
  # only what this run wrote: a stale file from an earlier report is not linked
  files = ["inference_data.nc"] + (["hmc_posterior.nc"] if hmc_html and not unavailable else [])
  parts.append("<h2>Files</h2><ul>" + "".join(
      f'<li><a href="{f}">{f}</a></li>' for f in files) + "</ul>")
  path = out_dir / "index.html"
  with outputs.atomic_path(path) as tmp:
    Path(tmp).write_text(page.document(f"{name} report", parts), encoding="utf-8")
  return path


def _columns(X):
  return [str(c) for c in X.columns] if hasattr(X, "columns") else None


def _fields(fitted):
  adapter = get_adapter(fitted)
  return [n for n, s in zip(adapter.params(fitted)._fields, adapter.param_specs(fitted))
          if s.trainable]


def _model_section(fitted, em_idata, feature_names) -> str:
  attrs = em_idata.posterior.attrs
  n_obs = em_idata.observed_data.sizes["obs"]
  loglik = float(attrs["log_likelihood"])
  count = len(feature_names) if feature_names is not None else int(attrs["n_features"])
  features = f"{count} feature{'s' if count != 1 else ''}" + (
      f" ({', '.join(map(str, feature_names))})" if feature_names is not None else "")
  return ("<h2>Model and data</h2>"
          f"<p>{page.esc(type(fitted).__name__)} fitted to {n_obs} observations of "
          f"{page.esc(features)}. Log-likelihood at the estimate {loglik:.4f} "
          f"({loglik / n_obs:.4f} per point), from restart {int(attrs['best_restart'])} of "
          f"{em_idata.posterior.sizes['chain']}.</p>"
          + page.config_table(str(attrs["config"])))


def _selection_section(em_idata, out_dir) -> list[str]:
  rows = em_idata.posterior.attrs.get("model_selection")
  if not rows:
    return []
  rows = json.loads(rows)
  pick = [r for r in rows if r.get("chosen")] or [min(rows, key=lambda r: r["bic"])]
  chosen = (pick[0]["k"], pick[0]["covariance_type"])
  types = list(dict.fromkeys(r["covariance_type"] for r in rows))
  ks = sorted({r["k"] for r in rows})
  bic = {(r["k"], r["covariance_type"]): float(r["bic"]) for r in rows}
  bic[chosen] = page.Marked(bic[chosen], "chosen")
  bic_cell = lambda v: "—" if np.isnan(v) else f"{v:.1f}"  # noqa: E731
  one_decimal = dict.fromkeys(range(1, len(types) + 1), bic_cell)
  table = page.table(["K"] + [f"BIC, {t}" for t in types],
                     [[k] + [bic.get((k, t), np.nan) for t in types] for k in ks], one_decimal)
  caption = ("BIC = -2 log-likelihood + (free parameters) log N; lower is better"
             + ("; ICL adds twice the classification entropy" if "icl" in rows[0] else "")
             + f". The chosen model (K={chosen[0]}, {chosen[1]}) is ringed.")
  return ["<h2>Model selection</h2>",
          f'<p class="note">This fit was chosen from {len(rows)} candidates by BIC '
          "(lower is better).</p>",
          page.save(selection.model_selection_figure(rows, chosen), out_dir,
                    "model_selection.png", caption), table]


def _restarts_section(em_idata, outcomes) -> str:
  ss = em_idata.sample_stats
  chains = np.arange(ss.sizes["chain"])
  final = ss["lp"].values[chains, ss["n_iter"].values]
  rows = [[int(c), int(ss["seed"].values[c]), float(final[c]), int(ss["n_iter"].values[c]),
           str(ss["stop_reason"].values[c]), outcomes[c].text, float(ss["seconds"].values[c])]
          for c in chains]
  return ("<h2>Restarts</h2>"
          + page.table(["restart", "seed", "final log-likelihood", "iterations", "stopped by",
                        "outcome", "seconds"], rows,
                       {2: lambda v: f"{v:.4f}", 6: lambda v: f"{v:.2f}"}))


def _clusters_section(fitted, data, out_dir) -> list[str]:
  adapter = get_adapter(fitted)
  if not adapter.latent_states or not any("component" in d for d in adapter.dims(fitted).values()):
    return []
  table = adapter.complete_log_prob_table(fitted, adapter.params(fitted), data)   # [N, K]
  resp = tf.nn.softmax(table, axis=-1).numpy()
  if resp.shape[1] < 2:
    return []
  sizes = selection.classification_table(resp)
  return ["<h2>Clusters</h2>",
          '<p class="note">Each point is assigned to its most probable component; the expected '
          "size is the sum of the posterior probabilities. A point whose largest probability is "
          f"below {selection.SURE} sits between components.</p>",
          page.table(["component"] + list(sizes.columns),
                     [[i] + list(r) for i, r in zip(sizes.index, sizes.itertuples(index=False))]),
          page.save(selection.classification_figure(resp), out_dir, "clusters.png",
                    "Cluster sizes (left) and each point's largest posterior probability (right).")]


def _estimates_section(fitted, data, se_h, named, n_boot, progress):
  adapter = get_adapter(fitted)
  columns = {"SE (Hessian)": se_h.se}
  checks = []
  if adapter.latent_states:
    se_l = standard_errors(fitted, data, method="louis")
    columns["SE (Louis)"] = se_l.se
    rel = float(np.max(np.abs(se_l.se - se_h.se) / np.maximum(se_h.se, 1e-300)))
    checks.append(("Louis' observed information equals the autodiff Hessian (max rel. SE diff.)",
                   f"{rel:.2e}", rel < 1e-5))
  gauge = adapter.gauge_dimension(fitted)
  eig = float(np.linalg.eigvalsh(0.5 * (se_h.information + se_h.information.T))[gauge])
  checks.append(("observed information positive definite (smallest eigenvalue"
                 + (f" after the model's {gauge} flat directions)" if gauge else ")"),
                 f"{eig:.4g}", eig > 0))
  if n_boot:
    from tfp_em.diagnostics.standard_errors import bootstrap_standard_errors
    columns[f"SE (bootstrap, {n_boot})"] = bootstrap_standard_errors(
        fitted, data, n_boot=n_boot, progress=progress).se
  lower, upper = se_h.interval(0.95)
  scale = {"logit": "logit", "log": "log", "identity": "—"}
  keep = [i for i, e in enumerate(named) if e.keep]
  rows = [[named[i].name, se_h.estimate[i]] + [c[i] for c in columns.values()]
          + [lower[i], upper[i], scale[se_h.links[i]]] for i in keep]
  louis = ("; Louis' method from the complete-data information over the enumerated latents"
           if adapter.latent_states else "")
  boot = f"; a parametric bootstrap with {n_boot} refits" if n_boot else ""
  repeats = len(named) - len(keep)
  html = ("<h2>Estimates and standard errors</h2>"
          '<p class="note">Standard errors from the observed information (autodiff Hessian '
          "of the TFP marginal log-likelihood in the bijectors' unconstrained coordinates, "
          f"mapped back by the delta method){louis}{boot}. 95% intervals are Wald intervals on "
          "each entry's own scale (logit for a probability, log for a variance, none otherwise) "
          "mapped back, so they stay inside the parameter's range."
          + (f" Symmetric matrices are listed once ({repeats} repeated "
             f"{'entry' if repeats == 1 else 'entries'} left out)." if repeats else "")
          + "</p>"
          + page.table(["parameter", "estimate"] + list(columns) + ["95% lower", "95% upper",
                                                                     "interval scale"], rows))
  return html, checks
