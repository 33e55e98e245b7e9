"""ArviZ export, standard errors, HMC cross-check, plots and reports."""
import copy
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import arviz as az

from tfp_em.diagnostics.adapters import hungarian_permutation
from tfp_em.diagnostics.inference_data import load_fitted, to_inference_data
from tfp_em.mixture.estimator import GaussianMixture
from tfp_em.diagnostics.standard_errors import bootstrap_standard_errors, standard_errors, summary

DATA = Path(__file__).resolve().parents[1] / "tfp_em" / "cli" / "data" / "old_faithful.csv"


def old_faithful():
  df = pd.read_csv(DATA)
  return (df - df.mean()) / df.std(ddof=0)


@pytest.fixture(scope="module")
def faithful():
  x = old_faithful()
  fitted = GaussianMixture(2, n_init=4, seed=0, tol=1e-8).fit(x.values)
  return fitted, x


@pytest.fixture(scope="module")
def faithful_hmc(faithful):
  from tfp_em.diagnostics.hmc import sample_posterior
  fitted, x = faithful
  return sample_posterior(fitted, x.values, num_chains=4, num_results=300, num_burnin=300,
                          seed=1, progress=False)


# -- InferenceData -------------------------------------------------------------

def test_groups_and_dims(faithful):
  fitted, x = faithful
  idata = to_inference_data(fitted, x)
  assert {"posterior", "sample_stats", "log_likelihood", "observed_data"} <= set(idata.groups())
  restarts = fitted.fit_result_.restarts
  length = max(len(r.log_likelihood) for r in restarts)
  post = idata.posterior
  assert dict(post.sizes) == {"chain": 4, "draw": length, "component": 2, "feature": 2,
                              "feature_bis": 2}
  assert post["covariances"].dims == ("chain", "draw", "component", "feature", "feature_bis")
  assert list(post.coords["feature"].values) == ["eruptions", "waiting"]
  stats = idata.sample_stats
  np.testing.assert_array_equal(stats["n_iter"].values, [r.n_iter for r in restarts])
  np.testing.assert_array_equal(stats["converged"].values, [r.converged for r in restarts])
  for c, r in enumerate(restarts):
    n = r.n_iter
    np.testing.assert_allclose(stats["lp"].values[c, :n + 1], r.log_likelihood)
    assert not stats["padded"].values[c, :n + 1].any() and stats["padded"].values[c, n + 1:].all()
    # padding repeats the final value
    final = post["weights"].values[c, n]
    np.testing.assert_array_equal(post["weights"].values[c, n:], np.broadcast_to(final, (length - n, 2)))
  ll = idata.log_likelihood["x"]
  assert ll.dims == ("chain", "draw", "obs") and ll.shape == (1, 1, len(x))
  np.testing.assert_allclose(ll.values.sum(), fitted.log_likelihood_, rtol=1e-10)
  np.testing.assert_allclose(ll.values[0, 0], fitted.score_samples(x.values), rtol=1e-10)
  np.testing.assert_array_equal(idata.observed_data["x"].values, x.values)
  best = fitted.fit_result_.best_restart
  np.testing.assert_allclose(post["means"].values[best, restarts[best].n_iter], fitted.means_)


def test_restart_labels_are_aligned(faithful):
  fitted, x = faithful
  restarts = fitted.fit_result_.restarts
  raw = [r.final_params.means[:, 0] for r in restarts]
  assert len({tuple(np.sign(m)) for m in raw}) > 1, "fixture should have label-switched restarts"
  idata = to_inference_data(fitted, x)
  finals = np.stack([idata.posterior["means"].values[c, r.n_iter] for c, r in enumerate(restarts)])
  np.testing.assert_allclose(finals, np.broadcast_to(fitted.means_, finals.shape), atol=1e-3)
  # the whole trajectory got the same permutation: the initial point of each
  # restart is closer to its own final than to the swapped labels.
  for c, r in enumerate(restarts):
    start = idata.posterior["means"].values[c, 0]
    assert np.sum((start - fitted.means_) ** 2) < np.sum((start[::-1] - fitted.means_) ** 2)


