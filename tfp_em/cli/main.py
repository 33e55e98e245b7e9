"""The `tfp-em` command.

    tfp-em demo [--out DIR] [--no-report]
    tfp-em fit gmm --data FILE.csv [--columns A B ...] --components K
                   --covariance TYPE [--out DIR] [--resume]
    tfp-em report FIT.nc [--out DIR] [--no-hmc]
    tfp-em verify MY_EM.py

Errors in the input (bad files, options, data) print one line to stderr and
exit with code 2; nothing is written before the input has been checked.
"""
from __future__ import annotations

import argparse
import os
import sys

from tfp_em.cli import readers

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow loads

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line, exit 2, no usage dump
    raise _UsageError(f"{self.prog.removeprefix('tfp-em').strip() or 'usage'}: {message}")


class _UsageError(Exception):
  pass


def build_parser() -> argparse.ArgumentParser:
  parser = _Parser(prog="tfp-em", description="EM for latent-variable models on TFP.")
  sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

  demo = sub.add_parser("demo", help="fit a mixture to the built-in Old Faithful data")
  demo.add_argument("--out", default="tfp_em_demo", help="output folder (default ./tfp_em_demo)")
  demo.add_argument("--max-components", type=int, default=6)
  demo.add_argument("--seed", type=int, default=0)
  demo.add_argument("--no-report", action="store_true",
                    help="skip the HTML diagnostic report (and its HMC cross-check)")

  fit = sub.add_parser("fit", help="fit a model to a CSV file")
  fit_sub = fit.add_subparsers(dest="model", required=True, parser_class=_Parser)
  gmm = fit_sub.add_parser("gmm", help="Gaussian mixture")
  gmm.add_argument("--data", required=True, help="CSV file with a header row")
  gmm.add_argument("--columns", nargs="+", default=None, help="columns to use (default all)")
  gmm.add_argument("--components", type=int, required=True)
  gmm.add_argument("--covariance", default="full",
                   choices=["full", "tied", "diag", "spherical"])
  gmm.add_argument("--n-init", type=int, default=3)
  gmm.add_argument("--max-iter", type=int, default=500)
  gmm.add_argument("--seed", type=int, default=0)
  gmm.add_argument("--out", default="tfp_em_fit")
  gmm.add_argument("--resume", action="store_true",
                   help="continue an interrupted fit from OUT/checkpoint")
  gmm.add_argument("--checkpoint-every", type=int, default=10)

  report = sub.add_parser("report", help="HTML diagnostic report of a saved fit")
  report.add_argument("source", help="inference_data.nc written by `tfp-em fit` or a report")
  report.add_argument("--out", default="tfp_em_report")
  report.add_argument("--no-hmc", action="store_true", help="skip the NUTS cross-check")
  report.add_argument("--hmc-draws", type=int, default=1000,
                      help="NUTS warm-up and kept draws per chain (default 1000)")

  verify = sub.add_parser("verify", help="check a hand-written EM against TFP and autodiff")
  verify.add_argument("path", help="a .py file defining the model and the E/M steps "
                      "(names: see tfp_em.verification.verify_file)")
  return parser


def main(argv=None) -> int:
  try:
    args = build_parser().parse_args(argv)
    commands = {"demo": _demo, "fit": _fit_gmm, "report": _report, "verify": _verify}
    _import_tensorflow_quietly()
    return commands[args.command](args)
  except (_UsageError, ValueError) as e:
    print(f"tfp-em: error: {_one_line(e)}", file=sys.stderr)
    return EXIT_USAGE
  except KeyboardInterrupt:
    print("tfp-em: interrupted", file=sys.stderr)
    return 130


def _import_tensorflow_quietly() -> None:
  """Imports TensorFlow with file descriptor 2 muted: its C++ start-up logs
  (oneDNN, CUDA probing) ignore TF_CPP_MIN_LOG_LEVEL in TF 2.21."""
  if "tensorflow" in sys.modules:
    return
  saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(devnull, 2)
    import tensorflow as tf
    tf.config.list_logical_devices()
  finally:
    os.dup2(saved, 2)
    os.close(devnull)
    os.close(saved)


