"""Checkpoint and resume: an interrupted fit resumes to the uninterrupted result."""
import json
import os
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import tensorflow as tf

from tfp_em.engine import fit_em
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


@pytest.mark.parametrize("kwargs,match", [(dict(resume=True), "checkpoint_dir"),
                                          (dict(checkpoint_dir="{tmp}", checkpoint_every=0),
                                           "checkpoint_every")])
def test_bad_checkpoint_options(problem, tmp_path, kwargs, match):
  model, data = problem
  kwargs = {k: (v.format(tmp=tmp_path) if isinstance(v, str) else v) for k, v in kwargs.items()}
  with pytest.raises(ValueError, match=match):
    fit_em(model, data, **kwargs)


@pytest.mark.slow
def test_sigkilled_cli_fit_resumes_to_uninterrupted_result(tmp_path):
  rng = np.random.default_rng(1)
  x = np.concatenate([rng.normal(0, 1, (60000, 2)), rng.normal(0.6, 1, (60000, 2))])
  csv = tmp_path / "data.csv"
  np.savetxt(csv, x, delimiter=",", header="a,b", comments="", fmt="%.17g")
  base = [sys.executable, "-m", "tfp_em.cli", "fit", "gmm", "--data", str(csv),
          "--components", "2", "--n-init", "1", "--max-iter", "300", "--checkpoint-every", "1"]
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

  resumed = subprocess.run(base + ["--out", str(out), "--resume"], env=env,
                           capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  a = json.loads((tmp_path / "whole" / "gmm_params.json").read_text())
  b = json.loads((out / "gmm_params.json").read_text())
  for key in ("weights", "means", "covariances", "log_likelihood"):
    np.testing.assert_allclose(b[key], a[key], rtol=1e-12, atol=0, err_msg=key)
