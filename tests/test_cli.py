"""The tfp-em command: outputs of the demo and fit, and one-line errors with exit code 2."""
import argparse
import json
import os
import re
import subprocess
import sys

import matplotlib.image as mpimg
import numpy as np
import pytest

import tfp_em
from tfp_em.cli import preflight
from tfp_em.cli.main import FIT_WRITES, build_parser, main
from tfp_em.engine import outputs


def _write(path, text):
  path.write_text(text)
  return str(path)


def test_demo_writes_params_and_png(tmp_path, capsys):
  out = tmp_path / "demo"
  assert main(["demo", "--out", str(out), "--max-components", "3", "--no-report"]) == 0
  printed = capsys.readouterr().out
  assert "Best by BIC" in printed and "spherical" in printed
  assert "ICL" in printed and "lower is better" in printed
  params = json.loads((out / "gmm_params.json").read_text())
  assert len(params["model_selection"]) == 12
  best = min(params["model_selection"], key=lambda r: r["bic"])
  assert (params["n_components"], params["covariance_type"]) == (best["k"],
                                                                   best["covariance_type"])
  np.testing.assert_allclose(sum(params["weights"]), 1.0)
  image = mpimg.imread(out / "gmm_fit.png")
  assert image.ndim == 3 and image.shape[0] > 100
  assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]
  assert main(["demo", "--out", str(out), "--no-report"]) == 2      # another run is there
  assert "pass --overwrite" in capsys.readouterr().err
  import arviz as az
  stored = json.loads(az.from_netcdf(out / "inference_data.nc").posterior.attrs["model_selection"])
  assert [r["bic"] for r in stored] == [r["bic"] for r in params["model_selection"]]


@pytest.mark.slow
def test_demo_ends_with_a_report(tmp_path, capsys):
  out = tmp_path / "demo"
  assert main(["demo", "--out", str(out), "--max-components", "2"]) == 0
  index = out / "report" / "index.html"
  assert f"Open {index}" in capsys.readouterr().out
  html = index.read_text()
  assert "inference_data.nc" in html and (out / "report" / "inference_data.nc").exists()
  assert "model_selection.png" in html and "lower is better" in html
  assert "means[component 0, eruptions]" in html


def test_report_and_verify_commands(tmp_path, capsys):
  rng = np.random.default_rng(0)
  x = np.concatenate([rng.normal(0, 1, (80, 2)), rng.normal(5, 1, (80, 2))])
  data = _write(tmp_path / "d.csv", "a,b\n" + "\n".join(f"{a},{b}" for a, b in x))
  assert main(["fit", "gmm", "--data", data, "--components", "2", "--out",
               str(tmp_path / "fit")]) == 0
  netcdf = tmp_path / "fit" / "inference_data.nc"
  assert main(["report", str(netcdf), "--out", str(tmp_path / "rep"), "--no-hmc"]) == 0
  assert (tmp_path / "rep" / "index.html").exists()
  examples = os.path.join(os.path.dirname(__file__), "..", "examples")
  capsys.readouterr()
  assert main(["verify", os.path.join(examples, "gmm_em_correct.py")]) == 0
  assert "FAIL" not in capsys.readouterr().out
  assert main(["verify", os.path.join(examples, "gmm_em_buggy.py")]) == 1
  assert "FAIL" in capsys.readouterr().out


def test_fit_gmm_on_csv_selects_columns(tmp_path):
  rng = np.random.default_rng(0)
  x = np.concatenate([rng.normal(0, 1, (60, 2)), rng.normal(5, 1, (60, 2))])
  rows = "\n".join(f"{a},{b},label{i}" for i, (a, b) in enumerate(x))
  data = _write(tmp_path / "d.csv", "a,b,name\n" + rows + "\n")
  out = tmp_path / "fit"
  assert main(["fit", "gmm", "--data", data, "--columns", "a", "b", "--components", "2",
               "--covariance", "diag", "--out", str(out)]) == 0
  params = json.loads((out / "gmm_params.json").read_text())
  assert params["columns"] == ["a", "b"] and params["covariance_type"] == "diag"
  means = np.sort(np.array(params["means"])[:, 0])
  np.testing.assert_allclose(means, [0, 5], atol=0.5)
  again = ["fit", "gmm", "--data", data, "--columns", "a", "b", "--components", "2", "--n-init",
           "1", "--out", str(out)]
  assert main(again) == 2                                # would overwrite the first fit
  assert main(again + ["--overwrite", "--quiet"]) == 0
  assert json.loads((out / "gmm_params.json").read_text())["covariance_type"] == "full"
  assert main(again + ["--covariance", "VEV", "--overwrite", "--quiet"]) == 0  # an mclust model
  params = json.loads((out / "gmm_params.json").read_text())
  assert params["covariance_type"] == "VEV" and np.shape(params["covariances"]) == (2, 2, 2)