def _one_line(e: Exception) -> str:
  return " ".join(str(e).split())


def _fit_gmm(args) -> int:
  from tfp_em.engine import outputs  # loads TensorFlow: not at start-up
  x, names = readers.load_csv(args.data, args.columns)
  outputs.check_output_dir(args.out)
  # The checkpoint folder is created by the fit, after the input has been checked.
  est = _fit_mixture(x, args.components, args.covariance, args.n_init, args.max_iter,
                     args.seed, checkpoint=dict(checkpoint_dir=os.path.join(args.out, "checkpoint"),
                                                checkpoint_every=args.checkpoint_every,
                                                resume=args.resume))
  _write_outputs(est, x, names, outputs.ensure_writable_dir(args.out),
                 title=os.path.basename(args.data))
  return 0


def _demo(args) -> int:
  from tfp_em.engine import outputs  # loads TensorFlow: not at start-up
  if args.max_components < 1:
    raise ValueError(f"--max-components must be >= 1, got {args.max_components}")
  if args.seed < 0:
    raise ValueError(f"--seed must be >= 0, got {args.seed}")
  x, names = readers.load_old_faithful()
  outputs.check_output_dir(args.out)
  print(f"Old Faithful: {x.shape[0]} eruptions, columns {names}")
  print(f"Selecting K in 1..{args.max_components} and the covariance type by BIC\n")
  rows, best = [], None
  print(f"{'K':>3} {'covariance':>10} {'loglik':>12} {'BIC':>12} {'iters':>6} {'converged':>9}")
  for cov in ("full", "tied", "diag", "spherical"):
    for k in range(1, args.max_components + 1):
      est = _fit_mixture(x, k, cov, n_init=3, max_iter=500, seed=args.seed)
      bic = est.bic(x)
      rows.append(dict(k=k, covariance_type=cov, log_likelihood=est.log_likelihood_, bic=bic,
                       n_iter=est.n_iter_, converged=est.converged_))
      print(f"{k:>3} {cov:>10} {est.log_likelihood_:>12.3f} {bic:>12.3f} {est.n_iter_:>6} "
            f"{str(est.converged_):>9}")
      if best is None or bic < best[0]:
        best = (bic, est)
  est = best[1]
  print(f"\nBest by BIC: K={est.n_components}, covariance_type={est.covariance_type!r}")
  out = outputs.ensure_writable_dir(args.out)
  _write_outputs(est, x, names, out, title="Old Faithful", selection=rows)
  if not args.no_report:
    from tfp_em.diagnostics.report import write_report
    print("\nWriting the diagnostic report (standard errors, NUTS cross-check) ...", flush=True)
    index = write_report(est, x, os.path.join(out, "report"), feature_names=names,
                         title="Old Faithful: Gaussian mixture chosen by BIC")
    print(f"Open {index}")
  return 0


def _report(args) -> int:
  from tfp_em.engine import outputs  # loads TensorFlow: not at start-up
  from tfp_em.diagnostics.report import write_report
  if args.hmc_draws < 10:
    raise ValueError(f"--hmc-draws must be >= 10, got {args.hmc_draws}")
  if not os.path.isfile(args.source):
    raise ValueError(f"{args.source!r} does not exist or is not a file")
  outputs.check_output_dir(args.out)
  index = write_report(args.source, out_dir=args.out, hmc=not args.no_hmc,
                       hmc_kwargs=dict(num_results=args.hmc_draws, num_burnin=args.hmc_draws))
  print(f"wrote {index}")
  return 0


def _verify(args) -> int:
  from tfp_em.verification.api import verify_file
  if not os.path.isfile(args.path):
    raise ValueError(f"{args.path!r} does not exist or is not a file")
  try:
    report = verify_file(args.path)
  except Exception as e:  # noqa: BLE001 - one line if the user's own code raised
    import traceback
    user = [f for f in traceback.extract_tb(e.__traceback__)
            if os.path.abspath(f.filename) == os.path.abspath(args.path)]
    if isinstance(e, ValueError) or not user:
      raise
    raise ValueError(f"{args.path}, line {user[-1].lineno}, in {user[-1].name}: "
                     f"{type(e).__name__}: {e}") from None
  print(report)
  return 0 if report.passed else 1


