"""Mixed-model formulas: lme4's syntax for the random part, formulaic for the rest.

    Reaction ~ Days + (Days | Subject)   correlated intercept and slope per Subject
    y ~ x + (1 | g)                      random intercept
    y ~ x + (t || g)                     intercept and slope, uncorrelated (diagonal Sigma_u)
    y ~ x + (1 | g) + (0 + t | g)        the same model as (t || g)
    y ~ x + (1 | g1) + (1 | g2)          crossed random intercepts, one variance each
    y ~ x + (1 | g1:g2)                  one factor: each combination of g1 and g2 a level
    y ~ x + (1 | g1/g2)                  nested: (1 | g1) + (1 | g1:g2), two crossed factors
    y ~ x + (1 + t | g1) + (1 | g2)      slopes on one of several crossed factors (linear f)
    y ~ x + (0 + z1 + z2 | g)            any design of columns (random_effects='custom')
    y ~ x1 + x2 + (features | g)         MeNets: z = [1, Gamma(x)], Gamma the network's
                                         last hidden layer on the fixed part's columns

The bar terms `(design | group)` and `(design || group)` are parsed in
`formula_terms`; the response, the fixed part (categorical coding, `C(...)`,
`I(...)`, interactions) and each bar term's design are built by formulaic
from a pandas DataFrame, with missing values refused. `formula_design` maps a
formula onto the array API of `MixedEffectsRegressor` (X, y, clusters, time, Z
and the options random_effects, degree, covariance, fit_intercept), so a
formula fit is the array fit of those arrays; `FormulaMixin` gives the
estimator `from_formula`, `predict_data` and `summary`.

Every model the array API fits, and its formula (options not in the table,
such as f, method and max_iter, are `from_formula` keywords; f does not change
the formula except that `features` needs a network f; a network takes the
fixed part's columns as its inputs, its own bias in place of the intercept):

    array API                                       formula
    ----------------------------------------------  -------------------------------------
    random_effects='intercept'                      y ~ x + (1 | g)
    'slopes', degree=1, covariance='full'           y ~ x + (t | g)      = (1 + t | g)
    'slopes', degree=1, covariance='diag'           y ~ x + (t || g)     = (1 | g) + (0 + t | g)
    'slopes', degree=d ('full' / 'diag')            (1 + t + I(t**2) + ... + I(t**d) | g)  / ||
    'slopes', degree=0                              (1 | g): the same model as 'intercept'
    'custom', Z=[z1, z2], 'full'                    y ~ x + (0 + z1 + z2 | g)  (any formulaic design)
    'custom', 'diag'                                (0 + z1 + z2 || g) = (0 + z1 | g) + (0 + z2 | g)
    'features' (network f), 'full' / 'diag'         y ~ x + (features | g)  /  (features || g)
    'intercept', covariance='diag'                  (1 | g): one effect, the same model
    fit_intercept=True / False                      y ~ x + ...  /  y ~ 0 + x + ...
    clusters = labels of g1 x g2 combinations       (1 | g1:g2)
    clusters=[g1, g2, ...] (crossed; f linear or    (1 | g1) + (1 | g2) + ...;  nested
      a network; intercepts, one variance each)       (1 | g1/g2) = (1 | g1) + (1 | g1:g2)
    clusters=[g1, g2], 'custom', Z=[z1, None]       (1 + t | g1) + (1 | g2)  (linear f; any
      (crossed, a design per factor; None: an         design per factor; '||' on every
      intercept)                                      factor with slopes: covariance='diag')

A design whose columns are [1, t, t^2, ..., t^d] (in any spelling: `t`,
`I(t**2)`, `poly(t, d, raw=True)`) is 'slopes' with degree d; any other design
with two or more columns is 'custom'. The reserved name `features` in a bar
term means Gamma(x) (a data column called 'features' is reached as
`I(features)`). Formulas the array API cannot fit get a ValueError naming the
term: a correlated block of two or more effects next to another term on the
same factor (`(1 + t | g) + (0 + x | g)`: a block-diagonal Sigma_u), a column
repeated on one factor, `features` on one of several factors (and slopes
there with a network f), correlated and uncorrelated slopes on different
factors (one covariance type), `(0 + features | g)` (the
MeNets design always has its constant), and `features` without a network f.

#### References

[1] D. Bates, M. Maechler, B. Bolker and S. Walker. Fitting linear
    mixed-effects models using lme4. Journal of Statistical Software 67(1),
    2015 (Table 2: the random-effects syntax).
[2] Y. Xiong, H. J. Kim and V. Singh. Mixed effects neural networks (MeNets)
    with applications to gaze estimation. CVPR, 2019.
"""
from __future__ import annotations

