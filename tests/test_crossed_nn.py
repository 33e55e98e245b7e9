"""A network f with crossed random intercepts: batch NLL against the dense TFP MVN,
Fisher identity, EM monotonicity with a linear layer, recovery, prediction, bad input."""
import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

from models import crossed_effects as ce
from tfp_em.mixed_effects import crossed_networks as cn
from tfp_em.mixed_effects import crossed_posterior as cp
from tfp_em.mixed_effects.estimator import MixedEffectsRegressor
from tfp_em.mixed_effects.training import Network

tfd = tfp.distributions


def _simulate(seed=0, n=400, num_levels=(12, 9), variances=(1., 0.5), noise=0.3, p=2):
  """Nonlinear f, two crossed factors; returns X, y, codes [n, K], f(X)."""
  rng = np.random.default_rng(seed)
  X = rng.uniform(-1., 1., (n, p))
  f = np.sin(2. * X[:, 0]) + X[:, 1] ** 2
  codes = np.stack([rng.integers(0, q, n) for q in num_levels], 1)
  y = f + noise * rng.normal(size=n)
  for k, (q, v) in enumerate(zip(num_levels, variances)):
    y += np.sqrt(v) * rng.normal(size=q)[codes[:, k]]
  return X, y, codes, f


def _dense_mvn(loc, codes, variances, noise_variance):
  data = ce.CrossedData(tf.zeros([len(loc), 0], loc.dtype), tf.zeros_like(loc),
                        tf.constant(codes, tf.int32), tf.constant(codes.max(0) + 1, tf.int32))
  params = ce.CrossedParams(tf.zeros([0], loc.dtype), variances, noise_variance)
  mvn = ce.dense_marginal(params, data)
  return tfd.MultivariateNormalFullCovariance(loc, mvn.covariance())


@pytest.mark.parametrize("dtype", [tf.float64, tf.float32])
def test_batch_log_prob_equals_dense_mvn(dtype):
  X, y, codes, f = _simulate(1, n=15, num_levels=(4, 3))
  variances, noise = tf.constant([0.7, 1.3], dtype), tf.constant(0.4, dtype)
  y_, f_ = tf.constant(y, dtype), tf.constant(f, dtype)
  got = cn.batch_log_prob(y_ - f_, tf.constant(codes), variances, noise)
  want = _dense_mvn(f_, codes, variances, noise).log_prob(y_)
  assert got.dtype == dtype
  np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-10 if dtype == tf.float64 else 1e-5)
  # a relabelling of the levels (the batch uses global codes) changes nothing
  shifted = cn.batch_log_prob(y_ - f_, tf.constant(codes * 7 + 100), variances, noise)
  np.testing.assert_allclose(shifted.numpy(), got.numpy(), rtol=1e-12)


def test_batch_gradients_equal_dense_mvn_autodiff():
  X, y, codes, f = _simulate(2, n=14, num_levels=(5, 4))
  f_ = tf.constant(f)
  log_var, log_noise = tf.Variable(np.log([0.6, 1.1])), tf.Variable(np.log(0.5))
  with tf.GradientTape(persistent=True) as tape:
    tape.watch(f_)
    got = cn.batch_log_prob(y - f_, tf.constant(codes), tf.exp(log_var), tf.exp(log_noise))
    want = _dense_mvn(f_, codes, tf.exp(log_var), tf.exp(log_noise)).log_prob(y)
  for a, b in zip(tape.gradient(got, [f_, log_var, log_noise]),
                  tape.gradient(want, [f_, log_var, log_noise])):
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-9)
  assert np.all(np.abs(tape.gradient(got, f_).numpy()) > 0)


