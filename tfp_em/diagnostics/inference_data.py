"""ArviZ export of EM fits: `to_inference_data` and its inverse `load_fitted`.

Groups of the returned `az.InferenceData` (dims after chain/draw in brackets):

    posterior       one variable per parameter field, e.g. for a mixture
                    weights [component], means [component, feature],
                    covariances [component, feature, feature_bis];
                    chain = restart, draw = EM iteration (draw 0 is the
                    initialization). Restarts shorter than the longest repeat
                    their final value; `sample_stats.n_iter` says where the
                    real trajectory ends. When only the first and last params
                    were kept (keep_trajectory=False; a network f), draw 1 on
                    holds the final params. Latent labels of every restart
                    are aligned to the best restart (Hungarian matching:
                    mixture means; Bernoulli-MLP hidden units).
    sample_stats    lp [chain, draw] (log-likelihood per iteration, padded the
                    same way), padded [chain, draw] (True past n_iter),
                    converged [chain], n_iter [chain], seed [chain],
                    stop_reason [chain], seconds [chain]
    log_likelihood  pointwise log p(obs_n | theta_hat) at the returned params,
                    under the first observed name, [chain=1, draw=1, obs]
                    (mixed effects: per cluster, [chain, draw, cluster])
    observed_data   the data, e.g. x [obs, feature]
    constant_data   sample_weight [obs] (only when the fit was weighted)

`posterior.attrs` carry what `load_fitted` needs to rebuild the estimator
(estimator class, constructor arguments as JSON, best restart, n_features; and
the model search's table when there was one, `model_selection`), so
the netCDF file alone is enough for `tfp_em.diagnostics.report.write_report`.

R-hat over EM trajectories is a heuristic for "did restarts agree"; on HMC
draws (`tfp_em.diagnostics.hmc.sample_posterior`) it is the real diagnostic.
"""
from __future__ import annotations

import json
import os

import numpy as np
import tensorflow as tf
import xarray as xr

import arviz as az

from tfp_em.diagnostics.adapters import estimator_class, get_adapter
from tfp_em.diagnostics.naming import dataset_coords
from tfp_em.engine import inputs as v


def resolve_data(fitted, X=None, y=None, **data_kwargs):
  """The model's data tuple from X (and y), or the data the fit kept.

  X may also be the model's data tuple itself (passed through).
  `data_kwargs` go to the adapter (e.g. sample_weight for mixtures;
  clusters, time, Z for mixed effects).
  """
  adapter = get_adapter(fitted)
  v.check_is_fitted(fitted, adapter.fitted_attribute)
  if isinstance(X, tuple) and all(tf.is_tensor(t) for t in X):
    return X
  if X is not None:
    return adapter.data(fitted, X, y, **data_kwargs)
  data = adapter.training_data(fitted)
  if data is None:
    raise ValueError(f"{type(fitted).__name__} does not keep its training data: pass X "
                     "(and y) to compute diagnostics")
  return data


def aligned_restarts(fitted):
  """Each restart's trajectory (list of numpy params), labels aligned to the best.

  One permutation per restart, found on its final params: labels do not
  switch within an EM run, and matching each iteration separately would hide
  the early iterations' real wandering.
  """
  adapter = get_adapter(fitted)
  result = fitted.fit_result_
  reference = result.restarts[result.best_restart].final_params
  out = []
  for trace in result.restarts:
    perm = adapter.label_permutation(fitted, reference, trace.final_params)
    numpy_params = [type(p)(*[np.asarray(a) for a in p]) for p in trace.params]
    out.append(numpy_params if perm is None
               else [adapter.permute(fitted, p, perm) for p in numpy_params])
  return out


def _shaped(value, shape):
  """`value` as float64, or NaN of `shape` where its shape differs (an iteration before a
  fit's design grew, e.g. MeNets' random intercepts before [1, Gamma(x)])."""
  value = np.asarray(value, np.float64)
  return value if value.shape == tuple(shape) else np.full(shape, np.nan)


def _pad(rows, length):
  """Stacks per-iteration arrays, repeating the last row up to `length`."""
  rows = list(rows)
  rows += [rows[-1]] * (length - len(rows))
  return np.stack(rows)