def test_hungarian_permutation():
  ref = np.array([[0.0, 0.0], [5.0, 5.0], [-3.0, 4.0]])
  perm = np.array([2, 0, 1])
  candidate = ref[np.argsort(perm)] + 0.1
  found = hungarian_permutation(ref, candidate)
  np.testing.assert_allclose(candidate[found], ref + 0.1)


def test_netcdf_round_trip(faithful, tmp_path):
  fitted, x = faithful
  idata = to_inference_data(fitted, x)
  path = tmp_path / "fit.nc"
  idata.to_netcdf(str(path))
  back = az.from_netcdf(str(path))
  for group in idata.groups():
    for name, var in getattr(idata, group).data_vars.items():
      np.testing.assert_array_equal(getattr(back, group)[name].values, var.values)
  assert back.posterior.attrs["estimator"] == "GaussianMixture"
  rebuilt, data = load_fitted(path)
  assert rebuilt.covariance_type == fitted.covariance_type and rebuilt.n_init == 4
  np.testing.assert_allclose(rebuilt.means_, fitted.means_)
  np.testing.assert_allclose(rebuilt.score_samples(x.values), fitted.score_samples(x.values))
  np.testing.assert_array_equal(np.asarray(data.x), x.values)



def test_load_fitted_in_a_fresh_process(faithful, tmp_path):
  """A saved fit loads where no estimator package was imported (the file names its class)."""
  fitted, x = faithful
  path = tmp_path / "fit.nc"
  to_inference_data(fitted, x).to_netcdf(str(path))
  code = ("import sys, numpy as np; from tfp_em.diagnostics.inference_data import load_fitted; "
          f"m, _ = load_fitted({str(path)!r}); np.save(sys.argv[1], m.means_)")
  out = tmp_path / "means.npy"
  done = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  np.testing.assert_allclose(np.load(out), fitted.means_)

def test_weighted_fit_keeps_weights():
  rng = np.random.default_rng(0)
  x = np.concatenate([rng.normal(-2, 1, (40, 1)), rng.normal(2, 1, (40, 1))])
  w = rng.uniform(0.5, 2.0, 80)
  fitted = GaussianMixture(2, seed=0).fit(x, sample_weight=w)
  idata = to_inference_data(fitted, x, sample_weight=w)
  np.testing.assert_array_equal(idata.constant_data["sample_weight"].values, w)
  np.testing.assert_allclose((w * idata.log_likelihood["x"].values[0, 0]).sum(),
                             fitted.log_likelihood_, rtol=1e-9)
  rebuilt, data = load_fitted(idata)
  np.testing.assert_array_equal(np.asarray(data.weights), w)


def test_bad_input_raises(faithful):
  fitted, x = faithful
  with pytest.raises(ValueError, match="not fitted"):
    to_inference_data(GaussianMixture(2), x)
  streamed = copy.copy(fitted)
  streamed.fit_data_ = None  # what a streamed fit keeps
  with pytest.raises(ValueError, match="pass X"):
    to_inference_data(streamed)
  assert to_inference_data(fitted).posterior.sizes["chain"] >= 1  # in-memory fits keep X
  with pytest.raises(ValueError, match="features"):
    to_inference_data(fitted, x.values[:, :1])
  with pytest.raises(ValueError, match="adapter"):
    to_inference_data(object(), x)
  with pytest.raises(ValueError, match="method"):
    standard_errors(fitted, x, method="sandwich")
  with pytest.raises(ValueError, match="tfp_em"):
    load_fitted(az.from_dict(posterior={"a": np.zeros((1, 3))}))


# -- standard errors -----------------------------------------------------------

@pytest.mark.parametrize("covariance_type", [
    "full", "spherical", pytest.param("diag", marks=pytest.mark.slow),
    pytest.param("tied", marks=pytest.mark.slow)])
def test_louis_equals_hessian(covariance_type):
  x = old_faithful().values
  fitted = GaussianMixture(2, covariance_type=covariance_type, seed=0, tol=1e-10).fit(x)
  hess = standard_errors(fitted, x)
  louis = standard_errors(fitted, x, method="louis")
  np.testing.assert_allclose(louis.information, hess.information, rtol=1e-7,
                             atol=1e-9 * np.abs(hess.information).max())
  np.testing.assert_allclose(louis.se, hess.se, rtol=1e-7)
  assert np.all(hess.se > 0) and np.all(np.isfinite(hess.se))
  # the weights sum to one, so their SEs coincide for K=2
  np.testing.assert_allclose(hess.se[0], hess.se[1], rtol=1e-8)