def test_covariance_choices_are_the_estimators():
  from models.gaussian_mixture import ALL_COVARIANCE_TYPES
  from tfp_em.cli.main import COVARIANCE_TYPES
  assert COVARIANCE_TYPES == ALL_COVARIANCE_TYPES


def _files(folder):
  return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes())
          for p in sorted(folder.rglob("*")) if p.is_file()}


def test_resume_checks_the_fit_and_reports_a_finished_one(tmp_path, capsys):
  rng = np.random.default_rng(0)
  x = np.concatenate([rng.normal(0, 1, (60, 3)), rng.normal(5, 1, (60, 3))])
  data = _write(tmp_path / "d.csv", "a,b,c\n" + "".join(f"{p},{q},{r}\n" for p, q, r in x))
  out = tmp_path / "fit"
  args = ["fit", "gmm", "--data", data, "--columns", "a", "b", "--components", "2", "--n-init",
          "1", "--quiet", "--out", str(out)]
  assert main(args) == 0
  done = _files(out)
  capsys.readouterr()
  assert main(args + ["--resume", "--components", "3"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("tfp-em: error: --resume: the checkpoint in ")
  assert "n_components 2 -> 3" in err
  assert main(args[:5] + ["c", "b"] + args[7:] + ["--resume"]) == 2     # --columns c b
  assert "data x values changed (column sums differ in column(s) [0]" in capsys.readouterr().err
  assert _files(out) == done                      # refused: nothing written
  assert main(args + ["--resume"]) == 0
  assert "holds this fit, finished earlier" in capsys.readouterr().out
  assert _files(out) == done                      # finished: reported, not refitted
  assert main(args + ["--components", "3", "--overwrite"]) == 0      # starts over
  assert json.loads((out / "gmm_params.json").read_text())["n_components"] == 3
  assert main(args + ["--components", "3", "--resume"]) == 0
  assert "finished earlier" in capsys.readouterr().out


@pytest.mark.parametrize("content,match", [
    ("", "empty"),
    ("a,b\n", "no data rows"),
    ("a,b\n1,2\n3\n", "line 3 has 1 fields"),
    ("a,b\n1,2\n3,x\n", "'x' is not a number"),
    ("a,b\n1,2\n3,nan\n", "not finite"),
    ("a,c\n1,2\n3,4\n", r"column\(s\) \['b'\] not found"),
])
def test_malformed_csv_is_one_line_exit_2(tmp_path, capsys, content, match):
  data = _write(tmp_path / "bad.csv", content)
  out = tmp_path / "never"
  rc = main(["fit", "gmm", "--data", data, "--columns", "a", "b", "--components", "1",
             "--out", str(out)])
  err = capsys.readouterr().err
  assert rc == 2
  assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
  assert pytest.importorskip("re").search(match, err)
  assert not out.exists()


@pytest.mark.parametrize("argv,match", [
    (["fit", "gmm", "--data", "/no/such.csv", "--components", "2"], "does not exist"),
    (["fit", "gmm", "--data", "{csv}", "--components", "0"],
     "must be at least 1 (n_components), got 0"),
    (["fit", "gmm", "--data", "{csv}", "--components", "two"], "invalid int value 'two'"),
    (["fit", "gmm", "--data", "{csv}", "--components", "2", "--covariance", "x"], "invalid choice"),
    (["fit", "gmm", "--data", "{csv}", "--components", "50"], "at least as many points"),
    (["fit", "gmm", "--data", "{csv}", "--components", "2", "--out", "{file}/sub"],
     "cannot be created"),
    (["fit", "gmm", "--data", "{csv}", "--components", "2", "--out", "{file}"], "is a file"),
    (["fit", "gmm", "--data", "{csv}", "--components", "2", "--columns", "a", "zz"], "['zz']"),
    (["demo", "--max-components", "0"], "max-components"),
    (["frobnicate"], "invalid choice"),
    (["report", "/no/such.nc"], "does not exist"),
    (["report", "{csv}"], "not a netCDF file"),
    (["report", "{csv}", "--hmc-draws", "1"], "hmc-draws"),
    (["verify", "/no/such.py"], "does not exist"),
    (["verify", "{bad_py}"], "line 2: SyntaxError"),
])
def test_bad_arguments_are_one_line_exit_2(tmp_path, capsys, argv, match):
  csv_path = _write(tmp_path / "ok.csv", "a,b\n" + "\n".join(f"{i},{i % 3}" for i in range(20)))
  file_path = _write(tmp_path / "plain.txt", "x")
  bad_py = _write(tmp_path / "bad.py", "x = 1\ndef f(:\n")
  argv = [a.format(csv=csv_path, file=file_path, bad_py=bad_py) for a in argv]
  before = sorted(os.listdir(tmp_path))
  rc = main(argv + (["--out", str(tmp_path / "out")] if argv[:1] == ["fit"] and "--out" not in argv
                    else []))
  err = capsys.readouterr().err
  assert rc == 2 and match in err and len(err.strip().splitlines()) == 1, err
  assert sorted(os.listdir(tmp_path)) == before  # nothing written


def test_bad_input_fails_before_tensorflow_loads(tmp_path):
  """Argument and file errors come from plain Python: TensorFlow is never imported."""
  csv_path = _write(tmp_path / "ok.csv", "a,b\n" + "\n".join(f"{i},{i % 3}" for i in range(20)))
  occupied = tmp_path / "occupied"
  occupied.mkdir()
  (occupied / "gmm_params.json").write_text("{}")
  calls = [
      ["fit", "gmm", "--data", csv_path, "--columns", "a", "nope", "--components", "2"],
      ["fit", "gmm", "--data", str(tmp_path / "none.csv"), "--components", "2"],
      ["fit", "gmm", "--data", csv_path, "--components", "2", "--out", str(occupied)],
      ["report", csv_path], ["verify", str(tmp_path / "none.py")], ["demo", "--out", csv_path],
  ]
  code = ("import sys\nfrom tfp_em.cli.main import main\n"
          f"for argv in {calls!r}:\n  assert main(argv) == 2, argv\n"
          "assert 'tensorflow' not in sys.modules, 'TensorFlow was imported'\nprint('ok')\n")
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        cwd=tmp_path, timeout=120)
  assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-1500:]
  assert len(done.stderr.strip().splitlines()) == len(calls)  # one line per error
  assert "holds another run (gmm_params.json); pass --overwrite" in done.stderr


