"""Gaussian mixtures with entries missing at random (GaussianMixture(missing='em'), #20)."""
import warnings

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp
from scipy.optimize import linear_sum_assignment

from tfp_em import GaussianMixture
from tfp_em.mixture import missing as mv
from tfp_em.verification import verify

import missing_mutants  # tests/ is on sys.path (rootdir-relative import)

tfd = tfp.distributions
COV_TYPES = ("full", "tied", "diag", "spherical")


def _fit(x, k=3, fit_kw=None, **kw):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return GaussianMixture(k, **kw).fit(x, **(fit_kw or {}))


def _with_gaps(x, fraction, seed=0):
  """x with `fraction` of its entries set to NaN at random (MCAR); rows left
  all-NaN get their first entry back."""
  rng = np.random.default_rng(seed)
  out = np.array(x, dtype=float)
  out[rng.random(out.shape) < fraction] = np.nan
  empty = np.all(np.isnan(out), axis=1)
  out[empty, 0] = np.asarray(x, dtype=float)[empty, 0]
  return out


def _dense(est):
  """The fitted covariances as [K, D, D]."""
  return mv.dense_covariances(est.params_, est.covariance_type).numpy()


def _observed_mixture_log_prob(est, x):
  """(log p(x_o) [N], p(z | x_o) [N, K]): tfd.MixtureSameFamily of the observed
  sub-vectors, one per missingness pattern."""
  cov = _dense(est)
  out, resp = np.zeros(len(x)), np.zeros((len(x), est.n_components))
  patterns, index = np.unique(~np.isnan(x), axis=0, return_inverse=True)
  for p, o in enumerate(patterns):
    rows = x[index.ravel() == p][:, o]
    mixture = tfd.MixtureSameFamily(
        tfd.Categorical(probs=est.weights_),
        tfd.MultivariateNormalFullCovariance(est.means_[:, o], cov[:, o][:, :, o]))
    out[index.ravel() == p] = mixture.log_prob(rows).numpy()
    resp[index.ravel() == p] = mixture.posterior_marginal(rows).probs_parameter().numpy()
  return out, resp


# ---- Pure functions (tfp_em.mixture.missing). -------------------------------------

def test_conditional_is_gaussian_conditioning():
  rng = np.random.default_rng(3)
  k, d, n = 2, 4, 5
  a = rng.normal(size=(k, d, d))
  cov = a @ np.swapaxes(a, 1, 2) + d * np.eye(d)
  means = rng.normal(size=(k, d))
  x = rng.normal(size=(n, d))
  mask = np.array([1.0, 0.0, 1.0, 0.0])
  o, m = mask > 0, mask == 0
  x0 = np.where(o, x, 0.0)
  cond = mv.conditional(tf.constant(x0[np.newaxis]), tf.constant(mask[np.newaxis]),
                        tf.constant(means), tf.constant(cov))        # one group of n rows
  assert cond.cov.shape == (1, k, d, d)
  for j in range(k):
    s_oo, s_mo = cov[j][np.ix_(o, o)], cov[j][np.ix_(m, o)]
    gain = s_mo @ np.linalg.inv(s_oo)
    mean_m = means[j, m] + (x[:, o] - means[j, o]) @ gain.T                       # [n, |m|]
    np.testing.assert_allclose(cond.mean.numpy()[:, j][:, m], mean_m, rtol=1e-12)
    np.testing.assert_array_equal(cond.mean.numpy()[:, j][:, o], x[:, o])
    c_mm = cov[j][np.ix_(m, m)] - gain @ s_mo.T
    np.testing.assert_allclose(cond.cov.numpy()[0, j][np.ix_(m, m)], c_mm, rtol=1e-12)
    assert np.all(cond.cov.numpy()[0, j][o] == 0) and np.all(cond.cov.numpy()[0, j][:, o] == 0)
    ref = tfd.MultivariateNormalFullCovariance(means[j, o], s_oo).log_prob(x[:, o]).numpy()
    np.testing.assert_allclose(cond.log_prob.numpy()[:, j], ref, rtol=1e-12)
  # the same rows one per group (as pooled rows of rare patterns are conditioned)
  per_row = mv.conditional(tf.constant(x0[:, np.newaxis]), tf.constant(np.tile(mask, (n, 1))),
                           tf.constant(means), tf.constant(cov))
  assert per_row.cov.shape == (n, k, d, d)
  np.testing.assert_allclose(per_row.log_prob.numpy(), cond.log_prob.numpy(), rtol=1e-12)
  np.testing.assert_allclose(per_row.mean.numpy(), cond.mean.numpy(), rtol=1e-12)
  np.testing.assert_allclose(per_row.cov.numpy(), np.repeat(cond.cov.numpy(), n, 0), atol=1e-12)