import re
from typing import NamedTuple

import numpy as np
import pandas as pd
from formulaic import model_matrix
from formulaic.errors import FormulaicError

from models import mixed_effects as me
from tfp_em.engine import inputs as val
from tfp_em.mixed_effects.formula_terms import (RandomTerm, check_features_term, group_terms,
                                                split_formula)
from tfp_em.mixed_effects.network_summary import NetworkSummary, summarize_network
from tfp_em.mixed_effects.names import random_effect_names
from tfp_em.mixed_effects.summary import MixedSummary, summarize

INTERCEPT = "Intercept"

__all__ = ["FormulaDesign", "FormulaMixin", "RandomTerm", "formula_design", "new_data_inputs",
           "split_formula"]


class FormulaDesign(NamedTuple):
  """A formula evaluated on a DataFrame: the arrays and options of the array API."""
  formula: str
  response: str
  X: pd.DataFrame            # [n, p] fixed-effects columns, intercept excluded
  y: np.ndarray              # [n]
  clusters: object           # [n] labels, or a list of K label arrays (crossed)
  time: np.ndarray | None    # [n] for random_effects='slopes'
  Z: np.ndarray | None       # [n, q] for random_effects='custom'
  options: dict              # random_effects, degree, covariance, fit_intercept
  fixed_names: tuple         # lme4's names of beta: '(Intercept)', then X's columns
  random_names: tuple        # names of a single factor's random effects ('features':
                             # () until from_formula's fit sets '(Intercept)', 'Gamma1', ...);
                             # several factors: one tuple of names per factor
  group_names: tuple         # one per grouping factor
  terms: tuple               # the `RandomTerm`s, nesting expanded
  fixed_spec: object         # formulaic ModelSpec of the fixed part (for new data)
  random_specs: tuple        # formulaic ModelSpecs of a single factor's terms, side by side;
                             # several factors: one tuple of them per factor


def _matrix(spec, data: pd.DataFrame, what: str):
  """formulaic's model matrix of a formula or ModelSpec, with its errors turned
  into one-line ValueErrors."""
  try:
    if isinstance(spec, str):
      return model_matrix(spec, data, na_action="raise")
    return spec.get_model_matrix(data, na_action="raise")
  except (FormulaicError, ValueError, NameError, SyntaxError) as e:
    message = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise ValueError(f"{what}: {message}") from None


def lme4_name(column: str) -> str:
  """formulaic's 'Intercept' is lme4's '(Intercept)'."""
  return "(Intercept)" if column == INTERCEPT else column


def _group_labels(term: RandomTerm, data: pd.DataFrame) -> np.ndarray:
  """The term's grouping factor as [n] labels; g1:g2 joins the labels with ':'."""
  for g in term.groups:
    if g not in data.columns:
      raise ValueError(f"random-effects term {term.text!r}: column {g!r} is not in data")
    missing = data[g].isna().to_numpy()
    if missing.any():
      raise ValueError(f"random-effects term {term.text!r}: group column {g!r} has missing "
                       f"values (NaN) in {int(missing.sum())} row(s), first at row "
                       f"{int(np.flatnonzero(missing)[0])}")
  if len(term.groups) == 1:
    return data[term.groups[0]].to_numpy()
  return data[list(term.groups)].astype(str).agg(":".join, axis=1).to_numpy()


