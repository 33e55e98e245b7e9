"""tfp_em.verify: exact references, the six checks, mutants, user files, report API."""
import json
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

import gmm_mutants  # tests/ is on sys.path (rootdir-relative import)
from models import gaussian_mixture as gm
from tfp_em.mixture.em import GaussianMixtureEM, MixtureData
from tfp_em.mixture.initialization import initial_responsibilities
from tfp_em.verification import (CheckResult, ExactPosterior, VerificationError, VerificationReport,
                                 load_user_module, main_verify, marginalize_discrete,
                                 marginalize_gaussian, verify, verify_file)
from tfp_em.verification.exact import expected_log_joint_discrete, expected_log_joint_gaussian

tfd = tfp.distributions
tfb = tfp.bijectors

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
QUICK = ("1", "2", "3", "4", "5")   # everything but the EM/L-BFGS runs of check 6
K = 3


def _gmm_data(n_per_cluster=30, seed=0, weights=None):
  rng = np.random.default_rng(seed)
  centres = np.array([[0.0, 0.0], [2.0, 1.0], [0.0, 2.5]])
  x = np.concatenate([c + 0.8 * rng.standard_normal((n_per_cluster, 2)) for c in centres])
  w = np.ones(x.shape[0]) if weights is None else weights(rng, x.shape[0])
  return MixtureData(tf.constant(x), tf.constant(w))


def _init(x, w, seed):
  return initial_responsibilities("kmeans++", x, w, K, seed)


def _params(seed=1, d=2):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(K, d, d))
  return gm.GaussianMixtureParams(
      tf.constant(rng.dirichlet(np.ones(K) * 3)), tf.constant(rng.normal(size=(K, d))),
      tf.constant(a @ np.transpose(a, (0, 2, 1)) + 0.5 * np.eye(d)))


# ----------------------------------------------------------------------------
# Exact references.

def test_enumeration_matches_tfp_mixture():
  data, p = _gmm_data(10), _params()
  exact = marginalize_discrete(lambda: gm.joint(p, "full", 30), {"z": K}, {"x": data.x})
  mix = gm.marginal(p, "full")
  np.testing.assert_allclose(exact.log_prob, tf.reduce_sum(mix.log_prob(data.x)), rtol=1e-12)
  np.testing.assert_allclose(exact.posterior["z"], mix.posterior_marginal(data.x).probs_parameter(),
                             atol=1e-12)
  np.testing.assert_allclose(exact.posterior["z_mean"], exact.posterior["z"].numpy() @ np.arange(K),
                             atol=1e-12)


def test_enumeration_of_batched_joint_with_vector_latent():
  """Batch shape [N], two binary latents per point: 4 configurations."""
  rng = np.random.default_rng(0)
  n = 7
  logits = tf.constant(rng.normal(size=(n, 2)))
  y = tf.constant(rng.normal(size=n))
  w = tf.constant([1.5, -2.0], tf.float64)
  jd = tfd.JointDistributionNamed(dict(
      z=tfd.Independent(tfd.Bernoulli(logits=logits, dtype=tf.float64), 1),
      y=lambda z: tfd.Normal(tf.reduce_sum(z * w, -1), 1.0)))
  exact = marginalize_discrete(jd, {"z": 2}, {"y": y})
  configs = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], np.float64)
  log_prior = np.sum(configs[None] * logits.numpy()[:, None] -
                     np.log1p(np.exp(logits.numpy()))[:, None], -1)            # [N, 4]
  log_lik = -0.5 * (y.numpy()[:, None] - configs @ w.numpy()) ** 2 - 0.5 * np.log(2 * np.pi)
  joint = log_prior + log_lik
  expected = np.log(np.sum(np.exp(joint), -1))
  np.testing.assert_allclose(exact.log_prob, expected.sum(), rtol=1e-12)
  np.testing.assert_allclose(exact.posterior["z"], np.exp(joint - expected[:, None]), atol=1e-12)


