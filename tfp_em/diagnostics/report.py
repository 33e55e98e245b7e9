"""Self-contained HTML diagnostic report of an EM fit.

`write_report(fitted_or_netcdf, X, out_dir)` writes into `out_dir`:

    index.html            tables and figures; relative links only
    *.png                 the figures
    inference_data.nc     the EM InferenceData (+ posterior_predictive); it
                          carries everything `write_report` needs, so
                          `write_report("inference_data.nc", out_dir=...)`
                          rebuilds the same report without refitting
    hmc_posterior.nc      the NUTS InferenceData (when hmc=True)
"""
from __future__ import annotations

import html
import os
from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf

from tfp_em.diagnostics import plots
from tfp_em.diagnostics.adapters import get_adapter
from tfp_em.diagnostics.inference_data import load_fitted, read_netcdf, resolve_data, to_inference_data
from tfp_em.diagnostics.standard_errors import as_float64, standard_errors
from tfp_em.engine import outputs
from tfp_em.engine.unconstrained import Flattener

RHAT_LIMIT = 1.01

_CSS = """
body { font-family: -apple-system, Segoe UI, Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1100px; color: #222; line-height: 1.45; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 0.86em; margin: 0.6em 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.4em 0; }
.pass { color: #17702a; font-weight: bold; } .fail { color: #b3261e; font-weight: bold; }
.warn { color: #a05a00; font-weight: bold; }
.note { color: #555; font-size: 0.9em; } code { background: #f5f5f5; padding: 0 3px; }
"""


def _table(df: pd.DataFrame, digits: int = 4) -> str:
  return df.to_html(float_format=lambda x: f"{x:.{digits}g}", border=0, escape=True)


def _figure(fig, out_dir: Path, name: str, caption: str) -> str:
  outputs.save_figure(fig, out_dir / name, dpi=100)
  return (f'<figure><img src="{html.escape(name)}" alt="{html.escape(caption)}">'
          f'<figcaption class="note">{html.escape(caption)}</figcaption></figure>')


def _write_netcdf(idata, path):
  """Atomic: a report regenerated in place may still hold `path` open."""
  with outputs.atomic_path(path) as tmp:
    idata.to_netcdf(tmp)


def _verdict(ok) -> str:
  if ok is None:
    return '<span class="warn">warn</span>'
  return '<span class="pass">pass</span>' if ok else '<span class="fail">FAIL</span>'


