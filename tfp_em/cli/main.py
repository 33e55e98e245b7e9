"""The `tfp-em` command.

    tfp-em demo [--out DIR] [--no-report] [--overwrite] [--quiet]
    tfp-em fit gmm --data FILE.csv [--columns A B ...] --components K
                   [--covariance TYPE] [--out DIR] [--resume] [--overwrite] [--quiet]
    tfp-em report FIT.nc [--out DIR] [--no-hmc] [--overwrite] [--quiet]
    tfp-em verify MY_EM.py

Every command first checks its arguments and input files in plain Python
(`tfp_em.cli.preflight`, `tfp_em.cli.readers`), then imports TensorFlow. An
error prints one line to stderr and exits with code 2; nothing is written
before the input has been checked, and an output folder holding another run
is not overwritten without --overwrite. `fit gmm --resume` continues the fit
in DIR/checkpoint only if it is the same fit (data, columns, options): another
one is an error naming what changed; a finished one is reported, not refitted.
Progress bars show on a terminal (stderr) unless --quiet.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import time
import warnings

import tfp_em
from tfp_em.cli import preflight, readers

EXIT_USAGE = 2
FIT_WRITES = ("gmm_params.json", "gmm_fit.png", "inference_data.nc", "checkpoint")
DEMO_WRITES = FIT_WRITES + ("report",)
REPORT_WRITES = ("index.html", "inference_data.nc", "hmc_posterior.nc")
SKLEARN_COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")
# models.gaussian_mixture.ALL_COVARIANCE_TYPES, spelled out so that checking
# the arguments does not import TensorFlow (tests/test_cli.py holds them equal)
COVARIANCE_TYPES = SKLEARN_COVARIANCE_TYPES + (
    "EII", "VII", "EEI", "VEI", "EVI", "VVI", "EEE", "VEE", "EVE", "VVE", "EEV", "VEV", "EVV",
    "VVV")
DEMO_HEADERS = dict(k="K", covariance_type="covariance", log_likelihood="loglik", bic="BIC",
                    icl="ICL", n_iter="iters")


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line, exit 2, no usage dump
    command = self.prog.removeprefix("tfp-em").strip()
    raise _UsageError(f"{command}: {message}" if command else message)


class _UsageError(Exception):
  pass


class _Formatter(argparse.RawDescriptionHelpFormatter):
  """Shows each option's default, unless it has none (None, False)."""

  def _get_help_string(self, action):
    text = action.help or ""
    shown = not (action.default is None or action.default is False
                 or action.default == argparse.SUPPRESS)
    if shown and "%(default)" not in text and action.option_strings:
      text += " (default: %(default)s)"
    if action.required and action.option_strings:
      text += " (required)"
    return text


