"""Methods every fitted estimator shares, delegating to the diagnostics modules."""
from __future__ import annotations


class DiagnosticsMixin:
  """`summary()` and `to_inference_data()` for any estimator with an adapter."""

  def summary(self, X=None, y=None, **kwargs):
    """Estimates, standard errors and Wald intervals (`tfp_em.diagnostics.standard_errors.summary`).

    X, y and data keywords default to the training data where the fit kept
    it; `method='hessian'` (default) or 'louis', `ci=0.95`.
    """
    from tfp_em.diagnostics.standard_errors import summary
    return summary(self, X, y, **kwargs)

  def to_inference_data(self, X=None, y=None, **kwargs):
    """ArviZ InferenceData of the fit (`tfp_em.diagnostics.inference_data.to_inference_data`)."""
    from tfp_em.diagnostics.inference_data import to_inference_data
    return to_inference_data(self, X, y, **kwargs)