def test_enumeration_refuses_latents_coupled_across_points():
  jd = tfd.JointDistributionNamed(dict(
      z=tfd.Sample(tfd.Categorical(probs=tf.constant([0.5, 0.5], tf.float64)), 4),
      x=lambda z: tfd.Independent(tfd.Normal(tf.cast(tf.reduce_sum(z), tf.float64) * tf.ones(4, tf.float64), 1.0), 1)))
  with pytest.raises(ValueError, match="not independent across data points"):
    marginalize_discrete(jd, {"z": 2}, {"x": tf.zeros(4, tf.float64)})


def test_enumeration_bad_latents():
  jd = gm.joint(_params(), "full", 3)
  with pytest.raises(ValueError, match="not variables"):
    marginalize_discrete(jd, {"w": K}, {"x": tf.zeros([3, 2], tf.float64)})
  with pytest.raises(ValueError, match="cardinality"):
    marginalize_discrete(jd, {"z": 1}, {"x": tf.zeros([3, 2], tf.float64)})


def _random_intercept_joint(params, cluster, g):
  return tfd.JointDistributionNamed(dict(
      u=tfd.Sample(tfd.Normal(tf.constant(0.0, tf.float64), tf.sqrt(params["s2u"])), g),
      y=lambda u: tfd.Independent(tfd.Normal(params["mu"] + tf.gather(u, cluster),
                                             tf.sqrt(params["s2e"])), 1)))


def test_gaussian_conditioning_matches_mvn_marginal_and_posterior():
  rng = np.random.default_rng(3)
  cluster = np.repeat(np.arange(4), [1, 2, 3, 4])
  y = tf.constant(rng.normal(size=cluster.size))
  p = {"mu": tf.constant(0.3, tf.float64), "s2u": tf.constant(1.7, tf.float64),
       "s2e": tf.constant(0.6, tf.float64)}
  exact = marginalize_gaussian(lambda: _random_intercept_joint(p, cluster, 4), ["u"], {"y": y})
  zmat = np.eye(4)[cluster]                                                   # [N, G]
  cov = 1.7 * zmat @ zmat.T + 0.6 * np.eye(cluster.size)
  mvn = tfd.MultivariateNormalTriL(tf.fill([cluster.size], tf.constant(0.3, tf.float64)),
                                   tf.linalg.cholesky(tf.constant(cov)))
  np.testing.assert_allclose(exact.log_prob, mvn.log_prob(y), rtol=1e-12)
  post_cov = np.linalg.inv(np.eye(4) / 1.7 + zmat.T @ zmat / 0.6)
  np.testing.assert_allclose(exact.posterior["u_cov"], post_cov, atol=1e-12)
  np.testing.assert_allclose(exact.posterior["u_mean"], post_cov @ zmat.T @ (y.numpy() - 0.3) / 0.6,
                             atol=1e-12)


@pytest.mark.parametrize("kind", ["discrete", "gaussian"])
def test_derived_q_satisfies_fisher_identity(kind):
  """grad Q(theta | theta_old) at theta_old equals grad loglik for the derived Q."""
  if kind == "discrete":
    data, p0 = _gmm_data(5), _params()
    make = lambda p: gm.joint(gm.GaussianMixtureParams(**p), "full", 15)
    latents, observed = {"z": K}, {"x": data.x}
    p0 = p0._asdict()
    exact = marginalize_discrete(lambda: make(p0), latents, observed)
    q = lambda p: expected_log_joint_discrete(lambda: make(p), latents, observed, exact.posterior["z"])
    ll = lambda p: marginalize_discrete(lambda: make(p), latents, observed).log_prob
  else:
    cluster = np.repeat(np.arange(3), [2, 3, 4])
    make = lambda p: _random_intercept_joint(p, cluster, 3)
    latents = ["u"]
    observed = {"y": tf.constant(np.random.default_rng(0).normal(size=9))}
    p0 = {"mu": tf.constant(0.3, tf.float64), "s2u": tf.constant(1.7, tf.float64),
          "s2e": tf.constant(0.6, tf.float64)}
    exact = marginalize_gaussian(lambda: make(p0), latents, observed)
    q = lambda p: expected_log_joint_gaussian(lambda: make(p), latents, observed, exact.posterior)
    ll = lambda p: marginalize_gaussian(lambda: make(p), latents, observed).log_prob
  grads = []
  for fn in (q, ll):
    with tf.GradientTape() as tape:
      p = {k: tf.identity(v) for k, v in p0.items()}
      tape.watch(list(p.values()))
      value = fn(p)
    grads.append([tf.convert_to_tensor(g).numpy() for g in tape.gradient(value, list(p.values()))])
  for a, b in zip(*grads):
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9)
  assert max(np.max(np.abs(g)) for g in grads[1]) > 1e-2   # not trivially zero


