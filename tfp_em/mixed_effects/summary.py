"""`MixedSummary`: what lme4's `summary(lmer(...))` prints, for a linear mixed fit.

Fixed effects with standard errors and t values, from the ML covariance
(X^T V^-1 X)^-1 at the estimates; variance components with standard
deviations and correlations; logLik, AIC, BIC, deviance and residual degrees
of freedom; scaled (conditional) residuals; groups and observations. One
factor: V_i^-1 by Woodbury per cluster, never an n_i x n_i matrix:

    X_i^T V_i^-1 X_i = (X_i^T X_i - X_i^T Z_i (s2 I + D Z_i^T Z_i)^-1 D Z_i^T X_i) / s2

(no inverse of D, so a singular D at the boundary is fine). Several crossed
factors: (X^T V^-1 X)^-1 from the fit's sparse factorization
(`CrossedEffectsRegressor.fixed_effects_covariance_`; NaN beyond its exact
limit).

#### References

[1] D. Bates, M. Maechler, B. Bolker and S. Walker. Fitting linear
    mixed-effects models using lme4. Journal of Statistical Software 67(1),
    2015 (section 5: the summary's contents).
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import numpy as np
import pandas as pd

from tfp_em.engine import inputs as val
from tfp_em.mixed_effects.labels import as_factors
from tfp_em.mixed_effects.names import random_effect_names


@dataclasses.dataclass(frozen=True)
class MixedSummary:
  """A linear mixed fit summarized as lme4 does; `str()` prints lme4's layout.

  Attributes:
    formula: the formula, or None for an array fit.
    method: 'em' or 'nll'.
    fixed_effects: DataFrame indexed by term: 'Estimate', 'Std. Error', 't value'.
    random_effects: DataFrame with 'Groups', 'Name', 'Variance', 'Std.Dev.'
      (one row per random effect, then 'Residual').
    correlations: {group: DataFrame} correlation matrix of each factor's
      random effects (one factor with q >= 2 and a full covariance).
    log_likelihood, aic, bic, deviance: at the estimates (REML: from the
      restricted log-likelihood, as lme4's `logLik` of a REML fit).
    df_resid: observations minus estimated parameters.
    n_obs: number of observations.
    n_groups: {group: number of levels}.
    scaled_residuals: Series 'Min', '1Q', 'Median', '3Q', 'Max' of
      (y - fitted) / sigma, fitted including the BLUPs.
    reml: True for a REML fit; it then prints lme4's "REML criterion at
      convergence" (-2 l_R) in place of the AIC/BIC/logLik line.
  """
  formula: str | None
  method: str
  fixed_effects: pd.DataFrame
  random_effects: pd.DataFrame
  correlations: dict
  log_likelihood: float
  aic: float
  bic: float
  deviance: float
  df_resid: int
  n_obs: int
  n_groups: dict
  scaled_residuals: pd.Series
  reml: bool = False

  def __str__(self) -> str:
    criterion = "REML" if self.reml else "maximum likelihood"
    lines = [f"Linear mixed model fit by {criterion} (tfp_em, method={self.method!r})"]
    if self.formula:
      lines.append(f"Formula: {self.formula}")
    if self.reml:
      fit_text = f"REML criterion at convergence: {self.deviance:.4f}"
    else:
      fit_text = pd.DataFrame([[self.aic, self.bic, self.log_likelihood, self.deviance,
                                self.df_resid]], columns=["AIC", "BIC", "logLik", "deviance",
                                                          "df.resid"]).to_string(
          index=False, float_format=lambda v: f"{v:.1f}")
    lines += ["", fit_text, "", "Scaled residuals:",
              self.scaled_residuals.to_frame().T.to_string(
                  index=False, float_format=lambda v: f"{v:.4f}"), "",
              "Random effects:", random_effects_text(self.random_effects, self.correlations),
              "Number of obs: {}, groups:  {}".format(
                  self.n_obs, "; ".join(f"{g}, {n}" for g, n in self.n_groups.items())),
              "", "Fixed effects:",
              self.fixed_effects.to_string(float_format=lambda v: f"{v:.5g}")]
    return "\n".join(lines)


def random_effects_text(table: pd.DataFrame, correlations: dict) -> str:
  """lme4's 'Random effects:' block: Groups, Name, Variance, Std.Dev., Corr."""
  cells = [["Groups", "Name", "Variance", "Std.Dev.", "Corr"]]
  previous = None
  for i, (group, name, var, sd) in enumerate(table.itertuples(index=False)):
    corr = ""
    if group in correlations:
      j = list(table["Groups"][table["Groups"] == group].index).index(i)
      corr = " ".join(f"{c:.2f}" for c in correlations[group].to_numpy()[j, :j])
    cells.append(["" if group == previous else group, name, f"{var:.5g}", f"{sd:.5g}", corr])
    previous = group
  widths = [max(len(row[c]) for row in cells) for c in range(5)]
  return "\n".join(" " + " ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
                   for row in cells)


def scaled_residual_quantiles(residuals, sigma2: float) -> pd.Series:
  """'Min', '1Q', 'Median', '3Q', 'Max' of residuals / sigma."""
  scaled = np.quantile(np.asarray(residuals) / math.sqrt(sigma2), [0., .25, .5, .75, 1.])
  return pd.Series(scaled, index=["Min", "1Q", "Median", "3Q", "Max"])


def fixed_effects_covariance(x, z, codes, num_clusters, cov_u, sigma2) -> np.ndarray:
  """(X^T V^-1 X)^-1 for one grouping factor, by Woodbury per cluster; [p, p].

  Args:
    x: [n, p] fixed-effects design; z: [n, q] random-effects design;
    codes: [n] cluster codes in [0, num_clusters); cov_u: [q, q] D;
    sigma2: noise variance.
  """
  p, q = x.shape[1], z.shape[1]
  xtx = np.zeros((num_clusters, p, p))
  xtz = np.zeros((num_clusters, p, q))
  ztz = np.zeros((num_clusters, q, q))
  np.add.at(xtx, codes, np.einsum("np,nr->npr", x, x))
  np.add.at(xtz, codes, np.einsum("np,nr->npr", x, z))
  np.add.at(ztz, codes, np.einsum("np,nr->npr", z, z))
  a = sigma2 * np.eye(q) + cov_u @ ztz                                     # [G, q, q]
  correction = xtz @ np.linalg.solve(a, cov_u @ np.swapaxes(xtz, -1, -2))  # [G, p, p]
  info = (xtx - correction).sum(axis=0) / sigma2
  return np.linalg.inv(info)


def random_effects_table(groups, names, cov_u, sigma2):
  """(random-effects DataFrame, correlation DataFrame or None) for one factor."""
  sd = np.sqrt(np.diag(cov_u))
  rows = [(groups, name, cov_u[j, j], sd[j]) for j, name in enumerate(names)]
  rows.append(("Residual", "", sigma2, math.sqrt(sigma2)))
  table = pd.DataFrame(rows, columns=["Groups", "Name", "Variance", "Std.Dev."])
  corr = None
  if len(names) > 1:
    with np.errstate(invalid="ignore", divide="ignore"):
      corr = pd.DataFrame(cov_u / np.outer(sd, sd), index=list(names), columns=list(names))
  return table, corr


def crossed_random_table(groups, names, covariances, sigma2, full: bool):
  """(random-effects DataFrame, {group: correlation DataFrame}) of K crossed factors."""
  tables, correlations = [], {}
  for group, factor_names, cov in zip(groups, names, covariances):
    table, corr = random_effects_table(group, factor_names, np.asarray(cov, np.float64), sigma2)
    tables.append(table.iloc[:-1])                                     # the residual row once
    if corr is not None and full:
      correlations[group] = corr
  tables.append(table.iloc[-1:])
  return pd.concat(tables, ignore_index=True), correlations


def variance_components(estimator, groups, random_names):
  """(random-effects DataFrame, {group: correlation DataFrame}, number of
  variance parameters besides sigma^2, {group: levels}) of a fitted estimator."""
  sigma2 = estimator.sigma2_
  if estimator.crossed_ is not None:
    full = estimator.covariance == "full"
    covs = estimator.covariances_
    table, correlations = crossed_random_table(groups, random_names, covs, sigma2, full)
    n_cov = sum(len(c) * (len(c) + 1) // 2 if full else len(c) for c in covs)
    n_groups = {g: len(lv) for g, lv in zip(groups, estimator.crossed_.levels_)}
    return table, correlations, n_cov, n_groups
  cov_u = estimator.cov_random_effects_
  table, corr = random_effects_table(groups[0], random_names, cov_u, sigma2)
  q = cov_u.shape[0]
  full = estimator.covariance == "full"
  correlations = {groups[0]: corr} if corr is not None and full else {}
  n_groups = {groups[0]: len(estimator.cluster_labels_)}
  return table, correlations, q * (q + 1) // 2 if full else q, n_groups


def build_summary(*, formula, method, fixed_names, beta, beta_cov, table, correlations,
                  log_likelihood, n_params, n_obs, n_groups, residuals, sigma2,
                  reml: bool = False) -> MixedSummary:
  """Assembles a `MixedSummary` from the fit's pieces (see the attributes there)."""
  se = np.sqrt(np.diag(beta_cov))
  fixed = pd.DataFrame({"Estimate": beta, "Std. Error": se, "t value": beta / se},
                       index=list(fixed_names))
  return MixedSummary(
      formula=formula, method=method, fixed_effects=fixed, random_effects=table,
      correlations=correlations, log_likelihood=float(log_likelihood),
      aic=-2. * log_likelihood + 2. * n_params,
      bic=-2. * log_likelihood + n_params * math.log(n_obs),
      deviance=-2. * log_likelihood, df_resid=int(n_obs - n_params), n_obs=int(n_obs),
      n_groups=dict(n_groups), scaled_residuals=scaled_residual_quantiles(residuals, sigma2),
      reml=reml)


class TrainingData(NamedTuple):
  """The data a summary reads, and the names it prints."""
  X: object
  y: object
  clusters: object
  time: object
  Z: object
  fixed_names: tuple    # names of beta (linear f) or of X's columns
  random_names: tuple   # names of a single factor's random effects
  groups: tuple         # one name per grouping factor


def training_data(estimator, X=None, y=None, clusters=None, time=None, Z=None,
                  required: bool = True) -> TrainingData | None:
  """The training data of a fitted estimator: as given, else a formula fit's.

  Returns None when there is neither and `required` is False.

  Raises:
    ValueError: when there is neither and `required` is True.
  """
  design = estimator.formula_
  if X is None and design is not None:
    return TrainingData(design.X, design.y, design.clusters, design.time, design.Z,
                        design.fixed_names,
                        random_effect_names(estimator, design.random_names),
                        design.group_names)
  if X is None:
    if not required:
      return None
    raise ValueError("summary() needs the training data (X, y, clusters and time or Z) "
                     "for a fit without a formula")
  p = np.shape(X)[1]
  columns = (list(estimator.feature_names_in_) if hasattr(X, "columns") else
             [f"x{j + 1}" for j in range(p)])
  linear_intercept = estimator.f is None and estimator.fit_intercept
  fixed = (["(Intercept)"] if linear_intercept else []) + columns
  return TrainingData(X, y, clusters, time, Z, tuple(fixed),
                      random_effect_names(estimator), array_group_names(estimator))


def array_group_names(estimator) -> tuple:
  """'clusters' for one factor, 'clusters[k]' for K crossed factors."""
  if estimator.crossed_ is None:
    return ("clusters",)
  return tuple(f"clusters[{i}]" for i in range(len(estimator.crossed_.levels_)))


def summarize(estimator, X=None, y=None, clusters=None, time=None, Z=None) -> MixedSummary:
  """lme4's summary of a fitted linear `MixedEffectsRegressor`.

  Args:
    estimator: a `MixedEffectsRegressor` fitted with linear f (one factor or
      several crossed factors).
    X, y, clusters, time, Z: the training data, as given to `fit`; all None
      for a formula fit (`from_formula` keeps its design).

  Returns:
    A `MixedSummary`.

  Raises:
    ValueError: for a network f (see `network_summary.summarize_network`),
      missing data, or labels not seen in fit.
  """
  val.check_is_fitted(estimator, "fit_result_")
  if estimator.f is not None:
    raise ValueError("summarize() covers linear f; a network f has no fixed-effect "
                     "standard errors: use estimator.summary() (network_summary)")
  data = training_data(estimator, X, y, clusters, time, Z)
  x, y = estimator.checked_xy(data.X, data.y, estimator.dtype_)
  n = y.shape[0]
  fitted = estimator.predict(data.X, data.clusters, data.time, data.Z)
  sigma2 = estimator.sigma2_
  table, correlations, n_cov, n_groups = variance_components(estimator, data.groups,
                                                             data.random_names)
  if estimator.crossed_ is None:
    num = len(estimator.cluster_labels_)
    codes = estimator.cluster_codes(as_factors(data.clusters)[0], n, "clusters")
    if np.any(codes >= num):
      raise ValueError("summary() needs the training data: clusters has labels not seen in fit")
    z = estimator.random_effects_design(n, data.time, data.Z, estimator.dtype_)
    beta = np.asarray(estimator.params_.beta, np.float64)
    beta_cov = fixed_effects_covariance(estimator.fixed_effects_design(x), z, codes, num,
                                        estimator.cov_random_effects_, sigma2)
  else:
    crossed = estimator.crossed_
    beta = np.concatenate([[crossed.intercept_] if estimator.fit_intercept else [],
                           np.asarray(crossed.coef_, np.float64)])
    beta_cov = crossed.fixed_effects_covariance_
  return build_summary(
      formula=None if estimator.formula_ is None else estimator.formula_.formula,
      method=estimator.method, fixed_names=data.fixed_names, beta=beta, beta_cov=beta_cov,
      table=table, correlations=correlations, log_likelihood=estimator.log_likelihood_,
      n_params=len(beta) + n_cov + 1, n_obs=n, n_groups=n_groups, residuals=y - fitted,
      sigma2=sigma2, reml=estimator.reml)
