"""Checkpoint and resume: an interrupted fit resumes to the uninterrupted result."""
import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import tensorflow as tf

from tfp_em.engine import fit_em
from tfp_em.engine.checkpoint import CheckpointMismatchError, describe_changes, fingerprint
from tfp_em.mixture.em import GaussianMixtureEM, MixtureData
from tfp_em.mixture.initialization import initial_responsibilities


class Interrupt(Exception):
  pass


@pytest.fixture
def problem():
  rng = np.random.default_rng(0)
  x = np.concatenate([rng.normal(0, 1, (300, 2)), rng.normal(1.0, 1, (300, 2))])
  model = GaussianMixtureEM(
      2, "full", init=lambda xx, w, s: initial_responsibilities("kmeans++", xx, w, 2, s))
  return model, MixtureData(tf.constant(x), tf.ones(len(x), tf.float64))


def _fit(model, data, **kw):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return fit_em(model, data, n_init=3, max_iter=30, tol=0.0, seed=3, **kw)


def _stop_at(restart, iteration):
  def callback(r, it, params, ll):
    if (r, it) == (restart, iteration):
      raise Interrupt()
  return callback


@pytest.mark.parametrize("keep_trajectory", [True, False])
@pytest.mark.parametrize("stop", [(0, 7), (1, 12), (2, 29)])
def test_interrupted_fit_resumes_to_same_result(problem, tmp_path, keep_trajectory, stop):
  model, data = problem
  ref = _fit(model, data, keep_trajectory=keep_trajectory)
  with pytest.raises(Interrupt):
    _fit(model, data, keep_trajectory=keep_trajectory, checkpoint_dir=tmp_path,
         checkpoint_every=4, callback=_stop_at(*stop))
  assert os.path.exists(tmp_path / "latest.json")
  res = _fit(model, data, keep_trajectory=keep_trajectory, checkpoint_dir=tmp_path,
             checkpoint_every=4, resume=True)
  for a, b in zip(res.params, ref.params):
    np.testing.assert_array_equal(a, b)
  assert res.log_likelihood == ref.log_likelihood
  for ta, tb in zip(res.restarts, ref.restarts):
    np.testing.assert_array_equal(ta.log_likelihood, tb.log_likelihood)
    assert ta.seed == tb.seed and len(ta.params) == len(tb.params)
    for pa, pb in zip(ta.params, tb.params):
      for a, b in zip(pa, pb):
        np.testing.assert_array_equal(a, b)


def test_resume_without_checkpoint_starts_afresh(problem, tmp_path):
  model, data = problem
  ref = _fit(model, data)
  res = _fit(model, data, checkpoint_dir=tmp_path / "new", resume=True)
  assert res.log_likelihood == ref.log_likelihood


def test_checkpoint_of_another_fit_is_refused(problem, tmp_path):
  model, data = problem
  _fit(model, data, checkpoint_dir=tmp_path)
  with pytest.raises(ValueError, match="another fit"):
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      fit_em(model, data, n_init=2, max_iter=30, tol=0.0, seed=3, checkpoint_dir=tmp_path,
             resume=True)


def _folder_state(folder):
  """{relative path: (size, mtime, bytes)} of every file under `folder`."""
  return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes())
          for p in sorted(folder.rglob("*")) if p.is_file()}


def _model(k=2, covariance_type="full"):
  return GaussianMixtureEM(
      k, covariance_type,
      init=lambda xx, w, s: initial_responsibilities("kmeans++", xx, w, k, s))


def _data(x):
  return MixtureData(tf.constant(x), tf.ones(len(x), x.dtype))


