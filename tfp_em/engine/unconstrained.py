"""Params <-> one flat vector in unconstrained space, and the one L-BFGS driver.

Each params field has a `models.specs.ParamSpec`: trainable or fixed, and the
TFP bijector that maps unconstrained reals onto its support. `Flattener`
stacks the trainable fields, mapped to unconstrained space, into one vector
u [P]; fixed fields come back from the template unchanged. SQUAREM
extrapolates there, standard errors differentiate there, and the verifier,
the Bernoulli MLP's autodiff fit, the mixed models' NLL fits and the HMC MAP
minimize there with `minimize_lbfgs`.

    flat = Flattener(params, specs)
    u = flat.flatten(params)           # [P]
    params = flat.unflatten(u)         # trainable fields from u, fixed from the template
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import scipy.optimize
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_em.engine.compiling import compiled_or_eager


class Flattener:
  """Maps params (NamedTuple) <-> one flat unconstrained vector of the trainable fields.

  Works eagerly and inside `tf.function`, also where some axes are unknown
  in the trace (K, `EMModel.traced_component_axes`): sizes are then tensors.

  Args:
    template: params NamedTuple; its fixed fields are returned by `unflatten`.
    specs: NamedTuple of `ParamSpec` parallel to `template`.
    dtype: cast the template's floating fields to this dtype first (None:
      keep them).
  """

  def __init__(self, template, specs, dtype=None):
    if dtype is not None:
      template = type(template)(*[tf.cast(p, dtype) for p in template])
    self.template = template
    self.specs = specs
    self.fields = [i for i, s in enumerate(specs) if s.trainable]
    parts = [specs[i].bijector.inverse(template[i]) for i in self.fields]
    self.shapes = [p.shape if p.shape.is_fully_defined() else tf.shape(p) for p in parts]
    self.sizes = [int(np.prod(s)) if isinstance(s, tf.TensorShape) else tf.reduce_prod(s)
                  for s in self.shapes]
    self.u_hat = self._concat(parts)                                     # [P]

  @property
  def size(self) -> int:
    """P, the number of free numbers."""
    return sum(self.sizes)

  def _concat(self, parts):
    if not parts:
      return tf.zeros([0], self.template[0].dtype)
    return tf.concat([tf.reshape(p, [-1]) for p in parts], 0)

  def flatten(self, params):
    """u [P]: the trainable fields of `params` in unconstrained space, stacked."""
    return self._concat([self.specs[i].bijector.inverse(params[i]) for i in self.fields])

  def unflatten(self, u):
    """Params with the trainable fields from u [P] and the fixed ones from the template."""
    values = list(self.template)
    for i, part, shape in zip(self.fields, tf.split(u, self.sizes), self.shapes):
      values[i] = self.specs[i].bijector.forward(tf.reshape(part, shape))
    return type(self.template)(*values)

  def constrained(self, params):
    """Every entry of the trainable fields on their own scale, stacked [Q]."""
    return self._concat([params[i] for i in self.fields])

  def labels(self) -> list[str]:
    """Names of the entries of `constrained`, az.summary style: 'means[0, 1]'."""
    out = []
    for i in self.fields:
      name, shape = self.template._fields[i], self.template[i].shape
      out += ([f"{name}[{', '.join(map(str, idx))}]" for idx in np.ndindex(*shape)]
              if len(shape) else [name])
    return out

  def jacobian(self):
    """d theta / d u at u_hat, [Q, P]."""
    u = self.u_hat
    with tf.GradientTape() as tape:
      tape.watch(u)
      theta = self.constrained(self.unflatten(u))
    return tape.jacobian(theta, u)


def minimize_lbfgs(value_and_gradient, u0, *, max_iterations: int = 500,
                   tolerance: float = 1e-8, f_relative_tolerance: float = 0.,
                   x_tolerance: float = 0., num_correction_pairs: int = 10,
                   compile: bool = False, callback=None, driver: str = "tfp"):
  """Minimizes f(u) by L-BFGS (`tfp.optimizer.lbfgs_minimize`) from u0 [P].

  Args:
    value_and_gradient: u [P] -> (f(u) [], grad f(u) [P]).
    u0: starting point [P].
    max_iterations, tolerance (on the gradient's sup norm),
      f_relative_tolerance, x_tolerance, num_correction_pairs: as in
      `tfp.optimizer.lbfgs_minimize`.
    compile: run `value_and_gradient` as a `tf.function`, eagerly when it
      cannot be traced (`compiled_or_eager`); the L-BFGS loop itself runs
      eagerly (tracing its line search costs more than it saves).
    callback: `callback(iteration, position, objective_value)` after every
      iteration; L-BFGS then runs one iteration per call, resuming its state.
    driver: 'tfp' (`tfp.optimizer.lbfgs_minimize`, run op by op) or 'scipy'
      (SciPy's L-BFGS-B drives the loop in NumPy: each iteration costs only
      the calls of `value_and_gradient`, so a compiled objective makes a short
      run take milliseconds rather than about 0.1 s per iteration; gtol =
      `tolerance`, ftol = `f_relative_tolerance`; no `callback`, no
      `x_tolerance`).

  Returns:
    tfp's `LBfgsOptimizerResults` (position, objective_value, converged,
    failed, num_iterations, ...).
  """
  u0 = tf.convert_to_tensor(u0)
  fn = compiled_or_eager(value_and_gradient) if compile else value_and_gradient
  if driver == "scipy":
    if callback is not None or x_tolerance:
      raise ValueError("minimize_lbfgs(driver='scipy') takes no callback or x_tolerance")
    return _scipy_lbfgs(fn, u0, max_iterations, tolerance, f_relative_tolerance,
                        num_correction_pairs)
  if driver != "tfp":
    raise ValueError(f"driver must be 'tfp' or 'scipy', got {driver!r}")
  options = dict(tolerance=tolerance, f_relative_tolerance=f_relative_tolerance,
                 x_tolerance=x_tolerance, num_correction_pairs=num_correction_pairs)
  if callback is None:
    return tfp.optimizer.lbfgs_minimize(fn, initial_position=u0, max_iterations=max_iterations,
                                        **options)
  results = tfp.optimizer.lbfgs_minimize(fn, initial_position=u0, max_iterations=0, **options)
  for it in range(1, max_iterations + 1):
    done = int(results.num_iterations)
    results = tfp.optimizer.lbfgs_minimize(fn, initial_position=None,
                                           previous_optimizer_results=results,
                                           max_iterations=it, **options)
    if int(results.num_iterations) == done:  # stopped without another iteration
      break
    callback(it, results.position, results.objective_value)
    if bool(results.converged) or bool(results.failed):
      break
  return results


class LbfgsResult(NamedTuple):
  """The fields of tfp's `LBfgsOptimizerResults` that callers read (SciPy driver)."""
  position: tf.Tensor         # [P]
  objective_value: tf.Tensor  # []
  converged: bool
  failed: bool
  num_iterations: int


