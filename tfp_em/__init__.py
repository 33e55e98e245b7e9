"""tfp_em: reference EM for latent-variable models on TensorFlow Probability.

Public names are imported lazily (PEP 562), so `import tfp_em` and the
`tfp-em` command start without loading TensorFlow until it is needed. TensorFlow's
C++ start-up logs obey TF_CPP_MIN_LOG_LEVEL, which defaults to 3 (silent)
(`tfp_em.tensorflow_logs`).
"""
import importlib

from tfp_em.tensorflow_logs import quiet_tensorflow_startup

quiet_tensorflow_startup()  # before anything imports TensorFlow

__version__ = "0.1.0"

_EXPORTS = {
    "CheckpointMismatchError": "tfp_em.engine",
    "ConvergenceWarning": "tfp_em.engine",
    "EMModel": "tfp_em.engine",
    "FitResult": "tfp_em.engine",
    "LikelihoodDecreaseError": "tfp_em.engine",
    "LikelihoodDecreaseWarning": "tfp_em.engine",
    "NumericalFailureError": "tfp_em.engine",
    "RestartTrace": "tfp_em.engine",
    "fit_em": "tfp_em.engine",
    "fit_online_em": "tfp_em.engine",
    "GaussianMixture": "tfp_em.mixture",
    "EmptyComponentWarning": "tfp_em.mixture",
    "SpuriousSolutionWarning": "tfp_em.mixture",
    "select_mixture": "tfp_em.mixture.selection",
    "BernoulliMLPClassifier": "tfp_em.bernoulli_mlp",
    "MixedEffectsRegressor": "tfp_em.mixed_effects",
    "CrossedEffectsRegressor": "tfp_em.mixed_effects",
    "verify": "tfp_em.verification",
    "VerificationReport": "tfp_em.verification",
    "to_inference_data": "tfp_em.diagnostics.inference_data",
    "load_fitted": "tfp_em.diagnostics.inference_data",
    "standard_errors": "tfp_em.diagnostics.standard_errors",
    "summary": "tfp_em.diagnostics.standard_errors",
    "sample_posterior": "tfp_em.diagnostics.hmc",
    "write_report": "tfp_em.diagnostics.report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
  raise AttributeError(f"module 'tfp_em' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + __all__)