def to_inference_data(fitted, X=None, y=None, *, feature_names=None, model_selection=None,
                      **data_kwargs) -> az.InferenceData:
  """Exports a fitted estimator (and its data) to ArviZ; see the module docstring.

  Args:
    fitted: a fitted estimator with a registered adapter (e.g.
      `tfp_em.GaussianMixture`).
    X, y: the training data; optional when the estimator kept it.
    data_kwargs: further data the estimator's `fit` took, e.g. sample_weight
      (mixtures) or clusters, time, Z (mixed effects).
    feature_names: labels of the `feature` coordinate (default 0..D-1; a
      pandas DataFrame X gives its column names).
    model_selection: rows of the model search that chose this fit, kept as JSON in
      posterior.attrs (`set_model_selection`); default none.

  Returns:
    An `az.InferenceData` with groups posterior, sample_stats,
    log_likelihood, observed_data (and constant_data when weighted).
  """
  adapter = get_adapter(fitted)
  if feature_names is None and hasattr(X, "columns"):
    feature_names = [str(c) for c in X.columns]
  data = resolve_data(fitted, X, y, **data_kwargs)
  result = fitted.fit_result_
  trajectories = aligned_restarts(fitted)
  length = max(max(len(t.log_likelihood), len(t.params)) for t in result.restarts)
  dims = adapter.dims(fitted)
  params = adapter.params(fitted)
  coords = _coords(dims, params)
  sizes = {dim: len(values) for dim, values in coords.items()}
  coords.update(dataset_coords(adapter.coords(fitted, feature_names), sizes))

  posterior = {}
  for i, (name, spec) in enumerate(zip(params._fields, adapter.param_specs(fitted))):
    if spec.trainable:
      shape = np.shape(params[i])
      stacked = np.stack([_pad([_shaped(p[i], shape) for p in traj], length)
                          for traj in trajectories])   # [chain, draw, ...]
    else:  # held fixed (a network f's beta = 1, which its trace stores empty)
      value = np.asarray(params[i], np.float64)
      stacked = np.broadcast_to(value, (len(trajectories), length) + value.shape)
    posterior[name] = (("chain", "draw") + dims[name], stacked)
  n_iter = np.array([t.n_iter for t in result.restarts])
  draw = np.arange(length)
  stats = {
      "lp": (("chain", "draw"), np.stack([_pad(t.log_likelihood, length)
                                          for t in result.restarts])),
      "padded": (("chain", "draw"), draw[None, :] > n_iter[:, None]),
      "converged": (("chain",), np.array([t.converged for t in result.restarts])),
      "n_iter": (("chain",), n_iter),
      "seed": (("chain",), np.array([t.seed for t in result.restarts], np.int64)),
      "stop_reason": (("chain",), np.array([t.stop_reason for t in result.restarts])),
      "seconds": (("chain",), np.array([t.seconds for t in result.restarts])),
  }
  chain_coords = {"chain": np.arange(len(result.restarts)), "draw": draw}
  attrs = {
      "inference_library": "tfp_em (EM)",
      "estimator": type(fitted).__name__,
      "estimator_path": f"{type(fitted).__module__}:{type(fitted).__qualname__}",
      "config": adapter.config(fitted),
      "best_restart": int(result.best_restart),
      "n_features": int(fitted.n_features_in_),
      "log_likelihood": float(result.log_likelihood),
      "draws": "EM iterations; draw 0 is the initialization; draws past n_iter repeat the final value",
  }
  observed = adapter.observed(data)
  obs_dims = {name: ("obs",) + tuple(f"{name}_dim_{j}" if name != "x" or j else "feature"
                                     for j in range(np.ndim(a) - 1))
              for name, a in observed.items()}
  groups = {
      "posterior": xr.Dataset(posterior, coords={**chain_coords, **coords}, attrs=attrs),
      "sample_stats": xr.Dataset(stats, coords=chain_coords, attrs=attrs),
      "observed_data": xr.Dataset(
          {name: (obs_dims[name], np.asarray(a)) for name, a in observed.items()},
          coords=_obs_coords(observed, coords)),
  }
  pointwise = np.asarray(adapter.pointwise_log_likelihood(fitted, params, data), np.float64)
  first = adapter.observed_names[0]
  groups["log_likelihood"] = xr.Dataset(
      {first: (("chain", "draw", adapter.pointwise_dim), pointwise[None, None])},
      coords={"chain": [0], "draw": [0], adapter.pointwise_dim: np.arange(pointwise.shape[0])})
  weights = adapter.sample_weight(data)
  weights = None if weights is None else np.asarray(weights)
  if weights is not None and not np.all(weights == 1):
    groups["constant_data"] = xr.Dataset({"sample_weight": (("obs",), weights)},
                                         coords={"obs": np.arange(weights.shape[0])})
  idata = az.InferenceData(**groups)
  if model_selection is not None:
    set_model_selection(idata, model_selection)
  return idata


