"""Choosing K and the covariance model of a Gaussian mixture (`select_mixture`).

    select_mixture(X, n_components=range(1, 10), models="all")  -> MixtureSelection
        .table            one row per candidate (K, covariance model): l, free
                          parameters, BIC, ICL, AIC, iterations, notes,
                          spurious, best
        .best_            the best row (a dict)
        .best_estimator_  its fitted `GaussianMixture`

Every criterion follows scikit-learn's sign, LOWER IS BETTER, as the estimator's
`bic`, `icl` and `aic`:

    BIC = -2 l + p log N     ICL = BIC - 2 sum_n log r_n,z_n     AIC = -2 l + 2 p

with l the log-likelihood, p the free parameters and z_n the most probable
component of x_n. mclust reports -BIC and -ICL (larger is better): its
Old Faithful BIC of -2314.4 is 2314.4 here.

A candidate whose fit looks spurious (`SpuriousSolutionWarning`: a component
on a point or a few, whose likelihood grows without bound) is listed but not
chosen, as mclust gives singular fits no BIC.

Compiled steps are shared by every restart of a candidate, by every K (they
are traced with K unknown, `GaussianMixtureEM.traced_component_axes`; not
with missing='em', whose steps trace per K) and by any later fit of the same
configuration (covariance model, D; and N when N <= 2048,
`tfp_em.engine.compiling`): each covariance model traces its steps (three
graphs) once, and a second search traces nothing.

#### References

[1] G. Schwarz. Estimating the dimension of a model. Annals of Statistics
    6(2):461-464, 1978.
[2] C. Biernacki, G. Celeux and G. Govaert. Assessing a mixture model for
    clustering with the integrated completed likelihood. IEEE TPAMI
    22(7):719-725, 2000.
[3] L. Scrucca, M. Fop, T. B. Murphy and A. E. Raftery. mclust 5: clustering,
    classification and density estimation using Gaussian finite mixture models.
    The R Journal 8(1):289-317, 2016.
"""
from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import numpy as np
import pandas as pd

from models import gaussian_mixture as gm
from tfp_em.engine import NumericalFailureError, progress_enabled
from tfp_em.engine import inputs as v
from tfp_em.mixture.estimator import GaussianMixture
from tfp_em.mixture.spurious import SpuriousSolutionWarning

CRITERIA = ("bic", "icl", "aic")
SEARCH_PARAMS = ("n_components", "covariance_type", "n_init", "seed", "verbose", "warm_start")
COLUMNS = ("k", "covariance_type", "log_likelihood", "n_parameters", "bic", "icl", "aic",
           "n_iter", "converged", "notes", "spurious", "best")


class MixtureSelection(NamedTuple):
  """What `select_mixture` returns.

  Attributes:
    table: pandas DataFrame, one row per candidate, columns `COLUMNS`; bic, icl
      and aic are lower-is-better (NaN for a candidate whose fit failed, with
      the reason in `notes`); `spurious` marks fits flagged by a
      `SpuriousSolutionWarning`; `best` marks the chosen row.
    best_: the chosen row as a dict.
    best_estimator_: the chosen fitted `GaussianMixture`.
    criterion: the column that chose it ('bic', 'icl' or 'aic').
  """
  table: pd.DataFrame
  best_: dict
  best_estimator_: GaussianMixture
  criterion: str

  def report_rows(self) -> list[dict]:
    """The table as `write_report(model_selection=...)` takes it (the best row
    has chosen=True)."""
    rows = self.table.rename(columns={"best": "chosen"}).to_dict("records")
    return [{key: _plain(value) for key, value in row.items()} for row in rows]


