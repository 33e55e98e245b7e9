"""Mixed-model formulas (lme4 syntax) and lme4's summary (issue 15).

A formula fit is the array fit of the formula's arrays, so the two must agree
to 1e-12; the summary is checked against lme4's ML fit of sleepstudy
(`lmer(Reaction ~ Days + (Days | Subject), sleepstudy, REML = FALSE)`).
"""
import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.exceptions import ConvergenceWarning

from tfp_em import MixedEffectsRegressor
from tfp_em.mixed_effects.formula import formula_design
from tfp_em.mixed_effects.network_summary import NetworkSummary

# lme4 1.1, summary(lmer(..., REML = FALSE)) on sleepstudy.
LME4 = dict(loglik=-875.9697, sigma2=654.9457, aic=1763.9, bic=1783.1, deviance=1751.9,
            df_resid=174, beta=[251.405, 10.467], se=[6.632, 1.502], t=[37.906, 6.968],
            var=[565.52, 32.68], corr=0.08)


@pytest.fixture(scope="module")
def sleep_fits(sleepstudy):
  d = sleepstudy
  formula = MixedEffectsRegressor.from_formula("Reaction ~ Days + (Days | Subject)", d,
                                               tol=1e-12)
  arrays = MixedEffectsRegressor(random_effects="slopes", tol=1e-12).fit(
      d[["Days"]].values, d["Reaction"].values, d["Subject"].values, time=d["Days"].values)
  return formula, arrays


def _assert_same_fit(a, b):
  for name in ("log_likelihood_", "sigma2_", "cov_random_effects_", "intercept_", "coef_"):
    np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-12, atol=1e-12,
                               err_msg=name)


def test_formula_fit_equals_array_fit_on_sleepstudy(sleep_fits):
  formula, arrays = sleep_fits
  _assert_same_fit(formula, arrays)
  np.testing.assert_allclose(formula.random_effects_mean_, arrays.random_effects_mean_,
                             rtol=1e-12, atol=1e-12)
  assert formula.random_effects == "slopes" and formula.covariance == "full"
  np.testing.assert_allclose(formula.log_likelihood_, LME4["loglik"], atol=1e-4)
  # The likelihood is flat along sigma^2 here: our EM and L-BFGS optima agree in logLik to
  # 5e-10 but in sigma^2 only to 1e-6, and lme4's to 8e-6.
  np.testing.assert_allclose(formula.sigma2_, LME4["sigma2"], rtol=2e-5)


def test_summary_matches_lme4_on_sleepstudy(sleep_fits, sleepstudy):
  formula, arrays = sleep_fits
  s = formula.summary()
  np.testing.assert_allclose(s.fixed_effects["Estimate"], LME4["beta"], atol=5e-4)
  np.testing.assert_allclose(s.fixed_effects["Std. Error"], LME4["se"], atol=5e-4)
  np.testing.assert_allclose(s.fixed_effects["t value"], LME4["t"], atol=5e-3)
  assert list(s.fixed_effects.index) == ["(Intercept)", "Days"]
  np.testing.assert_allclose([s.aic, s.bic, s.deviance], [LME4["aic"], LME4["bic"],
                                                          LME4["deviance"]], atol=0.05)
  assert s.df_resid == LME4["df_resid"] and s.n_obs == 180 and s.n_groups == {"Subject": 18}
  np.testing.assert_allclose(s.random_effects["Variance"][:2], LME4["var"], rtol=2e-3)
  np.testing.assert_allclose(s.random_effects["Variance"].iloc[-1], formula.sigma2_, rtol=1e-15)
  np.testing.assert_allclose(s.correlations["Subject"].iloc[1, 0], LME4["corr"], atol=5e-3)
  text = str(s)
  for piece in ("Formula: Reaction ~ Days + (Days | Subject)", "Random effects:",
                "Number of obs: 180, groups:  Subject, 18", "Fixed effects:", "Std. Error"):
    assert piece in text
  # The array fit's summary, given its data, has the same numbers.
  d = sleepstudy
  t = arrays.summary(d[["Days"]].values, d["Reaction"].values, d["Subject"].values,
                     time=d["Days"].values)
  np.testing.assert_allclose(t.fixed_effects.to_numpy(), s.fixed_effects.to_numpy(), rtol=1e-10)


