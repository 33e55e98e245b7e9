"""`NetworkSummary`: the summary of a mixed-effects fit whose f is a network.

lme4's layout with the network in place of the fixed-effects table: the
layers and their parameter counts; the variance components with standard
deviations and correlations; the residual variance; logLik; groups and
observations; which trainer fitted it and where it stopped; for MeNets'
Gamma(x), the columns that are 0 on every training row (dead units, whose
variances the data do not identify).

logLik is the exact marginal log-likelihood of y given the trained f (the
random effects integrated out). AIC and BIC are not reported: the weights of
f are trained by Adam with early stopping on mini-batches, not maximized, so
logLik is not the maximum of a likelihood over all parameters, and the
weight count is not the model's effective number of parameters (a penalty
of 2 per weight would dwarf any difference in fit).

#### References

[1] Y. Xiong, H. J. Kim and V. Singh. Mixed effects neural networks (MeNets)
    with applications to gaze estimation. CVPR, 2019.
[2] G. Simchoni and S. Rosset. Using random effects to account for
    high-cardinality categorical features and repeated measures in deep neural
    networks. NeurIPS, 2021.
"""
from __future__ import annotations

import dataclasses
import math

import keras
import numpy as np
import pandas as pd

from tfp_em.engine import inputs as val
from tfp_em.mixed_effects.names import random_effect_names
from tfp_em.mixed_effects.summary import (array_group_names, random_effects_text,
                                          scaled_residual_quantiles, training_data,
                                          variance_components)

TRAINERS = {"em": ("MeNets EM", "iteration"), "nll": ("LMMNN marginal NLL (Adam)", "epoch")}
NO_CRITERIA = ("AIC and BIC are not reported: the network's weights are trained by Adam with "
               "early stopping, not by maximum likelihood, and their count is not the model's "
               "effective number of parameters.")
NO_LOGLIK = ("logLik is NaN: beyond the exact factorization of the crossed posterior "
             "(max_dense) log|V| is not computed.")


@dataclasses.dataclass(frozen=True)
class NetworkSummary:
  """A network-f mixed fit summarized; `str()` prints it in lme4's layout.

  Attributes:
    formula: the formula, or None for an array fit.
    method: 'em' (MeNets EM) or 'nll' (LMMNN marginal NLL).
    trainer: the trainer's name.
    network: one line: the Keras model's class and its layers.
    network_layers: DataFrame indexed by layer name: 'Type' (e.g. 'Dense(12, relu)'), 'Params'.
    n_network_params, n_trainable_params: the network's weight counts.
    random_effects: DataFrame 'Groups', 'Name', 'Variance', 'Std.Dev.'
      (one row per random effect, then 'Residual').
    correlations: {group: correlation DataFrame} (one factor, q >= 2, full covariance).
    sigma2: the residual variance.
    log_likelihood: the marginal log-likelihood of y given the trained f
      (NaN beyond the crossed factorization's exact limit).
    aic, bic: None (see `criteria_note`).
    criteria_note: why AIC and BIC (and, if NaN, logLik) are not given.
    n_obs: observations; n_groups: {group: number of levels}.
    best_iteration: the iteration (EM) or epoch (NLL) whose state was kept.
    stop_reason: 'early_stopping' or 'max_iter'.
    scaled_residuals: Series 'Min' ... 'Max' of (y - fitted) / sigma, or
      None when the training data were not given.
    unidentified: names of Gamma columns that are 0 on every training row
      (dead units of 'features'): the data say nothing about their variances.
  """
  formula: str | None
  method: str
  trainer: str
  network: str
  network_layers: pd.DataFrame
  n_network_params: int
  n_trainable_params: int
  random_effects: pd.DataFrame
  correlations: dict
  sigma2: float
  log_likelihood: float
  aic: None
  bic: None
  criteria_note: str
  n_obs: int
  n_groups: dict
  best_iteration: int
  stop_reason: str
  scaled_residuals: pd.Series | None
  unidentified: tuple = ()

  def __str__(self) -> str:
    unit = TRAINERS[self.method][1]
    lines = [f"Mixed-effects network fit by {self.trainer} (tfp_em, method={self.method!r})"]
    if self.formula:
      lines.append(f"Formula: {self.formula}")
    lines += [f"Network f: {self.network}",
              f"  {self.n_network_params} parameters ({self.n_trainable_params} trainable)",
              f"Kept {unit} {self.best_iteration} (stopped by {self.stop_reason})", "",
              f"logLik (marginal, given the trained f): {self.log_likelihood:.4f}",
              self.criteria_note, ""]
    if self.scaled_residuals is not None:
      lines += ["Scaled residuals:", self.scaled_residuals.to_frame().T.to_string(
          index=False, float_format=lambda v: f"{v:.4f}"), ""]
    lines += ["Random effects:", random_effects_text(self.random_effects, self.correlations)]
    if self.unidentified:
      lines.append(f" {', '.join(self.unidentified)}: 0 on every training row (dead units); "
                   "their variances are not identified by the data")
    lines += ["Number of obs: {}, groups:  {}".format(
                  self.n_obs, "; ".join(f"{g}, {n}" for g, n in self.n_groups.items())),
              "", "Network (in place of fixed effects):", self.network_layers.to_string()]
    return "\n".join(lines)


