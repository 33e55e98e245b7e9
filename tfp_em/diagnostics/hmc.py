"""HMC cross-check: TFP NUTS on the same (marginalized) model that EM fitted.

The target is log p(theta) + log p(data | theta), where the likelihood is the
model's TFP marginal (`model.marginal_log_prob`, e.g. `MixtureSameFamily`
for the Gaussian mixture) and the prior a `JointDistributionNamed` over the
trainable params. NUTS runs in unconstrained space through each param's
`ParamSpec.bijector` (`TransformedTransitionKernel`) with dual-averaging
step-size adaptation, compiled with XLA, preconditioned by the EM estimate's
observed information (each unconstrained coordinate scaled by its standard
error, so NUTS takes few leapfrog steps per draw).

Mixture labels: chains start at the EM estimate (jittered), and every draw is
afterwards matched to the EM estimate's labels (Hungarian matching on the
means), so a label switch inside a chain cannot fake a bad R-hat;
`sample_stats.relabelled` marks the draws that were relabelled.

With weak priors (the defaults), the posterior mode sits at the EM estimate
and the posterior standard deviations approach the observed-information
standard errors; `compare_with_em` tabulates both, with R-hat and ESS.

#### References

[1] M. D. Hoffman and A. Gelman. The No-U-Turn sampler. JMLR 15:1593-1623,
    2014.
[2] A. Vehtari, A. Gelman, D. Simpson, B. Carpenter and P.-C. Buerkner.
    Rank-normalization, folding, and localization: an improved R-hat.
    Bayesian Analysis 16(2):667-718, 2021.
"""
from __future__ import annotations

import math
import time

import numpy as np
import pandas as pd
import tensorflow as tf
import tensorflow_probability as tfp
import xarray as xr

import arviz as az

from tfp_em.diagnostics.adapters import get_adapter
from tfp_em.diagnostics.inference_data import resolve_data
from tfp_em.diagnostics.standard_errors import as_float64, hessian_information, standard_errors
from tfp_em.engine import inputs as v
from tfp_em.engine.loop import progress_enabled
from tfp_em.engine.unconstrained import Flattener, minimize_lbfgs

tfd = tfp.distributions