def test_fisher_identity_for_f_outputs():
  """d log p(y) / d f = (y - f - Z m) / sigma^2 with m from the sparse crossed posterior."""
  X, y, codes, f = _simulate(3, n=40, num_levels=(6, 5))
  num_levels = codes.max(0) + 1
  variances, noise = np.array([0.8, 0.4]), 0.3
  f_ = tf.constant(f)
  with tf.GradientTape() as tape:
    tape.watch(f_)
    lp = _dense_mvn(f_, codes, tf.constant(variances), tf.constant(noise, tf.float64)).log_prob(y)
  z = cp.design_matrix(codes, num_levels)
  post = cp.posterior(np.zeros((40, 0)), y - f, z, (z.T @ z).tocsr(), num_levels, np.zeros(0),
                      variances, noise)
  np.testing.assert_allclose(tape.gradient(lp, f_).numpy(), (y - f - z @ post.mean) / noise,
                             rtol=1e-8)
  assert post.log_prob == pytest.approx(float(lp), rel=1e-10)


def _linear_net(seed=0):
  model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(
      1, kernel_initializer=keras.initializers.Zeros())])
  return Network(model, features=False, dtype=tf.float64)


def _net_data(X, y, codes):
  return cn.CrossedNetData(X, y, codes, codes.max(0) + 1)


def test_em_exact_loglik_monotone_with_linear_f():
  """Full-batch Adam steps on a linear f far from its optimum are GEM steps: l never drops."""
  rng = np.random.default_rng(4)
  X, _, codes, _ = _simulate(4, n=300)
  y = 3. * X[:, 0] - 2. * X[:, 1] + rng.normal(size=12)[codes[:, 0]] + 0.5 * rng.normal(size=300)
  net = _linear_net()
  train = _net_data(X, y, codes)
  init = cn.initial_params(net, train, seed=0, max_dense=cp.MAX_DENSE)
  fit = cn.fit_crossed_network_em(net, train, None, init, max_iter=25, epochs_per_step=1,
                                  batch_size=300, learning_rate=1e-2, patience=100, seed=0)
  trace = fit.trace
  assert len(trace) == 26 and np.all(np.isfinite(trace))
  assert np.all(np.diff(trace) >= -1e-9 * np.abs(trace[1:]))
  assert trace[-1] > trace[0] + 10.
  np.testing.assert_allclose(fit.val_nll, -trace / 300., rtol=1e-12)


def test_loglik_and_blups_are_exact_at_returned_params():
  X, y, codes, _ = _simulate(5, n=200)
  est = MixedEffectsRegressor(f="mlp", hidden_units=(8,), dropout=0., method="nll", max_iter=3,
                              batch_size=50).fit(X, y, [codes[:, 0], codes[:, 1]])
  f = est.network_(tf.constant(X))[0]
  mvn = _dense_mvn(f, codes, tf.constant(est.variances_), tf.constant(est.sigma2_, tf.float64))
  assert est.log_likelihood_ == pytest.approx(float(mvn.log_prob(y)), rel=1e-10)
  assert est.fit_result_.log_likelihood == pytest.approx(est.log_likelihood_, rel=1e-12)
  data = ce.CrossedData(tf.zeros([200, 0], tf.float64), tf.constant(y - f.numpy()),
                        tf.constant(codes, tf.int32), tf.constant(codes.max(0) + 1, tf.int32))
  params = ce.CrossedParams(tf.zeros([0], tf.float64), tf.constant(est.variances_),
                            tf.constant(est.sigma2_, tf.float64))
  mean, cov = ce.dense_posterior(params, data)
  np.testing.assert_allclose(np.concatenate(est.crossed_.blups_), mean.numpy(), atol=1e-9)
  # predictive variance of row i (both levels seen): w_i^T Cov[u | y] w_i + sigma^2
  weights = np.zeros((5, cov.shape[0]))
  weights[np.arange(5), codes[:5, 0]] = 1.
  weights[np.arange(5), codes[:5, 1] + codes[:, 0].max() + 1] = 1.
  want = np.einsum("nq,qr,nr->n", weights, cov.numpy(), weights) + est.sigma2_
  lower, upper = est.predict_interval(X[:5], [codes[:5, 0], codes[:5, 1]]).T
  np.testing.assert_allclose(((upper - lower) / (2. * 1.959963984540054)) ** 2, want, rtol=1e-8)
  assert est.history_["best_iteration"] <= 3 and len(est.history_["log_likelihood"]) == 4


