"""Mixed-model formulas: lme4's syntax for the random part, formulaic for the rest.

    Reaction ~ Days + (Days | Subject)   correlated intercept and slope per Subject
    y ~ x + (1 | g)                      random intercept
    y ~ x + (t || g)                     intercept and slope, uncorrelated (diagonal Sigma_u)
    y ~ x + (1 | g1) + (1 | g2)          crossed random intercepts, one variance each
    y ~ x + (1 | g1:g2)                  one factor: each combination of g1 and g2 a level
    y ~ x + (0 + z1 + z2 | g)            any design of columns (random_effects='custom')

Only the bar terms `(design | group)` and `(design || group)` are parsed here;
the response, the fixed part (categorical coding, `C(...)`, `I(...)`,
interactions) and each bar term's design are built by formulaic from a pandas
DataFrame, with missing values refused. `formula_design` maps a formula onto
the array API of `MixedEffectsRegressor` (X, y, clusters, time, Z and the
options random_effects, degree, covariance, fit_intercept), so a formula fit
is the array fit of those arrays; `FormulaMixin` gives the estimator
`from_formula`, `predict_data` and `summary`. A term the estimator cannot fit gets a
ValueError naming the term.

#### References

[1] D. Bates, M. Maechler, B. Bolker and S. Walker. Fitting linear
    mixed-effects models using lme4. Journal of Statistical Software 67(1),
    2015 (Table 2: the random-effects syntax).
"""
from __future__ import annotations

import re
from typing import NamedTuple

import numpy as np
import pandas as pd
from formulaic import model_matrix
from formulaic.errors import FormulaicError

from tfp_em.engine import inputs as val
from tfp_em.mixed_effects.summary import MixedSummary, summarize

BAR = re.compile(r"\(([^()|]*)(\|\|?)([^()|]*)\)")
INTERCEPT = "Intercept"


class RandomTerm(NamedTuple):
  """One bar term of a formula."""
  text: str             # as written, for messages
  design: str           # left of the bar
  groups: tuple         # grouping columns; several for an interaction g1:g2
  uncorrelated: bool    # '||'

  @property
  def group_name(self) -> str:
    return ":".join(self.groups)


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
  random_names: tuple        # names of the random-effects design's columns
  group_names: tuple         # one per grouping factor
  terms: tuple               # the `RandomTerm`s
  fixed_spec: object         # formulaic ModelSpec of the fixed part (for new data)
  random_spec: object        # formulaic ModelSpec of a single factor's design, or None


def split_formula(formula: str) -> tuple[str, str, tuple]:
  """'y ~ fixed + (a | g)' -> (response, fixed part, bar terms)."""
  if not isinstance(formula, str) or formula.count("~") != 1:
    raise ValueError(f"formula must be a string 'response ~ terms', got {formula!r}")
  response, rhs = (s.strip() for s in formula.split("~"))
  if not response:
    raise ValueError(f"formula {formula!r} has no response left of '~'")
  terms = []
  for match in BAR.finditer(rhs):
    design, bar, group = (s.strip() for s in match.groups())
    text = match.group(0)
    if not design or not group:
      raise ValueError(f"random-effects term {text!r} needs a design and a group: (1 | g)")
    if "/" in group:
      raise ValueError(f"random-effects term {text!r}: nested groups '/' are not supported; "
                       "write (1 | g1) + (1 | g1:g2)")
    groups = tuple(g.strip() for g in group.split(":"))
    if not all(re.fullmatch(r"[A-Za-z_.][\w.]*", g) for g in groups):
      raise ValueError(f"random-effects term {text!r}: the group must be column names "
                       "joined by ':'")
    terms.append(RandomTerm(text, design, groups, bar == "||"))
  fixed = BAR.sub(" ", rhs)
  if "|" in fixed:
    raise ValueError(f"formula {formula!r}: a '|' outside a parenthesized random-effects "
                     "term (design | group)")
  if not terms:
    raise ValueError(f"formula {formula!r} has no random-effects term such as (1 | group)")
  fixed = re.sub(r"(\s*\+\s*)+", " + ", fixed).strip(" +")  # the '+' left around removed terms
  return response, fixed or "1", tuple(terms)


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


