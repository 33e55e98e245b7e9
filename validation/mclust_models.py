"""mclust's model search on Old Faithful and iris: tfp_em.select_mixture against
mclust's published answers, and timed against the same search by scikit-learn.

For each data set: the BIC table over K and the covariance models (mclust's
sign, 2 l - p log N, LARGER is better, so that it reads as mclust's; tfp_em's
own `bic` is its negative), the best model, K and l beside mclust's published
ones, then the wall time of

  * tfp_em over every model (cold: the process's first search, tracing
    included; warm: the same search again, compiled steps reused),
  * tfp_em over scikit-learn's four types (warm), and
  * sklearn.mixture.GaussianMixture over its four types,

all with the same K, n_init, tol, max_iter and reg_covar (scikit-learn's tol
is on the change of its mean lower bound, tfp_em's on the relative change of
the mean log-likelihood; both at 1e-6 here).

    python validation/mclust_models.py            # K = 1..9, n_init = 3
    python validation/mclust_models.py --quick    # K = 1..3, n_init = 1 (a check)

Writes validation/out/mclust_models.json and .md (--quick: mclust_models_quick.*).

mclust's answers (Scrucca et al. 2016, mclust 5/6 `summary(Mclust(...))`):
Old Faithful: EEE, K=3, l=-1126.361, BIC=-2314.386, ICL=-2360.865;
iris (4 features): VEV, K=2, l=-215.7259, BIC=-561.7285, ICL=-561.7289.

#### References

[1] L. Scrucca, M. Fop, T. B. Murphy and A. E. Raftery. mclust 5: clustering,
    classification and density estimation using Gaussian finite mixture
    models. The R Journal 8(1):289-317, 2016.
"""
from __future__ import annotations

import argparse
import json
import os
import time
import warnings

import numpy as np
import pandas as pd

import tfp_em  # first: it keeps TensorFlow's start-up logs quiet
from models.gaussian_mixture import COVARIANCE_TYPES, MCLUST_MODELS, mclust_name

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
MCLUST = {  # model, K, l, BIC, ICL (mclust's sign: larger is better)
    "old_faithful": ("EEE", 3, -1126.361, -2314.386, -2360.865),
    "iris": ("VEV", 2, -215.7259, -561.7285, -561.7289),
}


def datasets():
  from sklearn.datasets import load_iris

  from tfp_em.cli.readers import load_old_faithful
  return {"old_faithful": load_old_faithful()[0], "iris": load_iris().data}


def tfp_em_search(x, ks, models, options):
  start = time.perf_counter()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the table lists each fit's warnings
    found = tfp_em.select_mixture(x, ks, models=models, progress=False, **options)
  return found, time.perf_counter() - start


def sklearn_search(x, ks, options):
  """scikit-learn's four types; rows like select_mixture's (k, covariance_type, l, bic)."""
  from sklearn.mixture import GaussianMixture
  rows = []
  start = time.perf_counter()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    for cov in COVARIANCE_TYPES:
      for k in ks:
        est = GaussianMixture(k, covariance_type=cov, n_init=options["n_init"],
                              max_iter=options["max_iter"], tol=options["tol"],
                              reg_covar=options["reg_covar"], random_state=options["seed"])
        est.fit(x)
        rows.append(dict(k=k, covariance_type=cov, log_likelihood=est.score(x) * len(x),
                         bic=est.bic(x)))
  return pd.DataFrame(rows), time.perf_counter() - start


def bic_grid(table) -> pd.DataFrame:
  """K x model grid of BIC in mclust's sign (larger is better)."""
  grid = table.assign(model=table["covariance_type"].map(mclust_name), mclust_bic=-table["bic"])
  grid = grid.pivot(index="k", columns="model", values="mclust_bic")
  return grid[[m for m in MCLUST_MODELS if m in grid.columns]]  # mclust's order


