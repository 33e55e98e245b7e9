"""Diagnostics adapter of `MixedEffectsRegressor` (registered on import of
`tfp_em.mixed_effects`)."""
from __future__ import annotations

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from models import mixed_effects as me
from tfp_em.diagnostics.adapters import Adapter, Table, register
from tfp_em.engine import inputs as v
from tfp_em.mixed_effects.em import MixedEffectsEM
from tfp_em.mixed_effects.estimator import MixedEffectsRegressor
from tfp_em.mixed_effects.names import term_names
from tfp_em.mixed_effects.summary import random_effects_table

tfd = tfp.distributions


@register(MixedEffectsRegressor)
class MixedEffectsAdapter(Adapter):
  """Adapter for `tfp_em.mixed_effects.MixedEffectsRegressor`.

  Data: X, y plus `clusters` (and `time` / `Z` as in `fit`). For a network f,
  the model sees f(x) as a single fixed-effects column with beta = 1 held
  fixed, so the variance components are what the diagnostics estimate.
  HMC holds beta at its EM estimate (`hmc_fixed`): the variance components
  with f fixed. The log-likelihood does not factor over points, so
  `log_likelihood` is per cluster.
  """
  fitted_attribute = "fit_result_"
  params_type = me.MixedEffectsParams
  observed_names = ("y",)
  pointwise_dim = "cluster"
  hmc_fixed = ("beta",)

  def model(self, fitted):
    return MixedEffectsEM(fitted.covariance, compile="graph")

  def params(self, fitted):
    p = fitted.params_
    if fitted.network_ is not None:
      p = p._replace(beta=tf.ones([1], p.noise_variance.dtype))
    return p

  def param_specs(self, fitted):
    specs = self.model(fitted).param_specs
    if fitted.network_ is not None:
      specs = specs._replace(beta=specs.beta._replace(trainable=False))
    return specs

  def data(self, fitted, X, y=None, clusters=None, time=None, Z=None):
    if fitted.crossed_ is not None:
      raise ValueError("diagnostics cover one grouping factor; this MixedEffectsRegressor was "
                       f"fitted with {len(fitted.crossed_.levels_)} crossed factors")
    if y is None or clusters is None:
      raise ValueError("MixedEffectsRegressor diagnostics need X, y and clusters "
                       "(and time / Z as passed to fit)")
    dtype = fitted.dtype_
    X, y = fitted.checked_xy(X, y, dtype)
    v.check_n_features(X, fitted.n_features_in_)
    n = X.shape[0]
    codes = fitted.cluster_codes(clusters, n, "clusters")
    if codes.max() >= len(fitted.cluster_labels_):
      raise ValueError("clusters contains labels not seen in fit; diagnostics need the "
                       "training data")
    z = fitted.random_effects_design(n, time, Z, dtype)
    if fitted.network_ is None:
      x = fitted.fixed_effects_design(X)
    else:
      f, hidden = fitted.network_(tf.constant(X))
      z = np.asarray(fitted.network_.design(hidden, z), dtype)
      x = np.asarray(f, dtype)[:, None]
    return fitted.em_data(x, y, z, codes, len(fitted.cluster_labels_))

  def observed(self, data):
    return {"y": np.asarray(data.y)}

  def pointwise_log_likelihood(self, fitted, params, data):
    return me.marginal_log_prob_per_cluster(params, data, fitted.covariance)

  def dims(self, fitted):
    cov = ("effect", "effect_bis") if fitted.covariance == "full" else ("effect",)
    return {"beta": ("coef",), "covariance": cov, "noise_variance": ()}

  def posterior_predictive(self, fitted, params, data, num_draws, seed):
    joint = me.joint_distribution(params, data, fitted.covariance)
    # the model's gather takes one draw at a time
    draws = [joint.sample(seed=tf.constant([int(seed) % 2**31, i], tf.int32))["y"].numpy()
             for i in range(num_draws)]
    return {"y": np.stack(draws)}

  def simulate(self, fitted, params, data, seed):
    y = self.posterior_predictive(fitted, params, data, 1, seed)["y"][0]
    return data._replace(y=tf.constant(y, data.y.dtype))

  def default_priors(self, fitted, data):
    """Nearly flat: Sigma_u ~ Wishart(q+1, 100 var(y) I) ('diag': Exponential
    with mean 200 var(y)); sigma^2 ~ Exponential(mean 200 var(y)); beta ~
    N(0, (100 sd(y))^2)."""
    y = np.asarray(data.y)
    dtype = y.dtype
    var = float(np.var(y)) + np.finfo(dtype).eps
    q = int(data.z.shape[1])
    rate = tf.constant(1.0 / (200 * var), dtype)
    if fitted.covariance == "full":
      cov = tfd.WishartTriL(df=tf.constant(q + 1.0, dtype),
                            scale_tril=tf.constant(np.sqrt(100 * var) * np.eye(q), dtype),
                            input_output_cholesky=False)
    else:
      cov = tfd.Independent(tfd.Exponential(tf.fill([q], rate)), 1)
    p = int(data.x.shape[1])
    return {"beta": tfd.Independent(tfd.Normal(tf.zeros([p], dtype),
                                               tf.constant(100 * np.sqrt(var), dtype)), 1),
            "covariance": cov, "noise_variance": tfd.Exponential(rate)}

  def coords(self, fitted, feature_names=None):
    names = term_names(fitted, feature_names)
    return {"coef": list(names.fixed), "effect": list(names.random)}

  def training_data(self, fitted):
    """A formula fit's data (`from_formula` keeps its design); None for an array fit."""
    design = fitted.formula_
    if design is None:
      return None
    return self.data(fitted, design.X, design.y, clusters=design.clusters, time=design.time,
                     Z=design.Z)

  def tables(self, fitted, data, feature_names=None):
    """The variance components as lme4 prints them (Groups, Name, Variance, Std.Dev.,
    Corr)."""
    names = term_names(fitted, feature_names)
    cov_u = np.asarray(fitted.cov_random_effects_, np.float64)
    table, corr = random_effects_table(names.group, names.random, cov_u, fitted.sigma2_)
    full = corr is not None and fitted.covariance == "full"
    rows = []
    for i, (group, name, variance, sd) in enumerate(table.itertuples(index=False)):
      row = [group if i == 0 or group == "Residual" else "", name, variance, sd]
      if full:
        row.append(" ".join(f"{c:.2f}" for c in corr.to_numpy()[i, :i])
                   if group != "Residual" else "")
      rows.append(row)
    note = (f"{len(fitted.cluster_labels_)} groups of {names.group}, "
            f"{int(data.y.shape[0])} observations. Maximum-likelihood estimates; Corr holds "
            "each random effect's correlations with the ones above it"
            + ("" if full else " (a diagonal covariance: none)") + ".")
    return [Table("Variance components", note,
                  ["Groups", "Name", "Variance", "Std.Dev."] + (["Corr"] if full else []), rows)]

  def figures(self, fitted, data, feature_names=None):
    from tfp_em.diagnostics import group_plots  # matplotlib loads on first use
    names = term_names(fitted, feature_names)
    params = self.params(fitted)
    blups = np.asarray(fitted.random_effects_mean_)                       # [G, q]
    codes = np.asarray(data.cluster)
    fitted_values = (np.asarray(data.x) @ np.asarray(params.beta)
                     + np.sum(np.asarray(data.z) * blups[codes], axis=-1))  # [N]
    residuals = np.asarray(data.y) - fitted_values
    labels = fitted.cluster_labels_
    return [
        (group_plots.caterpillar(blups, fitted.random_effects_covariance_, labels, names.random,
                                 group_name=names.group), "caterpillar.png",
         f"Caterpillar plot of the random effects by {names.group}: each group's BLUP (the "
         "posterior mean E[u | y]) with a 95% interval from its posterior SD, one panel per "
         "random effect, groups sorted by the BLUP; the dashed line is the population value 0."),
        (group_plots.residuals_by_group(fitted_values, residuals, codes, labels,
                                        float(np.sqrt(fitted.sigma2_)), names.group),
         "residuals.png",
         "Conditional residuals y - f(x) - z BLUP: against the fitted value (dashed: 2 residual "
         f"SDs); by {names.group}, each group's median and interquartile range (sorted; band: "
         "2 residual SDs); each group's residual SD against its size."),
    ]

  def rebuild(self, estimator_class, config, params, n_features):
    raise ValueError("rebuilding a MixedEffectsRegressor from netCDF is not supported "
                     "(the designs and network are not stored); write the report from the "
                     "fitted estimator")