@pytest.mark.parametrize("change,match", [
    (dict(k=3), "n_components 2 -> 3"),
    (dict(covariance_type="diag"), "covariance_type 'full' -> 'diag'"),
    (dict(columns=[0]), r"data x shape \(600, 2\) -> \(600, 1\)"),
    (dict(shift=3.0), r"data x values changed \(column sums differ in column\(s\) \[0, 1\]"),
    (dict(reorder=True), "data x values changed \\(a sample of rows differs"),
    (dict(dtype=np.float32), "data x dtype float64 -> float32"),
    (dict(seed=4), "seed 3 -> 4"),
    (dict(max_iter=40), "max_iter 30 -> 40"),
])
def test_resume_of_another_fit_names_the_change_and_writes_nothing(problem, tmp_path, change,
                                                                   match):
  _, data = problem
  x = data.x.numpy()
  with pytest.raises(Interrupt):
    _fit(_model(), data, checkpoint_dir=tmp_path, checkpoint_every=2, callback=_stop_at(0, 5))
  before = _folder_state(tmp_path)
  x = x[:, change.get("columns", [0, 1])] + change.get("shift", 0.0)
  x = (x[::-1] if change.get("reorder") else x).astype(change.get("dtype", np.float64))
  model = _model(change.get("k", 2), change.get("covariance_type", "full"))
  with warnings.catch_warnings(), pytest.raises(CheckpointMismatchError, match=match) as e:
    warnings.simplefilter("ignore")
    fit_em(model, _data(x), n_init=3, max_iter=change.get("max_iter", 30), tol=0.0,
           seed=change.get("seed", 3), checkpoint_dir=tmp_path, resume=True)
  assert "belongs to another fit" in str(e.value) and isinstance(e.value, ValueError)
  assert _folder_state(tmp_path) == before  # nothing written, nothing removed


def test_a_complete_fit_is_returned_without_fitting_again(problem, tmp_path):
  model, data = problem
  first = _fit(model, data, checkpoint_dir=tmp_path, checkpoint_every=4)
  assert json.loads((tmp_path / "latest.json").read_text())["complete"] is True
  before = _folder_state(tmp_path)

  def no_iterations(*args):
    raise AssertionError("a complete fit was fitted again")

  again = _fit(model, data, checkpoint_dir=tmp_path, resume=True, callback=no_iterations)
  assert again.log_likelihood == first.log_likelihood and again.n_iter == first.n_iter
  assert again.num_observations == first.num_observations
  for a, b in zip(again.params, first.params):
    np.testing.assert_array_equal(a, b)
  assert _folder_state(tmp_path) == before
  with pytest.raises(CheckpointMismatchError, match="data x values changed"):
    _fit(model, _data(data.x.numpy() + 3.0), checkpoint_dir=tmp_path, resume=True)


def test_fingerprint_parts(problem):
  model, data = problem
  settings = dict(seed=0, init_params=None)
  a = fingerprint(model, data, settings)
  assert a == fingerprint(model, data, dict(settings))  # deterministic
  assert a["config"]["n_components"] == 2 and a["model"].endswith("GaussianMixtureEM")
  assert a["data"]["x"]["shape"] == [600, 2] and a["data"]["weights"]["dtype"] == "float64"
  np.testing.assert_allclose(a["data"]["x"]["column_sums"], data.x.numpy().sum(0), rtol=1e-11)
  assert describe_changes(a, a) == []
  # 3000 rows: every 3rd is sampled. An edit in a skipped row changes the sums only.
  x = np.random.default_rng(1).normal(size=(3000, 2))
  base = fingerprint(model, _data(x), settings)
  edited = x.copy()
  edited[1, 0] += 1.0
  b = fingerprint(model, _data(edited), settings)
  assert b["data"]["x"]["sample"] == base["data"]["x"]["sample"]
  assert describe_changes(base, b) == [
      "data x values changed (column sums differ in column(s) [0]: other columns, shifted or "
      "edited data?)"]
  swapped = x.copy()
  swapped[[0, 1]] = swapped[[1, 0]]  # same sums, a sampled row differs
  assert describe_changes(base, fingerprint(model, _data(swapped), settings)) == [
      "data x values changed (a sample of rows differs: rows edited or reordered?)"]
  c = fingerprint(model, data, dict(settings, init_params=data))
  assert describe_changes(a, c)[0].startswith("init_params None -> [")
  assert describe_changes(dict(a, format=1), a) == [
      "the checkpoint was written by another version of tfp_em"]


@pytest.mark.parametrize("kwargs,match", [(dict(resume=True), "checkpoint_dir"),
                                          (dict(checkpoint_dir="{tmp}", checkpoint_every=0),
                                           "checkpoint_every")])
def test_bad_checkpoint_options(problem, tmp_path, kwargs, match):
  model, data = problem
  kwargs = {k: (v.format(tmp=tmp_path) if isinstance(v, str) else v) for k, v in kwargs.items()}
  with pytest.raises(ValueError, match=match):
    fit_em(model, data, **kwargs)