def select_mixture(X, n_components=range(1, 10), models="all", *, n_init: int = 3,
                   seed: int | None = 0, criterion: str = "bic", progress: bool | None = None,
                   **params) -> MixtureSelection:
  """Fits a `GaussianMixture` for every K and covariance model; picks the best.

  Args:
    X: [N, D] array or DataFrame (in memory).
    n_components: the numbers of components K to try (default 1..9, as mclust).
    models: covariance models to try: 'all' (mclust's 14, EII ... VVV),
      'sklearn' (full, tied, diag, spherical), or a list of names of either.
    n_init: restarts per candidate; the best log-likelihood wins (default 3).
    seed: seed of every candidate's restarts (default 0).
    criterion: 'bic' (default), 'icl' or 'aic': the column whose LOWEST value
      chooses the model among the fits not flagged as spurious (among all,
      when every fit is; ties: the first row, rows being models in the given
      order, each with K ascending).
    progress: a progress bar over the candidates; None means on, except under
      pytest.
    **params: any other `GaussianMixture` option (max_iter, tol, reg_covar,
      init_params, dtype, compile, ...), the same for every candidate.

  Returns:
    A `MixtureSelection` (table, best_, best_estimator_, criterion). Warnings
    of the fits are listed by kind in the table's `notes`; the chosen fit's own
    warnings are issued again. A candidate whose fit fails numerically gets NaN
    criteria and the reason in `notes`.

  Raises:
    ValueError: bad options, a K above the number of rows, or every
      candidate failed.
  """
  ks, names = _candidates(n_components, models)
  n_rows = v.check_array(X, allow_nan=True).shape[0]  # the fits check X (NaN: missing="em")
  if ks[-1] > n_rows:
    raise ValueError(f"n_components goes up to {ks[-1]} but X has {n_rows} rows; "
                     "need at least as many rows as components")
  v.check_option("criterion", criterion, CRITERIA)
  v.check_int("n_init", n_init, minimum=1)
  fixed = sorted(set(params) & set(SEARCH_PARAMS))
  if fixed:
    raise ValueError(f"select_mixture sets {fixed} itself; pass n_components, models, n_init, "
                     "seed and progress as its own arguments")
  unknown = sorted(set(params) - set(GaussianMixture().get_params()))
  if unknown:
    raise ValueError(f"unknown GaussianMixture option(s) {unknown}")
  candidates = [(k, name) for name in names for k in ks]
  bar = _bar(progress, len(candidates))
  rows = []
  leaders = {}  # 'any' / 'sound' (not spurious) -> (value, row, estimator, warnings)
  for row_index, (k, name) in enumerate(candidates):
    if bar is not None:
      bar.set_postfix_str(f"K={k} {name}")
    est = GaussianMixture(k, covariance_type=name, n_init=n_init, seed=seed, verbose=progress,
                          **params)
    row, caught = _fit_candidate(est, X)
    rows.append(row)
    for kind in ("any", "sound"):  # only the leaders are kept: each holds a copy of X
      # NaN (a failed fit) is never below; ties keep the first row
      if (kind == "any" or not row["spurious"]) and \
          row[criterion] < leaders.get(kind, (math.inf,))[0]:
        leaders[kind] = (row[criterion], row_index, est, caught)
    if bar is not None:
      bar.update()
  if bar is not None:
    bar.close()
  table = pd.DataFrame(rows, columns=list(COLUMNS))
  if not leaders:
    raise ValueError(f"every candidate failed; first: {table['notes'].iloc[0]}")
  _, best, est, caught = leaders.get("sound", leaders["any"])
  table["best"] = table.index == best
  chosen = table.iloc[best]
  for w in caught:
    warnings.warn(w.message, w.category, stacklevel=2)
  return MixtureSelection(table, {key: _plain(value) for key, value in chosen.items()}, est,
                          criterion)


def _candidates(n_components, models) -> tuple[list[int], list[str]]:
  if isinstance(n_components, (str, bytes)) or np.ndim(n_components) != 1:
    raise ValueError(f"n_components must be a list or range of integers, got {n_components!r}")
  ks = sorted({v.check_int("n_components", k, minimum=1) for k in n_components})
  if not ks:
    raise ValueError("n_components is empty")
  if isinstance(models, str):
    if models not in ("all", "sklearn"):
      raise ValueError(f"models must be 'all', 'sklearn' or a list of covariance models, "
                       f"got {models!r}")
    names = list(gm.MCLUST_MODELS if models == "all" else gm.COVARIANCE_TYPES)
  else:
    names = list(dict.fromkeys(models))
    if not names:
      raise ValueError("models is empty")
    for name in names:
      gm.check_covariance_type(name)
  return ks, names


def _fit_candidate(est: GaussianMixture, X) -> tuple[dict, list]:
  """The candidate's table row, and the warnings its fit issued."""
  row = dict(k=est.n_components, covariance_type=est.covariance_type)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    try:
      est.fit(X)
    except NumericalFailureError as e:
      return dict(row, log_likelihood=math.nan, n_parameters=math.nan, bic=math.nan,
                  icl=math.nan, aic=math.nan, n_iter=0, converged=False,
                  notes=f"failed: {e}", spurious=False), []
    bic, icl, aic = est.bic(X), est.icl(X), est.aic(X)
  kinds = dict.fromkeys(w.category.__name__ for w in caught)
  return dict(row, log_likelihood=est.log_likelihood_,
              n_parameters=gm.n_parameters(est.covariance_type, est.n_components,
                                           est.n_features_in_),
              bic=bic, icl=icl, aic=aic, n_iter=est.n_iter_, converged=bool(est.converged_),
              notes=", ".join(kinds), spurious=SpuriousSolutionWarning.__name__ in kinds), \
      list(caught)


def _bar(progress, total):
  if not progress_enabled(progress):
    return None
  from tqdm.auto import tqdm
  return tqdm(total=total, desc="select_mixture", leave=False)


def _plain(value):
  """numpy scalars as Python numbers (for JSON)."""
  return value.item() if isinstance(value, np.generic) else value
