"""The package's architecture, checked by well-kept tools in a child process.

* import-linter with the contracts in `.importlinter`: layers (models < engine
  < verification | diagnostics < families < cli), models knowing nothing of
  tfp_em, no import cycle at any depth (grimp reads imports inside functions).
* pylint's copy detector: no two places in tfp_em/ or models/ share six or
  more lines (imports, signatures, docstrings and comments aside).
"""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(*args):
  return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=600)


def test_import_contracts_are_kept():
  done = _run("-c", "import sys; from importlinter.cli import lint_imports; "
                    "sys.exit(lint_imports(config_filename='.importlinter', no_cache=True))")
  assert done.returncode == 0, done.stdout + done.stderr
  assert "0 broken" in done.stdout


def test_no_duplicated_code_in_the_package():
  done = _run("-m", "pylint", "--disable=all", "--enable=duplicate-code", "--min-similarity-lines=6",
              "--ignore-imports=y", "--ignore-signatures=y", "--ignore-docstrings=y",
              "--ignore-comments=y", "--score=n", "tfp_em", "models")
  assert done.returncode == 0, done.stdout + done.stderr
  assert "duplicate-code" not in done.stdout