def test_standard_errors_match_statsmodels(sleep_fits, sleepstudy):
  smf = pytest.importorskip("statsmodels.formula.api")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    ref = smf.mixedlm("Reaction ~ Days", sleepstudy, groups=sleepstudy["Subject"],
                      re_formula="~Days").fit(reml=False, method=["bfgs"])
  s = sleep_fits[0].summary()
  np.testing.assert_allclose(s.fixed_effects["Std. Error"], ref.bse_fe, rtol=1e-3)


def _grouped(seed=0, n_groups=12, per=8):
  rng = np.random.default_rng(seed)
  g = np.repeat([f"s{i:02d}" for i in range(n_groups)], per)
  kind = np.where(np.repeat(np.arange(n_groups) % 3, per) == 0, "public",
                  np.where(np.repeat(np.arange(n_groups) % 3, per) == 1, "private", "charter"))
  x = rng.normal(size=g.size)
  t = np.tile(np.arange(per, dtype=float), n_groups)
  u = rng.normal(size=(n_groups, 2)) * [1., .3]
  codes = np.repeat(np.arange(n_groups), per)
  y = (1. + .5 * x + (kind == "private") * .8 + u[codes, 0] + u[codes, 1] * t
       + .4 * rng.normal(size=g.size))
  g2 = np.tile(["a", "b", "c", "d"], g.size // 4)
  return pd.DataFrame({"y": y, "x": x, "t": t, "kind": kind, "school": g, "rater": g2})


def _quiet(fn):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", ConvergenceWarning)
    return fn()


def test_exam_like_categorical_fixed_effect_and_random_intercept():
  d = _grouped()
  f = _quiet(lambda: MixedEffectsRegressor.from_formula("y ~ x + kind + (1 | school)", d,
                                                        max_iter=200))
  dummies = np.column_stack([d.x, d.kind == "private", d.kind == "public"]).astype(float)
  a = _quiet(lambda: MixedEffectsRegressor(max_iter=200).fit(dummies, d.y.values,
                                                            d.school.values))
  _assert_same_fit(f, a)
  assert list(f.feature_names_in_) == ["x", "kind[T.private]", "kind[T.public]"]
  np.testing.assert_allclose(f.predict(f.formula_.X, d.school.values),
                             a.predict(dummies, d.school.values), rtol=1e-12)


def test_predict_data_builds_the_arrays_from_new_rows(sleep_fits, sleepstudy):
  formula, arrays = sleep_fits
  d = sleepstudy.iloc[::7]
  expected = arrays.predict(d[["Days"]].values, d["Subject"].values, time=d["Days"].values)
  np.testing.assert_allclose(formula.predict_data(d), expected, rtol=1e-12)
  np.testing.assert_allclose(
      formula.predict_data(d, interval=True),
      arrays.predict_interval(d[["Days"]].values, d["Subject"].values, time=d["Days"].values),
      rtol=1e-12)
  with pytest.raises(ValueError, match="Days"):
    formula.predict_data(d.drop(columns=["Days"]))
  with pytest.raises(ValueError, match="from_formula"):
    arrays.predict_data(d)
  # Categorical levels are coded as in the fit, whatever the new rows hold.
  g = _grouped()
  f = _quiet(lambda: MixedEffectsRegressor.from_formula("y ~ x + kind + (1 | school)", g,
                                                        max_iter=20))
  few = g[g.kind == "private"].iloc[:3]
  np.testing.assert_allclose(f.predict_data(few), f.predict(f.formula_.X.loc[few.index],
                                                            few.school.values), rtol=1e-12)


def test_uncorrelated_slopes_are_a_diagonal_covariance():
  d = _grouped(seed=1)
  f = _quiet(lambda: MixedEffectsRegressor.from_formula("y ~ x + (t || school)", d,
                                                        max_iter=100))
  a = _quiet(lambda: MixedEffectsRegressor("slopes", covariance="diag", max_iter=100).fit(
      d[["x"]].values, d.y.values, d.school.values, time=d.t.values))
  assert f.covariance == "diag"
  _assert_same_fit(f, a)


def test_custom_design_and_interaction_groups():
  d = _grouped(seed=2)
  f = _quiet(lambda: MixedEffectsRegressor.from_formula("y ~ x + (0 + t + x | school)", d,
                                                        max_iter=50))
  a = _quiet(lambda: MixedEffectsRegressor("custom", max_iter=50).fit(
      d[["x"]].values, d.y.values, d.school.values, Z=d[["t", "x"]].values))
  _assert_same_fit(f, a)
  f = _quiet(lambda: MixedEffectsRegressor.from_formula("y ~ x + (1 | school:rater)", d,
                                                        max_iter=50))
  labels = (d.school + ":" + d.rater).values
  a = _quiet(lambda: MixedEffectsRegressor(max_iter=50).fit(d[["x"]].values, d.y.values, labels))
  _assert_same_fit(f, a)
  assert f.summary().n_groups == {"school:rater": len(set(labels))}


def test_crossed_factors_equal_the_array_fit_and_summarize():
  d = _grouped(seed=3)
  f = _quiet(lambda: MixedEffectsRegressor.from_formula("y ~ x + (1 | school) + (1 | rater)", d,
                                                        max_iter=100))
  a = _quiet(lambda: MixedEffectsRegressor(max_iter=100).fit(
      d[["x"]].values, d.y.values, [d.school.values, d.rater.values]))
  for name in ("log_likelihood_", "sigma2_", "variances_", "intercept_", "coef_"):
    np.testing.assert_allclose(getattr(f, name), getattr(a, name), rtol=1e-12, err_msg=name)
  s = f.summary()
  assert s.n_groups == {"school": 12, "rater": 4}
  assert list(s.random_effects["Groups"]) == ["school", "rater", "Residual"]
  assert np.all(np.isfinite(s.fixed_effects["Std. Error"]))
  assert s.df_resid == len(d) - 5  # 2 fixed effects, 2 variances, sigma^2


@pytest.mark.parametrize("formula, match", [
    ("y ~ zz + (1 | school)", "zz"),
    ("y ~ x + (1 | nowhere)", "column 'nowhere' is not in data"),
    ("y ~ x + (1 + t | school) + (x || rater)", "all be correlated .* or all uncorrelated"),
    ("y ~ x + (1 + t | school) + (0 + x | school)", r"\(1 \+ t \| school\).*block-diagonal"),
    ("y ~ x + (1 | school) + (1 | school)", r"\(1 \| school\)' repeats '\(Intercept\)'"),
    ("y ~ x + (1 | school) + (features | rater)", r"\(features \| rater\).*needs a network f"),
    ("y ~ x + (1 | school/gap)", "'gap' has missing values"),
    ("y ~ x + (features | school)", r"\(features \| school\).*needs a network f"),
    ("y ~ x", "no random-effects term"),
    ("y ~ x | school", "no random-effects term|'\\|' outside"),
    ("nope ~ x + (1 | school)", "response 'nope'"),
    ("y ~ x + (1 | gap)", "missing values"),
    ("y x + (1 | school)", "response ~ terms"),
    ("y ~ x + (1 | school", "unbalanced"),
])
def test_bad_formulas_name_the_problem(formula, match):
  d = _grouped()
  d["gap"] = d.school.where(np.arange(len(d)) != 5)
  with pytest.raises(ValueError, match=match):
    MixedEffectsRegressor.from_formula(formula, d, max_iter=5)


def test_a_transformed_response_is_evaluated_by_formulaic():
  d = _grouped()
  d["e"] = np.exp(d.y)
  f = _quiet(lambda: MixedEffectsRegressor.from_formula("np.log(e) ~ x + (1 | school)", d,
                                                        max_iter=20))
  a = _quiet(lambda: MixedEffectsRegressor.from_formula("y ~ x + (1 | school)", d, max_iter=20))
  np.testing.assert_allclose(f.log_likelihood_, a.log_likelihood_, rtol=1e-10)


def test_options_set_by_the_formula_are_refused():
  with pytest.raises(ValueError, match="random_effects is set by the formula"):
    MixedEffectsRegressor.from_formula("y ~ x + (1 | school)", _grouped(),
                                       random_effects="slopes")


# Each model of the array API and its formula (the table in formula.py's docstring).
S, C = ("school",), ("school", "rater")
@pytest.mark.parametrize("formula, options, groups", [
    ("y ~ x + (1 | school)", dict(random_effects="intercept", covariance="full"), S),
    ("y ~ x + (t | school)", dict(random_effects="slopes", degree=1, covariance="full"), S),
    ("y ~ x + (1 + t | school)", dict(random_effects="slopes", degree=1, covariance="full"), S),
    ("y ~ x + (t || school)", dict(random_effects="slopes", degree=1, covariance="diag"), S),
    ("y ~ x + (1 | school) + (0 + t | school)",
     dict(random_effects="slopes", degree=1, covariance="diag"), S),
    ("y ~ x + (1 + t + I(t**2) | school)",
     dict(random_effects="slopes", degree=2, covariance="full"), S),
    ("y ~ x + (poly(t, 2, raw=True) || school)",
     dict(random_effects="slopes", degree=2, covariance="diag"), S),
    ("y ~ x + (0 + t + x | school)", dict(random_effects="custom", covariance="full"), S),
    ("y ~ x + (0 + t | school) + (0 + x | school)",
     dict(random_effects="custom", covariance="diag"), S),
    ("y ~ x + (1 + kind | school)", dict(random_effects="custom", covariance="full"), S),
    ("y ~ x + (features | school)", dict(random_effects="features", covariance="full"), S),
    ("y ~ x + (1 + features || school)", dict(random_effects="features", covariance="diag"), S),
    ("y ~ 0 + x + (1 | school)", dict(random_effects="intercept", fit_intercept=False), S),
    ("y ~ x + (1 | school:rater)", dict(random_effects="intercept"), ("school:rater",)),
    ("y ~ x + (1 | school) + (1 | rater)", dict(random_effects="intercept"), C),
    ("y ~ x + (1 | school/rater)", dict(random_effects="intercept"), ("school", "school:rater")),
])
def test_every_array_model_has_a_formula(formula, options, groups):
  d = _grouped()
  design = formula_design(formula, d, network=True)
  assert {k: design.options[k] for k in options} == options
  assert design.options["fit_intercept"] == options.get("fit_intercept", True)
  assert design.group_names == groups
  assert isinstance(design.clusters, list) == (len(groups) > 1)
  kind = options["random_effects"]
  if kind == "slopes":
    np.testing.assert_array_equal(design.time, d.t)
  assert (design.Z is not None) == (kind == "custom")


def test_two_terms_on_one_factor_are_the_uncorrelated_model():
  d = _grouped(seed=1)
  f = _quiet(lambda: MixedEffectsRegressor.from_formula(
      "y ~ x + (1 | school) + (0 + t | school)", d, max_iter=100))
  a = _quiet(lambda: MixedEffectsRegressor("slopes", covariance="diag", max_iter=100).fit(
      d[["x"]].values, d.y.values, d.school.values, time=d.t.values))
  _assert_same_fit(f, a)
  assert f.summary().random_effects["Name"].tolist() == ["(Intercept)", "t", ""]
  np.testing.assert_allclose(f.predict_data(d.iloc[:9]),
                             a.predict(d[["x"]].values[:9], d.school.values[:9],
                                       time=d.t.values[:9]), rtol=1e-12)


def test_nested_groups_are_crossed_factors():
  d = _grouped(seed=3)
  f = _quiet(lambda: MixedEffectsRegressor.from_formula("y ~ x + (1 | school/rater)", d,
                                                        max_iter=40))
  inner = (d.school + ":" + d.rater).values
  a = _quiet(lambda: MixedEffectsRegressor(max_iter=40).fit(
      d[["x"]].values, d.y.values, [d.school.values, inner]))
  for name in ("log_likelihood_", "sigma2_", "variances_", "intercept_", "coef_"):
    np.testing.assert_allclose(getattr(f, name), getattr(a, name), rtol=1e-12, atol=1e-12,
                               err_msg=name)
  assert f.summary().n_groups == {"school": 12, "school:rater": 48}
  np.testing.assert_allclose(f.predict_data(d), a.predict(d[["x"]].values,
                                                          [d.school.values, inner]),
                             rtol=1e-12)


TINY_NET = dict(f="mlp", hidden_units=(4, 3), dropout=0., max_iter=3, batch_size=48, seed=2)


@pytest.fixture(scope="module")
def menets_fits():
  d = _grouped(seed=4)
  formula = MixedEffectsRegressor.from_formula("y ~ x + t + (features | school)", d, **TINY_NET)
  arrays = MixedEffectsRegressor("features", **TINY_NET).fit(
      d[["x", "t"]].values, d.y.values, d.school.values)
  return formula, arrays, d


def test_features_term_is_menets_design(menets_fits):
  formula, arrays, d = menets_fits
  assert formula.random_effects == "features" and formula.covariance == "full"
  for name in ("log_likelihood_", "sigma2_", "cov_random_effects_", "random_effects_mean_"):
    np.testing.assert_allclose(getattr(formula, name), getattr(arrays, name), rtol=1e-12,
                               atol=1e-12, err_msg=name)
  assert formula.cov_random_effects_.shape == (4, 4)  # [1, Gamma(x)], Gamma of 3 units
  assert formula.formula_.random_names == ("(Intercept)", "Gamma1", "Gamma2", "Gamma3")
  np.testing.assert_allclose(formula.predict_data(d), arrays.predict(
      d[["x", "t"]].values, d.school.values), rtol=1e-12)
  with pytest.raises(ValueError, match=r"\(0 \+ features \| school\).*as a whole"):
    formula_design("y ~ x + (0 + features | school)", d, network=True)
  with pytest.raises(ValueError, match=r"\(features \| school\).*only term"):
    formula_design("y ~ x + (features | school) + (0 + t | school)", d, network=True)
  with pytest.raises(ValueError, match=r"\(features \| rater\).*no 'features' term"):
    formula_design("y ~ x + (1 | school) + (features | rater)", d, network=True)


def test_network_summary_names_the_network_and_the_variance_components(menets_fits):
  formula, arrays, d = menets_fits
  s = formula.summary()
  assert isinstance(s, NetworkSummary)
  model = formula.network_.model
  assert s.n_network_params == model.count_params() == s.network_layers["Params"].sum()
  assert s.network_layers["Type"].tolist() == ["Dense(4, relu)", "Dense(3, relu)",
                                               "Dense(1, linear)"]
  assert s.random_effects["Name"].tolist() == ["(Intercept)", "Gamma1", "Gamma2", "Gamma3", ""]
  np.testing.assert_allclose(s.random_effects["Variance"][:4],
                             np.diag(formula.cov_random_effects_), rtol=1e-15)
  assert s.sigma2 == formula.sigma2_ == s.random_effects["Variance"].iloc[-1]
  assert s.correlations["school"].shape == (4, 4)
  assert s.log_likelihood == formula.log_likelihood_ and s.aic is None and s.bic is None
  assert s.n_obs == len(d) and s.n_groups == {"school": 12}
  assert s.best_iteration == formula.history_["best_iteration"]
  residuals = d.y.values - formula.predict_data(d)
  np.testing.assert_allclose(s.scaled_residuals["Max"],
                             residuals.max() / np.sqrt(formula.sigma2_), rtol=1e-10)
  text = str(s)
  for piece in ("MeNets EM", "Formula: y ~ x + t + (features | school)",
                "Sequential: Dense(4, relu) -> Dense(3, relu) -> Dense(1, linear)",
                f"{model.count_params()} parameters", "AIC and BIC are not reported",
                "Number of obs: 96, groups:  school, 12", "Gamma3"):
    assert piece in text
  bare = arrays.summary()  # an array fit without its data: no residuals
  assert bare.scaled_residuals is None and bare.n_groups == {"clusters": 12}
  np.testing.assert_allclose(bare.random_effects["Variance"], s.random_effects["Variance"],
                             rtol=1e-12)


def test_network_summary_of_crossed_factors():
  d = _grouped(seed=5)
  f = MixedEffectsRegressor.from_formula("y ~ x + (1 | school) + (1 | rater)", d,
                                         method="nll", **TINY_NET)
  s = f.summary()
  assert s.trainer.startswith("LMMNN") and "epoch" in str(s)
  assert s.random_effects["Groups"].tolist() == ["school", "rater", "Residual"]
  np.testing.assert_allclose(s.random_effects["Variance"][:2], f.variances_, rtol=1e-12)
  assert s.n_groups == {"school": 12, "rater": 4} and s.correlations == {}


def test_network_summary_flags_dead_features():
  keras = pytest.importorskip("keras")

  def net(dim):  # the second unit of the last hidden layer is 0 everywhere (bias -100)
    dead = keras.initializers.Constant([0., -100.])
    return keras.Sequential([keras.Input((dim,)), keras.layers.Dense(2, "relu"),
                             keras.layers.Dense(2, "relu", bias_initializer=dead),
                             keras.layers.Dense(1)])

  d = _grouped(seed=6)
  f = MixedEffectsRegressor.from_formula("y ~ x + (features | school)", d, f=net, max_iter=2)
  s = f.summary()
  model = f.network_.model
  gamma = keras.Model(model.inputs[0], model.layers[-1].input)(
      f.formula_.X.to_numpy(np.float32)).numpy()                        # [n, 2]
  dead = tuple(f"Gamma{j + 1}" for j in np.flatnonzero(np.all(gamma == 0., axis=0)))
  assert "Gamma2" in dead and s.unidentified == dead
  assert "Gamma2: 0 on every training row" in str(s)