def build_parser() -> argparse.ArgumentParser:
  """The `tfp-em` argument parser (subcommands demo, fit gmm, report, verify)."""
  kw = dict(formatter_class=_Formatter)
  parser = _Parser(prog="tfp-em", description="EM for latent-variable models on TensorFlow "
                   "Probability, checked against autodiff.", epilog="Run `tfp-em COMMAND --help` "
                   "for a command's options; `tfp-em demo` for a first look.", **kw)
  parser.add_argument("--version", action="version", version=f"tfp-em {tfp_em.__version__}")
  sub = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND",
                              parser_class=_Parser)
  run = _Parser(add_help=False)
  run.add_argument("--overwrite", action="store_true",
                   help="replace the outputs of an earlier run in --out")
  run.add_argument("--quiet", action="store_true",
                   help="no progress bars (they show only when stderr is a terminal)")

  demo = sub.add_parser("demo", parents=[run], help="select and fit a mixture to the built-in Old "
                        "Faithful data by BIC, write the fit and a diagnostic report", **kw)
  demo.add_argument("--out", default="tfp_em_demo", metavar="DIR", help="output folder")
  demo.add_argument("--max-components", type=preflight.int_at_least(1), default=6, metavar="K",
                    help="largest number of components K tried")
  demo.add_argument("--seed", type=preflight.int_at_least(0), default=0, metavar="N",
                    help="random seed")
  demo.add_argument("--no-report", action="store_true",
                    help="skip the HTML diagnostic report (and its NUTS cross-check)")

  fit = sub.add_parser("fit", help="fit a model to a CSV file", **kw)
  fit_sub = fit.add_subparsers(dest="model", title="models", metavar="MODEL", parser_class=_Parser)
  gmm = fit_sub.add_parser("gmm", parents=[run], help="Gaussian mixture", **kw)
  gmm.add_argument("--data", required=True, metavar="FILE.csv",
                   help="CSV file with a header row; numeric columns")
  gmm.add_argument("--columns", nargs="+", metavar="NAME",
                   help="columns to use (default: all)")
  gmm.add_argument("--components", type=preflight.int_at_least(1, "n_components"), required=True,
                   metavar="K",
                   help="number of mixture components")
  gmm.add_argument("--covariance", default="full", choices=COVARIANCE_TYPES,
                   metavar="TYPE",
                   help="covariance of the components: scikit-learn's full, tied, diag, "
                        "spherical or one of mclust's 14 models (EII ... VVV)")
  gmm.add_argument("--n-init", type=preflight.int_at_least(1, "n_init"), default=3, metavar="N",
                   help="restarts from different initializations; the best is kept")
  gmm.add_argument("--max-iter", type=preflight.int_at_least(1, "max_iter"), default=500,
                   metavar="N",
                   help="EM iterations per restart at most")
  gmm.add_argument("--seed", type=preflight.int_at_least(0), default=0, metavar="N",
                    help="random seed")
  gmm.add_argument("--out", default="tfp_em_fit", metavar="DIR", help="output folder")
  gmm.add_argument("--resume", action="store_true",
                   help="continue an interrupted fit from DIR/checkpoint (the same data and "
                   "options only; a finished fit is reported, not refitted)")
  gmm.add_argument("--checkpoint-every", type=preflight.int_at_least(1), default=10, metavar="N",
                   help="iterations between checkpoints in DIR/checkpoint")

  report = sub.add_parser("report", parents=[run], help="HTML diagnostic report of a saved fit",
                          **kw)
  report.add_argument("source", metavar="FIT.nc",
                      help="inference_data.nc written by `tfp-em fit`, `tfp-em demo` or a report")
  report.add_argument("--out", default="tfp_em_report", metavar="DIR", help="output folder")
  report.add_argument("--no-hmc", action="store_true", help="skip the NUTS cross-check")
  report.add_argument("--hmc-draws", type=preflight.int_at_least(10), metavar="N",
                      help="NUTS warm-up and kept draws per chain (default: 500 and 1000)")

  verify = sub.add_parser("verify", help="check a hand-written EM against TFP and autodiff", **kw)
  verify.add_argument("path", metavar="MY_EM.py", help="a .py file defining the model and the "
                      "E/M steps (names: see tfp_em.verification.verify_file)")
  # what a bare `tfp-em` or `tfp-em fit` lacks (a subparser's defaults win)
  parser.set_defaults(usage_parser=parser, usage_choices=list(sub.choices))
  fit.set_defaults(usage_parser=fit, usage_choices=list(fit_sub.choices))
  return parser


def main(argv=None) -> int:
  """Runs `tfp-em` with `argv` (default sys.argv[1:]); returns the exit status."""
  parser = build_parser()
  try:
    try:
      args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version
      return e.code
    if args.command is None or (args.command == "fit" and args.model is None):
      _missing_command(args.usage_parser, args.usage_choices)
    check, run = COMMANDS[args.command]
    checked = check(args)            # plain Python: fails fast, before TensorFlow loads
    with _quiet_third_parties():
      from tfp_em.engine.compiling import use_persistent_cache
      use_persistent_cache()         # XLA programs (NUTS, GMM kernels) kept for the next run
      return run(args, checked)
  except (_UsageError, ValueError) as e:
    print(f"tfp-em: error: {_one_line(e)}", file=sys.stderr)
    return EXIT_USAGE
  except KeyboardInterrupt:
    print("tfp-em: interrupted", file=sys.stderr)
    return 130


@contextlib.contextmanager
def _quiet_third_parties():
  """TensorFlow imported with its start-up logs muted; libraries' FutureWarnings
  and TensorFlow's Python warnings (retracing) kept out of the output."""
  _import_tensorflow_quietly()
  import tensorflow as tf
  logger = tf.get_logger()
  level = logger.level
  logger.setLevel("ERROR")
  try:
    with warnings.catch_warnings():
      warnings.filterwarnings("ignore", category=FutureWarning)
      warnings.filterwarnings("ignore", category=DeprecationWarning)
      yield
  finally:
    logger.setLevel(level)


