"""Validation of the Bernoulli hidden-unit MLP fitted by exact EM, with its defaults.

5-fold stratified CV (shuffle, random_state=0) on iris, wine, breast cancer
and digits (PCA to 30 components), every method in a scikit-learn Pipeline
that standardizes the features (and runs the PCA) on each training fold:

  em        `BernoulliMLPClassifier()`: the defaults (n_hidden=5, l2='auto':
            the penalty chosen by held-out log-likelihood, SQUAREM,
            max_iter=200).
  autodiff  `BernoulliMLPClassifier(method='autodiff', l2=<em's l2_ on the
            fold>)`: EM's penalized objective maximized by L-BFGS
            (max_iter=200), one fit (l2='auto' would repeat EM's choice at
            up to seven L-BFGS fits, each traced anew).
  sklearn   `sklearn.neural_network.MLPClassifier(random_state=fold)`: its
            defaults (100 ReLU units, Adam, alpha=1e-4, max_iter=200).
  keras     `KerasMLP`: a tf_keras network of EM's size (n_hidden sigmoid
            units, softmax output), cross-entropy, Adam(1e-2), batches of
            32, up to 1000 epochs with early stopping (patience 50, best
            weights restored) on a shuffled 10% validation split.

Per method and dataset: test accuracy and held-out log-likelihood per point
(-log_loss, mean +- sd over folds), seconds per fit (the whole Pipeline.fit
of a fresh clone; TensorFlow warmed up once per process, traces cached
across folds as in any CV loop), and EM's chosen l2_. Then the speed
benchmark: seconds per EM iteration at m = 7 on iris against a per-sample,
per-configuration Python loop E-step.

Usage:
  python validation/em_mlp.py            # full run (all 4 datasets, 5 folds)
  python validation/em_mlp.py --quick    # iris and wine, 2 folds, short loop

Writes validation/out/em_mlp[_quick].json and .md.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from sklearn import datasets  # noqa: E402
from sklearn.base import BaseEstimator, ClassifierMixin, clone  # noqa: E402
from sklearn.decomposition import PCA  # noqa: E402
from sklearn.metrics import log_loss  # noqa: E402
from sklearn.model_selection import StratifiedKFold  # noqa: E402
from sklearn.neural_network import MLPClassifier  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

from tfp_em.bernoulli_mlp import BernoulliMLPClassifier  # noqa: E402
from tfp_em.bernoulli_mlp import em as bm  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")

DATASETS = {"iris": (datasets.load_iris, None), "wine": (datasets.load_wine, None),
            "breast_cancer": (datasets.load_breast_cancer, None),
            "digits": (datasets.load_digits, 30)}   # (loader, PCA components)
QUICK_DATASETS, QUICK_FOLDS = ("iris", "wine"), 2
METHODS = ("em", "autodiff", "sklearn", "keras")
EM_DEFAULT_HIDDEN = BernoulliMLPClassifier().n_hidden


class KerasMLP(ClassifierMixin, BaseEstimator):
  """Backprop baseline of EM's size (tf_keras): Dense(n_hidden, sigmoid) ->
  Dense(C, softmax), cross-entropy, Adam(`learning_rate`), batches of 32, at
  most `max_epochs` epochs with early stopping on the validation loss of a
  shuffled 10% split (patience `patience`, best weights restored). Keras'
  default rate 1e-3 stops too early on iris (4 batches per epoch: the
  validation loss of 12 points can rise for 20 epochs before it falls)."""

  def __init__(self, n_hidden: int = EM_DEFAULT_HIDDEN, seed: int = 0, max_epochs: int = 1000,
               patience: int = 50, learning_rate: float = 1e-2):
    self.n_hidden = n_hidden
    self.seed = seed
    self.learning_rate = learning_rate
    self.max_epochs = max_epochs
    self.patience = patience

  def fit(self, X, y):
    import tf_keras as keras
    keras.utils.set_random_seed(self.seed)
    self.classes_, codes = np.unique(y, return_inverse=True)
    order = np.random.default_rng(self.seed).permutation(len(X))   # validation_split takes the tail
    model = keras.Sequential([
        keras.layers.Input((X.shape[1],)),
        keras.layers.Dense(self.n_hidden, activation="sigmoid"),
        keras.layers.Dense(len(self.classes_), activation="softmax")])
    model.compile(optimizer=keras.optimizers.Adam(self.learning_rate), loss="sparse_categorical_crossentropy")
    stop = keras.callbacks.EarlyStopping(patience=self.patience, restore_best_weights=True)
    history = model.fit(np.asarray(X, np.float32)[order], codes[order], epochs=self.max_epochs,
                        batch_size=32, validation_split=0.1, callbacks=[stop], verbose=0)
    self.model_, self.n_iter_ = model, len(history.epoch)
    return self

  def predict_proba(self, X):
    proba = self.model_(np.asarray(X, np.float32), training=False).numpy().astype(np.float64)
    return proba / proba.sum(axis=1, keepdims=True)   # float32 softmax sums to 1 +- 1e-7

  def predict(self, X):
    return self.classes_[np.argmax(self.predict_proba(X), axis=1)]


def make_method(method: str, seed: int, n_hidden: int = EM_DEFAULT_HIDDEN, l2="auto"):
  """The classifier of `method` (last step of the Pipeline); `n_hidden` sizes
  EM, autodiff and Keras (sklearn keeps its 100 units), `l2` is autodiff's."""
  if method == "em":
    return BernoulliMLPClassifier(n_hidden=n_hidden)
  if method == "autodiff":
    return BernoulliMLPClassifier(n_hidden=n_hidden, method="autodiff", l2=l2)
  if method == "sklearn":
    return MLPClassifier(random_state=seed)
  return KerasMLP(n_hidden=n_hidden, seed=seed)