def run_dataset(name, x, ks, options):
  found, cold = tfp_em_search(x, ks, "all", options)
  _, warm = tfp_em_search(x, ks, "all", options)
  four, warm_four = tfp_em_search(x, ks, list(COVARIANCE_TYPES), options)
  theirs, sk_seconds = sklearn_search(x, ks, options)
  best = found.best_
  model, k, loglik, bic, icl = MCLUST[name]
  mine = four.table.set_index(["k", "covariance_type"])["log_likelihood"]
  gap = theirs.set_index(["k", "covariance_type"])["log_likelihood"] - mine  # sklearn - tfp_em
  sk_best = theirs.loc[theirs["bic"].idxmin()]
  return dict(
      dataset=name, n=int(x.shape[0]), d=int(x.shape[1]), ks=list(ks),
      models=sorted({mclust_name(m) for m in found.table["covariance_type"]}),
      best=dict(model=mclust_name(best["covariance_type"]), k=best["k"],
                log_likelihood=best["log_likelihood"], mclust_bic=-best["bic"],
                mclust_icl=-best["icl"], n_parameters=best["n_parameters"]),
      mclust=dict(model=model, k=k, log_likelihood=loglik, mclust_bic=bic, mclust_icl=icl),
      sklearn_best=dict(model=mclust_name(sk_best["covariance_type"]), k=int(sk_best["k"]),
                        log_likelihood=float(sk_best["log_likelihood"]),
                        mclust_bic=-float(sk_best["bic"])),
      loglik_sklearn_minus_tfp_em=dict(max=float(gap.max()), min=float(gap.min()),
                                       largest_at=f"{mclust_name(gap.idxmax()[1])},"
                                       f"K={gap.idxmax()[0]}"),
      seconds=dict(tfp_em_all_cold=cold, tfp_em_all_warm=warm, tfp_em_four_warm=warm_four,
                   sklearn_four=sk_seconds),
      spurious=[f"{mclust_name(r.covariance_type)},K={r.k}"
                for r in found.table.itertuples() if r.spurious],
      bic_grid=bic_grid(found.table))


def describe(r) -> str:
  b, m, s, t = r["best"], r["mclust"], r["sklearn_best"], r["seconds"]
  grid = r["bic_grid"].to_string(float_format=lambda v: f"{v:.1f}")
  return "\n".join([
      f"## {r['dataset']} (N={r['n']}, D={r['d']}, K={r['ks'][0]}..{r['ks'][-1]}, "
      f"{len(r['models'])} models)",
      "BIC, mclust's sign (2 l - p log N, larger is better):", grid,
      f"best (tfp_em):  {b['model']}, K={b['k']}: l={b['log_likelihood']:.4f}, "
      f"BIC={b['mclust_bic']:.3f}, ICL={b['mclust_icl']:.3f}, p={b['n_parameters']}",
      f"best (mclust):  {m['model']}, K={m['k']}: l={m['log_likelihood']}, "
      f"BIC={m['mclust_bic']}, ICL={m['mclust_icl']}",
      f"best (sklearn, four types): {s['model']}, K={s['k']}: l={s['log_likelihood']:.4f}, "
      f"BIC={s['mclust_bic']:.3f}",
      f"l(sklearn) - l(tfp_em) over the four types: {r['loglik_sklearn_minus_tfp_em']['min']:.3g}"
      f" .. {r['loglik_sklearn_minus_tfp_em']['max']:.3g} (largest at "
      f"{r['loglik_sklearn_minus_tfp_em']['largest_at']})",
      f"flagged spurious (not chosen): {', '.join(r['spurious']) or 'none'}",
      f"seconds: tfp_em all models {t['tfp_em_all_cold']:.1f} cold, {t['tfp_em_all_warm']:.1f} "
      f"warm; tfp_em four types {t['tfp_em_four_warm']:.1f} warm; "
      f"sklearn four types {t['sklearn_four']:.1f}", ""])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="K=1..3, n_init=1: a check")
  parser.add_argument("--n-init", type=int, default=3)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  ks = range(1, 4) if args.quick else range(1, 10)
  options = dict(n_init=1 if args.quick else args.n_init, seed=args.seed, tol=1e-6,
                 max_iter=1000, reg_covar=1e-6)
  results = []
  for name, x in datasets().items():
    results.append(run_dataset(name, x, ks, options))
    print(describe(results[-1]), flush=True)
  os.makedirs(OUT, exist_ok=True)
  stem = os.path.join(OUT, "mclust_models_quick" if args.quick else "mclust_models")
  with open(stem + ".md", "w") as f:
    f.write(f"options: {options}\n\n" + "\n".join(describe(r) for r in results))
  with open(stem + ".json", "w") as f:
    json.dump([dict(r, bic_grid=r["bic_grid"].to_dict()) for r in results], f, indent=2,
              default=lambda v: v.item() if isinstance(v, np.generic) else str(v))
  print(f"wrote {stem}.md and .json")


if __name__ == "__main__":
  main()