def test_se_matches_closed_form_single_gaussian():
  """K=1: SE(mean) = sigma / sqrt(n), SE(variance) = sigma^2 sqrt(2 / n) (MLE)."""
  x = np.random.default_rng(3).normal(1.0, 2.0, (500, 1))
  fitted = GaussianMixture(1, seed=0, reg_covar=0.0).fit(x)
  se = dict(zip(standard_errors(fitted, x).labels, standard_errors(fitted, x).se))
  var = x.var()
  np.testing.assert_allclose(se["means[0, 0]"], np.sqrt(var / 500), rtol=1e-6)
  np.testing.assert_allclose(se["covariances[0, 0, 0]"], var * np.sqrt(2 / 500), rtol=1e-6)
  assert se["weights[0]"] < 1e-6


def _bootstrap_case():
  rng = np.random.default_rng(11)
  x = np.concatenate([rng.normal([-2.0, 0.0], [0.7, 1.0], (120, 2)),
                      rng.normal([2.0, 1.0], [1.0, 0.6], (180, 2))])
  return GaussianMixture(2, covariance_type="diag", seed=0, tol=1e-8).fit(x), x


def _check_bootstrap(n_boot, rtol):
  fitted, x = _bootstrap_case()
  hess = standard_errors(fitted, x)
  boot = bootstrap_standard_errors(fitted, x, n_boot=n_boot, seed=5, progress=False)
  ratio = boot.se / hess.se
  assert np.all(np.abs(ratio - 1) < rtol), dict(zip(hess.labels, np.round(ratio, 3)))
  return ratio


def test_se_agree_with_bootstrap_quick():
  # SD of a bootstrap SD with B draws is about 1/sqrt(2B): 10% at B=50.
  _check_bootstrap(n_boot=50, rtol=0.35)


@pytest.mark.slow
def test_se_agree_with_bootstrap():
  ratio = _check_bootstrap(n_boot=400, rtol=0.15)
  assert abs(np.mean(ratio) - 1) < 0.06


def test_summary_table(faithful):
  fitted, x = faithful
  table = summary(fitted, x)
  se = standard_errors(fitted, x)
  assert list(table.columns) == ["name", "estimate", "se", "ci_2.5%", "ci_97.5%"]
  # a symmetric covariance entry once: [k, 1, 0] repeats [k, 0, 1]
  assert list(table.index) == [lab for lab in se.labels if not lab.endswith(", 1, 0]")]
  assert "covariances[1, 0, 1]" in table.index
  first = str(x.columns[0]) if hasattr(x, "columns") else "feature 0"
  assert table.loc["means[1, 0]", "name"] == f"means[component 1, {first}]"
  named = summary(fitted, x, feature_names=["a", "b"])
  assert named.loc["covariances[1, 0, 1]", "name"] == "covariances[component 1, a, b]"
  # means and off-diagonal covariances: plain Wald intervals; weights and variances on the
  # logit and log scales, inside their ranges
  plain = [lab for lab, link in zip(se.labels, se.links) if link == "identity" and lab in table.index]
  assert plain[:4] == [f"means[{k}, {j}]" for k in (0, 1) for j in (0, 1)]
  np.testing.assert_allclose(table.loc[plain, "ci_97.5%"] - table.loc[plain, "estimate"],
                             1.959964 * table.loc[plain, "se"], rtol=1e-6)
  weights = table.loc[["weights[0]", "weights[1]"]]
  assert (weights["ci_2.5%"] > 0).all() and (weights["ci_97.5%"] < 1).all()
  assert (table.loc["covariances[0, 1, 1]", "ci_2.5%"] > 0)
  assert ((table["ci_2.5%"] < table["estimate"]) & (table["estimate"] < table["ci_97.5%"])).all()
  assert table.loc["means[1, 0]", "estimate"] == pytest.approx(fitted.means_[1, 0])
  narrow = summary(fitted, x, ci=0.5)
  assert (narrow["ci_75%"] < table["ci_97.5%"]).all()
  with pytest.raises(ValueError, match="ci"):
    summary(fitted, x, ci=1.5)