def make_pipeline_for(dataset: str, method: str, seed: int, n_hidden: int = EM_DEFAULT_HIDDEN,
                      l2="auto"):
  components = DATASETS[dataset][1]
  steps = [StandardScaler()] + ([PCA(components, random_state=0)] if components else [])
  return make_pipeline(*steps, make_method(method, seed, n_hidden, l2))


def fit_and_score(pipe, x_train, y_train, x_test, y_test) -> dict:
  """Fits a fresh clone; accuracy, held-out log-likelihood per point, seconds."""
  pipe = clone(pipe)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    start = time.perf_counter()
    pipe.fit(x_train, y_train)
    seconds = time.perf_counter() - start
  proba = pipe.predict_proba(x_test)
  classes = pipe.classes_
  est = pipe[-1]
  return dict(accuracy=float(np.mean(classes[np.argmax(proba, 1)] == y_test)),
              heldout_loglik=-float(log_loss(y_test, proba, labels=classes)),
              seconds=seconds, iterations=int(np.max(est.n_iter_)),
              l2=float(est.l2_) if isinstance(est, BernoulliMLPClassifier) else None)


def warm_up():
  """One tiny fit per method: TensorFlow's and Keras' one-off start-up costs are not timed."""
  x, y = datasets.load_iris(return_X_y=True)
  for method in METHODS:
    fit_and_score(make_pipeline_for("iris", method, 0, l2=1.), x[::3], y[::3], x[1::3], y[1::3])


