"""Generative models written as TFP JointDistributions, with parameter specs.

Nothing in this package knows about EM: `tfp_em` fits and checks these models.
"""
from models.specs import ParamSpec, constrain, unconstrain

__all__ = ["ParamSpec", "constrain", "unconstrain"]
