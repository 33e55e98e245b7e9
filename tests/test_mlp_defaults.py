"""The default penalty of `BernoulliMLPClassifier` (l2='auto', issue 21).

The docstring's promises: the penalty is one of `penalty.L2_GRID`, the one
whose fit on a stratified 80% scores the best held-out log-likelihood per
point along a walk from the strongest penalty that stops at the first one
no better than the best; the final fit is exactly the fit with `l2=l2_`;
its objective (the one EM monitors and `tfp_em.verify` checks) is the
log-likelihood minus (l2_ / 2) |w|^2 and never decreases.
"""
import warnings

import numpy as np
import pytest
import tensorflow as tf

from models.bernoulli_mlp import BernoulliMLPParams
from tfp_em import verify
from tfp_em.bernoulli_mlp import em as bm
from tfp_em.bernoulli_mlp import penalty
from tfp_em.bernoulli_mlp.estimator import BernoulliMLPClassifier
from tfp_em.bernoulli_mlp.newton import l2_penalty
from tfp_em.engine import fit_em


def _overlapping(n_per=30, seed=0):
  """Three overlapping classes in 2-D, shifted and scaled away from unit scale."""
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(3), n_per)
  centres = np.array([[0., 0.], [2., 0.], [0., 2.]])
  return 50. + 10. * (centres[labels] + rng.normal(size=(3 * n_per, 2))), labels


def _fit(x, y, **kw):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return BernoulliMLPClassifier(**kw).fit(x, y)


def _params(est):
  return BernoulliMLPParams(*[tf.constant(p) for p in est.params_])


# ---- The pure pieces. ----------------------------------------------------------

def test_walk_grid_stops_at_the_first_penalty_no_better_than_the_best():
  curve = {10.: -2., 1.: -1., 0.1: -0.5, 0.01: -0.7, 0.001: 0.}   # 0.001 is never reached
  seen = []

  def score(l2):
    seen.append(l2)
    return curve[l2]

  best, scores = penalty.walk_grid(score, grid=tuple(curve))
  assert best == 0.1 and seen == [10., 1., 0.1, 0.01]
  assert scores == {l2: curve[l2] for l2 in seen}
  # A tie stops the walk; NaN counts as -inf; a rising curve is walked to its end.
  assert penalty.walk_grid(lambda l2: -1., grid=(3., 2., 1.)) == (3., {3.: -1., 2.: -1.})
  best, scores = penalty.walk_grid(lambda l2: np.nan if l2 < 2 else -l2, grid=(3., 2., 1.))
  assert best == 2. and scores[1.] == -np.inf
  assert penalty.walk_grid(lambda l2: -l2, grid=(3., 2., 1.))[0] == 1.


def test_holdout_split_is_stratified_and_refuses_tiny_classes():
  labels = np.repeat(np.arange(3), [10, 20, 30])
  train, held_out = penalty.holdout_split(labels, 3, seed=0)
  assert len(held_out) == 12 and len(train) == 48
  assert sorted(np.concatenate([train, held_out]).tolist()) == list(range(60))
  np.testing.assert_array_equal(np.bincount(labels[held_out]), [2, 4, 6])
  again = penalty.holdout_split(labels, 3, seed=0)
  np.testing.assert_array_equal(again[1], held_out)
  assert penalty.holdout_split(np.array([0, 0, 0, 1, 1, 2]), 3, seed=0) is None  # one row of class 2
  assert penalty.holdout_split(np.repeat([0, 1, 2], 2), 3, seed=0) is None      # 2 held out < 3 classes


# ---- The estimator's default. --------------------------------------------------

def test_default_penalty_is_the_held_out_choice_and_the_fit_at_it():
  x, y = _overlapping()
  est = _fit(x, y, n_hidden=2, max_iter=30)
  assert BernoulliMLPClassifier().l2 == "auto"
  tried = list(est.l2_scores_)
  assert tried == list(penalty.L2_GRID[:len(tried)]) and len(tried) >= 2
  assert est.l2_ == max(est.l2_scores_, key=est.l2_scores_.get)
  # The walk stopped at the first penalty no better than the best (or at the grid's end).
  values = list(est.l2_scores_.values())
  assert all(b > a for a, b in zip(values[:-2], values[1:-1]))
  assert len(tried) == len(penalty.L2_GRID) or values[-1] <= max(values[:-1])

  # Each score is the held-out log-likelihood per point of a fit on the other 80%
  # (the estimator's standardized inputs, the same seed).
  xs = est.standardized_inputs(x)
  train, held_out = penalty.holdout_split(y, 3, seed=0)
  model = bm.BernoulliMLPEM(2, 3, l2=est.l2_)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    sub = fit_em(model, (tf.constant(xs[train]), tf.constant(y[train], tf.int32)),
                 max_iter=30, tol=est.tol, seed=0, progress=False, accelerate=est.accelerate)
  held = float(model.marginal_log_prob(sub.params, (tf.constant(xs[held_out]),
                                                     tf.constant(y[held_out], tf.int32))))
  held += float(l2_penalty(sub.params, est.l2_))                      # unpenalized
  assert est.l2_scores_[est.l2_] == pytest.approx(held / len(held_out), rel=1e-10)

  # The final fit is the fixed-penalty fit at l2_, and its objective is penalized by l2_.
  fixed = _fit(x, y, n_hidden=2, max_iter=30, l2=est.l2_)
  for a, b in zip(est.params_, fixed.params_):
    np.testing.assert_array_equal(a, b)
  assert fixed.l2_ == est.l2_ and fixed.l2_scores_ == {}
  assert est.em_model(3).l2 == est.l2_
  assert est.objective_ == pytest.approx(
      est.log_likelihood_ - float(l2_penalty(_params(est), est.l2_)), rel=1e-10)
  trace = est.fit_result_.restarts[0].log_likelihood
  assert np.all(np.diff(trace) >= -1e-10 * np.abs(trace[1:]))
  assert trace[-1] == pytest.approx(est.objective_)