def run_cv(names, folds_used, methods=METHODS, n_hidden=EM_DEFAULT_HIDDEN):
  rows, per_fold = [], {}
  warm_up()
  for name in names:
    x, y = DATASETS[name][0](return_X_y=True)
    folds = list(StratifiedKFold(5, shuffle=True, random_state=0).split(x, y))[:folds_used]
    results = {m: [] for m in methods}
    for k, (train, test) in enumerate(folds):
      l2 = "auto"
      for method in methods:
        results[method].append(fit_and_score(make_pipeline_for(name, method, k, n_hidden, l2),
                                             x[train], y[train], x[test], y[test]))
        if method == "em":
          l2 = results[method][-1]["l2"]                       # autodiff fits EM's objective
      print(f"  {name} fold {k}: " + " | ".join(
          f"{m} {r[-1]['accuracy']:.3f} {r[-1]['heldout_loglik']:.3f} {r[-1]['seconds']:.1f}s"
          for m, r in results.items()), flush=True)
    per_fold[name] = results
    for method, r in results.items():
      acc = np.array([f["accuracy"] for f in r])
      ll = np.array([f["heldout_loglik"] for f in r])
      rows.append(dict(dataset=name, method=method, folds=len(r), n_hidden=n_hidden,
                       accuracy_mean=float(acc.mean()), accuracy_sd=float(acc.std(ddof=1)),
                       heldout_loglik_mean=float(ll.mean()), heldout_loglik_sd=float(ll.std(ddof=1)),
                       seconds_mean=float(np.mean([f["seconds"] for f in r])),
                       iterations_mean=float(np.mean([f["iterations"] for f in r])),
                       l2=[f["l2"] for f in r] if r[0]["l2"] is not None else None))
  return rows, per_fold


# ---- Speed benchmark ----------------------------------------------------------

def loop_e_step(hidden_weights, output_weights, x, y):
  """The straightforward E-step: Python loops over points and configurations.

  Returns tau [N, 2^m], the hidden targets [N, m], the counts [2^m, C] and
  the log-likelihood, like `BernoulliMLPEM.e_step`.
  """
  d1, m = hidden_weights.shape
  num_classes = output_weights.shape[1]
  configs = list(itertools.product([0, 1], repeat=m))
  tau = np.zeros((len(x), len(configs)))
  targets = np.zeros((len(x), m))
  counts = np.zeros((len(configs), num_classes))
  loglik = 0.
  for j in range(len(x)):
    x_tilde = np.concatenate([[1.], x[j]])
    for k, z in enumerate(configs):
      prob = 1.
      for h in range(m):
        u = 1. / (1. + np.exp(-x_tilde @ hidden_weights[:, h]))
        prob *= u if z[h] == 1 else 1. - u
      logits = np.concatenate([[1.], z]) @ output_weights
      out = np.exp(logits - logits.max())
      out /= out.sum()
      tau[j, k] = prob * out[y[j]]
    marginal = tau[j].sum()
    loglik += np.log(marginal)
    tau[j] /= marginal
    for k, z in enumerate(configs):
      targets[j] += tau[j, k] * np.asarray(z)
      counts[k, y[j]] += tau[j, k]
  return tau, targets, counts, loglik


def _min_block_seconds(step, count, blocks=5):
  """Per-call seconds: the fastest of `blocks` blocks of `count` calls.

  The minimum filters out interference from other processes on a shared
  machine; `step` must force its result (e.g. float(...)).
  """
  best = np.inf
  for _ in range(blocks):
    start = time.perf_counter()
    for _ in range(count):
      step()
    best = min(best, (time.perf_counter() - start) / count)
  return best


def _time_em(data, m, mode, warm, timed):
  """Seconds per EM iteration (E-step + exact M-step) over blocks of `timed`
  iterations after `warm` untimed ones, and per E-step alone."""
  model = bm.BernoulliMLPEM(m, 3, l2=0.1)
  e_step = tf.function(model.e_step, jit_compile=(mode == "xla"))
  m_step = tf.function(model.m_step, jit_compile=(mode == "xla"))
  state = {"params": model.initialize(data, 0)}

  def iteration():
    stats, ll = e_step(state["params"], data)
    state["params"] = m_step(state["params"], stats)
    float(ll)

  for _ in range(max(warm, 1)):                                        # compiles too
    iteration()
  per_iteration = _min_block_seconds(iteration, timed, blocks=1 if warm == 0 else 5)
  per_e_step = _min_block_seconds(lambda: float(e_step(state["params"], data)[1]), timed)
  return per_iteration, per_e_step, model, state["params"]