# -- HMC -----------------------------------------------------------------------

@pytest.mark.slow  # 30 s of sampling in its fixture
def test_hmc_short_run(faithful, faithful_hmc):
  fitted, x = faithful
  post = faithful_hmc.posterior
  assert dict(post.sizes) == {"chain": 4, "draw": 300, "component": 2, "feature": 2,
                              "feature_bis": 2}
  rhat = az.rhat(faithful_hmc)
  assert max(float(rhat[v].max()) for v in rhat.data_vars) < 1.02
  assert int(faithful_hmc.sample_stats["diverging"].sum()) == 0
  # weak priors: the posterior concentrates at the EM estimate
  se = standard_errors(fitted, x)
  mean = post["means"].mean(("chain", "draw")).values
  sd = post["means"].std(("chain", "draw")).values
  np.testing.assert_allclose(mean, fitted.means_, atol=0.5 * se.se[2:6].max())
  np.testing.assert_allclose(sd.ravel(), se.se[2:6], rtol=0.25)


@pytest.mark.slow
def test_hmc_rhat_and_mode_on_demo_model(faithful):
  from tfp_em.diagnostics.hmc import compare_with_em, sample_posterior
  fitted, x = faithful
  idata = sample_posterior(fitted, x.values, num_chains=4, num_results=1000, num_burnin=1000,
                           seed=0, progress=False)
  table = compare_with_em(fitted, idata, x.values)
  assert table["r_hat"].max() < 1.01
  assert table["ess_bulk"].min() > 400
  assert np.abs(table["z_map"]).max() < 0.05      # the mode is the EM estimate
  assert np.abs(table["z_mean"]).max() < 1.0      # the mean is within one SE
  np.testing.assert_allclose(table["post_sd"], table["em_se"], rtol=0.25)


# -- reports -------------------------------------------------------------------

def _check_report(path: Path):
  from PIL import Image
  page = path.read_text()
  links = re.findall(r'(?:src|href)="([^"]+)"', page)
  assert links, "report has no figures or files"
  for link in links:
    assert not re.match(r"^[a-z]+:|^/", link), f"non-relative link {link}"
    assert (path.parent / link).is_file(), f"report links a missing file {link}"
  pngs = sorted(path.parent.glob("*.png"))
  assert pngs
  for png in pngs:
    with Image.open(png) as im:
      im.verify()
    with Image.open(png) as im:
      assert im.size[0] > 200 and im.size[1] > 200
      assert np.asarray(im.convert("L")).std() > 5, f"{png.name} is blank"
  return page


def _report_and_reload(fitted, x, tmp_path, hmc, model_selection=None):
  from tfp_em.diagnostics.report import write_report
  path = write_report(fitted, x, tmp_path / "report", hmc=hmc, progress=False,
                      model_selection=model_selection)
  page = _check_report(path)
  for name in ("loglik_traces.png", "parameter_traces.png", "mixture_ellipses.png", "ppc.png",
               "inference_data.nc"):
    assert f'"{name}"' in page
  assert 'class="fail"' not in page, "a report check failed"
  again = write_report(tmp_path / "report" / "inference_data.nc", out_dir=tmp_path / "again",
                       hmc=False, progress=False)
  page2 = _check_report(again)
  assert "hmc_trace.png" not in page2 and "mixture_ellipses.png" in page2
  # the estimates table is the same whether built from the estimator or the file
  assert re.findall(r"-?\d+\.\d+", page.split("Estimates")[1][:3000])[:10] == \
      re.findall(r"-?\d+\.\d+", page2.split("Estimates")[1][:3000])[:10]
  return page


