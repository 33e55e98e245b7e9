"""tfp_em: reference EM for latent-variable models on TensorFlow Probability."""
from tfp_em.engine import (ConvergenceWarning, EMModel, FitResult,
                           LikelihoodDecreaseError, LikelihoodDecreaseWarning,
                           NumericalFailureError, RestartTrace, fit_em)

__version__ = "0.1.0"

__all__ = [
    "ConvergenceWarning", "EMModel", "FitResult", "LikelihoodDecreaseError",
    "LikelihoodDecreaseWarning", "NumericalFailureError", "RestartTrace",
    "fit_em",
]

from tfp_em.mixture import GaussianMixture  # noqa: E402

__all__ += ["GaussianMixture"]