def _single_factor(term: RandomTerm, data: pd.DataFrame):
  """(options, time, Z, names, design's ModelSpec) of one bar term's design."""
  z = _matrix(term.design, data, f"random-effects term {term.text!r}")
  columns = list(z.columns)
  names = tuple("(Intercept)" if c == INTERCEPT else c for c in columns)
  covariance = "diag" if term.uncorrelated and len(columns) > 1 else "full"
  spec = z.model_spec
  if columns == [INTERCEPT]:
    return dict(random_effects="intercept", covariance=covariance), None, None, names, spec
  if (len(columns) == 2 and columns[0] == INTERCEPT and columns[1] in data.columns
      and pd.api.types.is_numeric_dtype(data[columns[1]])):
    options = dict(random_effects="slopes", degree=1, covariance=covariance)
    return options, data[columns[1]].to_numpy(np.float64), None, names, spec
  return (dict(random_effects="custom", covariance=covariance), None,
          np.asarray(z, np.float64), names, spec)


def formula_design(formula: str, data) -> FormulaDesign:
  """Evaluates a mixed-model formula on a DataFrame.

  Args:
    formula: 'response ~ fixed terms + (design | group) [+ ...]'.
    data: a pandas DataFrame holding every column the formula names.

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
  groups = [t.group_name for t in terms]
  if len(terms) == 1:
    options, time, Z, random_names, random_spec = _single_factor(terms[0], data)
    clusters = _group_labels(terms[0], data)
  else:
    seen = set()
    for term in terms:
      if term.group_name in seen:
        raise ValueError(f"random-effects term {term.text!r}: a second term for group "
                         f"{term.group_name!r} is not supported; write (1 + t | g) or (t || g)")
      seen.add(term.group_name)
      design = _matrix(term.design, data, f"random-effects term {term.text!r}")
      if list(design.columns) != [INTERCEPT]:
        raise ValueError(f"random-effects term {term.text!r}: several grouping factors take "
                         "random intercepts (1 | g) only")
    options, time, Z, random_names = dict(random_effects="intercept"), None, None, ("(Intercept)",)
    random_spec = None
    clusters = [_group_labels(t, data) for t in terms]
  options["fit_intercept"] = fit_intercept
  return FormulaDesign(formula, response, X, y, clusters, time, Z, options, fixed_names,
                       random_names, tuple(groups), terms, mm.rhs.model_spec, random_spec)


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
  clusters = [_group_labels(t, data) for t in design.terms]
  inputs = dict(X=X, clusters=clusters[0] if len(clusters) == 1 else clusters, time=None, Z=None)
  kind = design.options["random_effects"]
  if kind != "intercept":
    z = np.asarray(_matrix(design.random_spec, data,
                           f"random-effects term {design.terms[0].text!r}"), np.float64)
    inputs["time" if kind == "slopes" else "Z"] = z[:, 1] if kind == "slopes" else z
  return inputs


class FormulaMixin:
  """`from_formula`, `predict_data` and lme4's `summary` for `MixedEffectsRegressor`."""

  @classmethod
  def from_formula(cls, formula: str, data, **options):
    """Fits an lme4 formula, e.g. 'Reaction ~ Days + (Days | Subject)', on a DataFrame.

    The formula sets random_effects, degree, covariance and fit_intercept;
    `options` are the other constructor arguments. The fit is `fit` on
    `formula_design`'s arrays, and `formula_` keeps them (a `FormulaDesign`)
    for `summary()` and `predict_data()`.

    Raises:
      ValueError: naming the term the estimator cannot fit, an unknown column
        or missing values; or an option the formula already sets.
    """
    design = formula_design(formula, data)
    clash = sorted(set(options) & set(design.options))
    if clash:
      raise ValueError(f"{', '.join(clash)} is set by the formula; leave it out of the options")
    estimator = cls(**design.options, **options)
    estimator.fit(design.X, design.y, design.clusters, time=design.time, Z=design.Z)
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

  def summary(self, X=None, y=None, clusters=None, time=None, Z=None) -> MixedSummary:
    """lme4's summary (`summary.summarize`): fixed effects with SE and t, variance
    components, logLik, AIC, BIC, deviance, groups; `print()` it for lme4's
    layout. The data default to a formula fit's; an array fit passes its
    training data."""
    return summarize(self, X, y, clusters, time, Z)
