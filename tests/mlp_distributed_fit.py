"""Fits the summed-statistics Bernoulli MLP under a strategy; run as a subprocess.

    python tests/mlp_distributed_fit.py mirrored OUT.json   (two logical CPUs)
    python tests/mlp_distributed_fit.py single OUT.json
    python tests/mlp_distributed_fit.py mirrored OUT.json estimator   (BernoulliMLPClassifier)

Writes the final weights and log-likelihood as JSON.
"""
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

MAX_ITER = 12


def problem():
  """301 points (odd: the replicas' shards differ in size), 3 inputs, 3 classes."""
  rng = np.random.default_rng(3)
  x = rng.normal(size=(301, 3))
  y = (np.argmax(x @ rng.normal(size=(3, 3)) + 0.5 * rng.normal(size=(301, 3)), 1))
  return tf.constant(x), tf.constant(y.astype(np.int32))


def fit(strategy):
  from tfp_em.bernoulli_mlp.summed import BernoulliMLPSummedEM
  from tfp_em.engine import fit_em
  result = fit_em(BernoulliMLPSummedEM(3, 3, l2=0.1, total_rows=301), problem(), max_iter=MAX_ITER, tol=0.,
                  strategy=strategy, progress=False)
  return dict(hidden_weights=np.asarray(result.params.hidden_weights).tolist(),
              output_weights=np.asarray(result.params.output_weights).tolist(),
              log_likelihood=result.log_likelihood, n_iter=result.n_iter)


def fit_estimator(strategy):
  """The estimator's fit (summed M-step, l2 = 0.1) on the unstandardized problem."""
  from tfp_em.bernoulli_mlp.estimator import BernoulliMLPClassifier
  x, y = problem()
  est = BernoulliMLPClassifier(n_hidden=3, l2=0.1, max_iter=MAX_ITER, tol=0., m_step="summed")
  est.fit(x.numpy() * 3. + 1., y.numpy(), strategy=strategy)
  return dict(hidden_weights=est.params_.hidden_weights.tolist(),
              output_weights=est.params_.output_weights.tolist(),
              log_likelihood=est.objective_, n_iter=est.n_iter_, m_step=est.m_step_)


def main(mode, out, what="model"):
  strategy = None
  if mode == "mirrored":
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
  result = (fit_estimator if what == "estimator" else fit)(strategy)
  result["replicas"] = 1 if strategy is None else strategy.num_replicas_in_sync
  with open(out, "w") as f:
    json.dump(result, f)


if __name__ == "__main__":
  main(*sys.argv[1:4])