def _coords(dims, params):
  coords = {}
  for name, p in zip(params._fields, params):
    for dim, size in zip(dims[name], np.shape(p)):
      coords.setdefault(dim, np.arange(size))
  return coords


def set_model_selection(idata, rows) -> None:
  """Stores a model search's table in `idata.posterior.attrs['model_selection']` (JSON).

  Args:
    rows: one dict per candidate with keys k, covariance_type, bic (and
      optionally icl, log_likelihood, ..., and chosen=True on the fitted
      model; default: the lowest BIC); numbers, bools and strings only.

  Raises:
    ValueError: no rows, or a row without k, covariance_type or bic.
  """
  rows = [dict(r) for r in rows]
  for key in ("k", "covariance_type", "bic"):
    if not rows or any(key not in r for r in rows):
      raise ValueError(f"model_selection needs rows with the keys k, covariance_type and bic; "
                       f"{key!r} is missing")
  plain = lambda v: v.item() if isinstance(v, np.generic) else v  # noqa: E731
  idata.posterior.attrs["model_selection"] = json.dumps(
      [{k: plain(v) for k, v in r.items()} for r in rows])


def _obs_coords(observed, coords):
  n = len(next(iter(observed.values())))
  out = {"obs": np.arange(n)}
  if "feature" in coords and "x" in observed:
    out["feature"] = coords["feature"]
  return out


def read_netcdf(path) -> az.InferenceData:
  """`az.from_netcdf` with a ValueError naming a missing or unreadable file."""
  path = str(path)
  if not os.path.isfile(path):
    raise ValueError(f"netCDF file {path!r} does not exist")
  try:
    return az.from_netcdf(path)
  except (OSError, ValueError) as e:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:150]
    raise ValueError(f"{path}: not a readable netCDF file ({first})") from None


def load_fitted(source):
  """(fitted estimator, data) from a netCDF path or an InferenceData.

  The estimator is rebuilt from `posterior.attrs` and the best restart's final
  draw; its `fit_result_` is not restored (the traces live in the file).
  """
  idata = read_netcdf(source) if not isinstance(source, az.InferenceData) else source
  attrs = idata.posterior.attrs
  if "estimator" not in attrs:
    raise ValueError(f"{source!s} was not written by tfp_em.to_inference_data "
                     "(posterior.attrs has no 'estimator')")
  cls = estimator_class(str(attrs["estimator"]), attrs.get("estimator_path"))
  adapter = get_adapter(cls)
  best = int(attrs["best_restart"])
  n_iter = int(idata.sample_stats["n_iter"].values[best])
  final = idata.posterior.isel(chain=best, draw=n_iter)
  params = adapter.params_type(*[final[name].values for name in adapter.params_type._fields])
  fitted = adapter.rebuild(cls, str(attrs["config"]), params, int(attrs["n_features"]))
  fitted.log_likelihood_ = float(attrs["log_likelihood"])
  fitted.n_iter_ = n_iter
  fitted.converged_ = bool(idata.sample_stats["converged"].values[best])
  observed = {name: idata.observed_data[name].values for name in adapter.observed_names}
  # constant_data holds data keywords of `fit` (sample_weight)
  data_kwargs = ({name: values.values for name, values in idata.constant_data.items()}
                 if "constant_data" in idata.groups() else {})
  data = adapter.data(fitted, *[observed[n] for n in adapter.observed_names], **data_kwargs)
  return fitted, data