def test_usage_version_and_help_with_defaults(capsys):
  assert main([]) == 2                   # one error line: the commands and the usage synopsis
  err = capsys.readouterr().err
  assert err.startswith("tfp-em: error: one of demo, fit, report or verify is required; usage: "
                        "tfp-em [-h] [--version] COMMAND ...") and len(err.splitlines()) == 1
  assert main(["fit"]) == 2 and "fit: gmm is required; usage: tfp-em fit" in capsys.readouterr().err
  assert main(["--version"]) == 0
  assert capsys.readouterr().out.strip() == f"tfp-em {tfp_em.__version__}"
  assert main(["fit", "gmm", "--help"]) == 0
  text = " ".join(capsys.readouterr().out.split())
  for option, default in [("--covariance", "full"), ("--n-init", "3"), ("--max-iter", "500"),
                          ("--seed", "0"), ("--out", "tfp_em_fit"), ("--checkpoint-every", "10")]:
    assert re.search(re.escape(option) + r"\b.*?\(default: " + re.escape(default) + r"\)", text)
  parser = build_parser()
  for action in _all_actions(parser):
    assert action.help, f"{action.option_strings or action.dest} has no help text"


def _all_actions(parser):
  for action in parser._actions:  # noqa: SLF001 - argparse has no public list of options
    if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
      for sub in action.choices.values():
        yield from _all_actions(sub)
    elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):  # noqa: SLF001
      yield action


def test_output_folder_checks(tmp_path):
  out = tmp_path / "run"
  assert preflight.output_folder(out, FIT_WRITES) == str(out)   # not there yet: fine
  out.mkdir()
  (out / "notes.txt").write_text("mine")
  preflight.output_folder(out, FIT_WRITES)                       # unrelated files: fine
  (out / "checkpoint").mkdir()
  with pytest.raises(ValueError, match="holds another run"):
    preflight.output_folder(out, FIT_WRITES)
  preflight.output_folder(out, FIT_WRITES, keep=("checkpoint",))  # --resume
  preflight.output_folder(out, FIT_WRITES, overwrite=True)


def test_atomic_json_write_leaves_no_partial_file(tmp_path):
  target = tmp_path / "x.json"
  with pytest.raises(TypeError):
    outputs.write_json(target, {"bad": object()})
  assert not target.exists() and not list(tmp_path.iterdir())
  outputs.write_json(target, {"a": np.arange(3)})
  assert json.loads(target.read_text()) == {"a": [0, 1, 2]}