def test_report_and_report_from_netcdf(faithful, tmp_path):
  from tfp_em.diagnostics.report import write_report
  fitted, x = faithful
  rows = [dict(k=k, covariance_type="full",
               bic=GaussianMixture(k, seed=0, max_iter=500).fit(x.values).bic(x.values))
          for k in (1, 3)] + [dict(k=2, covariance_type="full", bic=fitted.bic(x.values))]
  page = _report_and_reload(fitted, x, tmp_path, hmc=False, model_selection=rows)
  assert "hmc_trace.png" not in page
  # named parameters, each symmetric entry once; the model search's panel; the restarts
  assert "means[component 1, waiting]" in page and "means[1, 1]" not in page
  assert "covariances[component 0, eruptions, waiting]" in page
  assert "covariances[component 0, waiting, eruptions]" not in page
  assert "model_selection.png" in page and "lower is better" in page
  assert "clusters.png" in page and "assigned points" in page
  assert "at the best optimum" in page and "<th>restart</th>" in page
  assert "model_selection.png" in (tmp_path / "again" / "index.html").read_text()  # in the .nc
  # regenerated in place from its own netCDF; a stale file there is not linked
  (tmp_path / "report" / "hmc_posterior.nc").write_bytes(b"stale")
  path = write_report(tmp_path / "report" / "inference_data.nc", out_dir=tmp_path / "report",
                      hmc=False, progress=False)
  assert "hmc_posterior.nc" not in _check_report(path)


def test_mclust_constrained_model_reports_without_hmc_and_says_why(faithful, tmp_path):
  from tfp_em.diagnostics.report import write_report
  from tfp_em.diagnostics.hmc import sample_posterior
  _, x = faithful
  fitted = GaussianMixture(2, covariance_type="VEV", seed=0).fit(x.values)
  with warnings.catch_warnings():  # the redundant coordinates are the adapter's gauge
    warnings.simplefilter("error", RuntimeWarning)
    se = standard_errors(fitted, x.values)
  assert np.all(np.isfinite(se.se)) and np.all(se.se[:6] > 0)
  with pytest.raises(ValueError, match="VEV.*no density"):
    sample_posterior(fitted, x.values, num_results=2, num_burnin=0)
  path = write_report(fitted, x.values, tmp_path / "report", hmc=True, progress=False)
  page = _check_report(path)
  assert "HMC cross-check" in page and "Not run: covariance_type=&#x27;VEV&#x27;" in page
  assert "hmc_posterior.nc" not in page and "mixture_ellipses.png" in page


@pytest.mark.slow
def test_report_with_hmc(faithful, faithful_hmc, tmp_path):
  page = _report_and_reload(*faithful, tmp_path, hmc=faithful_hmc)
  for name in ("hmc_trace.png", "hmc_rank.png", "hmc_posterior.nc"):
    assert f'"{name}"' in page
  assert "Label switching" in page and "weights[component 0]" in page
  assert faithful_hmc.sample_stats["relabelled"].dtype == bool


# -- mixed effects and Bernoulli MLP -------------------------------------------

def _mixed_case():
  from tfp_em.mixed_effects.estimator import MixedEffectsRegressor
  rng = np.random.default_rng(0)
  g, n = 12, 10
  clusters = np.repeat(np.arange(g), n)
  t = np.tile(np.arange(n, dtype=float), g)
  u = rng.multivariate_normal([0, 0], [[1.0, 0.2], [0.2, 0.25]], g)
  X = rng.normal(size=(g * n, 2))
  y = 1 + X @ [0.5, -1.0] + u[clusters, 0] + u[clusters, 1] * t + rng.normal(0, 0.7, g * n)
  fitted = MixedEffectsRegressor(random_effects="slopes").fit(X, y, clusters, time=t)
  return fitted, X, y, dict(clusters=clusters, time=t)


