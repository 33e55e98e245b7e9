"""The catalogue of bad-input cases, shared by `tests/test_bad_input.py` and
`validation/robustness.py`.

Each `Case` runs one bad input through an estimator, the CSV loader or the
`tfp-em` command, and `run_case` classifies what happened:

  'clear error'  a `ValueError` whose one-line message matches `case.match`
                 (for the CLI: exit code 2, one line on stderr, nothing on
                 stdout, no file written);
  'handled'      a case that is not an error (`expect='handled'`) finished
                 and its `check` found finite, sensible output;
  'crash'        anything else: another exception, a message that does not
                 name the problem, a traceback, partial output, or silence.

Cases take a scratch folder `tmp` (a `pathlib.Path`) for the files they need.
Data sets are tiny so that the whole table runs in seconds.
"""
from __future__ import annotations

import contextlib
import io as _io
import pathlib
import re
import warnings
from typing import Callable, NamedTuple

import numpy as np


class Case(NamedTuple):
  name: str                      # 'target: what is wrong'
  target: str                    # 'GaussianMixture', ..., 'load_csv', 'cli'
  run: Callable                  # run(tmp) for estimators; argv(tmp) -> list for the CLI
  match: str = ""                # regex the error message must contain
  expect: str = "error"          # 'error' or 'handled'
  check: Callable | None = None  # for 'handled': check(result, warnings) -> problem or None


class Outcome(NamedTuple):
  kind: str    # 'clear error' | 'handled' | 'crash'
  detail: str


# ---- Small data. ------------------------------------------------------------

def _x(n=40, d=2, seed=0):
  return np.random.default_rng(seed).normal(size=(n, d))


def _labels(n=40):
  return (_x(n)[:, 0] > 0).astype(int)


