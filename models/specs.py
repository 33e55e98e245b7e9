"""Parameter specs: a NamedTuple parallel to a model's params NamedTuple.

Each field says whether the parameter is fitted (`trainable`) and which TFP
bijector maps unconstrained reals onto its support. Autodiff checks and
gradient-based fallbacks work on any model through these two functions.
"""
from typing import NamedTuple

import tensorflow as tf
import tensorflow_probability as tfp

tfb = tfp.bijectors


class ParamSpec(NamedTuple):
  """How one parameter is fitted.

  Attributes:
    trainable: whether the parameter is estimated (fixed otherwise).
    bijector: maps an unconstrained tensor onto the parameter's support.
  """
  trainable: bool = True
  bijector: tfb.Bijector = tfb.Identity()


def unconstrain(params, specs):
  """Params (NamedTuple) -> same NamedTuple in unconstrained coordinates."""
  return type(params)(*[s.bijector.inverse(p) for p, s in zip(params, specs)])


def constrain(unconstrained, specs):
  """Inverse of `unconstrain`."""
  return type(unconstrained)(
      *[s.bijector.forward(u) for u, s in zip(unconstrained, specs)])


def cast_params(params, dtype):
  """Casts every field of a params NamedTuple to `dtype`."""
  return type(params)(*[tf.cast(p, dtype) for p in params])
