"""Bad input to every estimator, the CSV loader and the CLI gets an error naming the problem.

The cases live in `robustness_cases.py` beside this file (shared with
`validation/robustness.py`); each must end as a clear error (a ValueError
whose message names the problem; for the CLI exit code 2, one line, nothing
written) or, for the few inputs that are legitimate, as a handled fit with
finite parameters.
"""
import numpy as np
import pytest

from robustness_cases import Case, all_cases, run_case

CASES = all_cases()


def test_catalogue_covers_every_estimator_and_the_cli():
  targets = {c.target for c in CASES}
  assert {"GaussianMixture", "BernoulliMLPClassifier", "MixedEffectsRegressor",
          "CrossedEffectsRegressor", "cli",
          "load_csv"} <= targets
  assert len({c.name for c in CASES}) == len(CASES)  # names are unique


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_case_is_a_clear_error_or_handled(case, tmp_path):
  outcome = run_case(case, tmp_path)
  expected = "clear error" if case.expect == "error" else "handled"
  assert outcome.kind == expected, outcome.detail


def test_the_classifier_flags_crashes(tmp_path):
  """The runner itself: a TypeError, a vague message and silence are crashes."""
  def boom(tmp):
    raise TypeError("deep inside")

  def vague(tmp):
    raise ValueError("something went wrong")

  assert run_case(Case("t", "x", boom, "X"), tmp_path).kind == "crash"
  assert run_case(Case("t", "x", vague, "NaN"), tmp_path).kind == "crash"
  assert run_case(Case("t", "x", lambda tmp: None, "NaN"), tmp_path).kind == "crash"
  bad_fit = Case("t", "x", lambda tmp: None, expect="handled", check=lambda r, w: "NaN params")
  assert run_case(bad_fit, tmp_path).kind == "crash"
  # A CLI run that exits 0 instead of 2 is a crash, as is one that writes files.
  ok_csv = tmp_path / "ok.csv"
  ok_csv.write_text("a,b\n" + "".join(f"{i},{i % 3}\n" for i in range(20)))
  success = Case("t", "cli", lambda tmp: ["fit", "gmm", "--data", str(ok_csv), "--components",
                                          "1", "--max-iter", "2", "--out", str(tmp / "o")], "x")
  assert run_case(success, tmp_path).kind == "crash"


def test_inputs_are_not_modified_by_failing_fits():
  from tfp_em import GaussianMixture
  x = np.random.default_rng(0).normal(size=(20, 2))
  x[3, 1] = np.nan
  before = x.copy()
  with pytest.raises(ValueError, match="NaN"):
    GaussianMixture(2).fit(x)
  np.testing.assert_array_equal(x, before)