def _factor_matrix(terms, data: pd.DataFrame):
  """(z [n, q], column names, ModelSpecs, covariance) of one factor's terms side by side.

  Several terms on one factor are uncorrelated with each other, so each must
  be one column or '||' (a diagonal Sigma_u); a correlated block next to
  another term would make Sigma_u block-diagonal, which the estimator does not fit.
  """
  blocks, columns, specs = [], [], []
  for term in terms:
    z = _matrix(term.design, data, f"random-effects term {term.text!r}")
    if len(terms) > 1 and z.shape[1] > 1 and not term.uncorrelated:
      raise ValueError(f"random-effects term {term.text!r}: a correlated block of {z.shape[1]} "
                       f"effects next to another term on group {term.group_name!r} makes a "
                       "block-diagonal covariance, which the estimator does not fit; write one "
                       "term (1 + t + x | g), or all uncorrelated (t + x || g)")
    repeated = sorted(set(columns) & set(z.columns))
    if repeated:
      raise ValueError(f"random-effects term {term.text!r} repeats {lme4_name(repeated[0])!r} "
                       f"on group {term.group_name!r}")
    blocks.append(np.asarray(z, np.float64))
    columns += list(z.columns)
    specs.append(z.model_spec)
  uncorrelated = len(terms) > 1 or terms[0].uncorrelated
  covariance = "diag" if uncorrelated and len(columns) > 1 else "full"
  return np.concatenate(blocks, axis=1), columns, tuple(specs), covariance


def _single_factor(terms, data: pd.DataFrame, network: bool):
  """(options, time, Z, names, ModelSpecs) of the terms of the only grouping factor."""
  if any(t.uses_features for t in terms):
    check_features_term(next(t for t in terms if t.uses_features), network, len(terms) == 1)
    covariance = "diag" if terms[0].uncorrelated else "full"
    return dict(random_effects="features", covariance=covariance), None, None, (), ()
  z, columns, specs, covariance = _factor_matrix(terms, data)  # z: [n, q]
  names = tuple(lme4_name(c) for c in columns)
  if columns == [INTERCEPT]:
    return dict(random_effects="intercept", covariance=covariance), None, None, names, specs
  if (columns[0] == INTERCEPT and
      np.allclose(z, me.polynomial_design(z[:, 1], len(columns) - 1), rtol=1e-12, atol=0.)):
    options = dict(random_effects="slopes", degree=len(columns) - 1, covariance=covariance)
    return options, z[:, 1], None, names, specs
  return dict(random_effects="custom", covariance=covariance), None, z, names, specs


def _crossed_factors(grouped: dict, data: pd.DataFrame, network: bool):
  """(clusters [K] label arrays, options, Z or None, names [K] tuples, ModelSpecs [K] tuples)
  of several grouping factors: random intercepts, or any design per factor
  (random_effects='custom', Z a list of K designs; a network f takes (1 | g) only)."""
  designs, names, specs, kinds = [], [], [], {}  # kinds: {covariance: the first term with it}
  for group, terms in grouped.items():
    for term in terms:
      if term.uses_features:
        check_features_term(term, network, len(terms) == 1)
        raise ValueError(f"random-effects term {term.text!r}: several grouping factors take "
                         "no 'features' term")
    z, columns, factor_specs, covariance = _factor_matrix(terms, data)  # z: [n, d_k]
    if network and columns != [INTERCEPT]:
      raise ValueError(f"random-effects term {terms[0].text!r}: with a network f, several "
                       "grouping factors take random intercepts (1 | g) only")
    if z.shape[1] > 1:
      kinds.setdefault(covariance, terms[0].text)
    designs.append(z)
    names.append(tuple(lme4_name(c) for c in columns))
    specs.append(factor_specs)
  if len(kinds) > 1:
    raise ValueError(f"random-effects terms {kinds['full']!r} and {kinds['diag']!r}: several "
                     "grouping factors with random slopes must all be correlated (1 + t | g) "
                     "or all uncorrelated (t || g); the estimator takes one covariance type")
  clusters = [_group_labels(terms[0], data) for terms in grouped.values()]
  if all(n == ("(Intercept)",) for n in names):
    return clusters, dict(random_effects="intercept"), None, tuple(names), tuple(specs)
  options = dict(random_effects="custom", covariance=next(iter(kinds), "full"))
  return clusters, options, designs, tuple(names), tuple(specs)


