"""User-file mutants of the verified templates in examples/: the verifier's own test.

Each mutant is one of the shipped correct files with a small edit (text
substitutions), the way a hand-written EM goes wrong, and the step that holds
the bug: 'E' (the E-step's loglik, posterior or statistics) or 'M' (the
M-step). `tfp_em.verify` must fail every mutant, blaming that step and no
other; the `CORRECT` variants (the templates themselves, a key-reordered
M-step, fixed weights, a start that collapses a component) must pass.

    path = write(mutant, directory)      # the mutated file, ready for verify_file
"""
from __future__ import annotations

import os
import shutil
from typing import NamedTuple

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


class FileMutant(NamedTuple):
  """A template with edits.

  Attributes:
    example: file name in examples/.
    name: short name of the edit.
    edits: ((old, new), ...) substitutions; each `old` occurs exactly once.
    step: 'E' or 'M', the step with the bug; None for a correct variant.
    description: what the edit does.
  """
  example: str
  name: str
  edits: tuple
  step: str | None
  description: str = ""


GMM, POISSON, RI, FA, HMM, MAP = ("gmm_em_correct.py", "poisson_mixture_em.py", "random_intercept_em.py",
                                  "factor_analysis_em.py", "hmm_em.py", "gmm_map_em.py")

_GMM_M_RETURN = ('return {"weights": n / tf.reduce_sum(n), "means": means, '
                 '"covariances": covariances}')

