"""Diagnostics adapter of `BernoulliMLPClassifier` (registered on import of
`tfp_em.bernoulli_mlp`)."""
from __future__ import annotations

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
from scipy.optimize import linear_sum_assignment

from models import bernoulli_mlp as mlp
from tfp_em.bernoulli_mlp.newton import l2_penalty
from tfp_em.bernoulli_mlp.estimator import BernoulliMLPClassifier
from tfp_em.diagnostics.adapters import Adapter, Table, register
from tfp_em.engine import inputs as v

tfd = tfp.distributions


@register(BernoulliMLPClassifier)
class BernoulliMLPAdapter(Adapter):
  """Adapter for `tfp_em.bernoulli_mlp.BernoulliMLPClassifier`.

  Latents: the 2^m hidden configurations (enumerable, so Louis' method
  applies; an L2 penalty enters as a per-point constant of the table). The
  softmax output weights are flat along 'add a vector to every class'
  (m+1 directions): SEs use the pseudo-inverse, i.e. they are the SEs of the
  class-centred weights the estimator stores. Hidden units are matched to the
  reference (Hungarian matching on their input weights, allowing the z -> 1-z
  flip of a unit); output weights are centred across classes after matching.
  """
  params_type = mlp.BernoulliMLPParams
  observed_names = ("y",)
  latent_states = True
  density_check = False  # `figures` checks the class counts

  def model(self, fitted):
    return fitted.em_model(len(fitted.classes_))

  def params(self, fitted):
    return fitted.em_params()

  def param_specs(self, fitted):
    return mlp.param_specs()

  def gauge_dimension(self, fitted):
    return int(fitted.n_hidden) + 1

  def data(self, fitted, X, y=None):
    if y is None:
      raise ValueError("BernoulliMLPClassifier diagnostics need X and y")
    xs = fitted.standardized_inputs(X)
    labels = fitted.label_codes(y, xs.shape[0])
    return (tf.constant(xs, v.check_dtype(fitted.dtype)), tf.constant(labels))

  def observed(self, data):
    return {"y": np.asarray(data[1])}

  def pointwise_log_likelihood(self, fitted, params, data):
    return mlp.marginal_log_prob(params, data[0], data[1])

  def complete_log_prob_table(self, fitted, params, data):
    """log p(z = config_k, y_n | x_n) - penalty / N, shape [N, 2^m]."""
    model = self.model(fitted)
    x, y = data
    dtype = params.hidden_weights.dtype
    table = model.log_joint(params, mlp.add_bias(x), tf.one_hot(y, model.num_classes, dtype=dtype),
                            model.configurations(dtype))
    return table - l2_penalty(params, model.l2) / tf.cast(tf.shape(y)[0], dtype)

  def dims(self, fitted):
    return {"hidden_weights": ("input", "hidden"), "output_weights": ("hidden_bias", "class")}

  def label_permutation(self, fitted, reference, params):
    """(perm, signs): unit perm[j] (flipped where signs[j] = -1) matches unit j.

    Two exact symmetries: permuting hidden units, and flipping one (z_h ->
    1 - z_h, i.e. W[:, h] -> -W[:, h], V[0] += V[h+1], V[h+1] -> -V[h+1]).
    """
    ref = np.asarray(reference.hidden_weights).T                  # [m, D+1]
    cand = np.asarray(params.hidden_weights).T
    plus = np.sum((ref[:, None] - cand[None]) ** 2, -1)           # [m, m]
    minus = np.sum((ref[:, None] + cand[None]) ** 2, -1)
    _, perm = linear_sum_assignment(np.minimum(plus, minus))
    rows = np.arange(len(perm))
    return perm, np.where(minus[rows, perm] < plus[rows, perm], -1.0, 1.0)

  def is_relabelling(self, perm_signs) -> bool:
    perm, signs = perm_signs
    return not np.array_equal(perm, np.arange(len(perm))) or bool(np.any(signs < 0))

  def permute(self, fitted, params, perm_signs):
    perm, signs = perm_signs
    w = np.array(params.hidden_weights, copy=True)
    out = np.array(params.output_weights, copy=True)
    for h, s in zip(perm, signs):
      if s < 0:
        out[0] += out[h + 1]
        out[h + 1] = -out[h + 1]
        w[:, h] = -w[:, h]
    out = out[np.concatenate([[0], np.asarray(perm) + 1])]
    return type(params)(w[:, perm], out - out.mean(axis=-1, keepdims=True))

  def posterior_predictive(self, fitted, params, data, num_draws, seed):
    dist = mlp.marginal(params, data[0])
    y = dist.sample(num_draws, seed=tf.constant([int(seed) % 2**31, 13], tf.int32))
    return {"y": y.numpy()}

  def simulate(self, fitted, params, data, seed):
    y = self.posterior_predictive(fitted, params, data, 1, seed)["y"][0]
    return (data[0], tf.constant(y, tf.int32))

  def default_priors(self, fitted, data):
    """Weak: every weight ~ N(0, 10^2) (inputs are standardized)."""
    p = self.params(fitted)
    dtype = p.hidden_weights.dtype
    return {name: tfd.Independent(tfd.Normal(tf.zeros(value.shape, dtype), tf.constant(10.0, dtype)), 2)
            for name, value in zip(p._fields, p)}

  def coords(self, fitted, feature_names=None):
    """Inputs by feature (the bias first), hidden units by number, classes by label."""
    if feature_names is None:
      feature_names = getattr(fitted, "feature_names_in_", None)
    features = ([str(f) for f in feature_names] if feature_names is not None
                else [f"x{j}" for j in range(int(fitted.n_features_in_))])
    units = [f"unit {h}" for h in range(int(fitted.n_hidden))]
    return {"input": ["bias"] + features, "hidden": units, "hidden_bias": ["bias"] + units,
            "class": [f"class {c}" for c in fitted.classes_]}

  def _fit_on_training_data(self, fitted, data):
    """(p(y | x) [N, C], replicated labels [100, N]) at the estimate."""
    params = self.params(fitted)
    probs = np.exp(self.model(fitted).predict_log_proba(params, data[0]).numpy())
    replicated = self.posterior_predictive(fitted, params, data, 100, seed=1)["y"]
    return probs, replicated

  def tables(self, fitted, data, feature_names=None):
    from tfp_em.diagnostics.classifier_plots import class_summary  # sklearn.calibration
    probs, replicated = self._fit_on_training_data(fitted, data)
    labels = np.asarray(data[1])
    s = class_summary(probs, labels, replicated)
    rows = [[str(c), int(s.observed[i]), float(s.expected[i]),
             f"{s.replicated_lower[i]:.0f} - {s.replicated_upper[i]:.0f}",
             float(s.recall[i]), float(s.precision[i])] for i, c in enumerate(fitted.classes_)]
    accuracy = float(np.mean(np.argmax(probs, axis=1) == labels))
    log_loss = float(-np.mean(np.log(np.maximum(probs[np.arange(len(labels)), labels], 1e-300))))
    note = (f"On the {len(labels)} training points: accuracy {accuracy:.3f}, log loss "
            f"{log_loss:.4f}. Expected count: the sum of p(class | x); replicated range: the "
            "2.5-97.5% range of the class counts in 100 label sets drawn from the fitted model; "
            "recall and precision of the most probable class.")
    return [Table("Classes", note, ["class", "observed count", "expected count",
                                    "replicated 95% range", "recall", "precision"], rows)]

  def figures(self, fitted, data, feature_names=None):
    from tfp_em.diagnostics import classifier_plots, plots  # matplotlib loads on first use
    probs, replicated = self._fit_on_training_data(fitted, data)
    return [
        (classifier_plots.classifier_figure(probs, np.asarray(data[1]), replicated,
                                            fitted.classes_), "classifier.png",
         "On the training data: the confusion matrix (counts; shade: share of the true class), "
         "the calibration curve (predicted probability against observed frequency, 10 bins) "
         "and each class's count against the counts in 100 label sets drawn from the fitted "
         "model (a per-class predictive check)."),
        (plots.hidden_unit_heatmap(fitted, data), "hidden_units.png",
         "Posterior E[z_h | x, y] of every hidden unit (columns) for every point (rows, "
         "grouped by class)."),
    ]

  def rebuild(self, estimator_class, config, params, n_features):
    raise ValueError("rebuilding a BernoulliMLPClassifier from netCDF is not supported (the "
                     "input scaling is not stored); write the report from the fitted estimator")
