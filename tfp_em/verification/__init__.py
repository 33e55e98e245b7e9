"""Checks of hand-coded E/M updates against TFP `log_prob` and autodiff.

    tfp_em.verify(model_or_joint, data, ...) -> VerificationReport
"""
from tfp_em.verification.api import load_user_module, main_verify, verify, verify_file
from tfp_em.verification.report import CheckResult, VerificationError, VerificationReport

__all__ = ["CheckResult", "VerificationError", "VerificationReport", "load_user_module",
           "main_verify", "verify", "verify_file"]