@pytest.mark.slow
def test_sigkilled_cli_fit_resumes_to_uninterrupted_result(tmp_path, capsys):
  """SIGKILL mid-fit; resumes of another fit (K, covariance, columns, shifted data) are
  refused by name and write nothing; the real resume equals the uninterrupted fit; a
  resume of the finished fit reports it and rewrites nothing."""
  from tfp_em.cli.main import main
  rng = np.random.default_rng(1)
  x = np.concatenate([rng.normal(0, 1, (60000, 3)), rng.normal(0.6, 1, (60000, 3))])
  csv = tmp_path / "data.csv"
  np.savetxt(csv, x, delimiter=",", header="a,b,c", comments="", fmt="%.17g")
  shifted = tmp_path / "shifted.csv"
  np.savetxt(shifted, x + 3.0, delimiter=",", header="a,b,c", comments="", fmt="%.17g")
  args = ["fit", "gmm", "--data", str(csv), "--columns", "a", "b", "--components", "2",
          "--n-init", "1", "--max-iter", "300", "--checkpoint-every", "1", "--quiet"]
  base = [sys.executable, "-m", "tfp_em.cli"] + args
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  whole = subprocess.run(base + ["--out", str(tmp_path / "whole")], env=env,
                         capture_output=True, text=True, timeout=600)
  assert whole.returncode == 0, whole.stderr[-2000:]

  out = tmp_path / "killed"
  proc = subprocess.Popen(base + ["--out", str(out)], env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  latest = out / "checkpoint" / "latest.json"
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if latest.exists() and int(json.loads(latest.read_text())["prefix"].rsplit("-", 1)[1]) >= 5:
      break  # a few iterations in, far from the end
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  assert proc.wait() == -signal.SIGKILL
  assert not (out / "gmm_params.json").exists()  # killed before the end: nothing partial

  killed = _folder_state(out)
  capsys.readouterr()
  for changed, named in [
      (("--components", "3"), "n_components 2 -> 3"),
      (("--covariance", "diag"), "covariance_type 'full' -> 'diag'"),
      (("--columns", "a", "c"), r"data x values changed \(column sums differ in column\(s\) \[1\]"),
      (("--columns", "a", "b", "c"), r"data x shape \(120000, 2\) -> \(120000, 3\)"),
      (("--data", str(shifted)), r"data x values changed \(column sums differ in column\(s\) "
                                 r"\[0, 1\]")]:
    argv = _replaced(args, changed[0], changed[1:])
    assert main(argv + ["--out", str(out), "--resume"]) == 2, changed
    err = capsys.readouterr().err
    assert err.startswith("tfp-em: error: --resume: the checkpoint in ") and \
        len(err.splitlines()) == 1, err
    assert re.search(named, err), err
    assert "pass --overwrite without --resume to start over" in err
    assert _folder_state(out) == killed, changed  # nothing written: the checkpoint intact

  resumed = subprocess.run(base + ["--out", str(out), "--resume"], env=env,
                           capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  a = json.loads((tmp_path / "whole" / "gmm_params.json").read_text())
  b = json.loads((out / "gmm_params.json").read_text())
  for key in ("weights", "means", "covariances", "log_likelihood"):
    np.testing.assert_allclose(b[key], a[key], rtol=1e-12, atol=0, err_msg=key)

  finished = _folder_state(out)
  assert main(args + ["--out", str(out), "--resume"]) == 0
  assert "holds this fit, finished earlier" in capsys.readouterr().out
  assert _folder_state(out) == finished  # reported, not refitted or rewritten
  assert main(args + ["--out", str(out), "--resume", "--components", "3"]) == 2
  assert "n_components 2 -> 3" in capsys.readouterr().err
  assert _folder_state(out) == finished


def _replaced(args, flag, values):
  """`args` with `flag`'s values (all up to the next option) replaced, or `flag` added."""
  if flag not in args:
    return args + [flag, *values]
  at = args.index(flag)
  end = next((i for i in range(at + 1, len(args)) if args[i].startswith("--")), len(args))
  return args[:at] + [flag, *values] + args[end:]
