"""The report's parts, one by one: entry names, symmetric repeats, intervals on the link scale,
the restarts' outcomes, model-selection and classification summaries."""
import numpy as np
import pytest
import xarray as xr
from scipy.special import expit, logit
from scipy.stats import norm

import arviz as az

from tfp_em.diagnostics.naming import coordinate_name, entries, is_symmetric_repeat
from tfp_em.diagnostics.restarts import SAME_OPTIMUM_SE, restart_check, restart_outcomes
from tfp_em.diagnostics.standard_errors import entry_links, link_interval

DIMS = {"weights": ("component",), "means": ("component", "feature"),
        "covariances": ("component", "feature", "feature_bis")}


def test_entries_are_named_by_component_and_feature():
  fields = [("weights", (2,)), ("means", (2, 2)), ("covariances", (2, 2, 2))]
  got = entries(fields, DIMS, {"feature": ["eruptions", "waiting"]})
  assert len(got) == 2 + 4 + 8
  assert [e.label for e in got[:3]] == ["weights[0]", "weights[1]", "means[0, 0]"]
  by_label = {e.label: e for e in got}
  assert by_label["means[1, 0]"].name == "means[component 1, eruptions]"
  assert by_label["covariances[0, 0, 1]"].name == "covariances[component 0, eruptions, waiting]"
  # without coords: numbered, with the dim's name
  assert entries([("means", (2, 3))], DIMS)[5].name == "means[component 1, feature 2]"
  assert coordinate_name("feature_bis", 1, {"feature": ["a", "b"]}) == "b"
  assert entries([("noise_variance", ())], {"noise_variance": ()})[0].name == "noise_variance"


def test_symmetric_matrices_keep_each_entry_once():
  got = entries([("covariances", (3, 4, 4))], DIMS)
  kept = [e.index for e in got if e.keep]
  assert len(kept) == 3 * 4 * 5 // 2                      # K D (D + 1) / 2
  assert all(i[1] <= i[2] for i in kept)                  # the upper triangle
  assert is_symmetric_repeat(("effect", "effect_bis"), (1, 0))
  assert not is_symmetric_repeat(("effect", "effect_bis"), (0, 1))
  assert not is_symmetric_repeat(("input", "hidden"), (1, 0))  # not a symmetric pair of dims
  tied = entries([("covariances", (2, 2))], {"covariances": ("feature", "feature_bis")})
  assert [e.keep for e in tied] == [True, True, False, True]


def test_intervals_on_the_link_scale_stay_in_the_support():
  estimate = np.array([0.02, 0.5, 0.3, -1.0, 2.0])
  se = np.array([0.02, 0.1, 0.4, 0.5, 3.0])
  links = ["logit", "logit", "log", "identity", "log"]
  lower, upper = link_interval(estimate, se, links, ci=0.95)
  z = norm.ppf(0.975)
  # plain Wald would give a negative weight and a negative variance here
  assert estimate[0] - z * se[0] < 0 and estimate[2] - z * se[2] < 0
  assert np.all(lower[:2] > 0) and np.all(upper[:2] < 1)
  assert lower[2] > 0 and lower[4] > 0
  # the delta method on the link scale: g(bound) = g(theta) -+ z se / g'(theta)
  p = estimate[0]
  np.testing.assert_allclose(logit(upper[0]) - logit(p), z * se[0] / (p * (1 - p)))
  np.testing.assert_allclose(lower[0], expit(logit(p) - z * se[0] / (p * (1 - p))))
  np.testing.assert_allclose(np.log(upper[2] / 0.3), z * 0.4 / 0.3)
  np.testing.assert_allclose([lower[3], upper[3]], [-1 - z * 0.5, -1 + z * 0.5])
  # small SEs: the same as the plain Wald interval to first order
  lo, hi = link_interval([0.4], [1e-6], ["logit"])
  np.testing.assert_allclose([lo[0], hi[0]], [0.4 - z * 1e-6, 0.4 + z * 1e-6], rtol=1e-9)
  # K = 1: the one weight is 1 with SE 0
  np.testing.assert_array_equal(link_interval([1.0], [0.0], ["logit"]), ([1.0], [1.0]))
  with pytest.raises(ValueError, match="links"):
    link_interval([1.0], [0.1], ["probit"])