@pytest.mark.parametrize("method", ["em", "nll"])
def test_predict_rule_and_validation_with_unseen_levels(method):
  X, y, codes, _ = _simulate(6, n=300)
  labels = [np.array([f"a{c}" for c in codes[:, 0]]), codes[:, 1]]
  tr, va = np.arange(240), np.arange(240, 300)
  val_labels = [labels[0][va].copy(), labels[1][va] + 100]   # factor 1 all unseen
  val_labels[0][:5] = "new"
  est = MixedEffectsRegressor(f="mlp", hidden_units=(8,), dropout=0., method=method,
                              max_iter=4, patience=2, batch_size=60).fit(
      X[tr], y[tr], [lab[tr] for lab in labels],
      validation_data=(X[va], y[va], val_labels))
  f = np.asarray(est.network_(tf.constant(X[va]))[0])
  np.testing.assert_allclose(est.predict(X[va]), f, rtol=1e-12)
  np.testing.assert_allclose(est.predict(X[va], [np.full(60, "zz"), np.full(60, -1)]), f,
                             rtol=1e-12)
  blup0 = est.crossed_.random_effects(0)
  want = f + np.array([blup0.get(v, 0.) for v in val_labels[0]])
  np.testing.assert_allclose(est.predict(X[va], val_labels), want, rtol=1e-10)
  assert np.all(np.isfinite(est.history_["criterion"]))
  assert est.variances_.shape == (2,) and est.sigma2_ > 0


def test_beyond_exact_limit_uses_mse_criterion():
  X, y, codes, _ = _simulate(7, n=200)
  net = _linear_net()
  train = _net_data(X[:160], y[:160], codes[:160])
  valid = _net_data(X[160:], y[160:], codes[160:])
  init = cn.initial_params(net, train, seed=0, max_dense=2)
  fit = cn.fit_crossed_network_em(net, train, valid, init, max_iter=3, epochs_per_step=1,
                                  batch_size=40, learning_rate=1e-2, patience=5, seed=0,
                                  max_dense=2, num_probes=16)
  assert np.all(np.isnan(fit.trace)) and np.isnan(fit.log_likelihood)
  # the criterion at the returned (best) state: validation MSE of f + CG BLUPs
  z = cp.design_matrix(train.codes, train.num_levels)
  f_train = np.asarray(net(tf.constant(train.x))[0])
  post = cp.posterior(np.zeros((160, 0)), train.y - f_train, z, (z.T @ z).tocsr(),
                      train.num_levels, np.zeros(0), fit.params.variances.numpy(),
                      float(fit.params.noise_variance), max_dense=2, num_probes=16)
  pred = np.asarray(net(tf.constant(valid.x))[0]) + cn.blup_by_code(valid.codes,
                                                                     train.num_levels, post.mean)
  assert fit.val_nll[fit.best_iteration] == pytest.approx(np.mean((valid.y - pred) ** 2),
                                                          rel=1e-6)