# ----------------------------------------------------------------------------
# The shipped Gaussian mixture and the mutant catalogue.

def _model(covariance_type):
  return GaussianMixtureEM(K, covariance_type, reg_covar=0.0, init=_init)


def test_correct_gmm_passes_every_check():
  report = verify(_model("full"), _gmm_data())
  assert report.passed, str(report)
  assert [r.check for r in report.results if r.passed is None] == ["2b", "4e"]  # no statistics, no fixed params
  assert all(r.passed for r in report.results if r.check not in ("2b", "4e"))
  assert report.info["em_converged"] and report.info["lbfgs_converged"]
  # Round-off level, far inside the tolerances.
  for check in ("1", "2", "3", "4b"):
    assert report[check].rel_error < 1e-11, report[check]


@pytest.mark.slow
@pytest.mark.parametrize("covariance_type", gmm_mutants.ALL_TYPES)
def test_correct_gmm_passes_every_check_all_types(covariance_type):
  report = verify(_model(covariance_type), _gmm_data())
  assert report.passed, str(report)


def test_weighted_data_pass_checks_1_to_4():
  data = _gmm_data(weights=lambda rng, n: rng.uniform(0.2, 3.0, n))
  report = verify(_model("diag"), data, checks=("1", "2", "3", "4"), n_points=2)
  assert report.passed, str(report)


def test_catalogue_covers_the_required_bugs():
  names = {m.name for m in gmm_mutants.MUTANTS}
  assert {"covariance_over_N", "hard_assignment_means", "weights_not_renormalized",
          "responsibilities_wrong_axis", "covariance_precision_confused",
          "missing_outer_product"} <= names
  assert len(gmm_mutants.cases()) >= 6 * 3


@pytest.mark.parametrize("mutant", gmm_mutants.MUTANTS, ids=lambda m: m.name)
def test_every_mutant_is_flagged_quick(mutant):
  """Each mutant on one covariance type, without the check-6 optimizer runs."""
  covariance_type = mutant.covariance_types[0]
  model = gmm_mutants.make(mutant, K, covariance_type, _init)
  report = verify(model, _gmm_data(), checks=QUICK, n_points=2, n_steps=3)
  assert not report.passed, f"{mutant.name} survived:\n{report}"


@pytest.mark.slow
@pytest.mark.parametrize("case", gmm_mutants.cases(), ids=lambda c: f"{c[0].name}-{c[1]}")
def test_every_mutant_is_flagged_every_type(case):
  mutant, covariance_type = case
  report = verify(gmm_mutants.make(mutant, K, covariance_type, _init), _gmm_data())
  assert not report.passed, f"{mutant.name}[{covariance_type}] survived:\n{report}"


