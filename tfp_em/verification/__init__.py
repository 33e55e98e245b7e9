"""Checks of hand-coded E/M updates against TFP `log_prob` and autodiff.

Generic: written against `tfp_em.engine.EMModel` (a model plugs in its exact
reference through `verification_oracle`) or a user's JointDistribution with
plain-function steps; knows no model family.

    tfp_em.verify(model_or_joint, data, ...) -> VerificationReport
"""
from tfp_em.verification.api import ALL_CHECKS, load_user_module, main_verify, verify, verify_file
from tfp_em.verification.checks import Tolerances
from tfp_em.verification.exact import ExactPosterior, marginalize_discrete, marginalize_gaussian
from tfp_em.verification.report import CheckResult, VerificationError, VerificationReport

__all__ = ["ALL_CHECKS", "CheckResult", "ExactPosterior", "Tolerances", "VerificationError",
           "VerificationReport", "load_user_module", "main_verify", "marginalize_discrete",
           "marginalize_gaussian", "verify", "verify_file"]