def benchmark(quick, m=7):
  x, y = datasets.load_iris(return_X_y=True)
  x = (x - x.mean(0)) / x.std(0)
  data = (tf.constant(x), tf.constant(y, tf.int32))
  big = (tf.constant(np.tile(x, (10, 1))), tf.constant(np.tile(y, 10), tf.int32))
  out = dict(m=m, n=len(x), configurations=2 ** m)
  for mode in ("graph", "xla"):
    # Iterations 1-50 from the start (M-steps need more Newton steps), then
    # steady-state iterations after 50, as in most of a long fit.
    out[f"em_iteration_seconds_{mode}_first50"], _, _, _ = _time_em(data, m, mode, 0, 50)
    it, e, model, params = _time_em(data, m, mode, 50, 20)
    out[f"em_iteration_seconds_{mode}"], out[f"e_step_seconds_{mode}"] = it, e
    out[f"em_iteration_seconds_{mode}_n1500"], out[f"e_step_seconds_{mode}_n1500"], _, _ = \
        _time_em(big, m, mode, 50, 10)
  subset = 15 if quick else len(x)
  np_params = [p.numpy() for p in params]
  result = {}

  def loop():
    result["tau"] = loop_e_step(*np_params, x[:subset], y[:subset])[0]

  out["loop_subset"] = subset
  out["loop_e_step_seconds"] = _min_block_seconds(loop, 1, blocks=3) * len(x) / subset
  tau = result["tau"]
  sub = (data[0][:subset], data[1][:subset])
  post = model.posterior(params, sub)
  out["loop_max_tau_error"] = float(np.max(np.abs(post["tau"].numpy() - tau)))
  for mode in ("graph", "xla"):
    loop = out["loop_e_step_seconds"]
    out[f"ratio_em_iteration_{mode}"] = loop / out[f"em_iteration_seconds_{mode}"]
    out[f"ratio_em_iteration_{mode}_first50"] = loop / out[f"em_iteration_seconds_{mode}_first50"]
    out[f"ratio_e_step_{mode}"] = loop / out[f"e_step_seconds_{mode}"]
    # The loop's cost is linear in N (extrapolated); ours is measured.
    out[f"ratio_em_iteration_{mode}_n1500"] = 10 * loop / out[f"em_iteration_seconds_{mode}_n1500"]
    out[f"ratio_e_step_{mode}_n1500"] = 10 * loop / out[f"e_step_seconds_{mode}_n1500"]
  return out


# ---- Report -----------------------------------------------------------------------

def _table(rows):
  lines = ["| dataset | method | m | test accuracy % | held-out log-lik / point | s per fit | "
           "iterations | l2_ per fold |", "|" + "---|" * 8]
  for r in rows:
    l2 = ", ".join(f"{v:g}" for v in r["l2"]) if r["l2"] else ""
    lines.append(
        f"| {r['dataset']} | {r['method']} | {100 if r['method'] == 'sklearn' else r['n_hidden']} | "
        f"{100 * r['accuracy_mean']:.2f} ± "
        f"{100 * r['accuracy_sd']:.2f} | {r['heldout_loglik_mean']:.4f} ± "
        f"{r['heldout_loglik_sd']:.4f} | {r['seconds_mean']:.2f} | {r['iterations_mean']:.0f} | {l2} |")
  return "\n".join(lines)