def em_checks(fitted, em_idata, data) -> list[tuple[str, str, bool]]:
  """(check, measured value, passed: True / False / None for a warning)."""
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
  final = lp[np.arange(lp.shape[0]), n_iter]
  best = np.max(final)
  at_best = np.abs(final - best) <= 1e-6 * n_obs
  # a warning (None), not a failure: other restarts found other local optima
  out.append(("restarts reaching the best log-likelihood (within 1e-6 per point)",
              f"{int(at_best.sum())} of {len(final)}",
              True if at_best.sum() >= min(2, len(final)) else None))
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
                 **data_kwargs) -> Path:
  """Writes the HTML report; returns the path of `index.html`.

  Args:
    source: a fitted estimator, or the path of a netCDF file written by
      `to_inference_data(...).to_netcdf` / a previous report.
    X, y: the training data (needed for a fitted estimator that does not keep
      it; ignored for netCDF, which carries its data).
    out_dir: output folder (created; default 'tfp_em_report').
    hmc: True (default) runs the NUTS cross-check; an InferenceData from
      `tfp_em.diagnostics.hmc.sample_posterior` is used as is; False leaves it out.
    hmc_kwargs: extra arguments for `tfp_em.diagnostics.hmc.sample_posterior`.
    n_boot: parametric-bootstrap replicates for a bootstrap SE column
      (default 0: none).
    feature_names: names for the plot axes (default from the data's coords).
    title: page title (default '<estimator> diagnostic report').
    progress: progress bars; None means on, except under pytest.
    data_kwargs: further data `fit` took (sample_weight; clusters, time, Z).
  """
  outputs.check_output_dir(out_dir)  # fail before any work; created once the input is read
  if isinstance(source, (str, os.PathLike)):
    em_idata = read_netcdf(source)
    em_idata.load()
    fitted, data = load_fitted(em_idata)
  else:
    fitted = source
    data = resolve_data(fitted, X, y, **data_kwargs)
    if feature_names is None and hasattr(X, "columns"):
      feature_names = [str(c) for c in X.columns]
    em_idata = to_inference_data(fitted, data, feature_names=feature_names)
  if feature_names is None and "feature" in em_idata.posterior.coords:
    feature_names = [str(f) for f in em_idata.posterior.coords["feature"].values]
  out_dir = Path(outputs.ensure_writable_dir(out_dir))
  adapter = get_adapter(fitted)
  name = type(fitted).__name__
  plots.add_posterior_predictive(em_idata, fitted, data, num_draws=100)

  parts = [f"<h1>{html.escape(title or name + ' diagnostic report')}</h1>"]
  attrs = em_idata.posterior.attrs
  n_obs = em_idata.observed_data.sizes["obs"]
  parts.append(
      f'<p class="note">Model configuration: <code>{html.escape(str(attrs["config"]))}</code><br>'
      f"{n_obs} observations; log-likelihood at the estimate {float(attrs['log_likelihood']):.6f} "
      f"({float(attrs['log_likelihood']) / n_obs:.6f} per point); best of "
      f"{em_idata.posterior.sizes['chain']} restarts: #{int(attrs['best_restart'])}.</p>")

  # Checks and restarts.
  checks = em_checks(fitted, em_idata, data)
  se_h = standard_errors(fitted, data)
  estimates = pd.DataFrame({"estimate": se_h.estimate, "se (Hessian)": se_h.se}, index=se_h.labels)
  if adapter.latent_states:
    se_l = standard_errors(fitted, data, method="louis")
    estimates["se (Louis)"] = se_l.se
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
    se_b = bootstrap_standard_errors(fitted, data, n_boot=n_boot, progress=progress)
    estimates[f"se (bootstrap, {n_boot})"] = se_b.se
  estimates["ci_2.5%"] = se_h.estimate - 1.959964 * se_h.se
  estimates["ci_97.5%"] = se_h.estimate + 1.959964 * se_h.se

  hmc_html, hmc_checks = "", []
  if hmc is not False and hmc is not None:
    hmc_html, hmc_checks = _hmc_section(fitted, data, out_dir, dict(hmc_kwargs or {}), progress,
                                        None if hmc is True else hmc)
  checks += hmc_checks
  rows = "".join(f"<tr><td>{html.escape(c)}</td><td>{html.escape(v)}</td><td>{_verdict(ok)}</td></tr>"
                 for c, v, ok in checks)
  parts.append("<h2>Checks</h2><table><tr><th>check</th><th>value</th><th>result</th></tr>"
               f"{rows}</table>")
  ss = em_idata.sample_stats
  restarts = pd.DataFrame({
      "seed": ss["seed"].values, "final log-lik": ss["lp"].values[np.arange(ss.sizes["chain"]),
                                                                   ss["n_iter"].values],
      "n_iter": ss["n_iter"].values, "converged": ss["converged"].values,
      "stop": ss["stop_reason"].values, "seconds": ss["seconds"].values},
      index=pd.Index(np.arange(ss.sizes["chain"]), name="restart"))
  parts.append("<h2>Restarts</h2>" + _table(restarts, 10))
  louis = ("; Louis' method from the complete-data information over the enumerated latents"
           if adapter.latent_states else "")
  boot = f"; a parametric bootstrap with {n_boot} refits" if n_boot else ""
  parts.append("<h2>Estimates and standard errors</h2>"
               '<p class="note">Standard errors from the observed information (autodiff Hessian '
               "of the TFP marginal log-likelihood in the bijectors' unconstrained coordinates, "
               f"mapped back by the delta method){louis}{boot}; 95% Wald intervals.</p>"
               + _table(estimates))

  parts.append("<h2>Convergence</h2>")
  parts.append(_figure(plots.loglik_traces(em_idata), out_dir, "loglik_traces.png",
                       "Log-likelihood at every EM iteration, one line per restart."))
  parts.append(_figure(plots.parameter_traces(em_idata), out_dir, "parameter_traces.png",
                       "Parameter trajectories (labels aligned to the best restart)."))
  parts.append("<h2>Fit</h2>")
  for fig, file_name, caption in adapter.figures(fitted, data, feature_names=feature_names):
    parts.append(_figure(fig, out_dir, file_name, caption))
  parts.append(_figure(plots.posterior_predictive(em_idata), out_dir, "ppc.png",
                       "Posterior predictive check: 100 data sets drawn from the fitted "
                       "JointDistribution (blue) against the data (black)."))
  parts.append(hmc_html)

  _write_netcdf(em_idata, out_dir / "inference_data.nc")
  # only what this run wrote: a stale file from an earlier report is not linked
  files = ["inference_data.nc"] + (["hmc_posterior.nc"] if hmc_html else [])
  parts.append("<h2>Files</h2><ul>" + "".join(
      f'<li><a href="{f}">{f}</a></li>' for f in files) + "</ul>")
  page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(name)} report"
          f"</title><style>{_CSS}</style></head><body>{''.join(parts)}</body></html>")
  path = out_dir / "index.html"
  with outputs.atomic_path(path) as tmp:
    Path(tmp).write_text(page, encoding="utf-8")
  return path


