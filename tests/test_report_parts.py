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


def test_dataset_coords_name_dims_and_their_bis_twins():
  from tfp_em.diagnostics.naming import dataset_coords
  sizes = {"chain": 2, "effect": 2, "effect_bis": 2, "coef": 3}
  got = dataset_coords({"effect": ["(Intercept)", "Days"], "class": ["a"]}, sizes)
  assert got == {"effect": ["(Intercept)", "Days"], "effect_bis": ["(Intercept)", "Days"]}
  with pytest.raises(ValueError, match="feature_names has 3 names but the data has 2"):
    dataset_coords({"feature": ["a", "b", "c"]}, {"feature": 2})
  with pytest.raises(ValueError, match="'coef'"):
    dataset_coords({"coef": ["x"]}, sizes)
  named = entries([("covariance", (2, 2))], {"covariance": ("effect", "effect_bis")}, got)
  assert [e.name for e in named if e.keep] == [
      "covariance[(Intercept), (Intercept)]", "covariance[(Intercept), Days]",
      "covariance[Days, Days]"]


def test_posterior_intervals_of_random_effects():
  from tfp_em.diagnostics.group_plots import posterior_intervals
  mean = np.array([[1.0, -2.0], [0.0, 0.5]])
  cov = np.array([[[4.0, 0.3], [0.3, 0.25]], [[1.0, 0.0], [0.0, 0.0]]])
  lower, upper = posterior_intervals(mean, cov, level=0.9)
  z = norm.ppf(0.95)
  np.testing.assert_allclose(upper - mean, z * np.array([[2.0, 0.5], [1.0, 0.0]]))
  np.testing.assert_allclose(mean - lower, upper - mean)
  with pytest.raises(ValueError, match="do not match"):
    posterior_intervals(mean, cov[:, :1, :1])
  with pytest.raises(ValueError, match="level"):
    posterior_intervals(mean, cov, level=95)


def test_few_groups_are_all_labelled_many_only_a_few():
  from tfp_em.diagnostics.group_plots import ALL_LABELS, labelled_ranks
  np.testing.assert_array_equal(labelled_ranks(5), np.arange(5))
  many = labelled_ranks(500)
  assert len(many) <= 9 and many[0] == 0 and many[-1] == 499   # both ends, evenly spaced
  assert np.all(np.diff(many) > 50)
  assert len(labelled_ranks(ALL_LABELS)) == ALL_LABELS


def test_caterpillar_has_one_panel_per_random_effect():
  from tfp_em.diagnostics.group_plots import caterpillar
  rng = np.random.default_rng(0)
  g = 300
  cov = np.broadcast_to(np.diag([0.2, 0.05]), (g, 2, 2))
  fig = caterpillar(rng.normal(size=(g, 2)), cov, [f"s{i}" for i in range(g)],
                    ["(Intercept)", "Days"], group_name="Subject")
  panels = [ax for ax in fig.axes if ax.get_visible()]
  assert [ax.get_title() for ax in panels] == ["(Intercept)", "Days"]
  assert all(len(ax.get_yticklabels()) <= 9 for ax in panels)     # a few labels, not 300


def test_mixed_model_terms_are_named_as_lme4_names_them():
  from types import SimpleNamespace
  from tfp_em.mixed_effects.names import term_names
  est = SimpleNamespace(formula_=None, n_random_effects_=3, random_effects="slopes",
                        network_=None, fit_intercept=True, n_features_in_=2, crossed_=None)
  names = term_names(est)
  assert names == (("(Intercept)", "x1", "x2"), ("(Intercept)", "time", "time^2"), "clusters")
  assert term_names(est, ["dose", "age"]).fixed == ("(Intercept)", "dose", "age")
  est.feature_names_in_ = np.array(["a", "b"], dtype=object)       # fitted on a DataFrame
  assert term_names(est).fixed == ("(Intercept)", "a", "b")
  custom = SimpleNamespace(**{**vars(est), "random_effects": "custom", "fit_intercept": False})
  assert term_names(custom) == (("a", "b"), ("z1", "z2", "z3"), "clusters")
  net = SimpleNamespace(**{**vars(est), "network_": object(), "random_effects": "intercept",
                           "n_random_effects_": 1})
  assert term_names(net)[:2] == (("f(x)",), ("(Intercept)",))


def test_class_summary_and_calibration():
  from tfp_em.diagnostics.classifier_plots import calibration, class_summary
  probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6], [0.45, 0.55]])
  labels = np.array([0, 1, 1, 1, 0])
  replicated = np.array([[0, 0, 1, 1, 1]] * 50 + [[0, 1, 1, 1, 1]] * 50)
  s = class_summary(probs, labels, replicated)
  np.testing.assert_array_equal(s.observed, [2, 3])
  np.testing.assert_allclose(s.expected, [2.85, 2.15])
  # predicted 0, 0, 1, 1, 1: class 0 recall 1/2, precision 1/2; class 1 recall 2/3, prec. 2/3
  np.testing.assert_allclose(s.recall, [0.5, 2 / 3])
  np.testing.assert_allclose(s.precision, [0.5, 2 / 3])
  assert list(s.replicated_lower) == [1, 3] and list(s.replicated_upper) == [2, 4]
  predicted, observed, counts, what = calibration(probs, labels, n_bins=2)
  assert what == "P(class 1)" and list(counts) == [2, 3]
  np.testing.assert_allclose(predicted, [0.15, 0.6166666666666667])   # bins [0, .5), [.5, 1]
  np.testing.assert_allclose(observed, [0.5, 2 / 3])
  three = np.array([[0.7, 0.2, 0.1], [0.3, 0.6, 0.1], [0.2, 0.2, 0.6], [0.5, 0.4, 0.1]])
  predicted, observed, counts, what = calibration(three, np.array([0, 0, 2, 1]), n_bins=2)
  assert what == "top-class P" and list(counts) == [1, 3]   # 0.5 falls in the lower bin
  np.testing.assert_allclose(observed, [0.0, 2 / 3])       # upper bin: 2 of 3 right
  with pytest.raises(ValueError, match="do not match"):
    class_summary(probs, labels[:3], replicated)