def _fit_mixture(x, k, cov, n_init, max_iter, seed, checkpoint=None):
  import warnings

  from tfp_em.mixture import GaussianMixture
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # per-fit convergence is reported in the table
    return GaussianMixture(k, covariance_type=cov, n_init=n_init, max_iter=max_iter,
                           seed=seed, verbose=False).fit(x, **(checkpoint or {}))


def _write_outputs(est, x, names, out, title, selection=None) -> None:
  from tfp_em.engine import outputs  # loads TensorFlow: not at start-up
  summary = dict(
      n_components=est.n_components, covariance_type=est.covariance_type, columns=names,
      weights=est.weights_, means=est.means_, covariances=est.covariances_,
      log_likelihood=est.log_likelihood_, bic=est.bic(x), aic=est.aic(x),
      n_iter=est.n_iter_, converged=est.converged_, n_points=int(x.shape[0]))
  if selection is not None:
    summary["model_selection"] = selection
  params_path = outputs.write_json(os.path.join(out, "gmm_params.json"), summary)
  from tfp_em.diagnostics.inference_data import to_inference_data
  netcdf_path = os.path.join(out, "inference_data.nc")
  with outputs.atomic_path(netcdf_path) as tmp:
    to_inference_data(est, x, feature_names=names).to_netcdf(tmp)
  png_path = _plot_fit(est, x, names, os.path.join(out, "gmm_fit.png"), title)
  print("\nComponent  weight   mean")
  for k in range(est.n_components):
    mean = ", ".join(f"{m:.3f}" for m in est.means_[k])
    print(f"{k:>9}  {est.weights_[k]:.3f}   [{mean}]")
  print(f"\nlog-likelihood {est.log_likelihood_:.4f} at the returned parameters "
        f"({est.n_iter_} iterations, converged={est.converged_})")
  print(f"wrote {params_path}\nwrote {png_path}\nwrote {netcdf_path} "
        f"(for `tfp-em report {netcdf_path}`)")


def _plot_fit(est, x, names, path, title) -> str:
  from tfp_em.engine import outputs  # loads TensorFlow: not at start-up
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np
  from matplotlib.patches import Ellipse

  full_cov = _full_covariances(est)
  fig, ax = plt.subplots(figsize=(6.5, 5))
  labels = est.predict(x)
  ax.scatter(x[:, 0], x[:, 1] if x.shape[1] > 1 else np.zeros(len(x)), c=labels, s=10,
             cmap="tab10", vmin=0, vmax=9, alpha=0.7)
  if x.shape[1] > 1:
    for k in range(est.n_components):
      vals, vecs = np.linalg.eigh(full_cov[k][:2, :2])
      angle = np.degrees(np.arctan2(vecs[1, -1], vecs[0, -1]))
      for n_sd in (1, 2):
        ax.add_patch(Ellipse(est.means_[k, :2], 2 * n_sd * np.sqrt(vals[-1]),
                             2 * n_sd * np.sqrt(vals[0]), angle=angle, fill=False,
                             color=plt.cm.tab10(k % 10), lw=2 / n_sd))
  ax.set_xlabel(names[0])
  ax.set_ylabel(names[1] if len(names) > 1 else "")
  ax.set_title(f"{title}: K={est.n_components}, {est.covariance_type} "
               "(1 and 2 sd ellipses)")
  fig.tight_layout()
  outputs.save_figure(fig, path, dpi=110)
  plt.close(fig)
  return path


def _full_covariances(est):
  import numpy as np
  k, d = est.n_components, est.n_features_in_
  cov = est.covariances_
  return {"full": lambda: cov,
          "tied": lambda: np.broadcast_to(cov, (k, d, d)),
          "diag": lambda: np.stack([np.diag(c) for c in cov]),
          "spherical": lambda: np.stack([c * np.eye(d) for c in cov])}[est.covariance_type]()