def formula_design(formula: str, data, network: bool = False) -> FormulaDesign:
  """Evaluates a mixed-model formula on a DataFrame.

  Args:
    formula: 'response ~ fixed terms + (design | group) [+ ...]'.
    data: a pandas DataFrame holding every column the formula names.
    network: whether f is a network (`features` in a bar term needs one).

  Returns:
    A `FormulaDesign`: the arrays and estimator options of the array API.

  Raises:
    ValueError: naming the term, for an unknown column, missing values, a
      term the estimator cannot fit or malformed syntax.
  """
  if not isinstance(data, pd.DataFrame):
    raise ValueError(f"data must be a pandas DataFrame, got {type(data).__name__}")
  response, fixed, terms = split_formula(formula)
  if re.fullmatch(r"[A-Za-z_.][\w.]*", response) and response not in data.columns:
    raise ValueError(f"response {response!r} is not a column of data")  # else formulaic evaluates it
  for term in terms:
    _group_labels(term, data)  # unknown columns and NaN first: the clearer message
  mm = _matrix(f"{response} ~ {fixed}", data, "fixed effects")
  X = pd.DataFrame(mm.rhs)
  fit_intercept = INTERCEPT in X.columns
  X = X.drop(columns=[INTERCEPT]) if fit_intercept else X
  if X.shape[1] == 0:
    raise ValueError(f"fixed effects {fixed!r}: need at least one column besides the "
                     "intercept (add a covariate)")
  X = X.astype(np.float64)
  y = np.asarray(mm.lhs, np.float64).reshape(-1)
  fixed_names = (("(Intercept)",) if fit_intercept else ()) + tuple(X.columns)
  grouped = group_terms(terms)
  if len(grouped) == 1:
    options, time, Z, random_names, random_specs = _single_factor(terms, data, network)
    clusters = _group_labels(terms[0], data)
  else:
    clusters, options, Z, random_names, random_specs = _crossed_factors(grouped, data, network)
    time = None
  options["fit_intercept"] = fit_intercept
  return FormulaDesign(formula, response, X, y, clusters, time, Z, options, fixed_names,
                       random_names, tuple(grouped), terms, mm.rhs.model_spec, random_specs)


def new_data_inputs(design: FormulaDesign, data) -> dict:
  """`predict`'s arguments (X, clusters, time, Z) for new rows of a DataFrame,
  coded as in the fit (formulaic keeps the categorical levels seen there).

  Raises:
    ValueError: naming a missing column or missing values.
  """
  if not isinstance(data, pd.DataFrame):
    raise ValueError(f"data must be a pandas DataFrame, got {type(data).__name__}")
  X = pd.DataFrame(_matrix(design.fixed_spec, data, "fixed effects"))
  X = X.drop(columns=[INTERCEPT], errors="ignore").astype(np.float64)
  grouped = group_terms(design.terms)
  clusters = [_group_labels(terms[0], data) for terms in grouped.values()]
  inputs = dict(X=X, clusters=clusters[0] if len(clusters) == 1 else clusters, time=None, Z=None)
  kind = design.options["random_effects"]
  if len(clusters) > 1 and kind == "custom":  # one design per factor
    inputs["Z"] = [np.concatenate([np.asarray(_matrix(spec, data, f"random-effects term "
                                                      f"{term.text!r}"), np.float64)
                                   for spec, term in zip(specs, terms)], axis=1)
                   for specs, terms in zip(design.random_specs, grouped.values())]
  elif kind in ("slopes", "custom"):
    z = np.concatenate([np.asarray(_matrix(spec, data, f"random-effects term {term.text!r}"),
                                   np.float64)
                        for spec, term in zip(design.random_specs, design.terms)], axis=1)
    inputs["time" if kind == "slopes" else "Z"] = z[:, 1] if kind == "slopes" else z
  return inputs