def test_mutants_fail_the_checks_that_name_their_bug():
  data = _gmm_data()
  by_name = {m.name: m for m in gmm_mutants.MUTANTS}
  wrong_axis = verify(gmm_mutants.make(by_name["responsibilities_wrong_axis"], K, "full", _init),
                      data, checks=("2", "3"), n_points=1)
  assert {"2", "3"} <= set(wrong_axis.failed_checks)
  old_means = verify(gmm_mutants.make(by_name["covariance_about_old_means"], K, "full", _init),
                     data, checks=QUICK, n_points=1)
  assert "4b" in old_means.failed_checks and "5" not in old_means.failed_checks
  no_weights = verify(gmm_mutants.make(by_name["loglik_without_weights"], K, "full", _init),
                      data, checks=("1",), n_points=1)
  assert no_weights.failed_checks == ["1"]
  unnormalized = verify(gmm_mutants.make(by_name["weights_not_renormalized"], K, "full", _init),
                        data, checks=("4",), n_points=1)
  assert "4a" in unnormalized.failed_checks


# ----------------------------------------------------------------------------
# User path: a JointDistribution and plain functions.

def test_user_example_correct_passes_quick():
  report = verify_file(os.path.join(EXAMPLES, "gmm_em_correct.py"), checks=QUICK, n_points=2)
  assert report.passed, str(report)
  assert report.model == "gmm_em_correct.py"


def test_user_example_buggy_names_the_m_step():
  report = verify_file(os.path.join(EXAMPLES, "gmm_em_buggy.py"), checks=QUICK, n_points=2)
  assert {"4b", "4c", "4d"} <= set(report.failed_checks)
  assert {"1", "2", "3"}.isdisjoint(report.failed_checks)   # the E-step is fine
  with pytest.raises(VerificationError, match="your M-step does not maximize Q"):
    report.raise_if_failed()


@pytest.mark.slow
@pytest.mark.parametrize("name, passes", [("gmm_em_correct.py", True), ("gmm_em_buggy.py", False)])
def test_user_examples_all_checks(name, passes, capsys):
  assert main_verify(os.path.join(EXAMPLES, name)) == (0 if passes else 1)
  assert "tfp_em.verify" in capsys.readouterr().out


def _ri_posterior(params, data):
  """Random-intercept posterior u_g | y: precision 1/s2u + n_g/s2e."""
  y, cluster, g = data["y"], data["cluster"], 4
  n_g = tf.math.unsorted_segment_sum(tf.ones_like(y), cluster, g)
  prec = 1.0 / params["s2u"] + n_g / params["s2e"]
  mean = tf.math.unsorted_segment_sum(y - params["mu"], cluster, g) / params["s2e"] / prec
  return {"u_mean": mean, "u_cov": tf.linalg.diag(1.0 / prec)}


def _ri_e_step(params, data):
  y, cluster = data["y"], data["cluster"]
  post = _ri_posterior(params, data)
  m, v = post["u_mean"], tf.linalg.diag_part(post["u_cov"])
  n_g = tf.math.unsorted_segment_sum(tf.ones_like(y), cluster, 4)
  r = tf.math.unsorted_segment_sum(y - params["mu"], cluster, 4)
  rr = tf.math.unsorted_segment_sum(tf.square(y - params["mu"]), cluster, 4)
  s2e, s2u = params["s2e"], params["s2u"]
  logdet = (n_g - 1) * tf.math.log(s2e) + tf.math.log(s2e + n_g * s2u)
  quad = (rr - s2u * r ** 2 / (s2e + n_g * s2u)) / s2e
  loglik = -0.5 * tf.reduce_sum(n_g * np.log(2 * np.pi) + logdet + quad)
  return {"m": m, "v": v, "y": y, "cluster": cluster}, loglik


def _ri_m_step(params, stats, forget_variance=False):
  m, v = stats["m"], stats["v"]
  resid = stats["y"] - tf.gather(m, stats["cluster"])
  mu = tf.reduce_mean(resid)
  s2u = tf.reduce_mean(m ** 2) if forget_variance else tf.reduce_mean(m ** 2 + v)
  s2e = tf.reduce_mean((resid - mu) ** 2 + tf.gather(v, stats["cluster"]))
  return {"mu": mu, "s2u": s2u, "s2e": s2e}