MUTANTS = (
    # Gaussian mixture.
    FileMutant(GMM, "hard_assignments", ((
        "  r = tf.nn.softmax(log_joint, axis=-1)                        # [N, K]",
        "  r = tf.one_hot(tf.argmax(log_joint, -1), K, dtype=tf.float64)"),), "E",
        "statistics from hard assignments"),
    FileMutant(GMM, "dropped_point", ((
        '"sx": tf.einsum("nk,nd->kd", r, x),', '"sx": tf.einsum("nk,nd->kd", r[1:], x[1:]),'),),
        "E", "the first point left out of sum r x"),
    FileMutant(GMM, "loglik_without_weights", ((
        "  return stats, tf.reduce_sum(tf.reduce_logsumexp(log_joint, axis=-1))",
        "  return stats, tf.reduce_sum(tf.reduce_logsumexp(\n"
        '      log_joint - tf.math.log(params["weights"]), axis=-1))'),), "E",
        "loglik without log w_k"),
    FileMutant(GMM, "posterior_wrong_axis", ((
        '  return {"z": tf.nn.softmax(_log_joint(params, data["x"]), axis=-1)}',
        '  return {"z": tf.nn.softmax(_log_joint(params, data["x"]), axis=0)}'),), "E",
        "responsibilities normalized over points"),
    FileMutant(GMM, "covariance_over_N", ((
        'covariances = stats["sxx"] / n[:, None, None] - tf.einsum("kd,ke->kde", means, means)',
        'covariances = (stats["sxx"] - n[:, None, None] * tf.einsum("kd,ke->kde", means, means))'
        ' / tf.reduce_sum(n)'),), "M", "covariance divided by N, not N_k"),
    FileMutant(GMM, "weights_not_normalized", ((
        '"weights": n / tf.reduce_sum(n)', '"weights": n / 100.0'),), "M",
        "weights divided by a constant"),
    FileMutant(GMM, "inner_product", ((
        'tf.einsum("kd,ke->kde", means, means)',
        'tf.einsum("kd,kd->k", means, means)[:, None, None]'),), "M",
        "mu^T mu where mu mu^T belongs"),
    FileMutant(GMM, "old_means_in_scatter", ((
        'tf.einsum("kd,ke->kde", means, means)',
        'tf.einsum("kd,ke->kde", params["means"], params["means"])'),), "M",
        "the old means in the covariance"),
    FileMutant(GMM, "fixed_weights_reestimated", ((
        '"weights": tfb.SoftmaxCentered(),', '"weights": None,'),), "M",
        "weights declared fixed, re-estimated by the M-step"),
    # Poisson mixture.
    FileMutant(POISSON, "responsibilities_without_weights", ((
        "  r = tf.nn.softmax(log_joint, axis=-1)",
        '  r = tf.nn.softmax(log_joint - tf.math.log(params["weights"]), axis=-1)'),), "E",
        "E-step responsibilities without log w_k"),
    FileMutant(POISSON, "dropped_point", ((
        '"sx": tf.linalg.matvec(r, x, transpose_a=True)}',
        '"sx": tf.linalg.matvec(r[1:], x[1:], transpose_a=True)}'),), "E",
        "the first point left out of sum r x"),
    FileMutant(POISSON, "loglik_max", ((
        "  return stats, tf.reduce_sum(tf.reduce_logsumexp(log_joint, axis=-1))",
        "  return stats, tf.reduce_sum(tf.reduce_max(log_joint, axis=-1))"),), "E",
        "max where logsumexp belongs"),
    FileMutant(POISSON, "posterior_without_weights", ((
        '  return {"z": tf.nn.softmax(component_log_joint(params, data["x"]), axis=-1)}',
        '  return {"z": tf.nn.softmax(component_log_joint(params, data["x"])\n'
        '                             - tf.math.log(params["weights"]), axis=-1)}'),), "E",
        "posterior() without log w_k"),
    FileMutant(POISSON, "rates_over_N", ((
        '"rates": stats["sx"] / n}', '"rates": stats["sx"] / tf.reduce_sum(n)}'),), "M",
        "rates divided by N, not N_k"),
    FileMutant(POISSON, "softmax_weights", ((
        '"weights": n / tf.reduce_sum(n)', '"weights": tf.nn.softmax(n / 10.0)'),), "M",
        "weights as a softmax of the counts"),
    # Random intercept.
    FileMutant(RI, "variance_forgotten", ((
        '"s2u": tf.reduce_mean(uu)', '"s2u": tf.reduce_mean(u ** 2)'),), "M",
        "s2u from the posterior means only"),
    FileMutant(RI, "stats_without_variance", ((
        '"uu": m ** 2 + v,', '"uu": m ** 2,'),), "E", "E[u^2] without Var[u | y]"),
    FileMutant(RI, "posterior_precision", ((
        'prec = 1.0 / params["s2u"] + n_g / params["s2e"]',
        'prec = 1.0 / params["s2u"] + 1.0 / params["s2e"]'),), "E",
        "posterior precision without the cluster size"),
    FileMutant(RI, "loglik_without_2pi", ((
        "n_g * np.log(2 * np.pi) + logdet + quad", "logdet + quad"),), "E",
        "loglik without the 2 pi term"),
    FileMutant(RI, "mu_ignores_u", ((
        'mu = (tf.reduce_sum(stats["sy_g"]) - tf.reduce_sum(n_g * u)) / n',
        'mu = tf.reduce_sum(stats["sy_g"]) / n'),), "M", "mu from the raw mean of y"),
    FileMutant(RI, "residual_without_variance", ((
        "+ tf.reduce_sum(n_g * uu))", "+ tf.reduce_sum(n_g * u ** 2))"),), "M",
        "s2e without the posterior variance of u"),
    # Factor analysis.
    FileMutant(FA, "szz_without_covariance", ((
        "  szz += tf.pad(tf.cast(tf.shape(x)[0], tf.float64) * cov, [[0, 1], [0, 1]])        # + N Cov\n",
        ""),), "E", "E[z z^T] without Cov[z | x]"),
    FileMutant(FA, "posterior_mean_without_inverse", ((
        'mean = tf.matmul((data["x"] - params["mu"]) / psi, w) @ cov',
        'mean = tf.matmul((data["x"] - params["mu"]) / psi, w)'),), "E",
        "posterior mean without M^{-1}"),
    FileMutant(FA, "loglik_without_loadings", ((
        'marginal_cov = tf.matmul(params["w"], params["w"], transpose_b=True) + '
        'tf.linalg.diag(params["psi"])', 'marginal_cov = tf.linalg.diag(params["psi"])'),), "E",
        "loglik with diag(psi) as the covariance"),
    FileMutant(FA, "psi_not_averaged", ((
        ' / stats["n"]\n  return {"w"', '\n  return {"w"'),), "M", "psi not divided by N"),
    FileMutant(FA, "loadings_without_inverse", ((
        'tf.matmul(stats["sxz"], tf.linalg.inv(stats["szz"]))',
        'tf.matmul(stats["sxz"], stats["szz"]) / stats["n"]'),), "M",
        "sum x z^T times sum z z^T instead of its inverse"),
    # HMM.
    FileMutant(HMM, "transition_by_column", ((
        'tf.reduce_sum(stats["trans"], 1, keepdims=True)',
        'tf.reduce_sum(stats["trans"], 0, keepdims=True)'),), "M",
        "transition counts normalized by column"),
    FileMutant(HMM, "scales_without_mean", ((
        'tf.sqrt(stats["sxx"] / stats["n"] - means ** 2)', 'tf.sqrt(stats["sxx"] / stats["n"])'),),
        "M", "scales from E[x^2] without - mean^2"),
    FileMutant(HMM, "initial_from_all_steps", ((
        'stats["start"] / tf.reduce_sum(stats["start"])', 'stats["n"] / tf.reduce_sum(stats["n"])'),),
        "M", "initial distribution from the counts of every step"),
    FileMutant(HMM, "xi_without_emission", ((
        "alphas[t][:, :, None] * a * (b[:, t + 1] * betas[t + 1])[:, None, :]",
        "alphas[t][:, :, None] * a * betas[t + 1][:, None, :]"),), "E",
        "xi without the emission at t + 1"),
    FileMutant(HMM, "filtered_not_smoothed", ((
        "gamma = tf.stack([al * be for al, be in zip(alphas, betas)], 1)",
        "gamma = tf.stack(alphas, 1)"),), "E", "gamma from the forward pass only"),
    FileMutant(HMM, "loglik_without_shift", ((
        " + tf.reduce_sum(shift)\n", "\n"),), "E", "loglik without the emission shift"),
    # MAP EM (imports the Gaussian mixture template).
    FileMutant(MAP, "prior_ignored", ((
        "covariances = (scatter + PSI) / (n + NU + D + 1)[:, None, None]",
        "covariances = scatter / n[:, None, None]"),), "M", "the ML M-step in a MAP EM"),
)