class FormulaMixin:
  """`from_formula`, `predict_data` and lme4's `summary` for `MixedEffectsRegressor`."""

  @classmethod
  def from_formula(cls, formula: str, data, REML: bool | None = None, **options):
    """Fits an lme4 formula, e.g. 'Reaction ~ Days + (Days | Subject)', on a DataFrame.

    The formula sets random_effects, degree, covariance and fit_intercept
    (the table in `formula`'s module docstring maps every array-API model to
    its formula); `options` are the other constructor arguments, f and method
    among them. `(features | g)` is MeNets' design z = [1, Gamma(x)], Gamma
    the last hidden layer of the network f on the fixed part's columns
    (`(features || g)`: diagonal Sigma_u); it needs f='mlp' or a Keras model.
    Nesting `(1 | g1/g2)` is `(1 | g1) + (1 | g1:g2)` (crossed factors), and
    `(1 | g) + (0 + t | g)` is `(t || g)`. The fit is `fit` on
    `formula_design`'s arrays, and `formula_` keeps them (a `FormulaDesign`)
    for `summary()` and `predict_data()`. `REML` is lme4's name for the
    estimator's `reml` (default: the estimator's default, maximum likelihood).

    Raises:
      ValueError: naming the term the estimator cannot fit (a block-diagonal
        covariance, `features` on crossed factors or without a network),
        an unknown column or missing values; or an option the formula
        already sets.
    """
    if REML is not None:
      if "reml" in options:
        raise ValueError("pass REML= or reml=, not both")
      options["reml"] = REML
    design = formula_design(formula, data, network=options.get("f") is not None)
    clash = sorted(set(options) & set(design.options))
    if clash:
      raise ValueError(f"{', '.join(clash)} is set by the formula; leave it out of the options")
    estimator = cls(**design.options, **options)
    estimator.fit(design.X, design.y, design.clusters, time=design.time, Z=design.Z)
    if design.options["random_effects"] == "features":  # Gamma's width is known after the fit
      design = design._replace(random_names=random_effect_names(estimator))
    estimator.formula_ = design
    return estimator

  def predict_data(self, data, interval: bool = False, level: float = 0.95):
    """`predict` (with interval=True, `predict_interval`) on the rows of a DataFrame,
    for a fit by `from_formula`: the formula builds X, the groups, time and Z."""
    val.check_is_fitted(self, "fit_result_")
    if self.formula_ is None:
      raise ValueError("predict_data() needs a fit by from_formula; use predict(X, clusters)")
    inputs = new_data_inputs(self.formula_, data)
    return self.predict_interval(**inputs, level=level) if interval else self.predict(**inputs)

  def summary(self, X=None, y=None, clusters=None, time=None, Z=None
              ) -> MixedSummary | NetworkSummary:
    """lme4's summary; `print()` it for lme4's layout. Linear f
    (`summary.summarize`): fixed effects with SE and t, variance components,
    logLik, AIC, BIC, deviance, groups. A network f
    (`network_summary.summarize_network`): the network and its parameter
    count in place of the fixed effects. The data default to a formula fit's;
    an array fit passes its training data (a network's summary then
    leaves out the residuals)."""
    if self.f is not None:
      return summarize_network(self, X, y, clusters, time, Z)
    return summarize(self, X, y, clusters, time, Z)