@pytest.mark.parametrize("forget_variance", [False, True])
def test_user_gaussian_latent_path(forget_variance):
  """A hand-written random-intercept EM; the mutant drops Var[u|y] from s2u."""
  rng = np.random.default_rng(5)
  cluster = np.repeat(np.arange(4), [3, 4, 5, 6])
  y = 1.0 + rng.normal(size=4)[cluster] * 1.2 + 0.7 * rng.normal(size=cluster.size)
  data = {"y": y, "cluster": tf.constant(cluster, tf.int32)}
  report = verify(
      lambda p, d: _random_intercept_joint(p, d["cluster"], 4), data,
      e_step=_ri_e_step, m_step=lambda p, s: _ri_m_step(p, s, forget_variance),
      init_params={"mu": 0.0, "s2u": 1.0, "s2e": 1.0},
      param_specs={"mu": tfb.Identity(), "s2u": tfb.Softplus(), "s2e": tfb.Softplus()},
      latents={"u": "gaussian"}, posterior=_ri_posterior, checks=QUICK, n_points=2)
  if forget_variance:
    assert "4b" in report.failed_checks, str(report)
  else:
    assert report.passed, str(report)
    assert report["2"].passed and report["2"].rel_error < 1e-10


# ----------------------------------------------------------------------------
# Bad input.

def test_verify_file_bad_input(tmp_path, capsys):
  with pytest.raises(ValueError, match="no such file"):
    verify_file(tmp_path / "missing.py")
  partial = tmp_path / "partial.py"
  partial.write_text("data = {'x': [[0.0]]}\n")
  with pytest.raises(ValueError, match=r"must define \['joint_distribution'"):
    verify_file(partial)
  broken = tmp_path / "broken.py"
  broken.write_text("raise RuntimeError('boom')\n")
  with pytest.raises(ValueError, match="could not load .*boom"):
    verify_file(broken)
  assert main_verify(str(partial)) == 2
  assert "must define" in capsys.readouterr().err


def test_verify_argument_errors():
  data, model = _gmm_data(5), _model("full")
  with pytest.raises(ValueError, match="checks must be a subset"):
    verify(model, data, checks=("7",))
  with pytest.raises(ValueError, match="unknown tolerances"):
    verify(model, data, tolerances={"fisherr": 1.0})
  with pytest.raises(ValueError, match="component_axes"):
    verify(model, data, component_axes={"nope": 0}, checks=("1",))
  with pytest.raises(ValueError, match="n_points"):
    verify(model, data, n_points=0)
  with pytest.raises(ValueError, match="e_step must be a function"):
    verify(lambda p: None, {"x": np.zeros((3, 2))})
  user = dict(e_step=lambda p, d: None, m_step=lambda p, s: p, init_params={"a": 1.0},
              param_specs={"a": tfb.Identity()})
  joint = lambda p: tfd.JointDistributionNamed(dict(
      z=tfd.Sample(tfd.Bernoulli(probs=tf.constant(0.5, tf.float64)), 3),
      x=lambda z: tfd.Independent(tfd.Normal(tf.cast(z, tf.float64) * p["a"], 1.0), 1)))
  with pytest.raises(ValueError, match="posterior"):
    verify(joint, {"x": np.zeros(3)}, latents={"z": 2}, **user)
  with pytest.raises(ValueError, match="not variables"):
    verify(joint, {"x": np.zeros(3)}, latents={"w": 2}, posterior=lambda p, d: {}, **user)
  with pytest.raises(ValueError, match="observed variables"):
    verify(joint, {"y": np.zeros(3)}, latents={"z": 2}, posterior=lambda p, d: {}, **user)
  with pytest.raises(ValueError, match="param_specs has no entry"):
    verify(joint, {"x": np.zeros(3)}, latents={"z": 2}, posterior=lambda p, d: {},
           **{**user, "param_specs": {}})


