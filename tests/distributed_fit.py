"""Fits a fixed mixture problem under a tf.distribute strategy; run as a subprocess.

    python tests/distributed_fit.py mirrored OUT.json
    python tests/distributed_fit.py multiworker OUT.json   (TF_CONFIG set by the caller)
    python tests/distributed_fit.py single OUT.json
"""
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def problem():
  rng = np.random.default_rng(7)
  x = np.concatenate([rng.normal(0, 1, (400, 2)), rng.normal(2.0, 0.7, (300, 2))])
  init = dict(weights_init=np.array([0.5, 0.5]), means_init=x[[0, 500]],
              precisions_init=np.stack([np.eye(2)] * 2))
  return x, init


def fit(strategy):
  from tfp_em import GaussianMixture
  x, init = problem()
  est = GaussianMixture(2, tol=0.0, max_iter=30, **init).fit(x, strategy=strategy)
  return dict(means=est.means_.tolist(), covariances=est.covariances_.tolist(),
              weights=est.weights_.tolist(), log_likelihood=est.log_likelihood_)


def main(mode, out):
  if mode == "mirrored":
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
  elif mode == "multiworker":
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
  else:
    strategy = None
  result = fit(strategy)
  result["replicas"] = 1 if strategy is None else strategy.num_replicas_in_sync
  with open(out, "w") as f:
    json.dump(result, f)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