@pytest.mark.parametrize("covariance_type,expected", [
    ("full", ["logit"] * 2 + ["identity"] * 4 + ["log", "identity", "identity", "log"] * 2),
    ("diag", ["logit"] * 2 + ["identity"] * 4 + ["log"] * 4),
])
def test_entry_links_follow_the_bijectors(covariance_type, expected):
  import tensorflow as tf
  from models import gaussian_mixture as gm
  k, d = 2, 2
  cov = np.tile(np.eye(d), (k, 1, 1)) if covariance_type == "full" else np.ones((k, d))
  params = gm.GaussianMixtureParams(tf.constant([0.4, 0.6]), tf.zeros([k, d]), tf.constant(cov))
  assert entry_links(params, gm.param_specs(covariance_type)) == expected


def _em_idata(finals, theta, n_iter=(3, 3, 3), steps=(1.0, 0.5, 0.01)):
  """Restarts with final log-likelihoods `finals` and means `theta` [C, 2]; each climbs by
  `steps` (n_iter of them) to its final value."""
  chains, draws = len(finals), max(n_iter) + 1
  lp = np.zeros((chains, draws))
  for c, (f, n) in enumerate(zip(finals, n_iter)):
    lp[c, :n + 1] = f - np.r_[np.cumsum(steps[::-1])[::-1], 0.0]   # the last step is steps[-1]
    lp[c, n + 1:] = f
  means = np.repeat(np.asarray(theta)[:, None, :], draws, axis=1)          # [C, draw, 2]
  post = xr.Dataset({"means": (("chain", "draw", "feature"), means)}, attrs={"best_restart": 0})
  stats = xr.Dataset({"lp": (("chain", "draw"), lp), "n_iter": (("chain",), np.array(n_iter)),
                      "stop_reason": (("chain",), np.array(["converged"] * chains))})
  obs = xr.Dataset({"x": (("obs", "feature"), np.zeros((100, 2)))})
  return az.InferenceData(posterior=post, sample_stats=stats, observed_data=obs)


def test_restarts_stopped_early_are_told_from_other_optima():
  se = np.array([0.1, 0.2])
  idata = _em_idata([-10.0, -10.004, -25.0], [[0, 0], [0.01, -0.02], [1.0, 0.0]])
  best, early, other = restart_outcomes(idata, ["means"], se)
  assert best.kind == "best"
  assert early.kind == "stopped early" and early.distance < SAME_OPTIMUM_SE
  assert "still climbing" in early.text and "0.004" in early.text
  assert other.kind == "different optimum" and other.distance == pytest.approx(10.0)
  check, value, ok = restart_check([best, early, other])
  assert ok is None and "2 of 3 on the best optimum" in value and "1 stopped early" in value
  assert restart_check([best, early])[2] is True


def test_classification_table_and_selection_figure():
  from tfp_em.diagnostics.selection import classification_table, model_selection_figure
  resp = np.array([[0.99, 0.01], [0.6, 0.4], [0.2, 0.8], [0.05, 0.95]])
  table = classification_table(resp)
  assert list(table["assigned points"]) == [2, 2]
  np.testing.assert_allclose(table["expected size"], [1.84, 2.16])
  assert list(table.iloc[:, 2]) == [1, 1]                # 0.6 and 0.8 are below 0.9
  rows = [dict(k=k, covariance_type=c, bic=100.0 - k + (c == "diag"), icl=101.0 - k)
          for k in (1, 2) for c in ("full", "diag")]
  fig = model_selection_figure(rows, (2, "full"))
  assert [ax.get_title() for ax in fig.axes] == ["BIC (lower is better)", "ICL (lower is better)"]