def _clusters(n=40):
  return np.repeat(np.arange(8), n // 8)


def _y_reg(n=40):
  x = _x(n)
  return x @ np.array([1.0, -0.5]) + np.repeat(np.linspace(-1, 1, 8), n // 8) \
      + 0.1 * np.random.default_rng(1).normal(size=n)


def _with(a, index, value):
  a = np.array(a, dtype=float)
  a[index] = value
  return a


# Bad X shared by every estimator: (label, value, regex).
BAD_X = [
    ("X is 1-D", lambda: _x()[:, 0], "2-D"),
    ("X is 3-D", lambda: _x().reshape(40, 2, 1), "2-D"),
    ("X has NaN", lambda: _with(_x(), (3, 1), np.nan), "NaN"),
    ("X has inf", lambda: _with(_x(), (5, 0), np.inf), "inf"),
    ("X has -inf", lambda: _with(_x(), (0, 0), -np.inf), "inf"),
    ("X is empty (0 rows)", lambda: np.zeros((0, 2)), "at least"),
    ("X has no columns", lambda: np.zeros((40, 0)), "column"),
    ("X is strings", lambda: np.array([["a", "b"]] * 40), "numeric"),
    ("X is a ragged list", lambda: [[1.0, 2.0], [3.0]] * 20, "X"),
    ("X is complex", lambda: _x() + 1j, "real"),
    ("X is None", lambda: None, "X"),
    ("X is a scalar", lambda: 3.0, "2-D"),
    ("X near the float64 limit (1e300)", lambda: _x() * 1e300, "too large"),
    ("X is a scipy sparse matrix", lambda: _sparse(_x()),
     r"sparse matrices are not supported; call X\.toarray\(\)"),
    ("X is a pandas Float64 frame with NA", lambda: _nullable_with_na(_x()),
     r"missing value\(s\) \(NA, None or NaN; first at row 3, column 'b'\)"),
]


def _sparse(x):
  from scipy import sparse
  return sparse.csr_matrix(x)


def _nullable_with_na(x):
  import pandas as pd
  frame = pd.DataFrame(x, columns=["a", "b"]).astype("Float64")
  frame.iloc[3, 1] = pd.NA
  return frame


def _no_runtime_warning(run):
  """`run` with RuntimeWarnings raised: a cast-overflow warning before the error is a crash."""
  def wrapped(tmp):
    with warnings.catch_warnings():
      warnings.simplefilter("error", RuntimeWarning)
      return run(tmp)
  return wrapped


# ---- Estimators. ------------------------------------------------------------

def _gmm(**kw):
  from tfp_em import GaussianMixture
  base = dict(n_components=2, max_iter=20, verbose=False)
  base.update(kw)
  return GaussianMixture(**base)


def _mlp(**kw):
  from tfp_em.bernoulli_mlp.estimator import BernoulliMLPClassifier
  base = dict(n_hidden=2, max_iter=5)
  base.update(kw)
  return BernoulliMLPClassifier(**base)


def _me(**kw):
  from tfp_em.mixed_effects.estimator import MixedEffectsRegressor
  base = dict(max_iter=20)
  base.update(kw)
  return MixedEffectsRegressor(**base)


def _ce(**kw):
  from tfp_em.mixed_effects.crossed_estimator import CrossedEffectsRegressor
  base = dict(max_iter=20)
  base.update(kw)
  return CrossedEffectsRegressor(**base)


def _factors(n=40):
  return [np.repeat(np.arange(8), n // 8), np.tile(np.arange(5), n // 5)]


def _fit_ce(X=None, y=None, clusters=None, **kw):
  return lambda tmp: _ce(**kw).fit(_x() if X is None else X(), _y_reg() if y is None else y(),
                                   _factors() if clusters is None else clusters())


_FITTED = {}


def _fitted(kind):
  """A small fitted estimator of each kind (cached: predict-side cases reuse it)."""
  if kind not in _FITTED:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      _FITTED[kind] = {"gmm": lambda: _gmm().fit(_x()),
                       "mlp": lambda: _mlp().fit(_x(), _labels()),
                       "me": lambda: _me().fit(_x(), _y_reg(), _clusters()),
                       "ce": lambda: _ce().fit(_x(), _y_reg(), _factors())}[kind]()
  return _FITTED[kind]


def _fit_gmm(X=None, **kw):
  return lambda tmp: _gmm(**kw).fit(_x() if X is None else X())


def _fit_mlp(X=None, y=None, **kw):
  return lambda tmp: _mlp(**kw).fit(_x() if X is None else X(), _labels() if y is None else y())


def _mlp_batches(x_only=False):
  import tensorflow as tf
  return tf.data.Dataset.from_tensor_slices(_x() if x_only else (_x(), _labels())).batch(16)


def _one_device():
  import tensorflow as tf
  return tf.distribute.OneDeviceStrategy("/cpu:0")


def _summed_mlp(**kw):
  from tfp_em.bernoulli_mlp.summed import BernoulliMLPSummedEM
  return BernoulliMLPSummedEM(2, 2, **kw)


def _fit_me(X=None, y=None, clusters=None, fit_kw=None, **kw):
  return lambda tmp: _me(**kw).fit(_x() if X is None else X(), _y_reg() if y is None else y(),
                                   _clusters() if clusters is None else clusters(),
                                   **(fit_kw or {}))


def _finite_fit(est, w):
  values = [np.asarray(getattr(est, a)) for a in ("weights_", "means_", "covariances_",
                                                  "params_", "sigma2_", "coef_")
            if hasattr(est, a) and not isinstance(getattr(est, a), tuple)]
  if hasattr(est, "params_") and isinstance(est.params_, tuple):
    values += [np.asarray(p) for p in est.params_]
  if not all(np.all(np.isfinite(v)) for v in values):
    return "non-finite fitted parameters"
  return None


def _finite_and_warned(text):
  def check(est, caught):
    if not any(text in str(w.message) for w in caught):
      return f"finished without a warning mentioning {text!r}"
    return _finite_fit(est, caught)
  return check


def _estimator_cases():
  cases = []
  for label, bad, rx in BAD_X:
    cases.append(Case(f"GaussianMixture.fit: {label}", "GaussianMixture", _fit_gmm(bad), rx))
    cases.append(Case(f"BernoulliMLPClassifier.fit: {label}", "BernoulliMLPClassifier",
                      _fit_mlp(bad), rx))
    cases.append(Case(f"MixedEffectsRegressor.fit: {label}", "MixedEffectsRegressor",
                      _fit_me(bad), rx))
    cases.append(Case(f"CrossedEffectsRegressor.fit: {label}", "CrossedEffectsRegressor",
                      _fit_ce(bad), rx))
    for kind, target in (("gmm", "GaussianMixture"), ("mlp", "BernoulliMLPClassifier"),
                         ("me", "MixedEffectsRegressor"), ("ce", "CrossedEffectsRegressor")):
      if label in ("X is empty (0 rows)",):
        rx_pred = "at least"
      else:
        rx_pred = rx
      cases.append(Case(f"{target}.predict: {label}", target,
                        lambda tmp, kind=kind, bad=bad: _fitted(kind).predict(bad()), rx_pred))

  g = "GaussianMixture"
  cases += [
      Case(f"{g}: more components than points", g, _fit_gmm(lambda: _x(3), n_components=5),
           "at least as many points"),
      Case(f"{g}: n_components=0", g, _fit_gmm(n_components=0), "n_components"),
      Case(f"{g}: n_components='2'", g, _fit_gmm(n_components="2"), "n_components"),
      Case(f"{g}: n_components=2.5", g, _fit_gmm(n_components=2.5), "n_components"),
      Case(f"{g}: covariance_type unknown", g, _fit_gmm(covariance_type="banana"),
           "covariance_type"),
      Case(f"{g}: tol negative", g, _fit_gmm(tol=-1.0), "tol"),
      Case(f"{g}: tol NaN", g, _fit_gmm(tol=float("nan")), "tol"),
      Case(f"{g}: reg_covar negative", g, _fit_gmm(reg_covar=-1e-3), "reg_covar"),
      Case(f"{g}: reg_covar inf", g, _fit_gmm(reg_covar=float("inf")), "reg_covar"),
      Case(f"{g}: max_iter negative", g, _fit_gmm(max_iter=-1), "max_iter"),
      Case(f"{g}: n_init=0", g, _fit_gmm(n_init=0), "n_init"),
      Case(f"{g}: init_params unknown", g, _fit_gmm(init_params="magic"), "init_params"),
      Case(f"{g}: seed negative", g, _fit_gmm(seed=-3), "seed"),
      Case(f"{g}: seed a string", g, _fit_gmm(seed="0"), "seed"),
      Case(f"{g}: dtype float16", g, _fit_gmm(dtype="float16"), "dtype"),
      Case(f"{g}: on_decrease unknown", g, _fit_gmm(on_decrease="ignore"), "on_decrease"),
      Case(f"{g}: compile unknown", g, _fit_gmm(compile="jit"), "compile"),
      Case(f"{g}: accelerate unknown", g, _fit_gmm(accelerate="anderson"), "accelerate"),
      Case(f"{g}: means_init wrong shape", g, _fit_gmm(means_init=np.zeros((3, 2))),
           "means_init"),
      Case(f"{g}: means_init NaN", g, _fit_gmm(means_init=np.full((2, 2), np.nan)),
           "means_init"),
      Case(f"{g}: weights_init not summing to 1", g, _fit_gmm(weights_init=[0.2, 0.2]),
           "weights_init"),
      Case(f"{g}: precisions_init not PD", g,
           _fit_gmm(precisions_init=-np.stack([np.eye(2)] * 2)), "precisions_init"),
      Case(f"{g}: sample_weight wrong length", g,
           lambda tmp: _gmm().fit(_x(), sample_weight=np.ones(5)), "length"),
      Case(f"{g}: sample_weight negative", g,
           lambda tmp: _gmm().fit(_x(), sample_weight=-np.ones(40)), "negative"),
      Case(f"{g}: sample_weight NaN", g,
           lambda tmp: _gmm().fit(_x(), sample_weight=_with(np.ones(40), 2, np.nan)), "NaN"),
      Case(f"{g}: sample_weight all zero", g,
           lambda tmp: _gmm().fit(_x(), sample_weight=np.zeros(40)), "sample_weight"),
      Case(f"{g}: batch_size=0", g, lambda tmp: _gmm().fit(_x(), batch_size=0), "batch_size"),
      Case(f"{g}: online on an array", g, lambda tmp: _gmm().fit(_x(), online=True), "online"),
      Case(f"{g}: resume without checkpoint_dir", g, lambda tmp: _gmm().fit(_x(), resume=True),
           "checkpoint_dir"),
      Case(f"{g}: checkpoint_every=0", g,
           lambda tmp: _gmm().fit(_x(), checkpoint_dir=tmp / "ck", checkpoint_every=0),
           "checkpoint_every"),
      Case(f"{g}: checkpoint_dir under a regular file", g,
           lambda tmp: _gmm().fit(_x(), checkpoint_dir=_plain_file(tmp) / "ck"),
           "cannot be created|not a directory"),
      Case(f"{g}: resume from a checkpoint of another fit", g,
           lambda tmp: _resume_other_fit(tmp), "another fit"),
      Case(f"{g}: resume from a corrupt checkpoint", g,
           lambda tmp: _resume_corrupt(tmp), "checkpoint"),
      Case(f"{g}: fit from a missing file", g, lambda tmp: _gmm().fit(str(tmp / "none.csv")),
           "does not exist"),
      Case(f"{g}: fit from a file of unknown format", g,
           lambda tmp: _gmm().fit(_write(tmp, "d.txt", "a,b\n1,2\n")), "format"),
      Case(f"{g}: fit from a CSV with a non-numeric cell", g,
           lambda tmp: _gmm().fit(_write(tmp, "d.csv", _csv_rows(30) + "3,x\n")),
           "not a valid"),
      Case(f"{g}: streamed fit, a bad cell in a later batch", g,
           lambda tmp: _gmm().fit(_write(tmp, "d.csv", _csv_rows(30) + "3,x\n"), batch_size=8),
           "not a valid"),
      Case(f"{g}: online fit, a bad cell in a later batch", g,
           lambda tmp: _gmm().fit(_write(tmp, "d.csv", _csv_rows(30) + "3,x\n"), batch_size=8,
                                  online=True), "not a valid"),
      Case(f"{g}: online fit, NaN in a later batch", g,
           lambda tmp: _gmm().fit(_write(tmp, "d.csv", _csv_rows(30) + "nan,1\n"), batch_size=8,
                                  online=True), "NaN"),
      Case(f"{g}: fit from a CSV with a ragged row", g,
           lambda tmp: _gmm().fit(_write(tmp, "d.csv", _csv_rows(30) + "3\n")), "field|line"),
      Case(f"{g}: fit from an empty CSV", g, lambda tmp: _gmm().fit(_write(tmp, "d.csv", "")),
           "empty"),
      Case(f"{g}: fit from a header-only CSV", g,
           lambda tmp: _gmm().fit(_write(tmp, "d.csv", "a,b\n")), "rows|empty"),
      Case(f"{g}: fit from a CSV with a NaN cell", g,
           lambda tmp: _gmm().fit(_write(tmp, "d.csv", _csv_rows(30) + "3,nan\n")),
           "NaN|finite"),
      Case(f"{g}: fit from a CSV missing a column", g,
           lambda tmp: _gmm().fit(_write(tmp, "d.csv", _csv_rows(30)), columns=["a", "z"]),
           "not found"),
      Case(f"{g}: predict before fit", g, lambda tmp: _gmm().predict(_x()), "not fitted"),
      Case(f"{g}: predict with 3 features", g, lambda tmp: _fitted("gmm").predict(_x(d=3)),
           "features"),
      Case(f"{g}: sample(n_samples=0)", g, lambda tmp: _fitted("gmm").sample(0), "n_samples"),
      Case(f"{g}: collapse onto one point with reg_covar=0", g,
           _fit_gmm(lambda: np.array([[1.0, 2.0]] * 20 + [[5, 5], [6, 5.5], [5.5, 7], [7, 6]]),
                    reg_covar=0.0, init_params="kmeans"), "reg_covar"),
      Case(f"{g}: collapse onto one point with reg_covar>0", g,
           _fit_gmm(lambda: np.array([[1.0, 2.0]] * 20 + [[5, 5], [6, 5.5], [5.5, 7], [7, 6]]),
                    reg_covar=1e-3, init_params="kmeans"), expect="handled", check=_finite_fit),
      Case(f"{g}: all points identical", g, _fit_gmm(lambda: np.ones((30, 2)), n_components=1),
           expect="handled", check=_finite_fit),
      Case(f"{g}: integer X", g, _fit_gmm(lambda: np.arange(80).reshape(40, 2) % 7),
           expect="handled", check=_finite_fit),
      Case(f"{g}: boolean X", g, _fit_gmm(lambda: _x() > 0, n_components=1),
           expect="handled", check=_finite_fit),
      Case(f"{g}: fewer distinct points than components", g,
           _fit_gmm(lambda: np.repeat([[0.0, 0.0], [3.0, 1.0]], 10, axis=0), n_components=3),
           expect="handled", check=_finite_fit),
      Case(f"{g}: fewer distinct points than components, reg_covar=0", g,
           _fit_gmm(lambda: np.repeat([[0.0, 0.0], [3.0, 1.0]], 10, axis=0), n_components=3,
                    reg_covar=0.0), "reg_covar"),
      Case(f"{g}: a component loses all its points", g,
           _fit_gmm(means_init=[[0.0, 0.0], [1e3, 1e3]]), expect="handled",
           check=_finite_and_warned("lost all their points")),
      Case(f"{g}: float32 data offset by 1e6", g, _fit_gmm(lambda: _x() + 1e6, dtype="float32"),
           expect="handled", check=_finite_and_warned("float64")),
      Case(f"{g}: data scaled by 1e-6", g, _fit_gmm(lambda: _x() * 1e-6, reg_covar=1e-18),
           expect="handled", check=_finite_fit),
      Case(f"{g}: data scaled by 1e6", g, _fit_gmm(lambda: _x() * 1e6), expect="handled",
           check=_finite_fit),
      # Issue 17: inputs that passed unnoticed, resumes of another fit, spurious fits.
      Case(f"{g}: float32 with 1e40 (no cast-overflow warning first)", g,
           _no_runtime_warning(_fit_gmm(lambda: _x() * 1e40, dtype="float32")),
           "too large for float32 .*use dtype='float64'"),
      Case(f"{g}: resume with another n_components", g,
           lambda tmp: _resume_changed(tmp, n_components=3), "n_components 2 -> 3"),
      Case(f"{g}: resume with another covariance_type", g,
           lambda tmp: _resume_changed(tmp, covariance_type="diag"),
           "covariance_type 'full' -> 'diag'"),
      Case(f"{g}: resume with another column set", g,
           lambda tmp: _resume_changed(tmp, X=np.c_[_x(), _x(seed=1)[:, 0]]),
           r"data x shape \(40, 2\) -> \(40, 3\)"),
      Case(f"{g}: resume with shifted data", g, lambda tmp: _resume_changed(tmp, X=_x() + 3.0),
           r"data x values changed \(column sums differ"),
      Case(f"{g}: resume a finished fit", g, _resume_finished, expect="handled",
           check=_same_fit_again),
      Case(f"{g}: as many components as points", g,
           _fit_gmm(lambda: _x(6), n_components=6), expect="handled",
           check=_finite_and_warned("each component can hold a single point")),
      Case(f"{g}: more features than points (D=50, N=10)", g,
           _fit_gmm(lambda: _x(10, 50)), expect="handled",
           check=_finite_and_warned("50 features but only 10 points")),
      Case(f"{g}: X scaled by 1e-300", g, _fit_gmm(lambda: _x() * 1e-300), expect="handled",
           check=_finite_and_warned("below reg_covar")),
      Case(f"{g}: a component collapsed onto repeated points (positive loglik)", g,
           _fit_gmm(lambda: np.array([[1.0, 2.0]] * 20 + [[5, 5], [6, 5.5], [5.5, 7], [7, 6]]),
                    init_params="kmeans"), expect="handled",
           check=_finite_and_warned("spurious solution")),
  ]

  m = "BernoulliMLPClassifier"
  cases += [
      Case(f"{m}: y length mismatch", m, _fit_mlp(y=lambda: _labels()[:-1]), "labels but X has"),
      Case(f"{m}: y is 2-D", m, _fit_mlp(y=lambda: _labels()[:, None].repeat(2, 1)), "1-D"),
      Case(f"{m}: y has NaN", m, _fit_mlp(y=lambda: _with(_labels(), 2, np.nan)), "NaN"),
      Case(f"{m}: y has None", m, _fit_mlp(y=lambda: [None] + list(_labels()[1:])), "missing"),
      Case(f"{m}: y is a single class", m, _fit_mlp(y=lambda: np.zeros(40, int)), "single class"),
      Case(f"{m}: y is None", m, _fit_mlp(y=lambda: None), "y"),
      Case(f"{m}: one row", m, _fit_mlp(X=lambda: _x(1), y=lambda: [0]), "at least"),
      Case(f"{m}: n_hidden=0", m, _fit_mlp(n_hidden=0), "n_hidden"),
      Case(f"{m}: n_hidden=17", m, _fit_mlp(n_hidden=17), "supported limit"),
      Case(f"{m}: n_hidden=2.0", m, _fit_mlp(n_hidden=2.0), "n_hidden"),
      Case(f"{m}: l2 negative", m, _fit_mlp(l2=-1.0), "l2"),
      Case(f"{m}: l2 NaN", m, _fit_mlp(l2=float("nan")), "l2"),
      Case(f"{m}: l2 an unknown string", m, _fit_mlp(l2="max"), "l2 must be 'auto' or a number"),
      Case(f"{m}: tol negative", m, _fit_mlp(tol=-1.0), "tol"),
      Case(f"{m}: max_iter negative", m, _fit_mlp(max_iter=-2), "max_iter"),
      Case(f"{m}: n_init=0", m, _fit_mlp(n_init=0), "n_init"),
      Case(f"{m}: seed negative", m, _fit_mlp(seed=-1), "seed"),
      Case(f"{m}: method unknown", m, _fit_mlp(method="sgd"), "method"),
      Case(f"{m}: accelerate unknown", m, _fit_mlp(accelerate="anderson"), "accelerate"),
      Case(f"{m}: m_step unknown", m, _fit_mlp(m_step="newton"), "m_step must be one of"),
      Case(f"{m}: dtype int32", m, _fit_mlp(dtype="int32"), "dtype"),
      Case(f"{m}: memory_budget_mb=0", m, _fit_mlp(memory_budget_mb=0), "memory_budget_mb"),
      Case(f"{m}: predict before fit", m, lambda tmp: _mlp().predict(_x()), "not fitted"),
      Case(f"{m}: predict with 3 features", m, lambda tmp: _fitted("mlp").predict(_x(d=3)),
           "features"),
      Case(f"{m}: score with y of wrong length", m,
           lambda tmp: _fitted("mlp").score(_x(), _labels()[:-3]), "shape|length"),
      Case(f"{m}: log_likelihood with unseen labels", m,
           lambda tmp: _fitted("mlp").log_likelihood(_x(), _labels() + 7), "not seen"),
      Case(f"{m}: constant feature", m,
           _fit_mlp(X=lambda: np.c_[_x(), np.ones(40)]), expect="handled", check=_finite_fit),
      Case(f"{m}: X scaled by 1e6 and offset", m, _fit_mlp(X=lambda: _x() * 1e6 + 1e9),
           expect="handled", check=_finite_fit),
      Case(f"{m}: string labels", m, _fit_mlp(y=lambda: np.where(_labels() > 0, "yes", "no")),
           expect="handled", check=_finite_fit),
      Case(f"{m}: continuous y", m, _fit_mlp(y=lambda: _x()[:, 0]),
           "Unknown label type: continuous"),
      Case(f"{m}: labels mixing 0 and '0'", m, _fit_mlp(y=lambda: [0, "0"] * 20),
           r"Mix of label input types \(string and number\)"),
      Case("fit_em: BernoulliMLP over a tf.data.Dataset", "fit_em",
           lambda tmp: _mlp_em_fit(stream=True), "per data point, not sums"),
      Case("fit_em: BernoulliMLP under a tf.distribute strategy", "fit_em",
           lambda tmp: _mlp_em_fit(strategy=True), "per data point, not sums"),
      Case("fit_online_em: BernoulliMLP", "fit_em", lambda tmp: _mlp_em_fit(online=True),
           "per data point, not sums"),
      Case(f"{m}: m_step='exact' with a tf.data.Dataset", m,
           lambda tmp: _mlp(m_step="exact", l2=0.1).fit(_mlp_batches()), "m_step='summed'"),
      Case(f"{m}: m_step='exact' with a strategy", m,
           lambda tmp: _mlp(m_step="exact", l2=0.1).fit(
               _x(), _labels(), strategy=_one_device()),
           "m_step='summed'"),
      Case(f"{m}: l2='auto' with a tf.data.Dataset", m,
           lambda tmp: _mlp().fit(_mlp_batches()), "l2='auto'.*give a number"),
      Case(f"{m}: a tf.data.Dataset and y", m,
           lambda tmp: _mlp(l2=0.1).fit(_mlp_batches(), _labels()), "y must be None"),
      Case(f"{m}: a tf.data.Dataset of x only", m,
           lambda tmp: _mlp(l2=0.1).fit(_mlp_batches(x_only=True)),
           r"\(x, y\) batches"),
      Case(f"{m}: online=True with arrays", m,
           lambda tmp: _mlp(l2=0.1).fit(_x(), _labels(), online=True), "needs a tf.data.Dataset"),
      Case("BernoulliMLPSummedEM: l2 > 0 without total_rows", "fit_em",
           lambda tmp: _summed_mlp(l2=0.1), "total_rows is required"),
  ]

  r = "MixedEffectsRegressor"
  cases += [
      Case(f"{r}: y length mismatch", r, _fit_me(y=lambda: _y_reg()[:-1]), "y has length"),
      Case(f"{r}: clusters length mismatch", r, _fit_me(clusters=lambda: _clusters()[:-1]),
           "clusters has length"),
      Case(f"{r}: y has NaN", r, _fit_me(y=lambda: _with(_y_reg(), 4, np.nan)), "NaN"),
      Case(f"{r}: y has inf", r, _fit_me(y=lambda: _with(_y_reg(), 4, np.inf)), "inf"),
      Case(f"{r}: y is 2-D", r, _fit_me(y=lambda: _y_reg()[:, None]), "1-D"),
      Case(f"{r}: y is strings", r, _fit_me(y=lambda: _y_reg().astype(str)), "numeric"),
      Case(f"{r}: clusters has None", r, _fit_me(clusters=lambda: [None] + list(_clusters()[1:])),
           "missing"),
      Case(f"{r}: clusters has NaN", r, _fit_me(clusters=lambda: _with(_clusters(), 0, np.nan)),
           "missing"),
      Case(f"{r}: clusters is None", r, _fit_me(clusters=lambda: None), "clusters"),
      Case(f"{r}: clusters mixes 0 and '0'", r,
           _fit_me(clusters=lambda: [0, "0"] * 20), "mixes string and number labels"),
      Case(f"{r}: clusters is 2-D", r,
           _fit_me(clusters=lambda: _clusters()[:, None].repeat(2, 1)), "clusters"),
      Case(f"{r}: a single cluster", r, _fit_me(clusters=lambda: np.zeros(40)), "single level"),
      Case(f"{r}: random_effects unknown", r, _fit_me(random_effects="quadratic"),
           "random_effects"),
      Case(f"{r}: covariance unknown", r, _fit_me(covariance="spherical"), "covariance"),
      Case(f"{r}: method unknown", r, _fit_me(method="reml"), "method"),
      Case(f"{r}: degree negative", r, _fit_me(degree=-1), "degree"),
      Case(f"{r}: max_iter negative", r, _fit_me(max_iter=-1), "max_iter"),
      Case(f"{r}: tol NaN", r, _fit_me(tol=float("nan")), "tol"),
      Case(f"{r}: seed negative", r, _fit_me(seed=-1), "seed"),
      Case(f"{r}: dtype float16", r, _fit_me(dtype="float16"), "dtype"),
      Case(f"{r}: learning_rate 0", r, _fit_me(learning_rate=0.0), "learning_rate"),
      Case(f"{r}: batch_size 0", r, _fit_me(batch_size=0), "batch_size"),
      Case(f"{r}: f unknown string", r, _fit_me(f="resnet"), "f must be"),
      Case(f"{r}: features without a network", r, _fit_me(random_effects="features"),
           "network"),
      Case(f"{r}: slopes without time", r, _fit_me(random_effects="slopes"), "needs time"),
      Case(f"{r}: time of wrong length", r,
           _fit_me(random_effects="slopes", fit_kw=dict(time=np.arange(39.0))), "time has length"),
      Case(f"{r}: time has NaN", r,
           _fit_me(random_effects="slopes", fit_kw=dict(time=_with(np.arange(40.0), 1, np.nan))),
           "NaN"),
      Case(f"{r}: time given for intercept", r, _fit_me(fit_kw=dict(time=np.arange(40.0))),
           "only used"),
      Case(f"{r}: custom without Z", r, _fit_me(random_effects="custom"), "needs Z"),
      Case(f"{r}: Z of wrong length", r,
           _fit_me(random_effects="custom", fit_kw=dict(Z=np.ones((39, 1)))), "Z has 39 rows"),
      Case(f"{r}: Z is 1-D", r, _fit_me(random_effects="custom", fit_kw=dict(Z=np.ones(40))),
           "2-D"),
      Case(f"{r}: validation_data malformed", r,
           _fit_me(f="mlp", fit_kw=dict(validation_data=(1, 2))), "validation_data"),
      Case(f"{r}: predict before fit", r, lambda tmp: _me().predict(_x()), "not fitted"),
      Case(f"{r}: predict with 3 features", r, lambda tmp: _fitted("me").predict(_x(d=3)),
           "features"),
      Case(f"{r}: predict with clusters of wrong length", r,
           lambda tmp: _fitted("me").predict(_x(), _clusters()[:-2]), "clusters has length"),
      Case(f"{r}: predict_interval level 1.5", r,
           lambda tmp: _fitted("me").predict_interval(_x(), level=1.5), "level"),
      Case(f"{r}: collinear X columns", r, _fit_me(X=lambda: np.c_[_x(), _x()[:, 0]]),
           "rank 3 < 4 columns: drop collinear"),
      Case(f"{r}: constant X column with an intercept", r,
           _fit_me(X=lambda: np.c_[_x(), np.ones(40)]), "rank 3 < 4"),
      Case(f"{r}: more coefficients than rows", r,
           _fit_me(X=lambda: _x(40, 45), y=lambda: _y_reg()), "rank 40 < 46"),
      Case(f"{r}: random slopes on a time-scaled response", r,
           _fit_me(y=lambda: _y_reg() * (1 + 0.5 * np.tile(np.arange(5.0), 8)),
                   random_effects="slopes", max_iter=100,
                   fit_kw=dict(time=np.tile(np.arange(5.0), 8))),
           expect="handled", check=_finite_fit),
      Case(f"{r}: one point per cluster", r, _fit_me(clusters=lambda: np.arange(40)),
           expect="handled", check=_finite_fit),
      Case(f"{r}: no cluster effect (Sigma_u -> 0)", r,
           _fit_me(y=lambda: _x() @ np.array([1.0, -0.5])
                   + 0.1 * np.random.default_rng(2).normal(size=40), max_iter=200),
           expect="handled", check=_finite_fit),
      # degenerate data and REML (#16)
      Case(f"{r}: y constant within every cluster", r,
           _fit_me(y=lambda: np.repeat(np.arange(8.0), 5)), "residual variance is 0"),
      Case(f"{r}: y constant", r, _fit_me(y=lambda: np.full(40, 3.0)), "y is constant"),
      Case(f"{r}: X scaled by 1e140 (a scale problem, not collinearity)", r,
           _fit_me(X=lambda: _x() * 1e140), expect="handled", check=_finite_fit),
      Case(f"{r}: X scaled by 1e-140, REML", r, _fit_me(X=lambda: _x() * 1e-140, reml=True),
           expect="handled", check=_finite_fit),
      Case(f"{r}: reml with crossed factors", r,
           _fit_me(clusters=lambda: list(_factors()), reml=True), expect="handled",
           check=_finite_fit),
      Case(f"{r}: reml not a bool", r, _fit_me(reml="yes"), "reml must be True or False"),
  ]
  return cases


# ---- The CSV loader. ---------------------------------------------------------

def _write(tmp, name, text, mode="w"):
  path = pathlib.Path(tmp) / name
  if mode == "wb":
    path.write_bytes(text)
  else:
    path.write_text(text)
  return str(path)


def _csv_rows(n=30):
  x = _x(n)
  return "a,b\n" + "".join(f"{p:.6f},{q:.6f}\n" for p, q in x)


def _csv_abc(n=30, shift=0.0):
  """CSV text: columns a, b of `_x(n)` and c, all plus `shift`."""
  x = np.c_[_x(n), _x(n, 1, seed=1)] + shift
  return "a,b,c\n" + "".join(f"{p:.6f},{q:.6f},{r:.6f}\n" for p, q, r in x)


def _plain_file(tmp):
  path = pathlib.Path(tmp) / "plain.txt"
  path.write_text("not a folder")
  return path


def _resume_other_fit(tmp):
  ck = pathlib.Path(tmp) / "ck"
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    _gmm(max_iter=3).fit(_x(), checkpoint_dir=ck, checkpoint_every=1)
  return _gmm(max_iter=3, seed=7).fit(_x(), checkpoint_dir=ck, resume=True)


def _resume_changed(tmp, X=None, **kw):
  """A checkpointed fit of `_x()`, then a resume of it with `X` or estimator options changed."""
  ck = pathlib.Path(tmp) / "ck"
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    _gmm(max_iter=3).fit(_x(), checkpoint_dir=ck, checkpoint_every=1)
  return _gmm(max_iter=3, **kw).fit(_x() if X is None else X, checkpoint_dir=ck, resume=True)


def _resume_finished(tmp):
  ck = pathlib.Path(tmp) / "ck"
  first = _gmm().fit(_x(), checkpoint_dir=ck)
  return first, _gmm().fit(_x(), checkpoint_dir=ck, resume=True)


def _same_fit_again(result, caught):
  first, again = result
  if not (again.log_likelihood_ == first.log_likelihood_ and again.n_iter_ == first.n_iter_
          and np.array_equal(again.means_, first.means_)):
    return "resuming a finished fit did not return that fit"
  return _finite_fit(again, caught)


def _mlp_em_fit(stream=False, strategy=False, online=False):
  import tensorflow as tf
  from tfp_em.bernoulli_mlp.em import BernoulliMLPEM
  from tfp_em.engine import fit_em, fit_online_em
  data = (tf.constant(_x()), tf.constant(_labels().astype(np.int32)))
  batches = tf.data.Dataset.from_tensor_slices(data).batch(10)
  if online:
    return fit_online_em(BernoulliMLPEM(2, 2), batches)
  return fit_em(BernoulliMLPEM(2, 2), batches if stream else data, max_iter=2,
                strategy=tf.distribute.get_strategy() if strategy else None)


def _resume_corrupt(tmp):
  ck = pathlib.Path(tmp) / "ck"
  ck.mkdir()
  (ck / "latest.json").write_text("{not json")
  return _gmm(max_iter=3).fit(_x(), checkpoint_dir=ck, resume=True)


MALFORMED_CSV = [
    # (label, file content (str or bytes), regex)
    ("empty file", "", "empty"),
    ("blank lines only", "\n\n  \n", "empty"),
    ("header only", "a,b\n", "no data rows"),
    ("ragged row (short)", "a,b\n1,2\n3\n", "line 3 has 1 fields"),
    ("ragged row (long)", "a,b\n1,2\n3,4,5\n", "line 3 has 3 fields"),
    ("non-numeric cell", "a,b\n1,2\n3,x\n", "'x' is not a number"),
    ("empty cell", "a,b\n1,2\n3,\n", "'' is not a number"),
    ("row of empty cells", "a,b\n1,2\n,\n3,4\n", "line 3, column 'a': '' is not a number"),
    ("NaN cell", "a,b\n1,2\n3,nan\n", "not finite"),
    ("inf cell", "a,b\n1,2\ninf,3\n", "not finite"),
    ("missing column", "a,c\n1,2\n3,4\n", r"column\(s\) \['b'\] not found"),
    ("duplicate header", "a,a,b\n1,2,3\n", "duplicate"),
    ("binary (not UTF-8)", b"\xff\xfe\x00a,b\n\x81\x82", "UTF-8"),
    ("NUL byte", "a,b\n1,\x002\n", "malformed|not a number"),
]


def _loader_cases():
  from tfp_em.engine import outputs
  from tfp_em.cli import readers
  cases = []
  for label, content, rx in MALFORMED_CSV:
    mode = "wb" if isinstance(content, bytes) else "w"
    cases.append(Case(f"load_csv: {label}", "load_csv",
                      lambda tmp, c=content, m=mode: readers.load_csv(_write(tmp, "bad.csv", c, m),
                                                                 ["a", "b"]), rx))
  cases += [
      Case("load_csv: non-existent path", "load_csv", lambda tmp: readers.load_csv(tmp / "no.csv"),
           "does not exist"),
      Case("load_csv: a directory", "load_csv", lambda tmp: readers.load_csv(tmp), "directory"),
      Case("check_output_dir: under a regular file", "io",
           lambda tmp: outputs.check_output_dir(_plain_file(tmp) / "out"), "cannot be created"),
      Case("check_output_dir: an existing file", "io",
           lambda tmp: outputs.check_output_dir(_plain_file(tmp)), "not a directory"),
      Case("write_report: out_dir under a regular file", "report",
           lambda tmp: _report().write_report(_fitted("gmm"), _x(), _plain_file(tmp) / "r",
                                              hmc=False), "cannot be created"),
      Case("write_report: non-existent netCDF", "report",
           lambda tmp: _report().write_report(tmp / "none.nc", out_dir=tmp / "r", hmc=False),
           "does not exist"),
      Case("write_report: a CSV instead of netCDF", "report",
           lambda tmp: _report().write_report(_write(tmp, "d.nc", _csv_rows(5)),
                                              out_dir=tmp / "r", hmc=False), "netCDF"),
      Case("load_fitted: non-existent file", "diagnostics",
           lambda tmp: _diagnostics().load_fitted(tmp / "none.nc"), "does not exist"),
  ]
  c = "CrossedEffectsRegressor"
  cases += [
      Case(f"{c}: y length mismatch", c, _fit_ce(y=lambda: _y_reg()[:-1]), "y has length"),
      Case(f"{c}: y has NaN", c, _fit_ce(y=lambda: _with(_y_reg(), 3, np.nan)), "NaN"),
      Case(f"{c}: a factor of wrong length", c,
           _fit_ce(clusters=lambda: [_factors()[0], _factors()[1][:-1]]), "length"),
      Case(f"{c}: a factor with None", c,
           _fit_ce(clusters=lambda: [_factors()[0], [None] + list(_factors()[1][1:])]),
           "missing"),
      Case(f"{c}: clusters is None", c, _fit_ce(clusters=lambda: None), "clusters"),
      Case(f"{c}: clusters is one flat array", c, _fit_ce(clusters=lambda: _factors()[0]),
           "clusters|factor"),
      Case(f"{c}: method unknown", c, _fit_ce(method="reml"), "method"),
      Case(f"{c}: max_iter negative", c, _fit_ce(max_iter=-1), "max_iter"),
      Case(f"{c}: tol NaN", c, _fit_ce(tol=float("nan")), "tol"),
      Case(f"{c}: seed negative", c, _fit_ce(seed=-1), "seed"),
      Case(f"{c}: dtype float16", c, _fit_ce(dtype="float16"), "dtype"),
      Case(f"{c}: accelerate unknown", c, _fit_ce(accelerate="anderson"), "accelerate"),
      Case(f"{c}: on_decrease unknown", c, _fit_ce(on_decrease="ignore"), "on_decrease"),
      Case(f"{c}: collinear X columns", c, _fit_ce(X=lambda: np.c_[_x(), _x()[:, 0]]),
           "collinear|rank"),
      Case(f"{c}: predict before fit", c, lambda tmp: _ce().predict(_x()), "not fitted"),
      Case(f"{c}: predict with 3 features", c, lambda tmp: _fitted("ce").predict(_x(d=3)),
           "features"),
      Case(f"{c}: predict with one factor of two", c,
           lambda tmp: _fitted("ce").predict(_x(), [_factors()[0]]), "grouping factors"),
      # random slopes on several factors (#16)
      Case(f"{c}: Z a list of the wrong length", c,
           lambda tmp: _ce().fit(_x(), _y_reg(), _factors(), Z=[np.ones((40, 2))]),
           "Z must be None or a list of 2"),
      Case(f"{c}: Z[k] with the wrong number of rows", c,
           lambda tmp: _ce().fit(_x(), _y_reg(), _factors(), Z=[np.ones((39, 2)), None]),
           "Z\\[0\\] has 39 rows"),
      Case(f"{c}: Z[k] has NaN", c,
           lambda tmp: _ce().fit(_x(), _y_reg(), _factors(),
                                 Z=[_with(np.c_[np.ones(40), _x()[:, 0]], 3, np.nan), None]),
           "NaN"),
      Case(f"{c}: SQUAREM with random slopes", c,
           lambda tmp: _ce(accelerate="squarem").fit(_x(), _y_reg(), _factors(),
                                                     Z=[np.c_[np.ones(40), _x()[:, 0]], None]),
           "accelerate=None"),
      Case(f"{c}: covariance unknown", c, _fit_ce(covariance="block"), "covariance"),
  ]
  return cases


def _report():
  from tfp_em.diagnostics import report as report
  return report


def _diagnostics():
  from tfp_em.diagnostics import inference_data as diagnostics
  return diagnostics


# ---- The CLI. ----------------------------------------------------------------

def _cli_fit(*extra, data=None):
  def argv(tmp):
    path = data(tmp) if data else _write(tmp, "ok.csv", _csv_rows(30))
    return ["fit", "gmm", "--data", path, "--components", "2", *extra,
            *(() if "--out" in extra else ("--out", str(pathlib.Path(tmp) / "out")))]
  return argv


def _cli_cases():
  cases = []
  for label, content, rx in MALFORMED_CSV:
    mode = "wb" if isinstance(content, bytes) else "w"
    cases.append(Case(f"tfp-em fit gmm: {label}", "cli",
                      _cli_fit("--columns", "a", "b",
                               data=lambda tmp, c=content, m=mode: _write(tmp, "bad.csv", c, m)),
                      rx))
  cases += [
      Case("tfp-em fit gmm: non-existent --data", "cli",
           _cli_fit(data=lambda tmp: str(pathlib.Path(tmp) / "none.csv")), "does not exist"),
      Case("tfp-em fit gmm: --data is a directory", "cli",
           _cli_fit(data=lambda tmp: str(tmp)), "directory"),
      Case("tfp-em fit gmm: --out under a regular file", "cli",
           lambda tmp: _cli_fit("--out", str(_plain_file(tmp) / "sub"))(tmp),
           "cannot be created"),
      Case("tfp-em fit gmm: --out is a regular file", "cli",
           lambda tmp: _cli_fit("--out", str(_plain_file(tmp)))(tmp), "not a directory"),
      Case("tfp-em fit gmm: --components 0", "cli",
           lambda tmp: _replace(_cli_fit()(tmp), "--components", "0"), "n_components"),
      Case("tfp-em fit gmm: --components -3", "cli",
           lambda tmp: _replace(_cli_fit()(tmp), "--components", "-3"), "n_components"),
      Case("tfp-em fit gmm: --components two", "cli",
           lambda tmp: _replace(_cli_fit()(tmp), "--components", "two"), "invalid int"),
      Case("tfp-em fit gmm: more components than rows", "cli",
           lambda tmp: _replace(_cli_fit()(tmp), "--components", "99"), "at least as many"),
      Case("tfp-em fit gmm: --covariance unknown", "cli", _cli_fit("--covariance", "x"),
           "invalid choice"),
      Case("tfp-em fit gmm: --n-init 0", "cli", _cli_fit("--n-init", "0"), "n_init"),
      Case("tfp-em fit gmm: --max-iter -1", "cli", _cli_fit("--max-iter", "-1"), "max_iter"),
      Case("tfp-em fit gmm: --seed -1", "cli", _cli_fit("--seed", "-1"), "seed"),
      Case("tfp-em fit gmm: --seed 1.5", "cli", _cli_fit("--seed", "1.5"), "invalid int"),
      Case("tfp-em fit gmm: --checkpoint-every 0", "cli", _cli_fit("--checkpoint-every", "0"),
           "checkpoint"),
      Case("tfp-em fit gmm: --columns names a missing column", "cli",
           _cli_fit("--columns", "a", "zz"), "not found"),
      Case("tfp-em fit gmm: --columns with no names", "cli", _cli_fit("--columns"),
           "expected at least one"),
      Case("tfp-em fit gmm: unknown option", "cli", _cli_fit("--frobnicate"),
           "unrecognized"),
      Case("tfp-em fit gmm: missing --components", "cli",
           lambda tmp: ["fit", "gmm", "--data", _write(tmp, "ok.csv", _csv_rows(30)),
                        "--out", str(pathlib.Path(tmp) / "out")], "required"),
      Case("tfp-em fit gmm: missing --data", "cli",
           lambda tmp: ["fit", "gmm", "--components", "2"], "required"),
      Case("tfp-em fit gmm: --resume with a corrupt checkpoint", "cli",
           lambda tmp: _corrupt_checkpoint_argv(tmp), "checkpoint"),
      Case("tfp-em fit gmm: --resume with another --components", "cli",
           lambda tmp: _after_fit(tmp, "--components", "3"), "n_components 2 -> 3"),
      Case("tfp-em fit gmm: --resume with another --covariance", "cli",
           lambda tmp: _after_fit(tmp, "--covariance", "diag"),
           "covariance_type 'full' -> 'diag'"),
      Case("tfp-em fit gmm: --resume with another --columns", "cli",
           lambda tmp: _after_fit(tmp, "--columns", "a", "c"),
           r"data x values changed \(column sums differ in column\(s\) \[1\]"),
      Case("tfp-em fit gmm: --resume with shifted data", "cli",
           lambda tmp: _after_fit(tmp, "--data", _write(tmp, "shifted.csv", _csv_abc(30, 3.0))),
           r"data x values changed \(column sums differ in column\(s\) \[0, 1\]"),
      Case("tfp-em fit gmm: --resume a finished fit", "cli", lambda tmp: _after_fit(tmp),
           expect="handled", check=_reported_finished),
      Case("tfp-em fit: unknown model", "cli", lambda tmp: ["fit", "svm"], "invalid choice"),
      Case("tfp-em fit: no model", "cli", lambda tmp: ["fit"], "required"),
      Case("tfp-em: unknown command", "cli", lambda tmp: ["frobnicate"], "invalid choice"),
      Case("tfp-em: no command", "cli", lambda tmp: [], "required"),
      Case("tfp-em demo: --max-components 0", "cli",
           lambda tmp: ["demo", "--max-components", "0", "--out", str(pathlib.Path(tmp) / "o")],
           "max-components"),
      Case("tfp-em demo: --max-components x", "cli",
           lambda tmp: ["demo", "--max-components", "x", "--out", str(pathlib.Path(tmp) / "o")],
           "invalid int"),
      Case("tfp-em demo: --seed -1", "cli",
           lambda tmp: ["demo", "--seed", "-1", "--max-components", "1",
                        "--out", str(pathlib.Path(tmp) / "o")], "seed"),
      Case("tfp-em demo: --out under a regular file", "cli",
           lambda tmp: ["demo", "--out", str(_plain_file(tmp) / "o")], "cannot be created"),
      Case("tfp-em demo: unknown option", "cli", lambda tmp: ["demo", "--fast"], "unrecognized"),
      Case("tfp-em report: non-existent source", "cli",
           lambda tmp: ["report", str(pathlib.Path(tmp) / "none.nc"), "--out", _out(tmp)],
           "does not exist"),
      Case("tfp-em report: source is a directory", "cli",
           lambda tmp: ["report", str(tmp), "--out", _out(tmp)], "not a file"),
      Case("tfp-em report: source is a CSV, not netCDF", "cli",
           lambda tmp: ["report", _write(tmp, "d.nc", _csv_rows(5)), "--out", _out(tmp)],
           "netCDF"),
      Case("tfp-em report: --out under a regular file", "cli",
           lambda tmp: ["report", _write(tmp, "d.nc", "x"), "--out",
                        str(_plain_file(tmp) / "r")], "cannot be created"),
      Case("tfp-em report: --hmc-draws 5", "cli",
           lambda tmp: ["report", _write(tmp, "d.nc", "x"), "--hmc-draws", "5",
                        "--out", _out(tmp)], "hmc-draws"),
      Case("tfp-em report: --hmc-draws x", "cli",
           lambda tmp: ["report", _write(tmp, "d.nc", "x"), "--hmc-draws", "x"], "invalid int"),
      Case("tfp-em report: no source", "cli", lambda tmp: ["report"], "required"),
      Case("tfp-em verify: non-existent file", "cli",
           lambda tmp: ["verify", str(pathlib.Path(tmp) / "none.py")], "does not exist"),
      Case("tfp-em verify: a directory", "cli", lambda tmp: ["verify", str(tmp)], "not a file"),
      Case("tfp-em verify: empty file", "cli",
           lambda tmp: ["verify", _write(tmp, "em.py", "")], "em.py"),
      Case("tfp-em verify: syntax error", "cli",
           lambda tmp: ["verify", _write(tmp, "em.py", "def e_step(:\n")], "em.py"),
      Case("tfp-em verify: file raises on import", "cli",
           lambda tmp: ["verify", _write(tmp, "em.py", "raise RuntimeError('boom')\n")],
           "em.py"),
      Case("tfp-em verify: not Python (binary)", "cli",
           lambda tmp: ["verify", _write(tmp, "em.py", b"\xff\xfe\x00\x81", "wb")], "em.py"),
      Case("tfp-em verify: required names of the wrong kind", "cli",
           lambda tmp: ["verify", _write(tmp, "em.py", "".join(
               f"{n} = None\n" for n in ("joint_distribution", "data", "e_step", "m_step",
                                         "init_params", "param_specs")))],
           "EMModel or a function"),
      # Each check runs on its own (issue 19): the report names the user's line, exit 1.
      Case("tfp-em verify: the user's e_step raises", "cli",
           lambda tmp: ["verify", _write(tmp, "em.py", _BROKEN_E_STEP)],
           expect="handled", check=_verify_reports_the_broken_line),
      Case("tfp-em verify: no path", "cli", lambda tmp: ["verify"], "required"),
  ]
  return cases


_BROKEN_E_STEP = """import tensorflow_probability as tfp
tfd, tfb = tfp.distributions, tfp.bijectors
def joint_distribution(params):
  return tfd.JointDistributionNamed(dict(x=tfd.Sample(tfd.Normal(params["mu"], 1.), 5)))
data = {"x": [0., 1., 2., 3., 4.]}
def e_step(params, data):
  raise RuntimeError("my e-step is broken")
def m_step(params, stats):
  return params
def expected_log_joint(params, stats):
  return 0.
init_params = {"mu": 0.5}
param_specs = {"mu": tfb.Identity()}
"""


def _verify_reports_the_broken_line(result, _):
  rc, out, err = result
  if rc != 1 or "Traceback" in out + err:
    return f"exit code {rc} (expected 1, checks failed); stderr {err[:200]!r}"
  if not re.search(r"E-step: .*RuntimeError: my e-step is broken \(at .*em\.py:7 in e_step\)",
                   out):
    return f"the report does not name the user's line: {out[:300]!r}"
  return None


def _out(tmp):
  return str(pathlib.Path(tmp) / "out")


def _replace(argv, flag, value):
  argv = list(argv)
  argv[argv.index(flag) + 1] = value
  return argv


def _after_fit(tmp, *changed):
  """Fits abc.csv (columns a b, K=2) into tmp/out, then returns the argv that resumes it
  with `changed` (an option and its values) replacing the first fit's."""
  first = _cli_fit("--columns", "a", "b", "--n-init", "1", "--quiet",
                   data=lambda tmp: _write(tmp, "abc.csv", _csv_abc(30)))(tmp)
  from tfp_em.cli.main import main
  with contextlib.redirect_stdout(_io.StringIO()), contextlib.redirect_stderr(_io.StringIO()), \
      warnings.catch_warnings():
    warnings.simplefilter("ignore")
    if main(first) != 0:
      raise RuntimeError("the first fit failed")
  argv = first + ["--resume"]
  if changed and changed[0] not in argv:
    return argv + list(changed)
  if changed:
    at = argv.index(changed[0])
    end = next(i for i in range(at + 1, len(argv)) if argv[i].startswith("--"))
    argv[at:end] = list(changed)
  return argv


def _reported_finished(result, _):
  rc, out, err = result
  if rc != 0 or "holds this fit, finished earlier" not in out:
    return f"exit code {rc}, stdout {out[:200]!r}: the finished fit was not reported"
  return None


def _corrupt_checkpoint_argv(tmp):
  out = pathlib.Path(tmp) / "out"
  (out / "checkpoint").mkdir(parents=True)
  (out / "checkpoint" / "latest.json").write_text("{not json")
  return _cli_fit("--resume")(tmp)


# ---- Running and classifying. -------------------------------------------------

def _select(X=None, **kw):
  def run(tmp):
    from tfp_em import select_mixture
    return select_mixture(_x() if X is None else X, progress=False, **kw)
  return run


def _selection_cases():
  s = "select_mixture"
  return [
      Case(f"{s}: n_components empty", s, _select(n_components=[]), "n_components is empty"),
      Case(f"{s}: n_components an int", s, _select(n_components=3), "list or range of integers"),
      Case(f"{s}: n_components 0", s, _select(n_components=[0, 1]), "n_components must be >= 1"),
      Case(f"{s}: more components than rows", s, _select(n_components=[1, 50]),
           "goes up to 50 but X has 40 rows"),
      Case(f"{s}: models unknown word", s, _select(models="mclust"),
           "models must be 'all', 'sklearn' or a list"),
      Case(f"{s}: models with an unknown name", s, _select(models=["full", "banana"]),
           "covariance_type must be one of"),
      Case(f"{s}: models empty", s, _select(models=[]), "models is empty"),
      Case(f"{s}: criterion unknown", s, _select(criterion="bic2"), "criterion"),
      Case(f"{s}: covariance_type passed", s, _select(covariance_type="full"),
           "select_mixture sets"),
      Case(f"{s}: misspelt option", s, _select(max_iters=10), "unknown GaussianMixture option"),
      Case(f"{s}: X 1-D", s, _select(X=np.arange(10.0)), "2-D"),
  ]


def _gappy(n=40, d=2, fraction=0.2, seed=0):
  """_x with `fraction` of its entries NaN (no row all NaN)."""
  x = _x(n, d, seed)
  gaps = np.random.default_rng(seed + 1).random(x.shape) < fraction
  gaps[:, 0] &= ~gaps[:, 1:].all(axis=1)
  return np.where(gaps, np.nan, x)


def _missing_value_cases():
  """GaussianMixture(missing='em') (issue 20)."""
  g = "GaussianMixture"

  def fitted():
    return _gmm(missing="em").fit(_gappy())

  return [
      Case(f"{g}: missing unknown", g, _fit_gmm(missing="drop"), "missing"),
      Case(f"{g}: NaN without missing='em' names the option", g,
           _fit_gmm(lambda: _gappy()), "NaN .*missing='em'"),
      Case(f"{g}(missing='em'): a row with every entry NaN", g,
           lambda tmp: _gmm(missing="em").fit(_with(_gappy(), 5, np.nan)),
           r"every entry missing \(rows 5\)"),
      Case(f"{g}(missing='em'): a column with every entry NaN", g,
           lambda tmp: _gmm(missing="em").fit(_with(_gappy(d=3), (slice(None), 1), np.nan)),
           r"every entry missing \(columns 1\)"),
      Case(f"{g}(missing='em'): X has inf", g,
           lambda tmp: _gmm(missing="em").fit(_with(_gappy(), (2, 0), np.inf)), "inf"),
      Case(f"{g}(missing='em'): CSV with empty cells", g,
           lambda tmp: _gmm(missing="em").fit(_write(tmp, "d.csv", _csv_rows(30) + "3,\n,1\n")),
           expect="handled", check=_finite_fit),
      Case(f"{g}(missing='em'): streamed row with every entry missing", g,
           lambda tmp: _gmm(missing="em").fit(_write(tmp, "d.csv", _csv_rows(30) + ",\n"),
                                              batch_size=8), "every entry missing"),
      Case(f"{g}(missing='em'): streamed inf", g,
           lambda tmp: _gmm(missing="em").fit(_write(tmp, "d.csv", _csv_rows(30) + "inf,1\n"),
                                              batch_size=8), "inf"),
      Case(f"{g}(missing='em'): predict with an all-NaN row", g,
           lambda tmp: fitted().predict(_with(_gappy(), 0, np.nan)), r"rows 0\)"),
      Case(f"{g}: impute without missing='em'", g, lambda tmp: _fitted("gmm").impute(_x()),
           "missing='em'"),
      Case(f"{g}(missing='em'): 20% NaN entries", g, lambda tmp: fitted(), expect="handled",
           check=_finite_fit),
      Case(f"{g}(missing='em'): float32 with NaN entries", g,
           lambda tmp: _gmm(missing="em", dtype="float32").fit(_gappy()), expect="handled",
           check=_finite_fit),
  ]


def all_cases() -> list[Case]:
  return (_estimator_cases() + _loader_cases() + _cli_cases() + _selection_cases()
          + _missing_value_cases())


def _one_line(e) -> str:
  return " ".join(str(e).split())


def _snapshot(tmp) -> set:
  return {str(p.relative_to(tmp)) for p in pathlib.Path(tmp).rglob("*")}


def run_case(case: Case, tmp) -> Outcome:
  """Runs `case` in the scratch folder `tmp` and classifies the outcome."""
  tmp = pathlib.Path(tmp)
  if case.target == "cli":
    return _run_cli(case, tmp)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    try:
      result = case.run(tmp)
    except ValueError as e:
      msg = _one_line(e)
      if case.expect == "error" and re.search(case.match, msg):
        return Outcome("clear error", msg)
      return Outcome("crash", f"ValueError not naming the problem /{case.match}/: {msg}")
    except Exception as e:  # noqa: BLE001 - anything else is what we are looking for
      return Outcome("crash", f"{type(e).__name__}: {_one_line(e)[:300]}")
  if case.expect == "handled":
    problem = case.check(result, caught) if case.check else None
    if problem:
      return Outcome("crash", problem)
    notes = "; ".join(sorted({_one_line(w.message)[:80] for w in caught
                              if not issubclass(w.category, DeprecationWarning)}))
    return Outcome("handled", f"finished{' with warning: ' + notes if notes else ''}")
  return Outcome("crash", "no error raised")


def _run_cli(case: Case, tmp) -> Outcome:
  from tfp_em.cli.main import main
  try:
    argv = case.run(tmp)
  except Exception as e:  # noqa: BLE001 - a case that cannot even set up is a crash
    return Outcome("crash", f"setting up the case failed: {type(e).__name__}: {_one_line(e)}")
  before = _snapshot(tmp)
  out, err = _io.StringIO(), _io.StringIO()
  try:
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
        warnings.catch_warnings():
      warnings.simplefilter("ignore")
      rc = main(argv)
  except SystemExit as e:
    return Outcome("crash", f"SystemExit({e.code}) escaped main; stderr: {err.getvalue()[:200]}")
  except Exception as e:  # noqa: BLE001
    return Outcome("crash", f"{type(e).__name__} escaped main: {_one_line(e)[:300]}")
  lines = err.getvalue().strip().splitlines()
  written = sorted(_snapshot(tmp) - before)
  if case.expect == "handled":  # the command ran to its end: check(result) judges the output
    problem = case.check((rc, out.getvalue(), err.getvalue()), None)
    return Outcome("crash", problem) if problem else Outcome("handled", f"exit code {rc}")
  problems = []
  if rc != 2:
    problems.append(f"exit code {rc}")
  if len(lines) != 1 or not lines[0].startswith("tfp-em: error:"):
    problems.append(f"stderr is not one error line: {err.getvalue()[:200]!r}")
  elif not re.search(case.match, lines[0]):
    problems.append(f"message does not name the problem /{case.match}/: {lines[0]}")
  if "Traceback" in err.getvalue():
    problems.append("traceback printed")
  if out.getvalue().strip():
    problems.append(f"partial output on stdout: {out.getvalue()[:100]!r}")
  if written:
    problems.append(f"files written: {written[:5]}")
  if problems:
    return Outcome("crash", "; ".join(problems))
  return Outcome("clear error", lines[0].removeprefix("tfp-em: error: "))
