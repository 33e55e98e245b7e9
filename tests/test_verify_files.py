"""tfp_em.verify on user files: the templates in examples/, their mutants, user errors.

Every correct template passes; every mutant of `tests/example_mutants.py` is
killed by a check that names the step holding the bug (E or M) and no other;
a user's mistake in setting up the file is a one-line ValueError; an
exception in one check leaves the others reporting.
"""
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

import example_mutants as em  # tests/ is on sys.path (rootdir-relative import)
from tfp_em.verification import load_user_module, main_verify, verify, verify_file

tfd = tfp.distributions
tfb = tfp.bijectors

QUICK = ("1", "2", "3", "4", "5")   # everything but the EM/L-BFGS runs of check 6
POINT = ("1", "2", "3", "4")        # the checks at one parameter point


def _file(tmp_path, example, name, *edits):
  return em.write(em.FileMutant(example, name, tuple(edits), None), tmp_path)


# ----------------------------------------------------------------------------
# The catalogue.

def test_catalogue_has_four_mutants_per_template_and_both_steps():
  for example in (em.GMM, em.POISSON, em.RI, em.FA, em.HMM):
    mutants = [m for m in em.MUTANTS if m.example == example]
    assert len(mutants) >= 4, example
    assert {m.step for m in mutants} <= {"E", "M"}
  assert {m.step for m in em.MUTANTS} == {"E", "M"}
  for m in em.MUTANTS + em.CORRECT:
    em.mutated_source(m)          # every edit applies exactly once


@pytest.mark.parametrize("mutant", [m for m in em.MUTANTS if m.name in (
    "dropped_point", "covariance_over_N", "stats_without_variance", "transition_by_column")],
    ids=lambda m: f"{m.example}-{m.name}")
def test_mutant_is_blamed_on_its_step_quick(mutant, tmp_path):
  report = verify_file(em.write(mutant, tmp_path), checks=POINT, n_points=1)
  assert not report.passed, str(report)
  assert report.blamed_steps == [mutant.step], str(report)


@pytest.mark.slow
@pytest.mark.parametrize("mutant", em.MUTANTS, ids=lambda m: f"{m.example}-{m.name}")
def test_every_file_mutant_is_killed_and_blamed_on_its_step(mutant, tmp_path):
  report = verify_file(em.write(mutant, tmp_path))
  assert not report.passed, f"{mutant.name} survived:\n{report}"
  assert report.blamed_steps == [mutant.step], str(report)


@pytest.mark.slow
@pytest.mark.parametrize("variant", em.CORRECT, ids=lambda m: f"{m.example}-{m.name}")
def test_every_correct_file_passes(variant, tmp_path):
  report = verify_file(em.write(variant, tmp_path))
  assert report.passed, str(report)


@pytest.mark.slow
@pytest.mark.parametrize("name, step", sorted(em.BUGGY_TWINS.items()))
def test_buggy_twins_are_caught(name, step, capsys):
  assert main_verify(os.path.join(em.EXAMPLES, name)) == 1
  out = capsys.readouterr().out
  assert {"E": "E-step", "M": "M-step"}[step] + ":" in out


@pytest.mark.parametrize("example", [em.POISSON, em.RI, em.FA, em.HMM])
def test_templates_pass_quick(example):
  report = verify_file(os.path.join(em.EXAMPLES, example), checks=POINT, n_points=1)
  assert report.passed, str(report)


def test_statistics_check_names_the_field_and_size(tmp_path):
  mutant = next(m for m in em.MUTANTS if m.example == em.FA and m.name == "szz_without_covariance")
  report = verify_file(em.write(mutant, tmp_path), checks=("2", "3", "4"), n_points=1)
  assert report.failed_checks == ["2b"], str(report)
  assert "'szz'" in report["2b"].detail and report["2b"].abs_error > 1.0
  assert "E-step:" in str(report)


def test_without_statistics_an_e_step_bug_is_flagged_as_suspected(tmp_path):
  no_statistics = ("def statistics(params, data, latent_values):",
                   "def complete_statistics(params, data, latent_values):")
  dropped = next(m for m in em.MUTANTS if m.example == em.GMM and m.name == "dropped_point")
  report = verify_file(_file(tmp_path, em.GMM, "dropped", no_statistics, *dropped.edits),
                       checks=POINT, n_points=1)
  assert report.blamed_steps == ["M"], str(report)   # Q never sees the statistics...
  assert any("E-step suspected" in n and "statistics(params, data, latent_values)" in n
             for n in report.notes), str(report)    # ...so the report says where to look


# ----------------------------------------------------------------------------
# Fixed parameters, key order, degenerate starts, MAP.

@pytest.mark.slow
def test_fixed_weights_kept_pass_and_reestimated_fail(tmp_path):
  kept = next(m for m in em.CORRECT if m.name == "fixed_weights")
  report = verify_file(em.write(kept, tmp_path), checks=("4",), n_points=1)
  assert report.passed and report["4e"].passed, str(report)
  changed = next(m for m in em.MUTANTS if m.name == "fixed_weights_reestimated")
  report = verify_file(em.write(changed, tmp_path), checks=("4",), n_points=1)
  assert report.failed_checks == ["4e"], str(report)
  assert "'weights'" in report["4e"].detail


def test_m_step_keys_in_another_order_pass(tmp_path):
  reordered = next(m for m in em.CORRECT if m.name == "keys_reordered")
  assert verify_file(em.write(reordered, tmp_path), checks=("4", "5"), n_points=1).passed