def test_default_penalty_beats_maximum_likelihood_on_separable_classes():
  """The issue's case: ML drives the training loglik to 0 and the held-out one down."""
  rng = np.random.default_rng(1)
  labels, y_test = np.repeat([0, 1], 20), np.repeat([0, 1], 200)
  x = rng.normal(size=(40, 8)) + 0.8 * labels[:, None]                # 40 points in 8-D: separable
  x_test = rng.normal(size=(400, 8)) + 0.8 * y_test[:, None]
  auto = _fit(x, labels, n_hidden=2, max_iter=80)
  ml = _fit(x, labels, n_hidden=2, max_iter=80, l2=0.)
  assert auto.l2_ > 0.
  assert ml.log_likelihood_ > auto.log_likelihood_                    # ML fits the training set closer
  held_auto, held_ml = auto.log_likelihood(x_test, y_test), ml.log_likelihood(x_test, y_test)
  assert held_auto > held_ml + 10., (held_auto, held_ml)


@pytest.mark.slow  # the verifier runs EM and L-BFGS to convergence: ~10 s
def test_verifier_passes_the_default_model():
  x, y = _overlapping(n_per=15)
  est = _fit(x, y, n_hidden=2, max_iter=40)
  data = (tf.constant(est.standardized_inputs(x)), tf.constant(y, tf.int32))
  report = verify(est.em_model(3), data, n_points=2)
  assert report.passed, str(report)


def test_small_classes_fall_back_and_bad_l2_is_refused():
  x, y = _overlapping(n_per=4)
  y = y.copy()
  y[0] = 3                                                             # a class of one row
  est = _fit(x, y, n_hidden=2, max_iter=10)
  assert est.l2_ == penalty.SMALL_DATA_L2 and est.l2_scores_ == {}
  with pytest.raises(ValueError, match="l2 must be 'auto' or a number"):
    BernoulliMLPClassifier(l2="max").fit(x, y)
  with pytest.raises(ValueError, match="not fitted"):
    BernoulliMLPClassifier().em_model(3)
  assert BernoulliMLPClassifier(l2=0.5).em_model(3).l2 == 0.5


def test_a_refit_of_the_default_traces_nothing_new():
  from tfp_em.engine import compiling
  x, y = _overlapping(n_per=10)
  _fit(x, y, n_hidden=2, max_iter=5)
  before = compiling.tracing_count()
  again = _fit(x, y, n_hidden=2, max_iter=5)   # the held-out fits and the final one: all cached
  assert compiling.tracing_count() == before and len(again.l2_scores_) >= 2


def test_default_squarem_fit_converges_sooner_to_a_point_plain_em_reaches():
  """SQUAREM (the default) and plain EM from the same start: both monotone and
  converged, SQUAREM in fewer iterations; plain EM started at SQUAREM's
  answer stays there (a fixed point of the same EM map)."""
  x, y = _overlapping(n_per=20)
  fast = _fit(x, y, n_hidden=2, l2=0.3, max_iter=2000, tol=1e-9)
  plain = _fit(x, y, n_hidden=2, l2=0.3, max_iter=2000, tol=1e-9, accelerate=None)
  assert fast.accelerate == "squarem" and fast.converged_ and plain.converged_
  assert fast.n_iter_ < plain.n_iter_, (fast.n_iter_, plain.n_iter_)
  for est in (fast, plain):
    trace = est.fit_result_.restarts[0].log_likelihood
    assert np.all(np.diff(trace) >= -1e-10 * np.abs(trace[1:]))
  model = fast.em_model(3)
  data = (tf.constant(fast.standardized_inputs(x)), tf.constant(fast.label_codes(y, len(y))))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")   # tol=0: five iterations, never 'converged'
    again = fit_em(model, data, max_iter=5, tol=0., init_params=_params(fast), progress=False)
  assert again.log_likelihood == pytest.approx(fast.objective_, rel=1e-7)