def _chunk_size(num_burnin, num_results, pieces=20):
  """Largest step count dividing both phases, at most total / pieces (>= 1)."""
  g = math.gcd(num_burnin, num_results)
  cap = max(1, (num_burnin + num_results) // pieces)
  return max(d for d in range(1, g + 1) if g % d == 0 and d <= cap)


def _setup(fitted, X, y, priors, fixed, data_kwargs):
  """(adapter, float64 data, model, specs, Flattener at the estimate, priors)."""
  adapter = get_adapter(fitted)
  unavailable = adapter.hmc_unavailable(fitted)
  if unavailable:
    raise ValueError(f"sample_posterior: {unavailable}")
  data = as_float64(resolve_data(fitted, X, y, **data_kwargs))
  model = adapter.model(fitted)
  specs = fixed_specs(adapter, fitted, fixed)
  flat = Flattener(adapter.params(fitted), specs, dtype=tf.float64)
  priors = adapter.default_priors(fitted, data) if priors is None else dict(priors)
  return adapter, data, model, specs, flat, priors


def log_posterior_fn(model, params_template, specs, priors, data):
  """target(*trainable constrained parts with a leading chain dim) -> [C]."""
  fields = [i for i, s in enumerate(specs) if s.trainable]
  names = [params_template._fields[i] for i in fields]
  prior = tfd.JointDistributionNamed({n: priors[n] for n in names})

  def one_chain(parts):
    values = list(params_template)
    for i, p in zip(fields, parts):
      values[i] = p
    return model.marginal_log_prob(type(params_template)(*values), data)

  def target(*parts):
    # one chain at a time in a loop: a small graph that XLA compiles fast (pfor's
    # vectorized copy of the likelihood took most of the compile time)
    log_lik = tf.map_fn(one_chain, tuple(parts), fn_output_signature=parts[0].dtype)
    return prior.log_prob(dict(zip(names, parts))) + log_lik
  return target


def sample_posterior(fitted, X=None, y=None, *, priors=None, num_chains: int = 4,
                     num_results: int = 1000, num_burnin: int = 1000, seed: int = 0,
                     target_accept: float = 0.8, max_tree_depth: int = 10,
                     init_jitter: float = 0.05, jit_compile: bool = True, fixed=None,
                     precondition=True,
                     progress: bool | None = None, **data_kwargs) -> az.InferenceData:
  """Runs NUTS on the marginalized model of a fitted estimator.

  Args:
    fitted: a fitted estimator with a registered adapter; its EM estimate
      starts the chains and fixes the label order.
    X, y: the data (optional if the fit kept it).
    priors: {param name: tfd.Distribution over the constrained param} for
      every trainable param; default `adapter.default_priors` (weak).
    num_chains: chains (default 4).
    num_results: kept draws per chain (default 1000).
    num_burnin: warm-up draws per chain (default 1000); the step size adapts
      during the first 80% of them.
    seed: integer seed (default 0).
    target_accept: dual-averaging target acceptance (default 0.8).
    max_tree_depth: NUTS tree depth (default 10).
    init_jitter: standard deviation of the unconstrained jitter added to the
      EM estimate to start each chain (default 0.05).
    jit_compile: compile with XLA (default True).
    fixed: names of params held at the EM estimate (default the adapter's
      `hmc_fixed`, e.g. the fixed effects of a mixed model).
    precondition: sample z with u = u_hat + s * z, where u are the
      unconstrained params and s their standard errors from the observed
      information at the EM estimate (`unconstrained_scales`), so every
      coordinate has about unit posterior scale and NUTS needs few leapfrog
      steps (default True; no effect when the information is singular). An
      [P, P] array is used as that information (e.g. `standard_errors(fitted)
      .information` when no param is fixed), saving its computation.
    data_kwargs: further data `fit` took (sample_weight; clusters, time, Z).
    progress: progress bar; None means on, except under pytest.

  Returns:
    `az.InferenceData` with posterior (chain, draw, param dims), sample_stats
    (lp, acceptance_rate, step_size, n_steps, diverging, energy, and
    relabelled: whether the draw's labels were permuted to match the EM
    estimate, i.e. the sampler had switched labels),
    observed_data, and posterior.attrs['sampling_seconds'], ['num_burnin'].
  """
  num_chains = v.check_int("num_chains", num_chains, minimum=1)
  num_results = v.check_int("num_results", num_results, minimum=1)
  num_burnin = v.check_int("num_burnin", num_burnin, minimum=0)
  seed = v.check_seed(seed) or 0
  v.check_float("target_accept", target_accept, minimum=0.0, strict=True)
  if target_accept >= 1:
    raise ValueError(f"target_accept must be in (0, 1), got {target_accept}")
  adapter, data, model, specs, flat, priors = _setup(fitted, X, y, priors, fixed, data_kwargs)
  fields = flat.fields
  names = [flat.template._fields[i] for i in fields]
  missing = [n for n in names if n not in priors]
  if missing:
    raise ValueError(f"priors must give a distribution for every trainable param; missing {missing}")
  target = log_posterior_fn(model, flat.template, specs, priors, data)

  rng = np.random.default_rng(seed)
  init = []
  for i in fields:
    u = specs[i].bijector.inverse(flat.template[i]).numpy()
    u = u[None] + init_jitter * rng.standard_normal((num_chains,) + u.shape)
    init.append(specs[i].bijector.forward(tf.constant(u)))
  kernel = tfp.mcmc.DualAveragingStepSizeAdaptation(
      tfp.mcmc.TransformedTransitionKernel(
          tfp.mcmc.NoUTurnSampler(target, step_size=tf.constant(0.1, tf.float64),
                                  max_tree_depth=max_tree_depth),
          bijector=_bijectors(specs, flat, model, data, precondition)),
      num_adaptation_steps=int(0.8 * num_burnin), target_accept_prob=tf.constant(target_accept, tf.float64))

  def trace_fn(_, kr):
    nuts = kr.inner_results.inner_results
    return dict(lp=nuts.target_log_prob,
                acceptance_rate=tf.exp(tf.minimum(nuts.log_accept_ratio, 0.0)),
                step_size=tf.broadcast_to(kr.new_step_size, [num_chains]),
                n_steps=tf.cast(nuts.leapfrogs_taken, tf.int32),
                diverging=nuts.has_divergence, energy=nuts.energy)

  chunk = _chunk_size(num_burnin, num_results)

  @tf.function(jit_compile=jit_compile)
  def bootstrap(state):
    return kernel.bootstrap_results(state)

  @tf.function(jit_compile=jit_compile)
  def run_chunk(state, kernel_results, chunk_seed):
    states, trace, final = tfp.mcmc.sample_chain(
        num_results=chunk, current_state=state, previous_kernel_results=kernel_results,
        kernel=kernel, trace_fn=trace_fn, seed=chunk_seed, return_final_kernel_results=True)
    return states, trace, final

  start = time.perf_counter()
  state, kr = init, bootstrap(init)
  n_chunks = (num_burnin + num_results) // chunk
  bar = _bar(progress, n_chunks * chunk, type(fitted).__name__)
  kept_states, kept_trace = [], []
  for c in range(n_chunks):
    states, trace, kr = run_chunk(state, kr, tf.constant([seed % 2**31, c], tf.int32))
    state = [s[-1] for s in states]
    if c * chunk >= num_burnin:
      kept_states.append([s.numpy() for s in states])
      kept_trace.append({k: t.numpy() for k, t in trace.items()})
    if bar is not None:
      bar.update(chunk)
  if bar is not None:
    bar.close()
  seconds = time.perf_counter() - start
  draws = [np.concatenate([k[j] for k in kept_states]) for j in range(len(fields))]  # [S, C, ...]
  stats = {k: np.concatenate([t[k] for t in kept_trace]) for k in kept_trace[0]}
  idata = _to_idata(adapter, fitted, flat, names, draws, stats, data, seconds, chunk)
  idata.posterior.attrs["num_burnin"] = int(num_burnin)
  return idata


def _bar(progress, total, name):
  if not progress_enabled(progress):
    return None
  from tqdm.auto import tqdm
  return tqdm(total=total, desc=f"{name} NUTS", leave=False)


def _to_idata(adapter, fitted, flat, names, draws, stats, data, seconds, chunk):
  num_results, num_chains = draws[0].shape[:2]
  reference = type(flat.template)(*[np.asarray(p) for p in flat.template])
  values = {n: np.swapaxes(d, 0, 1) for n, d in zip(names, draws)}   # [C, S, ...]
  full = {n: values.get(n, np.broadcast_to(np.asarray(p), (num_chains, num_results) + np.shape(p)))
          for n, p in zip(reference._fields, reference)}
  relabelled = np.zeros((num_chains, num_results), bool)
  for c in range(num_chains):
    for s in range(num_results):
      one = type(reference)(*[full[n][c, s] for n in reference._fields])
      perm = adapter.label_permutation(fitted, reference, one)
      relabelled[c, s] = adapter.is_relabelling(perm)
      aligned = one if perm is None else adapter.permute(fitted, one, perm)
      for n in names:
        full[n][c, s] = getattr(aligned, n)
  stats = dict(stats, relabelled=relabelled.T)  # [S, C] like the other stats
  dims = adapter.dims(fitted)
  coords = {"chain": np.arange(num_chains), "draw": np.arange(num_results)}
  for n, p in zip(reference._fields, reference):
    for dim, size in zip(dims[n], np.shape(p)):
      coords.setdefault(dim, np.arange(size))
  posterior = xr.Dataset({n: (("chain", "draw") + dims[n], full[n]) for n in names},
                         coords=coords,
                         attrs={"inference_library": "tensorflow_probability NUTS",
                                "estimator": type(fitted).__name__,
                                "sampling_seconds": float(seconds),
                                "chunk_size": int(chunk)})
  sample_stats = xr.Dataset({k: (("chain", "draw"), np.swapaxes(np.asarray(a), 0, 1))
                             for k, a in stats.items()},
                            coords={"chain": coords["chain"], "draw": coords["draw"]})
  observed = adapter.observed(data)
  observed_data = xr.Dataset({n: (("obs",) + tuple(f"{n}_dim_{j}" if n != "x" or j else "feature"
                                                   for j in range(np.ndim(a) - 1)), a)
                              for n, a in observed.items()})
  return az.InferenceData(posterior=posterior, sample_stats=sample_stats,
                          observed_data=observed_data)


def fixed_specs(adapter, fitted, fixed=None):
  """The adapter's param specs with the `fixed` fields made non-trainable."""
  specs = adapter.param_specs(fitted)
  fixed = adapter.hmc_fixed if fixed is None else tuple(fixed)
  unknown = [f for f in fixed if f not in specs._fields]
  if unknown:
    raise ValueError(f"fixed names unknown params {unknown}; params are {specs._fields}")
  return type(specs)(*[s._replace(trainable=False) if n in fixed else s
                       for n, s in zip(specs._fields, specs)])


def posterior_mode(fitted, X=None, y=None, *, priors=None, start=None, fixed=None,
                   max_iterations: int = 500, **data_kwargs):
  """MAP estimate (theta parametrization) by L-BFGS in unconstrained space.

  Args:
    start: params NamedTuple to start from (default: the EM estimate). Start
      it from the HMC posterior mean to get an independent check.

  Returns:
    (params NamedTuple of numpy arrays, log posterior at them).
  """
  _, data, model, specs, flat, priors = _setup(fitted, X, y, priors, fixed, data_kwargs)
  target = log_posterior_fn(model, flat.template, specs, priors, data)
  start_u = flat.u_hat if start is None else Flattener(start, specs, dtype=tf.float64).u_hat

  def loss_and_grad(u):
    return tfp.math.value_and_gradient(
        lambda w: -target(*[p[None] for i, p in enumerate(flat.unflatten(w)) if i in flat.fields])[0],
        u)

  result = minimize_lbfgs(loss_and_grad, start_u, max_iterations=max_iterations, tolerance=1e-10,
                          compile=True)
  params = flat.unflatten(result.position)
  return type(params)(*[p.numpy() for p in params]), -float(result.objective_value)


def compare_with_em(fitted, hmc_idata, X=None, y=None, *, priors=None, fixed=None,
                    em_se=None, **data_kwargs) -> pd.DataFrame:
  """EM estimate and SE beside the NUTS posterior (az.summary) and the MAP.

  Columns: em_estimate, em_se (observed information), post_mean, post_sd,
  map (L-BFGS from the posterior mean, labels aligned), r_hat, ess_bulk, ess_tail,
  z_mean = (post_mean - em_estimate) / em_se and z_map likewise.

  `em_se`: the fit's `standard_errors` when already computed (default: computed here).
  """
  adapter = get_adapter(fitted)
  data = resolve_data(fitted, X, y, **data_kwargs)
  specs = fixed_specs(adapter, fitted, fixed)
  se = standard_errors(fitted, data) if em_se is None else em_se
  keep = [i for i, label in enumerate(se.labels) if label.split("[")[0] in hmc_idata.posterior]
  se = se._replace(labels=[se.labels[i] for i in keep], estimate=se.estimate[keep],
                   se=se.se[keep], links=[se.links[i] for i in keep] if se.links else ())
  table = az.summary(hmc_idata, kind="all", round_to="none").reindex(se.labels)
  estimate = adapter.params(fitted)
  mean_params = type(estimate)(*[
      hmc_idata.posterior[n].mean(("chain", "draw")).values if n in hmc_idata.posterior
      else np.asarray(p) for n, p in zip(estimate._fields, estimate)])
  mode, _ = posterior_mode(fitted, data, priors=priors, start=mean_params, fixed=fixed)
  # L-BFGS may land on a relabelled copy of the same optimum
  mode = adapter.align(fitted, type(estimate)(*[np.asarray(p) for p in estimate]), mode)
  flat_mode = Flattener(mode, specs, dtype=tf.float64)
  flat_mode = flat_mode.constrained(flat_mode.template).numpy()
  out = pd.DataFrame({
      "em_estimate": se.estimate, "em_se": se.se,
      "post_mean": table["mean"].values, "post_sd": table["sd"].values,
      "map": flat_mode, "r_hat": table["r_hat"].values,
      "ess_bulk": table["ess_bulk"].values, "ess_tail": table["ess_tail"].values},
      index=se.labels)
  scale = np.where(out["em_se"] > 0, out["em_se"], np.nan)
  out["z_mean"] = (out["post_mean"] - out["em_estimate"]) / scale
  out["z_map"] = (out["map"] - out["em_estimate"]) / scale
  return out


def unconstrained_scales(model, flat: Flattener, data, information=None):
  """Standard errors of the unconstrained params u (the EM estimate's
  observed information, inverted), split per trainable field; None when the
  information is not positive definite (flat directions, e.g. hidden-unit
  symmetries), where they would not describe the posterior.

  `information`: the observed information [P, P] if already computed.
  """
  info = (hessian_information(model, flat, data).numpy() if information is None
          else np.asarray(information, np.float64))
  if info.shape != (flat.size, flat.size):
    raise ValueError(f"precondition: the information must be [{flat.size}, {flat.size}] (one row "
                     f"per unconstrained param sampled), got {list(info.shape)}")
  info = 0.5 * (info + info.T)
  eigenvalues = np.linalg.eigvalsh(info)
  if not np.all(np.isfinite(eigenvalues)) or eigenvalues[0] <= 1e-8 * max(eigenvalues[-1], 1.0):
    return None
  sd = np.sqrt(np.diag(np.linalg.inv(info)))
  return [np.reshape(part, shape) for part, shape in
          zip(np.split(sd, np.cumsum(flat.sizes)[:-1]), [tuple(s) for s in flat.shapes])]


def _bijectors(specs, flat, model, data, precondition):
  """Each trainable field's bijector from the sampler's space; preconditioned:
  constrained = b(u_hat + s * z)."""
  tfb = tfp.bijectors
  plain = [specs[i].bijector for i in flat.fields]
  if precondition is False or precondition is None:
    return plain
  scales = unconstrained_scales(model, flat, data,
                                None if precondition is True else precondition)
  if scales is None:
    return plain
  return [tfb.Chain([b, tfb.Shift(b.inverse(flat.template[i])), tfb.Scale(tf.constant(s))])
          for b, i, s in zip(plain, flat.fields, scales)]