@pytest.mark.parametrize("shared_rows", [1, 8, 1000])
def test_pattern_blocks_cover_each_row_once(shared_rows):
  rng = np.random.default_rng(4)
  observed = rng.random((200, 3)) < 0.6
  blocks = mv.pattern_blocks(tf.constant(observed), size=16, shared_rows=shared_rows)
  order, starts, ends, per_row = (t.numpy() for t in blocks)
  assert np.all(ends > starts)
  rows = np.concatenate([order[a:b] for a, b in zip(starts, ends)])
  np.testing.assert_array_equal(np.sort(rows), np.arange(200))
  patterns, counts = np.unique(observed, axis=0, return_counts=True)
  frequent = {tuple(p) for p, c in zip(patterns, counts) if c >= shared_rows}
  for a, b, pooled in zip(starts, ends, per_row):
    block = observed[order[a:b]]
    if pooled:   # rows of rare patterns, at most size // D of them
      assert b - a <= 16 // 3 and not frequent & {tuple(r) for r in block}
    else:        # one frequent pattern, at most `size` rows
      assert b - a <= 16 and (block == block[0]).all() and tuple(block[0]) in frequent


def test_expected_stats_add_the_conditional_covariance():
  """One row, one component: sq_dev is (x^ - c)(x^ - c)^T + C, weighted."""
  mean = tf.constant([[[1.0, 2.0]]], tf.float64)                    # [n=1, K=1, D=2]
  cov = tf.constant([[[[0.0, 0.0], [0.0, 0.5]]]], tf.float64)        # [G=1, K, D, D]
  cond = mv.Conditional(None, mean, cov)
  center = tf.constant([[0.0, 1.0]], tf.float64)
  rw = tf.constant([[2.0]], tf.float64)
  full = mv.expected_stats(rw, cond, center, full=True)
  np.testing.assert_allclose(full.sq_dev.numpy()[0], 2 * (np.outer([1, 1], [1, 1]) + cov[0, 0]))
  diag = mv.expected_stats(rw, cond, center, full=False)
  np.testing.assert_allclose(diag.sq_dev.numpy()[0], [2.0, 2 * 1.5])
  np.testing.assert_allclose(diag.dev.numpy()[0], [2.0, 2.0])


def test_fill_column_means_is_weighted_and_leaves_observed_entries():
  x = np.array([[1.0, np.nan], [3.0, 4.0], [np.nan, 8.0]])
  out = mv.fill_column_means(x, np.array([1.0, 3.0, 1.0]))
  np.testing.assert_array_equal(out, [[1.0, 5.0], [3.0, 4.0], [2.5, 8.0]])
  assert np.isnan(x[0, 1])  # not modified


# ---- The estimator. --------------------------------------------------------------

@pytest.mark.parametrize("cov", ["full", "diag", pytest.param("tied", marks=pytest.mark.slow),
                                 pytest.param("spherical", marks=pytest.mark.slow)])
def test_without_nan_the_fit_equals_the_complete_data_fit(overlapping, cov):
  complete = _fit(overlapping, covariance_type=cov, tol=0.0, max_iter=30)
  ours = _fit(overlapping, covariance_type=cov, tol=0.0, max_iter=30, missing="em")
  assert ours.n_iter_ == complete.n_iter_ == 30
  for name in ("weights_", "means_", "covariances_"):
    np.testing.assert_allclose(getattr(ours, name), getattr(complete, name), rtol=1e-12,
                               atol=1e-12, err_msg=name)
  np.testing.assert_allclose(ours.log_likelihood_, complete.log_likelihood_, rtol=1e-12)
  np.testing.assert_allclose(ours.score_samples(overlapping),
                             complete.score_samples(overlapping), rtol=1e-12)


@pytest.mark.parametrize("cov,dtype,rtol", [("full", "float64", 1e-10), ("diag", "float64", 1e-10),
                                            ("full", "float32", 1e-4)])
def test_loglik_is_the_tfp_marginal_of_the_observed_entries(overlapping, cov, dtype, rtol):
  x = _with_gaps(overlapping[::5], 0.3)
  est = _fit(x, covariance_type=cov, max_iter=5, missing="em", dtype=dtype)
  ref, resp = _observed_mixture_log_prob(est, x.astype(dtype))
  np.testing.assert_allclose(est.score_samples(x), ref, rtol=rtol)
  np.testing.assert_allclose(est.predict_proba(x), resp, rtol=rtol, atol=rtol)
  np.testing.assert_array_equal(est.predict(x), np.argmax(resp, axis=1))
  # the fit's l is the same sum, at the returned params
  np.testing.assert_allclose(est.log_likelihood_, ref.sum(), rtol=rtol)
  assert est.params_.means.dtype == tf.as_dtype(dtype)


