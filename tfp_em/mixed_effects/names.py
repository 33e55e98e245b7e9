"""lme4's names of a fitted mixed model's terms, for the diagnostics report.

    fixed effects   '(Intercept)', then X's columns (a DataFrame's names, else x1, x2, ...);
                    a network f is one column, 'f(x)', with beta = 1 held fixed
    random effects  '(Intercept)', 'time', 'time^2', ... ('slopes'); z1, z2, ... ('custom');
                    '(Intercept)', 'Gamma1', ... ('features': the network's last layer);
                    several factors: one tuple per factor ('(Intercept)' or z1, z2, ...)
    group           the formula's grouping factor, else 'clusters'

A formula fit (`from_formula`) takes the formula's names.
"""
from __future__ import annotations

from typing import NamedTuple


class TermNames(NamedTuple):
  fixed: tuple    # [p] names of beta
  random: tuple   # [q] names of the random effects
  group: str      # the grouping factor


def random_effect_names(estimator, given=()) -> tuple:
  """Names of a single factor's random effects: `given` (a formula's) if any;
  for 'features' '(Intercept)', 'Gamma1', ..., for 'custom' 'z1', ..., by
  the fitted size. Several factors: `crossed_random_names`, one tuple each."""
  if estimator.crossed_ is not None:
    return crossed_random_names(estimator.crossed_, given)
  kind = estimator.random_effects
  if kind == "intercept" or (given and kind != "features"):
    return tuple(given) or ("(Intercept)",)
  q = int(estimator.n_random_effects_)  # one factor: set by the fit
  if kind == "features":
    return ("(Intercept)",) + tuple(f"Gamma{j}" for j in range(1, q))
  if kind == "slopes":
    return ("(Intercept)", "time") + tuple(f"time^{d}" for d in range(2, q))
  return tuple(f"z{j + 1}" for j in range(q))


def crossed_random_names(crossed, given=()) -> tuple:
  """K tuples of names, one per crossed factor: `given` (a formula's) if any;
  '(Intercept)' for a random intercept, else 'z1', 'z2', ... for factor k's
  design Z[k] (`crossed.intercepts_`, `crossed.num_effects_`)."""
  if given:
    return tuple(tuple(names) for names in given)
  return tuple(("(Intercept)",) if intercept else tuple(f"z{j + 1}" for j in range(d))
               for intercept, d in zip(crossed.intercepts_, crossed.num_effects_))


def term_names(estimator, feature_names=None) -> TermNames:
  """`TermNames` of a `MixedEffectsRegressor` fitted with one grouping factor.

  Args:
    estimator: the fitted estimator.
    feature_names: names of X's columns (default: the DataFrame columns seen
      in fit, `feature_names_in_`, else x1, x2, ...).
  """
  design = estimator.formula_
  if design is not None:
    return TermNames(tuple(design.fixed_names), random_effect_names(estimator, design.random_names),
                     str(design.group_names[0]))
  random = random_effect_names(estimator)
  if estimator.network_ is not None:
    return TermNames(("f(x)",), random, "clusters")
  if feature_names is None:
    feature_names = getattr(estimator, "feature_names_in_", None)
  columns = ([str(c) for c in feature_names] if feature_names is not None
             else [f"x{j + 1}" for j in range(int(estimator.n_features_in_))])
  fixed = (("(Intercept)",) if estimator.fit_intercept else ()) + tuple(columns)
  return TermNames(fixed, random, "clusters")