def test_bad_input():
  X, y, codes, _ = _simulate(8, n=60)
  factors = [codes[:, 0], codes[:, 1]]
  with pytest.raises(ValueError, match="random intercepts only"):
    MixedEffectsRegressor(f="mlp", random_effects="slopes").fit(X, y, factors, time=X[:, 0])
  with pytest.raises(ValueError, match="time and Z"):
    MixedEffectsRegressor(f="mlp").fit(X, y, factors, time=X[:, 0])
  est = MixedEffectsRegressor(f="mlp", hidden_units=(4,), max_iter=1)
  with pytest.raises(ValueError, match="validation_data must be a tuple"):
    est.fit(X, y, factors, validation_data=(X, y))
  with pytest.raises(ValueError, match="list of 2 grouping factors"):
    est.fit(X, y, factors, validation_data=(X, y, factors[:1]))
  with pytest.raises(ValueError, match="X \\(validation\\)"):
    est.fit(X, y, factors, validation_data=(X[:, :1], y, factors))
  with pytest.raises(ValueError, match="single level"):
    est.fit(X, y, [factors[0], np.zeros(60)])
  with pytest.raises(ValueError, match="only used with a network"):
    MixedEffectsRegressor().fit(X, y, factors, validation_data=(X, y, factors))
  with pytest.raises(ValueError, match="f must be"):
    MixedEffectsRegressor(f="cnn").fit(X, y, factors)
  fitted = MixedEffectsRegressor(f="mlp", hidden_units=(4,), max_iter=1).fit(X, y, factors)
  with pytest.raises(ValueError, match="list of 2 grouping factors"):
    fitted.predict(X, factors[:1])
  assert codes.shape == (60, 2) and np.all(np.isfinite(y))  # inputs untouched


@pytest.mark.slow
@pytest.mark.parametrize("method", ["em", "nll"])
def test_recovers_variances_and_beats_network_without_random_effects(method):
  variances, noise = (1., 0.5), 0.25
  X, y, codes, _ = _simulate(9, n=8000, num_levels=(150, 120), variances=variances,
                             noise=np.sqrt(noise))
  tr, va, te = np.arange(5600), np.arange(5600, 6400), np.arange(6400, 8000)
  facs = lambda idx: [codes[idx, 0], codes[idx, 1]]
  est = MixedEffectsRegressor(f="mlp", hidden_units=(32, 16), dropout=0., method=method,
                              max_iter=200, patience=8, batch_size=100, learning_rate=3e-3,
                              seed=1).fit(X[tr], y[tr], facs(tr),
                                          validation_data=(X[va], y[va], facs(va)))
  np.testing.assert_allclose(est.variances_, variances, rtol=0.3)
  assert est.sigma2_ == pytest.approx(noise, rel=0.15)
  mse = np.mean((est.predict(X[te], facs(te)) - y[te]) ** 2)
  keras.utils.set_random_seed(1)
  plain = Network(keras.Sequential([keras.Input((2,)), keras.layers.Dense(32, "relu"),
                                       keras.layers.Dense(16, "relu"), keras.layers.Dense(1)]),
                     False, tf.float64).model
  plain.compile(optimizer=keras.optimizers.Adam(3e-3), loss="mse")
  plain.fit(X[tr], y[tr], batch_size=100, epochs=200, verbose=0,
            validation_data=(X[va], y[va]),
            callbacks=[keras.callbacks.EarlyStopping(patience=8, restore_best_weights=True)])
  mse_plain = np.mean((plain.predict(X[te], verbose=0)[:, 0] - y[te]) ** 2)
  assert mse < 0.6 * mse_plain
  assert mse < noise + 0.15


@pytest.mark.parametrize("method", ["em", "nll"])
def test_float32(method):
  X, y, codes, _ = _simulate(10, n=200)
  factors = [codes[:, 0], codes[:, 1]]
  kw = dict(f="mlp", hidden_units=(8,), dropout=0., method=method, max_iter=3, batch_size=50)
  e32 = MixedEffectsRegressor(dtype="float32", **kw).fit(X, y, factors)
  e64 = MixedEffectsRegressor(**kw).fit(X, y, factors)
  assert e32.variances_.dtype == np.float32 and e32.crossed_.blups_[0].dtype == np.float32
  assert np.isfinite(e32.log_likelihood_)
  # the same weights start and the same batches: float32 round-off only
  np.testing.assert_allclose(e32.variances_, e64.variances_, rtol=2e-3)
  np.testing.assert_allclose(e32.predict(X, factors), e64.predict(X, factors), atol=2e-3)
