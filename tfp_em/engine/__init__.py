"""The EM engine: protocol, fit loop, results, passes over data, acceleration.

Knows no model family: everything here works through the `EMModel` protocol.

    fit_em(model, data, max_iter=100, tol=1e-5, n_init=1, seed=0) -> FitResult
"""
from tfp_em.engine.loop import (ON_DECREASE_OPTIONS, ConvergenceWarning, EMModel, FitResult,
                                LikelihoodDecreaseError, LikelihoodDecreaseWarning,
                                NumericalFailureError, RestartTrace, default_decrease_tol, fit_em,
                                restart_seeds, to_tensors)
from tfp_em.engine.online import fit_online_em

__all__ = [
    "ON_DECREASE_OPTIONS", "ConvergenceWarning", "EMModel", "FitResult", "LikelihoodDecreaseError",
    "LikelihoodDecreaseWarning", "NumericalFailureError", "RestartTrace", "default_decrease_tol",
    "fit_em", "fit_online_em", "restart_seeds", "to_tensors",
]
