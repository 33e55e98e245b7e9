"""TensorFlow's C++ start-up logs stay off a library user's stderr (`tfp_em.tensorflow_logs`),
unless the user set TF_CPP_MIN_LOG_LEVEL; Python's logging is left alone."""
import os
import subprocess
import sys

import pytest

from tfp_em.tensorflow_logs import startup_severity

FIT = """
import logging, os, sys
import numpy as np
import tfp_em
assert "tensorflow" not in sys.modules          # import tfp_em does not load TensorFlow
from tfp_em.mixture.estimator import GaussianMixture
x = np.random.default_rng(0).normal(size=(100, 2))
GaussianMixture(2, max_iter=5, tol=0.1, seed=0).fit(x)
assert not logging.root.handlers and logging.root.level == logging.WARNING
logging.warning("the user's own log line")
print(os.environ["TF_CPP_MIN_LOG_LEVEL"])
"""


def _run(code, **env):
  environment = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  environment.update(env, PYTHONWARNINGS="ignore")
  return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        env=environment, timeout=300)


def test_startup_lines_and_their_severity():
  assert startup_severity("I0000 00:00:1796537772.988153   28481 port.cc:153] oneDNN custom "
                          "operations are on.\n") == 0
  assert startup_severity("W0000 00:00:1735.12 7 x.cc:47] a warning") == 1
  assert startup_severity("E0000 00:00:1735.12 7 cuda_fft.cc:477] Unable to register cuFFT "
                          "factory: ...") == 2
  assert startup_severity("WARNING: All log messages before absl::InitializeLog() is called "
                          "are written to STDERR") == 0
  assert startup_severity("2024-03-01 10:00:00.123456: W tensorflow/core/util/port.cc:113] x") == 1
  assert startup_severity("WARNING:root:the user's own log line") is None
  assert startup_severity("F0000 00:00:1.1 1 x.cc:1] a fatal error stays") is None
  assert startup_severity("Traceback (most recent call last):") is None


def test_import_and_fit_print_nothing_from_tensorflow():
  done = _run(FIT)
  assert done.returncode == 0, done.stderr
  assert done.stdout.strip() == "3"                 # set for the user who set nothing
  lines = done.stderr.splitlines()
  assert lines == ["WARNING:root:the user's own log line"], lines


@pytest.mark.slow
def test_a_user_setting_is_kept():
  done = _run("import os, tfp_em, tensorflow\nprint(os.environ['TF_CPP_MIN_LOG_LEVEL'])",
              TF_CPP_MIN_LOG_LEVEL="0")
  assert done.returncode == 0, done.stderr
  assert done.stdout.strip() == "0"
  # TensorFlow 2.21 writes its start-up (info) lines whatever the level: level 0 shows them
  assert any(startup_severity(line) == 0 for line in done.stderr.splitlines()), done.stderr