def _import_tensorflow_quietly() -> None:
  """Imports TensorFlow with its Python warnings muted (`import tfp_em` keeps its C++
  start-up logs off stderr: `tfp_em.tensorflow_logs`)."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    importlib.import_module("tensorflow")


def _missing_command(parser, names) -> None:
  """One error line that names the commands, with the usage synopsis (errors are one line)."""
  usage = " ".join(parser.format_usage().split())
  listed = f"one of {', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else names[0]
  parser.error(f"{listed} is required; {usage} "
               f"(`{parser.prog} --help` describes them)")


def _one_line(e: Exception) -> str:
  return " ".join(str(e).split())


def _progress(args) -> bool:
  return not args.quiet and sys.stderr.isatty()


# -- checks (plain Python) and runs, command by command --------------------------

def _check_fit(args):
  x, names = readers.load_csv(args.data, args.columns)
  preflight.components(args.components, x.shape[0], args.data)
  # --resume: outputs beside a checkpoint belong to its fit (the fit's fingerprint decides).
  resumable = args.resume and os.path.isfile(os.path.join(args.out, "checkpoint", "latest.json"))
  preflight.output_folder(args.out, FIT_WRITES, args.overwrite,
                          keep=FIT_WRITES if resumable else ("checkpoint",) if args.resume else ())
  return x, names


def _fit_gmm(args, checked) -> int:
  from tfp_em.cli import writers
  from tfp_em.engine import checkpoint, outputs
  x, names = checked
  # The checkpoint folder is created by the fit, after the input has been checked.
  folder = os.path.join(args.out, "checkpoint")
  finished = args.resume and checkpoint.holds_complete_fit(folder)
  try:
    est = _fit_mixture(x, args.components, args.covariance, args.n_init, args.max_iter,
                       args.seed, _progress(args),
                       checkpoint=dict(checkpoint_dir=folder, resume=args.resume,
                                       checkpoint_every=args.checkpoint_every))
  except checkpoint.CheckpointMismatchError as e:
    raise ValueError(f"--resume: the checkpoint in {folder} belongs to another fit: {e.summary}; "
                     "pass --overwrite without --resume to start over, or choose another --out"
                     ) from None
  if finished and all(os.path.exists(os.path.join(args.out, n)) for n in FIT_WRITES):
    print(f"{args.out} holds this fit, finished earlier: log-likelihood "
          f"{est.log_likelihood_:.4f} ({est.n_iter_} iterations, converged={est.converged_}); "
          "nothing refitted or rewritten. Pass --overwrite without --resume to fit again.")
    return 0
  writers.write_fit_outputs(est, x, names, outputs.ensure_writable_dir(args.out),
                            title=os.path.basename(args.data))
  return 0


def _check_demo(args):
  preflight.output_folder(args.out, DEMO_WRITES, args.overwrite)
  return readers.load_old_faithful()


def _demo(args, checked) -> int:
  from tfp_em.cli import writers
  from tfp_em.engine import outputs
  from tfp_em.mixture.selection import select_mixture
  x, names = checked
  progress = _progress(args)
  print(f"Old Faithful: {x.shape[0]} eruptions, columns {names}")
  print(f"Selecting K in 1..{args.max_components} and the covariance type by BIC "
        "(lower is better)\n")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # per-fit convergence and warnings are in the table
    search = select_mixture(x, range(1, args.max_components + 1), models="sklearn",
                            n_init=3, max_iter=500, seed=args.seed, progress=progress)
  notes = ["notes"] if search.table["notes"].any() else []  # the fits' warnings, by kind
  shown = search.table[["k", "covariance_type", "log_likelihood", "bic", "icl", "n_iter",
                        "converged"] + notes]
  print(shown.rename(columns=DEMO_HEADERS).to_string(index=False,
                                                     float_format=lambda v: f"{v:.3f}"))
  est = search.best_estimator_
  print(f"\nBest by BIC: K={est.n_components}, covariance_type={est.covariance_type!r}")
  rows = search.report_rows()
  out = outputs.ensure_writable_dir(args.out)
  writers.write_fit_outputs(est, x, names, out, title="Old Faithful", selection=rows)
  if not args.no_report:
    from tfp_em.diagnostics.report import write_report
    print("\nWriting the diagnostic report (standard errors, NUTS cross-check) ...", flush=True)
    start = time.perf_counter()
    index = write_report(est, x, os.path.join(out, "report"), feature_names=names,
                         title="Old Faithful: Gaussian mixture chosen by BIC", progress=progress,
                         model_selection=rows)
    print(f"Report written in {time.perf_counter() - start:.0f} s. Open {index}")
  return 0


def _check_report(args):
  preflight.output_folder(args.out, REPORT_WRITES, args.overwrite)
  preflight.netcdf_file(args.source)


def _report(args, _) -> int:
  from tfp_em.diagnostics.report import write_report
  draws = {} if args.hmc_draws is None else dict(num_results=args.hmc_draws,
                                                 num_burnin=args.hmc_draws)
  index = write_report(args.source, out_dir=args.out, hmc=not args.no_hmc, hmc_kwargs=draws,
                       progress=_progress(args))
  print(f"wrote {index}")
  return 0


def _check_verify(args):
  preflight.python_file(args.path)


def _verify(args, _) -> int:
  from tfp_em.verification.api import verify_file
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


COMMANDS = {"demo": (_check_demo, _demo), "fit": (_check_fit, _fit_gmm),
            "report": (_check_report, _report), "verify": (_check_verify, _verify)}


def _fit_mixture(x, k, cov, n_init, max_iter, seed, progress, checkpoint=None):
  from tfp_em.mixture import GaussianMixture
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # convergence is printed with the fit
    return GaussianMixture(k, covariance_type=cov, n_init=n_init, max_iter=max_iter,
                           seed=seed, verbose=progress).fit(x, **(checkpoint or {}))