def test_impute_is_the_conditional_mean_and_keeps_observed_entries():
  rng = np.random.default_rng(5)
  cov = np.array([[1.0, 0.8, 0.2], [0.8, 1.0, 0.1], [0.2, 0.1, 1.0]])
  x = _with_gaps(rng.multivariate_normal([1.0, -1.0, 0.0], cov, 400), 0.2)
  est = _fit(x, k=1, missing="em")
  before = x.copy()
  filled = est.impute(x)
  np.testing.assert_array_equal(x, before)  # input not modified
  gaps = np.isnan(x)
  np.testing.assert_array_equal(filled[~gaps], x[~gaps])
  assert np.all(np.isfinite(filled))
  mu, sigma = est.means_[0], est.covariances_[0]
  for i in np.flatnonzero(gaps.any(1) & ~gaps.all(1))[:20]:
    o, m = ~gaps[i], gaps[i]
    expect = mu[m] + sigma[np.ix_(m, o)] @ np.linalg.solve(sigma[np.ix_(o, o)], x[i, o] - mu[o])
    np.testing.assert_allclose(filled[i, m], expect, rtol=1e-10)


def _simulated(n=3000, seed=0):
  rng = np.random.default_rng(seed)
  weights = np.array([0.5, 0.3, 0.2])
  means = np.array([[0.0, 0.0, 0.0, 0.0], [4.0, 4.0, 0.0, -2.0], [-3.0, 4.0, 3.0, 2.0]])
  a = rng.normal(size=(3, 4, 4)) * 0.5
  covs = a @ np.swapaxes(a, 1, 2) + 0.5 * np.eye(4) + 0.5  # correlated coordinates
  labels = rng.choice(3, size=n, p=weights)
  x = np.stack([rng.multivariate_normal(means[z], covs[z]) for z in labels])
  return x, (weights, means, covs)


# Recovery tolerances (max abs error) for 20% MCAR entries, N=3000, D=4, K=3. The
# complete-data fit of the same sample is off by 0.014 (weights), 0.086 (means) and
# 0.19 (covariances); the fit with 20% missing by 0.015, 0.11 and 0.18.
RECOVERY_TOL = {"weights": 0.03, "means": 0.15, "covariances": 0.3}


def test_recovers_parameters_with_20_percent_mcar_and_imputes_better_than_column_means():
  x, (weights, means, covs) = _simulated()
  gappy = _with_gaps(x, 0.2, seed=1)
  before = gappy.copy()
  est = _fit(gappy, k=3, missing="em", n_init=2)
  np.testing.assert_array_equal(gappy, before)
  _, perm = linear_sum_assignment(((means[:, None] - est.means_[None]) ** 2).sum(-1))
  errors = {"weights": np.max(np.abs(est.weights_[perm] - weights)),
            "means": np.max(np.abs(est.means_[perm] - means)),
            "covariances": np.max(np.abs(est.covariances_[perm] - covs))}
  assert all(errors[k] <= RECOVERY_TOL[k] for k in errors), errors
  gaps = np.isnan(gappy)
  rmse_em = np.sqrt(np.mean((est.impute(gappy)[gaps] - x[gaps]) ** 2))
  column_means = np.where(gaps, np.nanmean(gappy, axis=0), gappy)
  rmse_mean = np.sqrt(np.mean((column_means[gaps] - x[gaps]) ** 2))
  assert rmse_em < 0.8 * rmse_mean, (rmse_em, rmse_mean)


@pytest.mark.parametrize("cov", ["full", pytest.param("diag", marks=pytest.mark.slow),
                                 pytest.param("tied", marks=pytest.mark.slow),
                                 pytest.param("spherical", marks=pytest.mark.slow)])
def test_verifier_passes_the_missing_data_model(cov):
  report = verify(missing_mutants.model(covariance_type=cov), missing_mutants.verification_data())
  assert report.passed, str(report)


@pytest.mark.parametrize("mutant", [
    m if m is missing_mutants.NoConditionalCovariance else pytest.param(m, marks=pytest.mark.slow)
    for m in missing_mutants.MUTANTS], ids=lambda m: m.__name__)
def test_verifier_flags_every_missing_data_mutant(mutant):
  report = verify(missing_mutants.model(mutant), missing_mutants.verification_data(),
                  checks=("1", "2", "3"))
  assert not report.passed, f"{mutant.__name__} passed:\n{report}"


