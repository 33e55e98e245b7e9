"""Fits a fixed problem under a tf.distribute strategy; run as a subprocess.

    python tests/distributed_fit.py mirrored OUT.json [gmm|lmm]
    python tests/distributed_fit.py multiworker OUT.json [gmm|lmm]  (TF_CONFIG set by the caller)
    python tests/distributed_fit.py single OUT.json [gmm|lmm]

gmm: a two-component mixture; lmm: `MixedEffectsRegressor` with a random intercept and
slope (PX-EM), whose replicas each get whole clusters.
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


def fit_gmm(strategy):
  from tfp_em import GaussianMixture
  x, init = problem()
  est = GaussianMixture(2, tol=0.0, max_iter=30, **init).fit(x, strategy=strategy)
  return dict(means=est.means_.tolist(), covariances=est.covariances_.tolist(),
              weights=est.weights_.tolist(), log_likelihood=est.log_likelihood_)


def lmm_arrays():
  """101 clusters of 1-8 rows (an odd count, so the shards differ in size)."""
  rng = np.random.default_rng(11)
  sizes = rng.integers(1, 9, 101)
  cluster = np.repeat(np.arange(101), sizes)
  rng.shuffle(cluster)
  t = rng.uniform(0, 2, cluster.size)
  x = np.column_stack([t, rng.normal(size=t.size)])
  u = rng.normal(size=(101, 2)) * [1.0, 0.4]
  y = 1. + x @ [0.5, -1.] + u[cluster, 0] + u[cluster, 1] * t + 0.3 * rng.normal(size=t.size)
  return x, y, cluster, t


def lmm_problem():
  """`lmm_arrays` as MixedEffectsData: x = [1, t, x2], z = [1, t]."""
  from models import mixed_effects as me
  x, y, cluster, t = lmm_arrays()
  return me.MixedEffectsData(tf.constant(np.column_stack([np.ones_like(t), x])), tf.constant(y),
                             tf.constant(me.polynomial_design(t, 1)),
                             tf.constant(cluster, tf.int32), tf.constant(101, tf.int32))


def fit_lmm(strategy):
  # 15 iterations: l still rises by ~1e-5 per step; at tol=0 a run stops when l
  # stalls at round-off, whose iteration differs with the summation order.
  from tfp_em import MixedEffectsRegressor
  x, y, cluster, t = lmm_arrays()
  est = MixedEffectsRegressor("slopes", degree=1, max_iter=15, tol=0.).fit(
      x, y, cluster, time=t, strategy=strategy)
  return dict(coef=np.r_[est.intercept_, est.coef_].tolist(),
              covariance=est.cov_random_effects_.tolist(), noise_variance=est.sigma2_,
              blups=est.random_effects_mean_.tolist(), log_likelihood=est.log_likelihood_)


def fit(strategy, problem_name="gmm"):
  return {"gmm": fit_gmm, "lmm": fit_lmm}[problem_name](strategy)


def main(mode, out, problem_name="gmm"):
  if mode == "mirrored":
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
  elif mode == "multiworker":
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
  else:
    strategy = None
  result = fit(strategy, problem_name)
  result["replicas"] = 1 if strategy is None else strategy.num_replicas_in_sync
  with open(out, "w") as f:
    json.dump(result, f)


if __name__ == "__main__":
  main(*sys.argv[1:4])