def _scipy_lbfgs(fn, u0, max_iterations, tolerance, f_relative_tolerance, num_correction_pairs):
  dtype = u0.dtype

  def value_and_gradient(u):
    value, grad = fn(tf.constant(u, dtype))
    return float(value), np.asarray(grad, np.float64)

  result = scipy.optimize.minimize(
      value_and_gradient, np.asarray(u0, np.float64), jac=True, method="L-BFGS-B",
      options=dict(maxiter=max_iterations, maxcor=num_correction_pairs, gtol=tolerance,
                   ftol=f_relative_tolerance, maxfun=4 * max_iterations))
  converged = bool(result.success) or float(np.max(np.abs(result.jac), initial=0.)) <= tolerance
  return LbfgsResult(tf.constant(result.x, dtype), tf.constant(result.fun, dtype), converged,
                     not np.all(np.isfinite(result.x)), int(result.nit))


def newton_steps(objective, theta, max_steps: int = 5, relative_step: float = 1e-5):
  """(theta, l, grad l [P], number of steps taken) at the end: Newton's method
  on grad l = 0 from a point EM or L-BFGS has brought close.

  L-BFGS stops where l is flat to round-off, which leaves the parameters
  about sqrt(eps) off in flat directions; Newton steps on the exact gradient
  go on to about eps / curvature. The Hessian is central differences of the
  gradient (second derivatives through TFP's bijectors can be NaN where the
  gradient is fine); it is solved by least squares, so directions with no
  curvature do not move. A step is kept only while it shrinks the gradient
  and does not lower l beyond round-off, so far from the optimum, where the
  Hessian may be indefinite, Newton stops at once.

  Args:
    objective: theta [P] (numpy) -> (l, grad l [P]), the function to maximize.
    theta: the start [P].
  """
  theta = np.asarray(theta, np.float64)
  ll, grad = objective(theta)
  taken = 0
  for _ in range(max_steps):
    h = relative_step * np.maximum(1., np.abs(theta))
    columns = [(objective(theta + hi * e)[1] - objective(theta - hi * e)[1]) / (2. * hi)
               for hi, e in zip(h, np.eye(len(theta)))]
    hessian = np.array(columns)
    hessian = 0.5 * (hessian + hessian.T)
    if not np.all(np.isfinite(hessian)):
      break
    trial = theta + np.linalg.lstsq(hessian, -grad, rcond=1e-10)[0]
    trial_ll, trial_grad = objective(trial)
    if not (np.max(np.abs(trial_grad)) < np.max(np.abs(grad))
            and trial_ll >= ll - 1e-12 * abs(ll)):
      break
    theta, ll, grad, taken = trial, trial_ll, trial_grad, taken + 1
  return theta, ll, grad, taken
