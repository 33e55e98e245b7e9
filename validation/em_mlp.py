"""Validation of the Bernoulli hidden-unit MLP fitted by exact EM.

5-fold stratified CV on iris, wine, breast cancer and digits (PCA to 30
components, fitted on each training fold) comparing

  (a) EM: `BernoulliMLPClassifier(method='em')`;
  (b) autodiff: the same TFP marginal maximized by L-BFGS from the same start;
  (c) a deterministic Keras MLP (sigmoid hidden layer of the same size,
      softmax output, same L2 penalty) trained by backprop with Adam.

Reported per method: test accuracy (mean +- sd over folds), final training
log-likelihood (the stochastic-unit marginal for (a)/(b), the deterministic
net's sum log p(y|x) for (c)), wall seconds, iterations (EM iterations,
L-BFGS iterations, Keras epochs), and the seconds EM needed to reach the
autodiff method's final objective. Then a speed benchmark: seconds per EM
iteration at m = 7 on iris against a straightforward per-sample,
per-configuration Python loop E-step.

Usage:
  python validation/em_mlp.py            # full run
  python validation/em_mlp.py --quick    # 2 of the 5 folds, fewer epochs

Writes validation/out/em_mlp.json and validation/out/em_mlp.md.
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
from sklearn.decomposition import PCA  # noqa: E402
from sklearn.model_selection import StratifiedKFold  # noqa: E402

from tfp_em.bernoulli_mlp import em as bm# noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")

# n_hidden and the L2 penalty (on the summed log-likelihood) per dataset.
DATASETS = {
    "iris": dict(load=datasets.load_iris, n_hidden=5, l2=0.1, pca=None),
    "wine": dict(load=datasets.load_wine, n_hidden=5, l2=1.0, pca=None),
    "breast_cancer": dict(load=datasets.load_breast_cancer, n_hidden=5, l2=1.0, pca=None),
    "digits": dict(load=datasets.load_digits, n_hidden=10, l2=1.0, pca=30),
}
# EM iterations are cheap, so EM runs to a tight tolerance; L-BFGS stops at a
# relative change of AUTODIFF_TOL per iteration.
EM_MAX_ITER, EM_TOL = 5000, 1e-10
AUTODIFF_MAX_ITER, AUTODIFF_TOL = 2000, 1e-9


def _folds(x, y, quick):
  folds = list(StratifiedKFold(5, shuffle=True, random_state=0).split(x, y))
  return folds[:2] if quick else folds


def _prepare(cfg, x_train, x_test):
  if cfg["pca"] is None:
    return x_train, x_test
  pca = PCA(cfg["pca"], random_state=0).fit(x_train)
  return pca.transform(x_train), pca.transform(x_test)


def fit_tfp(method, cfg, x_train, y_train, x_test, y_test, seed):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    start = time.perf_counter()
    em = method == "em"
    est = bm.BernoulliMLPClassifier(
        n_hidden=cfg["n_hidden"], l2=cfg["l2"], seed=seed, method=method,
        max_iter=EM_MAX_ITER if em else AUTODIFF_MAX_ITER,
        tol=EM_TOL if em else AUTODIFF_TOL).fit(x_train, y_train)
    seconds = time.perf_counter() - start
  trace = est.fit_result_.restarts[est.fit_result_.best_restart].log_likelihood
  return dict(accuracy=est.score(x_test, y_test), loglik=est.log_likelihood_,
              objective=est.objective_, seconds=seconds, iterations=est.n_iter_,
              converged=bool(est.converged_), trace=trace.tolist(),
              trace_seconds=est.iteration_seconds_.tolist())


def fit_keras(cfg, x_train, y_train, x_test, y_test, seed, epochs):
  import keras
  keras.utils.set_random_seed(seed)
  mean, scale = x_train.mean(0), np.where(x_train.std(0) > 0, x_train.std(0), 1.)
  xs, xt = (x_train - mean) / scale, (x_test - mean) / scale
  classes, y_idx = np.unique(y_train, return_inverse=True)
  n = len(xs)
  # Keras' loss is the mean cross-entropy: (l2/2)|w|^2 on the sum is l2/(2n) on the mean.
  reg = keras.regularizers.L2(cfg["l2"] / (2. * n))
  model = keras.Sequential([
      keras.Input((xs.shape[1],)),
      keras.layers.Dense(cfg["n_hidden"], activation="sigmoid", kernel_regularizer=reg),
      keras.layers.Dense(len(classes), activation="softmax", kernel_regularizer=reg)])
  model.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy")
  start = time.perf_counter()
  model.fit(xs, y_idx, epochs=epochs, batch_size=32, verbose=0)
  seconds = time.perf_counter() - start
  proba = model.predict(xs, verbose=0)
  loglik = float(np.sum(np.log(np.maximum(proba[np.arange(n), y_idx], 1e-300))))
  pred = classes[np.argmax(model.predict(xt, verbose=0), axis=1)]
  return dict(accuracy=float(np.mean(pred == y_test)), loglik=loglik, seconds=seconds,
              iterations=epochs, converged=True)


def seconds_to_reach(em, target):
  """Seconds until EM's objective first reached `target` (None if never)."""
  trace, stamps = np.asarray(em["trace"]), np.asarray(em["trace_seconds"])
  slack = 1e-6 * abs(target)
  hit = np.nonzero(trace >= target - slack)[0]
  return float(stamps[hit[0]]) if len(hit) else None


