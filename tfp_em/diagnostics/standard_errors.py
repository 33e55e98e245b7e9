"""Standard errors of EM estimates: observed information, Louis, bootstrap.

All three work in the unconstrained coordinates u = b^{-1}(theta) given by
each parameter's `ParamSpec.bijector` (weights: SoftmaxCentered, so K-1
free numbers; full covariances: the Cholesky fill, D(D+1)/2 numbers), where
the information matrix is non-singular, and map back by the delta method:

    Cov(theta_hat) = J I(u_hat)^{-1} J^T,   J = d theta / d u   (autodiff)

* 'hessian': I(u) = -d^2 l(u) / du du^T, the autodiff Hessian of the TFP
  marginal log-likelihood (`model.marginal_log_prob`).
* 'louis' (models with enumerable discrete latents): Louis' identity
  I_obs = I_complete - I_missing with
      I_complete = -d^2/du^2 sum_n sum_k r_nk log p(x_n, k | u)   (r fixed)
      I_missing  = sum_n Cov_{k ~ r_n}[ d/du log p(x_n, k | u) ],
  computed from the complete-data table; it equals the Hessian exactly (up to
  round-off), so comparing the two checks both.
* `bootstrap_standard_errors`: parametric bootstrap (simulate from theta_hat,
  refit from theta_hat, align labels, take the standard deviation).

At the MLE the delta-method SEs do not depend on the choice of bijectors.
Intervals are Wald intervals on each entry's unconstrained scale, mapped back
(`entry_links`, `link_interval`): logit for a probability (mixture weights
stay in (0, 1)), log for a variance or any positive entry, the identity
otherwise (means, covariances off the diagonal).

#### References

[1] T. A. Louis. Finding the observed information matrix when using the EM
    algorithm. JRSS B, 44(2):226-233, 1982.
[2] G. J. McLachlan and T. Krishnan. The EM Algorithm and Extensions, 2nd
    ed., chapter 4. Wiley, 2008.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import NamedTuple

import numpy as np
import pandas as pd
import tensorflow as tf
import tensorflow_probability as tfp
from scipy.stats import norm

from tfp_em.diagnostics.adapters import get_adapter
from tfp_em.diagnostics.inference_data import resolve_data
from tfp_em.diagnostics.naming import entries
from tfp_em.engine import inputs as v
from tfp_em.engine.loop import fit_em, progress_enabled
from tfp_em.engine.unconstrained import Flattener

METHODS = ("hessian", "louis")


def as_float64(data):
  """`data` (a tuple or NamedTuple of tensors) with its floating tensors cast to float64."""
  return tf.nest.map_structure(lambda d: tf.cast(d, tf.float64) if d.dtype.is_floating else d,
                               data)


def hessian_information(model, flat: Flattener, data):
  """-Hessian of the marginal log-likelihood at u_hat, [P, P]."""
  u = flat.u_hat
  with tf.GradientTape() as outer:
    outer.watch(u)
    with tf.GradientTape() as inner:
      inner.watch(u)
      loglik = model.marginal_log_prob(flat.unflatten(u), data)
    grad = inner.gradient(loglik, u)
  return -outer.jacobian(grad, u)


def louis_information(table_fn, flat: Flattener, data, weights=None):
  """Louis' observed information at u_hat, [P, P].

  `table_fn(params, data)` returns log p(obs_n, latent = k | params), [N, K];
  `weights` [N] are per-point weights (None: every point counts once).
  """
  weights = tf.cast(1.0 if weights is None else weights, tf.float64)
  u = flat.u_hat
  with tf.GradientTape(persistent=True) as outer:
    outer.watch(u)
    with tf.GradientTape(persistent=True) as inner:
      inner.watch(u)
      table = table_fn(flat.unflatten(u), data)                        # [N, K]
      resp = tf.stop_gradient(tf.nn.softmax(table, axis=-1))        # [N, K]
      q = tf.reduce_sum(weights * tf.reduce_sum(resp * table, -1))  # Q(u | u_hat)
    grad_q = inner.gradient(q, u)
    scores = inner.jacobian(table, u)  # [N, K, P]
  complete = -outer.jacobian(grad_q, u)
  mean_score = tf.einsum("nk,nkp->np", resp, scores)                 # [N, P]
  centred = scores - mean_score[:, tf.newaxis, :]
  w = weights * tf.ones_like(resp[:, 0])
  missing = tf.einsum("n,nk,nkp,nkq->pq", w, resp, centred, centred)
  return complete - missing


class StandardErrors(NamedTuple):
  """Delta-method standard errors.

  Attributes:
    labels: names of the constrained entries ('means[0, 1]', ...), [Q].
    estimate: the estimates, [Q].
    se: standard errors, [Q].
    covariance: their covariance, [Q, Q].
    information: the observed information in unconstrained coordinates, [P, P].
    method: 'hessian', 'louis' or 'bootstrap'.
    links: each entry's scale for intervals ('logit', 'log', 'identity'), [Q].
  """
  labels: list
  estimate: np.ndarray
  se: np.ndarray
  covariance: np.ndarray
  information: np.ndarray | None
  method: str
  links: list = ()

  def interval(self, ci: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """(lower [Q], upper [Q]) `ci` intervals (`link_interval` on each entry's scale)."""
    return link_interval(self.estimate, self.se, self.links or ["identity"] * len(self.se), ci)


LINKS = ("identity", "log", "logit")


def entry_links(template, specs) -> list[str]:
  """Each trainable entry's interval scale, from its field's bijector, [Q].

  SoftmaxCentered (a probability vector): 'logit'; Exp, Softplus (positive):
  'log'; a Cholesky-based covariance bijector: 'log' on the diagonal, the
  identity off it; anything else: 'identity'. Order as `Flattener.constrained`.
  """
  tfb = tfp.bijectors
  out = []
  for param, spec in zip(template, specs):
    if not spec.trainable:
      continue
    shape = tuple(param.shape)
    bijector = spec.bijector
    outer = bijector.bijectors[0] if isinstance(bijector, tfb.Chain) else bijector
    for index in np.ndindex(*shape):
      if isinstance(outer, tfb.SoftmaxCentered):
        out.append("logit")
      elif isinstance(outer, (tfb.Exp, tfb.Softplus)):
        out.append("log")
      elif isinstance(outer, tfb.CholeskyOuterProduct):
        out.append("log" if index[-1] == index[-2] else "identity")
      else:
        out.append("identity")
  return out


def link_interval(estimate, se, links, ci: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
  """Wald intervals on each entry's link scale, mapped back.

  With g the link and theta the estimate, the delta method gives
  se(g(theta)) = se / |g'(theta)|; the interval is
  g^{-1}(g(theta) -+ z se(g(theta))), inside the entry's support.

  Args:
    estimate, se: [Q] estimates and their standard errors.
    links: [Q] of 'identity', 'log' (theta > 0: theta exp(-+ z se / theta))
      or 'logit' (0 < theta < 1).
    ci: interval probability in (0, 1).

  Returns:
    (lower [Q], upper [Q]).

  Raises:
    ValueError: for an unknown link.
  """
  estimate, se = np.asarray(estimate, np.float64), np.asarray(se, np.float64)
  links = np.asarray(list(links), dtype=object)
  unknown = sorted(set(links) - set(LINKS))
  if unknown or links.shape != estimate.shape:
    raise ValueError(f"links must be {LINKS}, one per estimate; got {unknown or links.shape}")
  z = norm.ppf(0.5 + ci / 2)
  lower, upper = estimate - z * se, estimate + z * se
  # an estimate on its support's boundary (the one weight of K = 1, se 0) keeps the plain interval
  pos = (links == "log") & (estimate > 0)
  prob = (links == "logit") & (estimate > 0) & (estimate < 1)
  half = z * se[pos] / estimate[pos]                                  # z se(log theta)
  lower[pos], upper[pos] = estimate[pos] * np.exp(-half), estimate[pos] * np.exp(half)
  p = estimate[prob]
  logit, half = np.log(p) - np.log1p(-p), z * se[prob] / (p * (1 - p))  # z se(logit p)
  lower[prob], upper[prob] = _expit(logit - half), _expit(logit + half)
  return lower, upper


def _expit(t):
  return 0.5 * (1 + np.tanh(0.5 * t))


def standard_errors(fitted, X=None, y=None, *, method: str = "hessian",
                    **data_kwargs) -> StandardErrors:
  """Standard errors of a fitted estimator's params (see the module docstring).

  Args:
    fitted: a fitted estimator with a registered adapter.
    X, y: the training data (optional if the fit kept it).
    method: 'hessian' (default) or 'louis'.
    data_kwargs: further data `fit` took (sample_weight; clusters, time, Z).
  """
  v.check_option("method", method, METHODS)
  with _quiet_retracing():
    return _standard_errors(fitted, resolve_data(fitted, X, y, **data_kwargs), method)


@contextlib.contextmanager
def _quiet_retracing():
  """Eager `tape.jacobian` wraps pfor in a fresh tf.function per call, which
  trips TF's retracing warning on repeated use; it is harmless here."""
  logger = tf.get_logger()
  level = logger.level
  logger.setLevel("ERROR")
  try:
    yield
  finally:
    logger.setLevel(level)


def _standard_errors(fitted, data, method):
  adapter = get_adapter(fitted)
  data = as_float64(data)
  model = adapter.model(fitted)
  flat = Flattener(adapter.params(fitted), adapter.param_specs(fitted), dtype=tf.float64)
  if method == "hessian":
    info = hessian_information(model, flat, data)
  else:
    if not adapter.latent_states:
      raise ValueError(f"method='louis' needs enumerable discrete latents; "
                       f"{type(fitted).__name__} does not have them: use method='hessian'")
    table_fn = lambda p, d: adapter.complete_log_prob_table(fitted, p, d)  # noqa: E731
    info = louis_information(table_fn, flat, data, adapter.sample_weight(data))
  info = info.numpy()
  cov_u = _inverse_information(info, type(fitted).__name__, adapter.gauge_dimension(fitted))
  jac = flat.jacobian().numpy()
  cov = jac @ cov_u @ jac.T
  estimate = flat.constrained(flat.template).numpy()
  return StandardErrors(flat.labels(), estimate, np.sqrt(np.clip(np.diag(cov), 0, None)),
                        cov, info, method, entry_links(flat.template, flat.specs))


def _inverse_information(info, name, gauge: int = 0):
  """Inverse, or pseudo-inverse when the model has `gauge` flat directions
  (e.g. softmax weights shifted across classes): then the SEs are those of the
  parametrization orthogonal to them (centred weights)."""
  info = 0.5 * (info + info.T)
  eigenvalues = np.linalg.eigvalsh(info)
  tiny = 1e-8 * max(abs(eigenvalues[-1]), 1.0)
  if gauge and np.sum(np.abs(eigenvalues) <= tiny) <= gauge and eigenvalues[gauge] > tiny:
    return np.linalg.pinv(info, rcond=1e-8, hermitian=True)
  if eigenvalues[0] <= 1e-10 * max(abs(eigenvalues[-1]), 1.0):
    warnings.warn(f"{name}: the observed information is not positive definite (smallest "
                  f"eigenvalue {eigenvalues[0]:.3g}); the fit is not at a strict local maximum "
                  "or the model is not identified, so the standard errors are unreliable "
                  "(a pseudo-inverse is used).", RuntimeWarning, stacklevel=3)
    return np.linalg.pinv(info)
  return np.linalg.inv(info)


def bootstrap_standard_errors(fitted, X=None, y=None, *, n_boot: int = 100, seed: int = 0,
                              max_iter: int = 500, progress: bool | None = None,
                              **data_kwargs) -> StandardErrors:
  """Parametric-bootstrap standard errors.

  Each replicate simulates a data set of the same size from theta_hat,
  refits by EM starting from theta_hat (the engine's tolerance, `max_iter`
  iterations), aligns latent labels to theta_hat and records the estimate.

  Args:
    n_boot: number of replicates (default 100).
    seed: integer seed (default 0).
    max_iter: EM iterations per replicate (default 500).
    progress: progress bar; None means on, except under pytest.
  """
  n_boot = v.check_int("n_boot", n_boot, minimum=2)
  seed = v.check_seed(seed)
  adapter = get_adapter(fitted)
  data = resolve_data(fitted, X, y, **data_kwargs)
  model = adapter.model(fitted)  # one instance: fit_em keeps its compiled steps across refits
  params = adapter.params(fitted)
  numpy_params = type(params)(*[np.asarray(p) for p in params])
  flat = Flattener(params, adapter.param_specs(fitted), dtype=tf.float64)
  rng = np.random.SeedSequence(seed).spawn(n_boot)
  draws = []
  iterator = range(n_boot)
  if progress_enabled(progress):
    from tqdm.auto import tqdm
    iterator = tqdm(iterator, desc=f"{type(fitted).__name__} bootstrap", leave=False)
  for b in iterator:
    replicate = adapter.simulate(fitted, params, data, int(rng[b].generate_state(1)[0]))
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      result = fit_em(model, replicate, max_iter=max_iter, tol=fitted.tol,
                      init_params=params, compile="graph", progress=False)
    aligned = adapter.align(fitted, numpy_params, type(params)(*[np.asarray(p) for p in result.params]))
    draws.append(flat.constrained(type(params)(*[tf.constant(p, tf.float64) for p in aligned])).numpy())
  draws = np.stack(draws)
  cov = np.cov(draws, rowvar=False)
  return StandardErrors(flat.labels(), flat.constrained(flat.template).numpy(),
                        np.sqrt(np.diag(cov)), cov, None, "bootstrap",
                        entry_links(flat.template, flat.specs))


def named_entries(fitted, feature_names=None):
  """`naming.Entry` of every trainable entry, in the order of `standard_errors`."""
  adapter = get_adapter(fitted)
  params, specs = adapter.params(fitted), adapter.param_specs(fitted)
  fields = [(n, p.shape) for n, p, s in zip(params._fields, params, specs) if s.trainable]
  return entries(fields, adapter.dims(fitted), adapter.coords(fitted, feature_names))


def summary(fitted, X=None, y=None, *, method: str = "hessian", ci: float = 0.95,
            round_to: int | None = None, feature_names=None, **data_kwargs) -> pd.DataFrame:
  """Table of estimate, standard error and interval, in az.summary style.

  Rows are indexed like `az.summary` ('weights[0]', 'means[1, 0]', ...); the
  'name' column spells each entry out by its coordinates, with the feature
  (column) names: 'means[component 1, waiting]'. A symmetric matrix's entry
  is listed once. Columns: name, estimate, se, and the interval bounds
  'ci_2.5%', 'ci_97.5%' (for the default ci=0.95): Wald intervals on each
  entry's link scale, mapped back (`link_interval`), so a weight's interval
  stays inside (0, 1).

  `feature_names` default to the columns of X when it is a DataFrame, else
  of the DataFrame the estimator was fitted on (scikit-learn's
  `feature_names_in_`, set only then).

  Args:
    fitted: a fitted estimator; X, y, data_kwargs (sample_weight; clusters,
      time, Z): its training data (optional when the fit kept it).
    method: 'hessian' (default) or 'louis'.
    ci: interval probability (default 0.95).
    round_to: decimals to round to (default None: no rounding).
  """
  ci = v.check_float("ci", ci, minimum=0.0, strict=True)
  if ci >= 1:
    raise ValueError(f"ci must be in (0, 1), got {ci}")
  se = standard_errors(fitted, X, y, method=method, **data_kwargs)
  lo, hi = f"ci_{100 * (1 - ci) / 2:g}%", f"ci_{100 * (1 + ci) / 2:g}%"
  lower, upper = se.interval(ci)
  if feature_names is None and hasattr(X, "columns"):  # a DataFrame
    feature_names = [str(c) for c in X.columns]
  if feature_names is None:
    feature_names = getattr(fitted, "feature_names_in_", None)  # scikit-learn's convention
  named = named_entries(fitted, feature_names)
  table = pd.DataFrame({"name": [e.name for e in named], "estimate": se.estimate, "se": se.se,
                        lo: lower, hi: upper}, index=se.labels)
  table = table[[e.keep for e in named]]
  return table.round(round_to) if round_to is not None else table