def describe_layer(layer) -> str:
  """'Dense(12, relu)', 'Dropout(0.25)' or the layer's class name."""
  if isinstance(layer, keras.layers.Dense):
    return f"Dense({layer.units}, {layer.activation.__name__})"
  if isinstance(layer, keras.layers.Dropout):
    return f"Dropout({layer.rate:g})"
  return type(layer).__name__


def network_tables(model: keras.Model):
  """(one-line description, layers DataFrame, parameters, trainable parameters) of a Keras model."""
  rows = {layer.name: (describe_layer(layer), int(layer.count_params())) for layer in model.layers}
  layers = pd.DataFrame.from_dict(rows, orient="index", columns=["Type", "Params"])
  trainable = int(sum(np.prod(w.shape) for w in model.trainable_weights))
  text = f"{type(model).__name__}: " + " -> ".join(layers["Type"])
  return text, layers, int(model.count_params()), trainable


def summarize_network(estimator, X=None, y=None, clusters=None, time=None, Z=None
                      ) -> NetworkSummary:
  """The summary of a `MixedEffectsRegressor` fitted with a network f.

  Args:
    estimator: fitted with f a network (one factor, any design, or crossed
      random intercepts).
    X, y, clusters, time, Z: the training data, as given to `fit`, for the
      scaled residuals; None for a formula fit (its design is used) or to
      leave the residuals out.

  Returns:
    A `NetworkSummary`.

  Raises:
    ValueError: for a linear f (see `summary.summarize`).
  """
  val.check_is_fitted(estimator, "fit_result_")
  if estimator.f is None:
    raise ValueError("summarize_network() needs a network f; a linear fit has summary.summarize")
  data = training_data(estimator, X, y, clusters, time, Z, required=False)
  if data is None:
    groups, names = array_group_names(estimator), random_effect_names(estimator)
  else:
    groups, names = data.groups, data.random_names
  table, correlations, _, n_groups = variance_components(estimator, groups, names)
  residuals, unidentified = None, ()
  if data is not None:
    _, y_checked = estimator.checked_xy(data.X, data.y, estimator.dtype_)
    fitted = estimator.predict(data.X, data.clusters, data.time, data.Z)
    residuals = scaled_residual_quantiles(y_checked - fitted, estimator.sigma2_)
    if estimator.random_effects == "features":
      _, hidden = estimator.network_(estimator.checked_predict_x(data.X))  # [n, H]
      dead = np.flatnonzero(np.all(np.asarray(hidden) == 0., axis=0))
      unidentified = tuple(names[j + 1] for j in dead)
  text, layers, n_params, n_trainable = network_tables(estimator.network_.model)
  log_lik = float(estimator.log_likelihood_)
  history = estimator.history_
  return NetworkSummary(
      formula=None if estimator.formula_ is None else estimator.formula_.formula,
      method=estimator.method, trainer=TRAINERS[estimator.method][0], network=text,
      network_layers=layers, n_network_params=n_params, n_trainable_params=n_trainable,
      random_effects=table, correlations=correlations, sigma2=float(estimator.sigma2_),
      log_likelihood=log_lik, aic=None, bic=None,
      criteria_note=NO_CRITERIA if math.isfinite(log_lik) else f"{NO_CRITERIA} {NO_LOGLIK}",
      n_obs=int(estimator.fit_result_.num_observations), n_groups=n_groups,
      best_iteration=int(history["best_iteration"]), stop_reason=str(history["stop_reason"]),
      scaled_residuals=residuals, unidentified=unidentified)
