"""What `tfp-em fit gmm` and `tfp-em demo` write: parameters (JSON), a plot, the InferenceData.

Imported after the command line's checks: it loads TensorFlow.
"""
from __future__ import annotations

import os

from tfp_em.diagnostics import plots
from tfp_em.diagnostics.inference_data import resolve_data, to_inference_data
from tfp_em.engine import outputs


def write_fit_outputs(est, x, names, out, title, selection=None) -> None:
  """Writes gmm_params.json, inference_data.nc (with the model search's table) and
  gmm_fit.png into `out`, and prints the components."""
  summary = dict(
      n_components=est.n_components, covariance_type=est.covariance_type, columns=names,
      weights=est.weights_, means=est.means_, covariances=est.covariances_,
      log_likelihood=est.log_likelihood_, bic=est.bic(x), aic=est.aic(x),
      n_iter=est.n_iter_, converged=est.converged_, n_points=int(x.shape[0]))
  if selection is not None:
    summary["model_selection"] = selection
  params_path = outputs.write_json(os.path.join(out, "gmm_params.json"), summary)
  netcdf_path = os.path.join(out, "inference_data.nc")
  with outputs.atomic_path(netcdf_path) as tmp:
    to_inference_data(est, x, feature_names=names, model_selection=selection).to_netcdf(tmp)
  png_path = plot_fit(est, x, names, os.path.join(out, "gmm_fit.png"), title)
  print("\nComponent  weight   mean")
  for k in range(est.n_components):
    mean = ", ".join(f"{m:.3f}" for m in est.means_[k])
    print(f"{k:>9}  {est.weights_[k]:.3f}   [{mean}]")
  print(f"\nlog-likelihood {est.log_likelihood_:.4f} at the returned parameters "
        f"({est.n_iter_} iterations, converged={est.converged_})")
  print(f"wrote {params_path}\nwrote {png_path}\nwrote {netcdf_path} "
        f"(for `tfp-em report {netcdf_path}`)")


def plot_fit(est, x, names, path, title) -> str:
  """Writes the data coloured by component with 1- and 2-sd ellipses (first two features)."""
  fig = plots.mixture_ellipses(est, resolve_data(est, x), feature_names=names)
  fig.suptitle(f"{title}: K={est.n_components}, {est.covariance_type} covariances")
  outputs.save_figure(fig, path, dpi=110)
  return path