@pytest.mark.slow
def test_collapsing_start_is_degenerate_not_a_failure(tmp_path):
  """One start collapses a component onto a single far point: replaced, not failed."""
  path = _file(tmp_path, em.GMM, "collapse", (
      "  x = np.concatenate([c + 0.8 * rng.standard_normal((n_per_cluster, 2)) for c in centres])\n",
      "  x = np.concatenate([c + 0.8 * rng.standard_normal((n_per_cluster, 2)) for c in centres]"
      " + [[[6.0, 6.0]]])\n"), (
      '"means": data["x"][[0, 40, 80]],', '"means": data["x"][[0, 40, 120]],'), (
      '"covariances": np.stack([np.eye(2)] * K),',
      '"covariances": np.stack([np.eye(2)] * K),'))
  report = verify_file(path, checks=("1", "2", "3", "4", "5"), n_points=2)
  assert report.passed, str(report)
  assert report.info.get("degenerate_starts"), str(report)
  assert any("degenerate" in n for n in report.notes)


@pytest.mark.slow
def test_map_em_passes_and_the_ml_m_step_fails(tmp_path):
  report = verify_file(os.path.join(em.EXAMPLES, "gmm_map_em.py"), checks=("4",), n_points=1)
  assert report.passed, str(report)
  ignored = next(m for m in em.MUTANTS if m.name == "prior_ignored")
  report = verify_file(em.write(ignored, tmp_path), checks=("4",), n_points=1)
  assert report.blamed_steps == ["M"] and "4b" in report.failed_checks, str(report)


# ----------------------------------------------------------------------------
# Exceptions stay in their check.

def test_exception_in_one_check_keeps_the_others(tmp_path):
  path = _file(tmp_path, em.GMM, "raises", (
      "def m_step(params, stats):\n  n = stats[\"n\"]\n",
      "def m_step(params, stats):\n  n = stats[\"n\"]\n"
      "  raise np.linalg.LinAlgError('Singular matrix')\n"))
  report = verify_file(path, checks=POINT, n_points=1)
  for check in ("1", "2", "2b", "3"):
    assert report[check].passed, str(report)
  assert report["4b"].passed is False and report["4b"].raised
  assert "LinAlgError: Singular matrix" in report["4b"].detail
  assert os.path.basename(path) in report["4b"].detail     # the user's file and line
  assert report.blamed_steps == ["M"]


# ----------------------------------------------------------------------------
# One-line ValueErrors for setup mistakes.

@pytest.mark.parametrize("edits, match", [
    ((('return {"weights": n / tf.reduce_sum(n), "means": means, "covariances": covariances}',
       'return {"weights": n / tf.reduce_sum(n), "means": means}'),),
     r"m_step returned parameters .* missing \['covariances'\]"),
    ((('"means": means,', '"means": means[:2],'),), r"'means' with shape \[2, 2\]"),
    ((('return {"weights": n / tf.reduce_sum(n),', 'return {"weights": tf.cast(n / tf.reduce_sum(n), tf.float32),'),),
     "float32"),
    ((('latents = {"z": K}', 'latents = {"z": 2}'),), "cardinalities"),
    ((('param_specs = {', 'param_specs = {"scale": None,'),), r"not in init_params"),
])
def test_setup_mistakes_are_one_line_value_errors(edits, match, tmp_path):
  path = _file(tmp_path, em.GMM, "setup", *edits)
  with pytest.raises(ValueError, match=match) as err:
    verify_file(path, checks=("1",), n_points=1)
  assert "\n" not in str(err.value)
  assert main_verify(path) == 2


def test_gaussian_posterior_without_the_expected_keys(tmp_path):
  path = _file(tmp_path, em.RI, "keys", ('return {"u_mean": mean, "u_cov": tf.linalg.diag(1.0 / prec)}',
                                         'return {"b_mean": mean, "b_cov": tf.linalg.diag(1.0 / prec)}'),
               ('m, v = post["u_mean"], tf.linalg.diag_part(post["u_cov"])',
                'm, v = post["b_mean"], tf.linalg.diag_part(post["b_cov"])'))
  with pytest.raises(ValueError, match=r"must return \['u_mean', 'u_cov'\]"):
    verify_file(path, checks=("1",), n_points=1)


def test_verify_file_takes_overrides_of_names_in_the_file():
  ex = load_user_module(os.path.join(em.EXAMPLES, em.GMM))
  report = verify_file(os.path.join(em.EXAMPLES, em.GMM), posterior=ex.posterior, checks=("2",),
                       n_points=1)
  assert report["2"].passed


def test_declared_gaussian_latent_that_is_not_linear_gaussian():
  joint = lambda p: tfd.JointDistributionNamed(dict(
      u=tfd.Sample(tfd.Normal(tf.constant(0.0, tf.float64), 1.0), 3),
      y=lambda u: tfd.Independent(tfd.Normal(tf.exp(u) * p["a"], 1.0), 1)))
  with pytest.raises(ValueError, match="exact Gaussian-conditioning path does not apply"):
    verify(joint, {"y": np.ones(3)}, e_step=lambda p, d: ({}, 0.0), m_step=lambda p, s: p,
           init_params={"a": 1.0}, param_specs={"a": tfb.Identity()}, latents={"u": "gaussian"},
           posterior=lambda p, d: {})


def test_numpy_steps_run_eagerly_and_say_so(tmp_path):
  path = _file(tmp_path, em.POISSON, "numpy", (
      '  return {"weights": n / tf.reduce_sum(n), "rates": stats["sx"] / n}',
      '  n = np.asarray(n)\n  return {"weights": n / n.sum(), "rates": np.asarray(stats["sx"]) / n}'))
  report = verify_file(path, checks=("4",), n_points=1)
  assert report.passed, str(report)
  assert any("ran eagerly" in n for n in report.notes)