def test_float32_fit_is_close_to_float64():
  x = _with_gaps(_simulated(300, seed=4)[0], 0.2, seed=5)
  f64 = _fit(x, missing="em", tol=0.0, max_iter=20)
  f32 = _fit(x, missing="em", tol=0.0, max_iter=20, dtype="float32")
  assert f32.means_.dtype == np.float32 and np.all(np.isfinite(f32.covariances_))
  np.testing.assert_allclose(f32.log_likelihood_, f64.log_likelihood_, rtol=1e-5)
  np.testing.assert_allclose(f32.means_, f64.means_, atol=1e-2)   # data scale ~3
  np.testing.assert_allclose(f32.impute(x), f64.impute(x), atol=1e-2)


def test_rows_or_columns_with_every_entry_missing_are_errors_naming_them():
  x = _with_gaps(_simulated(100)[0], 0.1)
  x[[3, 7]] = np.nan
  with pytest.raises(ValueError, match=r"2 row\(s\) with every entry missing \(rows 3, 7\)"):
    GaussianMixture(2, missing="em").fit(x)
  est = _fit(np.delete(x, [3, 7], axis=0), k=2, missing="em", max_iter=5)
  for method in (est.predict, est.predict_proba, est.score_samples, est.impute):
    with pytest.raises(ValueError, match=r"rows 3, 7"):
      method(x)
  x = np.delete(x, [3, 7], axis=0)
  x[:, 2] = np.nan
  with pytest.raises(ValueError, match=r"columns 2\)"):
    GaussianMixture(2, missing="em").fit(x)


def test_inputs_are_not_modified_and_pandas_missing_values_are_read():
  pd = pytest.importorskip("pandas")
  x = _with_gaps(_simulated(200)[0], 0.2)
  frame = pd.DataFrame(x, columns=list("abcd")).astype("Float64")  # NaN -> pd.NA
  before = frame.copy()
  est = _fit(frame, k=2, missing="em", max_iter=10)
  with_nan = pd.DataFrame(x, columns=list("abcd"))
  np.testing.assert_allclose(est.score_samples(frame), est.score_samples(with_nan), rtol=1e-12)
  np.testing.assert_array_equal(est.impute(frame)[~np.isnan(x)], x[~np.isnan(x)])
  pd.testing.assert_frame_equal(frame, before)


def test_nan_without_the_option_names_it():
  x = _with_gaps(_simulated(100)[0], 0.1)
  with pytest.raises(ValueError, match=r"NaN.*missing='em'"):
    GaussianMixture(2).fit(x)
  est = _fit(np.nan_to_num(x), k=2, max_iter=5)
  with pytest.raises(ValueError, match=r"missing='em'"):
    est.predict(x)
  with pytest.raises(ValueError, match=r"missing='em'"):
    est.impute(np.nan_to_num(x))


def _csv_with_empty_cells(path, x):
  rows = [",".join("" if np.isnan(v) else repr(float(v)) for v in row) for row in x]
  path.write_text("a,b,c,d\n" + "\n".join(rows) + "\n")
  return str(path)


def test_streamed_fits_equal_the_in_memory_fit(tmp_path):
  x = _with_gaps(_simulated(300)[0], 0.2)
  start = _fit(x, missing="em", max_iter=2)
  init = dict(weights_init=start.weights_, means_init=start.means_,
              precisions_init=start.precisions_, tol=0.0, max_iter=10, missing="em")
  memory = _fit(x, **init)
  for source in (tf.data.Dataset.from_tensor_slices(x).batch(64),
                 _csv_with_empty_cells(tmp_path / "gaps.csv", x)):
    streamed = _fit(source, fit_kw=dict(batch_size=64), **init)
    np.testing.assert_allclose(streamed.log_likelihood_, memory.log_likelihood_, rtol=1e-10)
    for name in ("weights_", "means_", "covariances_"):
      np.testing.assert_allclose(getattr(streamed, name), getattr(memory, name), rtol=1e-9,
                                 atol=1e-12, err_msg=name)
  x[5] = np.nan
  with pytest.raises(ValueError, match="every entry missing"):
    GaussianMixture(2, missing="em").fit(tf.data.Dataset.from_tensor_slices(x).batch(64))


@pytest.mark.slow
def test_online_fit_with_missing_values_is_close_to_the_batch_fit():
  x = _with_gaps(_simulated(3000)[0], 0.2)
  batch = _fit(x, missing="em")
  online = _fit(tf.data.Dataset.from_tensor_slices(x).batch(256), missing="em",
                fit_kw=dict(online=True))
  assert np.all(np.isfinite(online.covariances_))
  # one pass over 12 batches: within 0.2 of the batch fit's mean l per point (0.08 measured)
  assert online.score(x) > batch.score(x) - 0.2