class _DuckTypedModel:
  """Has the EMModel methods but does not subclass tfp_em.EMModel."""

  def e_step(self, params, data):
    return None, 0.0

  def m_step(self, params, stats):
    return params


def test_verify_refuses_models_that_are_not_emmodels():
  with pytest.raises(TypeError, match="subclass tfp_em.EMModel"):
    verify(_DuckTypedModel(), _gmm_data(5))


def test_oracle_argument_overrides_the_models_reference():
  """`oracle=` replaces the model's `verification_oracle` (checks 1 and 2)."""
  data, model = _gmm_data(5), _model("full")
  shifted = lambda p, d: ExactPosterior(model.verification_oracle(p, d).log_prob + 1.0,
                                        model.verification_oracle(p, d).posterior)
  assert verify(model, data, oracle=model.verification_oracle, checks=("1",), n_points=1).passed
  report = verify(model, data, oracle=shifted, checks=("1",), n_points=1)
  assert report.failed_checks == ["1"]
  no_reference = verify(model, data, oracle=lambda p, d: None, checks=("1", "2"), n_points=1)
  assert no_reference["2"].passed is None and "no exact posterior" in no_reference["2"].detail


# ----------------------------------------------------------------------------
# The report.

def _report():
  return VerificationReport("toy", [
      CheckResult("1", "likelihood", 1e-12, 1e-15, 1e-9, True, "point 0"),
      CheckResult("2", "posterior", float("nan"), float("nan"), 1e-8, None, "no exact posterior"),
      CheckResult("4b", "M-step gradient", 3.0, 0.5, 1e-7, False, "|3|_inf in 'covariances'"),
  ], seconds=1.5, info={"n_points": np.int64(3)})


def test_report_api():
  report = _report()
  assert not report.passed and report.failed_checks == ["4b"]
  assert report["1"].passed and report["2"].passed is None
  table = report.table()
  for word in ("check", "max abs err", "max rel err", "tolerance", "pass", "FAIL", "skipped"):
    assert word in table
  assert "5.00e-01" in table
  d = json.loads(json.dumps(report.to_dict()))
  assert d["failed_checks"] == ["4b"] and d["passed"] is False and d["info"]["n_points"] == 3
  assert "does not maximize Q" in d["checks"][2]["meaning"]
  assert "| 4b | M-step gradient |" in report.to_markdown()
  with pytest.raises(VerificationError) as err:
    report.raise_if_failed()
  message = str(err.value)
  assert "check 4b" in message and "your M-step does not maximize Q: grad Q(theta_new) = |3|_inf" in message
  assert "check 1" not in message
  passing = VerificationReport("ok", [report.results[0]])
  assert passing.passed and passing.raise_if_failed() is passing


def test_user_arrays_are_not_modified():
  ex = load_user_module(os.path.join(EXAMPLES, "gmm_em_correct.py"))
  data = {"x": ex.data["x"].copy()}
  init = {k: np.array(v) for k, v in ex.init_params.items()}
  copies = (data["x"].copy(), {k: v.copy() for k, v in init.items()})
  verify(ex.joint_distribution, data, e_step=ex.e_step, m_step=ex.m_step, init_params=init,
         param_specs=ex.param_specs, latents=ex.latents, posterior=ex.posterior,
         checks=("1", "4"), n_points=1)
  np.testing.assert_array_equal(data["x"], copies[0])
  for k in init:
    np.testing.assert_array_equal(init[k], copies[1][k])


def test_verify_is_a_plain_function():
  """`tfp_em.verify(...)` is the verifier itself; the package holds the rest."""
  import tfp_em
  import tfp_em.verification
  report = tfp_em.verify(_model("full"), _gmm_data(5), checks=("1",), n_points=1)
  assert isinstance(report, VerificationReport) and report.passed
  assert tfp_em.verify is verify and tfp_em.verification.verify_file is verify_file
