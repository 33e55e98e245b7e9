"""The EM engine: protocol, fit loop, results, passes over data, acceleration.

Knows no model family: everything here works through `EMModel`.

    fit_em(model, data, max_iter=100, tol=1e-5, n_init=1, seed=0) -> FitResult
"""
from tfp_em.engine.checkpoint import CheckpointMismatchError
from tfp_em.engine.loop import ON_DECREASE_OPTIONS, default_decrease_tol, fit_em, progress_enabled
from tfp_em.engine.online import fit_online_em
from tfp_em.engine.protocol import (ConvergenceWarning, EMModel, LikelihoodDecreaseError,
                                    LikelihoodDecreaseWarning, NumericalFailureError)
from tfp_em.engine.results import FitResult, RestartTrace, restart_seeds, to_numpy, to_tensors

__all__ = [
    "ON_DECREASE_OPTIONS", "CheckpointMismatchError", "ConvergenceWarning", "EMModel", "FitResult", "LikelihoodDecreaseError",
    "LikelihoodDecreaseWarning", "NumericalFailureError", "RestartTrace", "default_decrease_tol",
    "fit_em", "fit_online_em", "progress_enabled", "restart_seeds", "to_numpy", "to_tensors",
]