def _hmc_section(fitted, data, out_dir, kwargs, progress, hmc_idata=None):
  from tfp_em.diagnostics.hmc import compare_with_em, sample_posterior
  kwargs.setdefault("progress", progress)
  if hmc_idata is None:
    hmc_idata = sample_posterior(fitted, data, **kwargs)
  _write_netcdf(hmc_idata, out_dir / "hmc_posterior.nc")
  table = compare_with_em(fitted, hmc_idata, data, priors=kwargs.get("priors"))
  stats = hmc_idata.sample_stats
  max_rhat = float(table["r_hat"].max())
  checks = [
      (f"HMC: max R-hat < {RHAT_LIMIT}", f"{max_rhat:.4f}", max_rhat < RHAT_LIMIT),
      ("HMC: min bulk ESS > 400", f"{table['ess_bulk'].min():.0f}", table["ess_bulk"].min() > 400),
      ("HMC: divergent transitions", f"{int(stats['diverging'].sum())}",
       int(stats["diverging"].sum()) == 0),
      ("posterior mode at the EM estimate: max |MAP - EM| / SE",
       f"{np.nanmax(np.abs(table['z_map'])):.2e}", np.nanmax(np.abs(table["z_map"])) < 0.05),
  ]
  post = hmc_idata.posterior
  seconds = float(post.attrs["sampling_seconds"])
  body = [
      "<h2>HMC cross-check</h2>",
      f'<p class="note">TFP NUTS on the same marginalized model with weak priors '
      f"({post.sizes['chain']} chains x {post.sizes['draw']} draws after warm-up, "
      f"{seconds:.1f} s including XLA compilation; mean acceptance "
      f"{float(stats['acceptance_rate'].mean()):.2f}, mean leapfrog steps "
      f"{float(stats['n_steps'].mean()):.1f}). <code>map</code> is the posterior mode found by "
      "L-BFGS started from the posterior mean; <code>z_map</code> and <code>z_mean</code> are its "
      "and the posterior mean's distance from the EM estimate in standard errors. The posterior "
      "mean of a variance sits above its mode (right skew), the mode sits at the EM estimate.</p>",
      _table(table),
      _figure(plots.hmc_trace(hmc_idata), out_dir, "hmc_trace.png",
              "NUTS trace plot: marginal posteriors (left) and draws per chain (right)."),
      _figure(plots.hmc_rank(hmc_idata), out_dir, "hmc_rank.png",
              "Rank plots: near-uniform bars for every chain mean the chains mix."),
  ]
  return "".join(body), checks