def test_mixed_effects_inference_data_and_se():
  fitted, X, y, kw = _mixed_case()
  idata = to_inference_data(fitted, X, y, **kw)
  assert idata.log_likelihood["y"].dims == ("chain", "draw", "cluster")
  np.testing.assert_allclose(idata.log_likelihood["y"].values.sum(), fitted.log_likelihood_,
                             rtol=1e-9)
  assert idata.posterior["covariance"].dims[2:] == ("effect", "effect_bis")
  table = summary(fitted, X, y, **kw)
  assert "noise_variance" in table.index and "covariance[1, 1]" in table.index
  np.testing.assert_allclose(table.loc["covariance[0, 0]", "estimate"],
                             fitted.cov_random_effects_[0, 0])
  # against a finite-difference Hessian of the dense MVN oracle, in the
  # direct parametrization (beta, Sigma_u entries, sigma^2): at the MLE the
  # delta-method SEs do not depend on the parametrization.
  from models import mixed_effects as me
  from tfp_em.diagnostics.inference_data import resolve_data
  import tensorflow as tf
  data = resolve_data(fitted, X, y, **kw)
  p = fitted.params_
  c = np.asarray(p.covariance)
  theta = np.r_[np.asarray(p.beta), c[0, 0], c[0, 1], c[1, 1], float(p.noise_variance)]

  def gradient(t):
    t = tf.constant(t)
    with tf.GradientTape() as tape:
      tape.watch(t)
      params = me.MixedEffectsParams(t[:3], tf.reshape(tf.gather(t, [3, 4, 4, 5]), [2, 2]), t[6])
      ll = me.dense_marginal(params, data, "full").log_prob(data.y)
    return tape.gradient(ll, t).numpy()

  eye = np.eye(7) * 1e-5
  hess = np.stack([(gradient(theta + e) - gradient(theta - e)) / 2e-5 for e in eye])
  hess = 0.5 * (hess + hess.T)
  oracle = np.sqrt(np.diag(np.linalg.inv(-hess)))
  ours = table["se"].values  # covariance[1, 0] is listed once, as [0, 1]
  np.testing.assert_allclose(ours, oracle, rtol=1e-4)
  with pytest.raises(ValueError, match="clusters"):
    to_inference_data(fitted, X, y)


def test_bernoulli_mlp_louis_equals_hessian_and_heatmap(tmp_path):
  from PIL import Image
  from tfp_em.diagnostics import plots as plots
  from tfp_em.bernoulli_mlp.estimator import BernoulliMLPClassifier
  from tfp_em.diagnostics.inference_data import resolve_data
  rng = np.random.default_rng(0)
  X = rng.normal(size=(150, 2))
  y = (rng.uniform(size=150) < 1 / (1 + np.exp(-(1.5 * X[:, 0] - X[:, 1])))).astype(int)
  fitted = BernoulliMLPClassifier(n_hidden=2, l2=1.0, n_init=2, seed=0).fit(X, y)
  hess = standard_errors(fitted, X, y)
  louis = standard_errors(fitted, X, y, method="louis")
  np.testing.assert_allclose(louis.se, hess.se, rtol=1e-7)
  assert np.all(np.isfinite(hess.se)) and np.all(hess.se > 0)
  # SEs of class-centred output weights: the two classes mirror each other
  table = summary(fitted, X, y)
  np.testing.assert_allclose(table.loc["output_weights[1, 0]", "se"],
                             table.loc["output_weights[1, 1]", "se"], rtol=1e-8)
  idata = to_inference_data(fitted, X, y)
  assert idata.posterior["hidden_weights"].dims[2:] == ("input", "hidden")
  np.testing.assert_allclose(idata.log_likelihood["y"].values.sum(), fitted.log_likelihood_,
                             rtol=1e-9)
  fig = plots.hidden_unit_heatmap(fitted, resolve_data(fitted, X, y))
  fig.savefig(tmp_path / "heat.png")
  with Image.open(tmp_path / "heat.png") as im:
    assert im.size[0] > 100 and np.asarray(im.convert("L")).std() > 5


@pytest.mark.slow
def test_mixed_effects_hmc_variance_components():
  from tfp_em.diagnostics.hmc import compare_with_em, sample_posterior
  fitted, X, y, kw = _mixed_case()
  idata = sample_posterior(fitted, X, y, num_results=1000, num_burnin=1000, seed=0,
                           progress=False, **kw)
  assert "beta" not in idata.posterior            # f (here X beta) held fixed
  table = compare_with_em(fitted, idata, X, y, **kw)
  assert list(table.index) == ["covariance[0, 0]", "covariance[0, 1]", "covariance[1, 0]",
                               "covariance[1, 1]", "noise_variance"]
  assert table["r_hat"].max() < 1.01
  assert np.abs(table["z_map"]).max() < 0.05      # the mode is the EM estimate