def _bench_text(b):
  lines = [
      f"m = {b['m']} ({b['configurations']} configurations), iris N = {b['n']}",
      f"loop E-step (per-sample, per-configuration Python loop; timed on {b['loop_subset']} "
      f"points, scaled to N): {b['loop_e_step_seconds']:.3f} s "
      f"(max |tau - ours| = {b['loop_max_tau_error']:.1e})"]
  for mode in ("graph", "xla"):
    lines += [
        f"{mode}: EM iteration (E + exact Newton M-step), steady state "
        f"{1e3 * b[f'em_iteration_seconds_{mode}']:.3f} ms -> {b[f'ratio_em_iteration_{mode}']:.0f}x; "
        f"first 50 iterations {1e3 * b[f'em_iteration_seconds_{mode}_first50']:.3f} ms -> "
        f"{b[f'ratio_em_iteration_{mode}_first50']:.0f}x; E-step alone "
        f"{1e3 * b[f'e_step_seconds_{mode}']:.3f} ms -> {b[f'ratio_e_step_{mode}']:.0f}x",
        f"{mode}, iris x10 (N = 1500; loop extrapolated linearly): EM iteration "
        f"{1e3 * b[f'em_iteration_seconds_{mode}_n1500']:.3f} ms -> "
        f"{b[f'ratio_em_iteration_{mode}_n1500']:.0f}x; E-step "
        f"{1e3 * b[f'e_step_seconds_{mode}_n1500']:.3f} ms -> {b[f'ratio_e_step_{mode}_n1500']:.0f}x"]
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help=f"{' and '.join(QUICK_DATASETS)}, {QUICK_FOLDS} folds, short loop")
  parser.add_argument("--skip-cv", action="store_true", help="only the speed benchmark")
  parser.add_argument("--skip-benchmark", action="store_true", help="only the cross-validation")
  parser.add_argument("--datasets", default=None,
                      help=f"comma-separated subset of {','.join(DATASETS)} (default: all, "
                           f"or {','.join(QUICK_DATASETS)} with --quick)")
  parser.add_argument("--methods", default=",".join(METHODS),
                      help=f"comma-separated subset of {','.join(METHODS)} (default: all)")
  parser.add_argument("--n-hidden", type=int, default=EM_DEFAULT_HIDDEN,
                      help=f"hidden units of EM, autodiff and Keras (default: EM's default, "
                           f"{EM_DEFAULT_HIDDEN})")
  args = parser.parse_args(argv)
  default = QUICK_DATASETS if args.quick else tuple(DATASETS)
  names = [n.strip() for n in (args.datasets or ",".join(default)).split(",") if n.strip()]
  methods = [n.strip() for n in args.methods.split(",") if n.strip()]
  for given, known, what in ((names, DATASETS, "datasets"), (methods, METHODS, "methods")):
    unknown = sorted(set(given) - set(known))
    if unknown:
      parser.error(f"unknown {what} {unknown}; choose from {list(known)}")
  tf.get_logger().setLevel("ERROR")
  os.makedirs(OUT, exist_ok=True)
  report = dict(quick=args.quick, machine=platform.platform(), cpu_count=os.cpu_count(),
                load_average=os.getloadavg(), tensorflow=tf.__version__)
  bench = None
  if not args.skip_benchmark:
    print("speed benchmark ...", flush=True)
    report["benchmark"] = bench = benchmark(args.quick)
    print(_bench_text(bench), flush=True)
  markdown = ["# Bernoulli hidden-unit MLP with its defaults: EM vs autodiff vs scikit-learn vs Keras",
              "", f"quick={args.quick}; {report['machine']}; {report['cpu_count']} CPUs "
              f"(load average at start {report['load_average'][0]:.1f}); TF {report['tensorflow']}", ""]
  if not args.skip_cv:
    rows, per_fold = run_cv(names, QUICK_FOLDS if args.quick else 5, methods, args.n_hidden)
    report["rows"], report["per_fold"] = rows, per_fold
    table = _table(rows)
    print(table)
    markdown += ["## 5-fold cross-validation" + (" (first 2 folds)" if args.quick else ""), "",
                 table, ""]
  if bench is not None:
    markdown += ["## Speed (m = 7, iris)", "", "```", _bench_text(bench), "```", ""]
  name = "em_mlp_quick" if args.quick else "em_mlp"
  if names != list(default) or methods != list(METHODS):
    name += "_" + "_".join(names + ([] if methods == list(METHODS) else methods))
  if args.n_hidden != EM_DEFAULT_HIDDEN:
    name += f"_m{args.n_hidden}"
  with open(os.path.join(OUT, name + ".json"), "w") as f:
    json.dump(report, f, indent=1)
  with open(os.path.join(OUT, name + ".md"), "w") as f:
    f.write("\n".join(markdown))
  print(f"wrote {os.path.join(OUT, name)}.json/.md")


if __name__ == "__main__":
  main()