def warm_up():
  """One tiny fit per method, so that one-off autograph costs are not timed."""
  x, y = datasets.load_iris(return_X_y=True)
  cfg = dict(n_hidden=2, l2=1.)
  for method in ("em", "autodiff"):
    fit_tfp(method, cfg, x[::5], y[::5], x[:3], y[:3], seed=0)


def run_cv(quick, names):
  rows, per_fold = [], {}
  warm_up()
  for name in names:
    cfg = DATASETS[name]
    x, y = cfg["load"](return_X_y=True)
    results = {"em": [], "autodiff": [], "keras": [], "em_to_autodiff": []}
    for k, (train, test) in enumerate(_folds(x, y, quick)):
      x_train, x_test = _prepare(cfg, x[train], x[test])
      em = fit_tfp("em", cfg, x_train, y[train], x_test, y[test], seed=k)
      ad = fit_tfp("autodiff", cfg, x_train, y[train], x_test, y[test], seed=k)
      ke = fit_keras(cfg, x_train, y[train], x_test, y[test], seed=k, epochs=100 if quick else 300)
      reach = seconds_to_reach(em, ad["objective"])
      results["em"].append(em)
      results["autodiff"].append(ad)
      results["keras"].append(ke)
      results["em_to_autodiff"].append(reach)
      print(f"  {name} fold {k}: acc em {em['accuracy']:.3f} ad {ad['accuracy']:.3f} "
            f"keras {ke['accuracy']:.3f} | objective em {em['objective']:.3f} "
            f"ad {ad['objective']:.3f} | s em {em['seconds']:.1f} ad {ad['seconds']:.1f} "
            f"keras {ke['seconds']:.1f} | em reached ad's objective at "
            f"{'never' if reach is None else f'{reach:.1f}s'}", flush=True)
    per_fold[name] = results
    for method in ("em", "autodiff", "keras"):
      r = results[method]
      acc = np.array([f["accuracy"] for f in r])
      row = dict(dataset=name, method=method, n_hidden=cfg["n_hidden"], l2=cfg["l2"],
                 accuracy_mean=float(acc.mean()), accuracy_sd=float(acc.std(ddof=1)),
                 loglik_mean=float(np.mean([f["loglik"] for f in r])),
                 seconds_mean=float(np.mean([f["seconds"] for f in r])),
                 iterations_mean=float(np.mean([f["iterations"] for f in r])),
                 converged=int(sum(f["converged"] for f in r)), folds=len(r))
      if method == "em":
        reach = [t for t in results["em_to_autodiff"] if t is not None]
        row["folds_reaching_autodiff"] = len(reach)
        row["seconds_to_autodiff_objective"] = float(np.mean(reach)) if reach else None
        row["objective_minus_autodiff"] = float(np.mean(
            [e["objective"] - a["objective"] for e, a in zip(r, results["autodiff"])]))
      rows.append(row)
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
  head = ("| dataset | method | m | test accuracy | train loglik | seconds | iterations | "
          "EM s to autodiff objective (folds) | EM - autodiff objective |")
  lines = [head, "|" + "---|" * 9]
  for r in rows:
    reach = ""
    gap = ""
    if r["method"] == "em":
      s = r["seconds_to_autodiff_objective"]
      reach = f"{'never' if s is None else f'{s:.2f}'} ({r['folds_reaching_autodiff']}/{r['folds']})"
      gap = f"{r['objective_minus_autodiff']:+.3f}"
    lines.append(
        f"| {r['dataset']} | {r['method']} | {r['n_hidden']} | "
        f"{100 * r['accuracy_mean']:.2f} ± {100 * r['accuracy_sd']:.2f} | {r['loglik_mean']:.2f} | "
        f"{r['seconds_mean']:.2f} | {r['iterations_mean']:.0f} | {reach} | {gap} |")
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
  parser.add_argument("--quick", action="store_true", help="2 folds, 100 Keras epochs, short loop")
  parser.add_argument("--skip-cv", action="store_true", help="only the speed benchmark")
  parser.add_argument("--skip-benchmark", action="store_true", help="only the cross-validation")
  parser.add_argument("--datasets", default=",".join(DATASETS),
                      help=f"comma-separated subset of {','.join(DATASETS)} (default: all)")
  args = parser.parse_args(argv)
  names = [n.strip() for n in args.datasets.split(",") if n.strip()]
  unknown = sorted(set(names) - set(DATASETS))
  if unknown:
    parser.error(f"unknown datasets {unknown}; choose from {list(DATASETS)}")
  tf.get_logger().setLevel("ERROR")
  os.makedirs(OUT, exist_ok=True)
  report = dict(quick=args.quick, machine=platform.platform(), cpu_count=os.cpu_count(),
                load_average=os.getloadavg(), tensorflow=tf.__version__,
                em=dict(max_iter=EM_MAX_ITER, tol=EM_TOL),
                autodiff=dict(max_iter=AUTODIFF_MAX_ITER, tol=AUTODIFF_TOL))
  bench = None
  if not args.skip_benchmark:
    print("speed benchmark ...", flush=True)
    report["benchmark"] = bench = benchmark(args.quick)
    print(_bench_text(bench), flush=True)
  markdown = ["# Bernoulli hidden-unit MLP: exact EM vs autodiff vs Keras", "",
              f"quick={args.quick}; {report['machine']}; {report['cpu_count']} CPUs "
              f"(load average at start {report['load_average'][0]:.1f}); TF {report['tensorflow']}; "
              f"EM tol {EM_TOL:g}, L-BFGS tol {AUTODIFF_TOL:g}", ""]
  if not args.skip_cv:
    rows, per_fold = run_cv(args.quick, names)
    report["rows"], report["per_fold"] = rows, per_fold
    table = _table(rows)
    print(table)
    markdown += ["## Cross-validation", "", table, ""]
  if bench is not None:
    markdown += ["## Speed (m = 7, iris)", "", "```", _bench_text(bench), "```", ""]
  name = "em_mlp_quick" if args.quick else "em_mlp"
  if names != list(DATASETS):
    name += "_" + "_".join(names)
  with open(os.path.join(OUT, name + ".json"), "w") as f:
    json.dump(report, f, indent=1)
  with open(os.path.join(OUT, name + ".md"), "w") as f:
    f.write("\n".join(markdown))
  print(f"wrote {os.path.join(OUT, name)}.json/.md")


if __name__ == "__main__":
  main()