def test_bernoulli_mlp_alignment_undoes_exact_symmetries():
  """Permuting and flipping hidden units leaves p(y | x) unchanged; align undoes both."""
  from models import bernoulli_mlp as mlp
  from tfp_em.diagnostics.adapters import get_adapter
  from tfp_em.bernoulli_mlp.estimator import BernoulliMLPClassifier
  rng = np.random.default_rng(1)
  X = rng.normal(size=(60, 2))
  y = rng.integers(0, 3, 60)
  fitted = BernoulliMLPClassifier(n_hidden=3, l2=1.0, max_iter=20, seed=0).fit(X, y)
  adapter = get_adapter(fitted)
  ref = type(fitted.params_)(*[np.asarray(p) for p in fitted.params_])
  w, out = ref.hidden_weights.copy(), ref.output_weights.copy()
  out[0] += out[2]                        # flip unit 1: z_1 -> 1 - z_1
  out[2] = -out[2]
  w[:, 1] = -w[:, 1]
  perm = [2, 0, 1]
  moved = type(ref)(w[:, perm], out[[0, 3, 1, 2]] + 5.0)   # + 5: softmax shift
  xs = tf_constant(fitted.standardized_inputs(X))
  ll = lambda p: mlp.marginal_log_prob(type(p)(*[tf_constant(a) for a in p]), xs,
                                       tf_constant(y.astype(np.int32))).numpy()
  np.testing.assert_allclose(ll(moved), ll(ref), rtol=1e-10)
  back = adapter.align(fitted, ref, moved)
  np.testing.assert_allclose(back.hidden_weights, ref.hidden_weights, atol=1e-12)
  np.testing.assert_allclose(back.output_weights, ref.output_weights, atol=1e-12)


def tf_constant(a):
  import tensorflow as tf
  return tf.constant(a)


@pytest.mark.slow
def test_bernoulli_mlp_hmc():
  from tfp_em.bernoulli_mlp.estimator import BernoulliMLPClassifier
  from tfp_em.diagnostics.hmc import compare_with_em, sample_posterior
  rng = np.random.default_rng(0)
  X = rng.normal(size=(300, 2))
  logit = 1.5 * X[:, 0] - X[:, 1] + 0.8 * X[:, 0] * X[:, 1]
  y = (rng.uniform(size=300) < 1 / (1 + np.exp(-logit))).astype(int)
  fitted = BernoulliMLPClassifier(n_hidden=2, n_init=3, seed=0, l2=1.0).fit(X, y)
  idata = sample_posterior(fitted, X, y, num_results=1000, num_burnin=1000, seed=0,
                           progress=False)
  table = compare_with_em(fitted, idata, X, y)
  assert table["r_hat"].max() < 1.01          # after undoing unit permutations and flips
  assert np.abs(table["z_map"]).max() < 0.25  # the N(0, 10^2) prior adds a little to the L2 penalty


@pytest.mark.slow
def test_mixed_effects_network_fit_exports_and_reports(tmp_path):
  """MeNets: beta (held at 1) is stored empty in the trace, the design grows from [1] to
  [1, Gamma] during the fit, and only the first and last params are kept."""
  from tfp_em.diagnostics.report import write_report
  from tfp_em.mixed_effects.estimator import MixedEffectsRegressor
  rng = np.random.default_rng(0)
  g, n = 30, 8
  member = np.repeat(np.arange(g), n)
  X = pd.DataFrame(rng.normal(size=(g * n, 2)), columns=["a", "b"])
  y = np.sin(X["a"]).to_numpy() + rng.normal(size=g)[member] + 0.3 * rng.normal(size=g * n)
  fitted = MixedEffectsRegressor(random_effects="features", f="mlp", hidden_units=(6, 3),
                                 max_iter=3, seed=0).fit(X, y, member)
  idata = to_inference_data(fitted, X, y, clusters=member)
  post = idata.posterior
  assert post.sizes["draw"] == len(fitted.fit_result_.restarts[0].params)
  np.testing.assert_array_equal(post["beta"].values, 1.0)           # f(x) enters with beta = 1
  assert list(post.coords["coef"].values) == ["f(x)"]
  assert list(post.coords["effect"].values) == ["(Intercept)", "Gamma1", "Gamma2", "Gamma3"]
  final = post["covariance"].values[0, -1]
  np.testing.assert_allclose(final, fitted.params_.covariance)
  index = write_report(fitted, X, tmp_path / "report", y=y, clusters=member, hmc=False,
                       progress=False)
  page = index.read_text()
  assert "caterpillar.png" in page and "covariance[(Intercept), Gamma1]" in page
