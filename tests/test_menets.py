"""MeNets' Gamma(X) random effects and the exact variance refit of network fits."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from models import mixed_effects as me
from tfp_em.mixed_effects.estimator import MixedEffectsRegressor
from tfp_em.mixed_effects.networks import independent_columns, variances_given_network
from tfp_em.mixed_effects.training import Network


def _small_net(p=3, hidden=6, seed=0):
  init = keras.initializers.GlorotUniform(seed=seed)
  return keras.Sequential([keras.Input((p,)),
                           keras.layers.Dense(hidden, activation="tanh", kernel_initializer=init),
                           keras.layers.Dense(1, kernel_initializer=init)])


def _clustered(n=600, num_clusters=30, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.uniform(-1, 1, (n, 3))
  cluster = rng.integers(0, num_clusters, n)
  y = (np.sin(2 * x[:, 0]) + rng.normal(0, 1., num_clusters)[cluster]
       + rng.normal(0, .5, num_clusters)[cluster] * x[:, 0] + 0.3 * rng.normal(size=n))
  data = me.MixedEffectsData(x=tf.constant(x), y=tf.constant(y), z=tf.zeros([n, 0], tf.float64),
                             cluster=tf.constant(cluster, tf.int32),
                             num_clusters=tf.constant(num_clusters, tf.int32))
  return x, y, cluster, data


def test_independent_columns_drop_zero_and_collinear_columns():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(50, 2))
  z = np.column_stack([np.ones(50), a[:, 0], np.zeros(50), 3. * np.ones(50), a[:, 1],
                       a[:, 0] - 2 * a[:, 1]])
  kept = independent_columns(z)
  assert len(kept) == 3 == np.linalg.matrix_rank(z)
  assert np.linalg.matrix_rank(z[:, kept]) == 3 and 2 not in kept


def test_menets_design_starts_with_the_constant_column():
  net = Network(_small_net(), features=True, dtype="float64")
  x = np.random.default_rng(1).normal(size=(20, 3))
  f, hidden = net(x)
  z = np.asarray(net.design(hidden, None))
  assert z.shape == (20, 7)
  np.testing.assert_array_equal(z[:, 0], 1.)
  np.testing.assert_allclose(z[:, 1:], np.asarray(hidden))


@pytest.mark.parametrize("features", [False, True])
def test_variance_refit_never_lowers_l_and_reports_the_shifted_networks_l(features):
  x, _, _, data = _clustered()
  if not features:
    data = data._replace(z=tf.ones([data.y.shape[0], 1], tf.float64))
  net = Network(_small_net(), features=features, dtype="float64")
  first, l_first = variances_given_network(net, data, "full", seed=0, max_iter=20, tol=0.)
  again, l_again = variances_given_network(net, data, "full", seed=0, max_iter=20, tol=0.,
                                           start=first)
  assert l_again >= l_first - 1e-7 * abs(l_first)  # up to the float32 rounding of the shift
  # l is the exact marginal of the shifted network with the returned params.
  f, hidden = net(data.x)
  post = me.cluster_posterior(
      me.covariance_matrix(again.covariance, "full"), again.noise_variance,
      me.cluster_stats(net.design(hidden, data.z), data.y - f, data.cluster, data.num_clusters))
  assert float(tf.reduce_sum(post.log_prob)) == pytest.approx(l_again, rel=1e-10)
  assert again.beta.shape == (0,)


def test_network_fit_returns_the_ml_variances_given_its_network():
  x, y, cluster, _ = _clustered(seed=2)
  est = MixedEffectsRegressor(f=_small_net(), max_iter=5, batch_size=64, learning_rate=1e-2,
                              seed=0).fit(x, y, cluster)
  hist = est.history_
  assert est.log_likelihood_ >= hist["log_likelihood"][hist["best_iteration"]] * (1 + 1e-7)
  data = me.MixedEffectsData(x=tf.constant(x), y=tf.constant(y),
                             z=tf.ones([len(y), 1], tf.float64),
                             cluster=tf.constant(np.searchsorted(est.cluster_labels_, cluster),
                                                 tf.int32),
                             num_clusters=tf.constant(len(est.cluster_labels_), tf.int32))
  _, l_again = variances_given_network(est.network_, data, "full", seed=0, max_iter=1,
                                       tol=0., start=est.params_)
  assert l_again == pytest.approx(est.log_likelihood_, rel=1e-6)  # one more step: ~ converged


def _random_slope_simulation(seed=0):
  """The simulation of issue #22: a random intercept and a random slope on x0."""
  rng = np.random.default_rng(seed)
  num_clusters, n_per = 200, 25
  g = np.repeat(np.arange(num_clusters), n_per)
  x = rng.normal(size=(g.size, 5))
  f = np.sin(x[:, 0]) * 2 + x[:, 1] ** 2 - x[:, 2]
  b0, b1 = rng.normal(0, 1., num_clusters), rng.normal(0, .5, num_clusters)
  y = f + b0[g] + b1[g] * x[:, 0] + rng.normal(0, .5, g.size)
  idx = rng.permutation(g.size)
  return x, y, g, idx[:4000], idx[4000:]


@pytest.mark.slow
def test_menets_beats_random_intercepts_when_clusters_have_random_slopes():
  x, y, g, tr, te = _random_slope_simulation()
  mse = {}
  for design in ("intercept", "features"):
    est = MixedEffectsRegressor(random_effects=design, f="mlp", seed=0).fit(x[tr], y[tr], g[tr])
    mse[design] = np.mean((est.predict(x[te], g[te]) - y[te]) ** 2)
  assert mse["features"] < 0.45 < mse["intercept"]