CORRECT = (
    FileMutant(GMM, "template", (), None),
    FileMutant(GMM, "keys_reordered", ((
        _GMM_M_RETURN,
        'return {"covariances": covariances, "means": means, "weights": n / tf.reduce_sum(n)}'),),
        None, "the M-step returns its dict in another order"),
    FileMutant(GMM, "fixed_weights", (
        ('"weights": tfb.SoftmaxCentered(),', '"weights": None,'),
        ('"weights": n / tf.reduce_sum(n)', '"weights": params["weights"]')), None,
        "weights declared fixed and kept"),
    FileMutant(POISSON, "template", (), None),
    FileMutant(RI, "template", (), None),
    FileMutant(FA, "template", (), None),
    FileMutant(HMM, "template", (), None),
    FileMutant(MAP, "template", (), None, "MAP EM with an inverse-Wishart prior"),
)


def mutated_source(mutant: FileMutant) -> str:
  """The example's source with the mutant's edits applied."""
  with open(os.path.join(EXAMPLES, mutant.example)) as f:
    source = f.read()
  for old, new in mutant.edits:
    count = source.count(old)
    if count != 1:
      raise ValueError(f"{mutant.example}: {mutant.name}: {old!r} occurs {count} times")
    source = source.replace(old, new)
  return source


def write(mutant: FileMutant, directory) -> str:
  """Writes the mutated file into `directory` (with the examples it imports);
  returns its path. A correct variant without edits is the example itself."""
  if not mutant.edits:
    return os.path.join(EXAMPLES, mutant.example)
  directory = os.fspath(directory)
  source = mutated_source(mutant)
  for name in os.listdir(EXAMPLES):
    module = os.path.splitext(name)[0]
    if name.endswith(".py") and f"from {module} import" in source:
      shutil.copy(os.path.join(EXAMPLES, name), os.path.join(directory, name))
  path = os.path.join(directory, f"{os.path.splitext(mutant.example)[0]}__{mutant.name}.py")
  with open(path, "w") as f:
    f.write(source)
  return path


# The shipped buggy twins (examples/*_buggy.py) and the step each one's bug is in.
BUGGY_TWINS = {
    "gmm_em_buggy.py": "M",
    "poisson_mixture_em_buggy.py": "E",
    "random_intercept_em_buggy.py": "M",
    "factor_analysis_em_buggy.py": "E",
    "hmm_em_buggy.py": "M",
}
