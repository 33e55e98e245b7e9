"""Diagnostics adapter of `GaussianMixture` (registered on import of `tfp_em.mixture`)."""
from __future__ import annotations

import json

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from models import gaussian_mixture as gm
from tfp_em.diagnostics.adapters import Adapter, hungarian_permutation, register
from tfp_em.engine import inputs as v
from tfp_em.engine.results import to_tensors
from tfp_em.mixture.em import MixtureData
from tfp_em.mixture.estimator import GaussianMixture

tfd = tfp.distributions


@register(GaussianMixture)
class GaussianMixtureAdapter(Adapter):
  """Adapter for `tfp_em.GaussianMixture`."""
  latent_states = True
  params_type = gm.GaussianMixtureParams

  def model(self, fitted):
    return fitted.em_model()

  def gauge_dimension(self, fitted) -> int:
    """mclust's constrained models: the u [K, D + 2, D] of `models.eigen_covariance`
    beyond the family's free parameters (directions that leave every Sigma_k as it is)."""
    if gm.canonical_type(fitted.covariance_type) in gm.COVARIANCE_TYPES:
      return 0
    k, d = fitted.means_.shape
    return k * (d + 2) * d - gm.n_covariance_parameters(fitted.covariance_type, k, d)

  def hmc_unavailable(self, fitted) -> str | None:
    """mclust's ten constrained models map more unconstrained coordinates than they
    have free parameters (`models.eigen_covariance`): no density for NUTS over them."""
    if gm.canonical_type(fitted.covariance_type) not in gm.COVARIANCE_TYPES:
      return (f"covariance_type={fitted.covariance_type!r} (an mclust constrained model) is "
              "parametrized with more coordinates than free parameters, so NUTS has no "
              "density over them; HMC runs for full, tied, diag and spherical (VVV, EEE, VVI, "
              "VII)")
    return None

  def data(self, fitted, X, y=None, sample_weight=None):
    dtype = v.check_dtype(fitted.dtype)
    x = v.check_array(X, "X", dtype=dtype)
    v.check_n_features(x, fitted.n_features_in_)
    w = v.check_sample_weight(sample_weight, x.shape[0], dtype=dtype)
    return MixtureData(tf.constant(x), tf.constant(w))

  def training_data(self, fitted):
    return fitted.fit_data_

  def sample_weight(self, data):
    return data.weights

  def observed(self, data):
    return {"x": np.asarray(data.x)}

  def pointwise_log_likelihood(self, fitted, params, data):
    return gm.marginal(params, fitted.covariance_type).log_prob(data.x)

  def complete_log_prob_table(self, fitted, params, data):
    """log p(x_n, z_n = k | params), shape [N, K] (for Louis' method)."""
    return fitted.em_model().log_prob_components(params, data.x)

  def dims(self, fitted):
    cov = {"full": ("component", "feature", "feature_bis"),
           "tied": ("feature", "feature_bis"),
           "diag": ("component", "feature"),
           "spherical": ("component",)}[gm.covariance_layout(fitted.covariance_type)]
    return {"weights": ("component",), "means": ("component", "feature"), "covariances": cov}

  def label_permutation(self, fitted, reference, params):
    return hungarian_permutation(reference.means, params.means)

  def permute(self, fitted, params, perm):
    """Reorders the component axis (the leading axis after any batch dims)."""
    w, m, c = (np.asarray(p) for p in params)
    axis = w.ndim - 1
    return type(params)(
        weights=np.take(w, perm, axis), means=np.take(m, perm, axis),
        covariances=(c if gm.covariance_layout(fitted.covariance_type) == "tied"
                     else np.take(c, perm, axis)))

  def posterior_predictive(self, fitted, params, data, num_draws, seed, num_points=None):
    marginal = gm.marginal(params, fitted.covariance_type)
    num_points = int(data.x.shape[0]) if num_points is None else num_points
    x = marginal.sample([num_draws, num_points], seed=tf.constant([int(seed) % 2**31, 7], tf.int32))
    return {"x": x.numpy()}

  def simulate(self, fitted, params, data, seed):
    """Unit-weight points, as many as the total weight of `data`."""
    n = int(round(float(tf.reduce_sum(data.weights))))
    x = self.posterior_predictive(fitted, params, data, 1, seed, num_points=n)["x"][0]
    return type(data)(tf.constant(x), tf.ones([n], x.dtype))

  def default_priors(self, fitted, data):
    """Nearly flat proper priors (the posterior mode stays at the MLE).

    weights ~ Dirichlet(1) (flat on the simplex); means ~ N(mean(x), (10 sd)^2);
    full/tied covariances ~ Wishart(df=D+1, scale=100 var(x) I), whose log
    density is -tr(Sigma) / (200 var) + const; diag/spherical variances ~
    Exponential(rate=1 / (200 var)), the 1-D version of the same.
    """
    x = np.asarray(data.x)
    dtype = x.dtype
    k, d = fitted.n_components, x.shape[1]
    loc, sd = x.mean(0), x.std(0) + np.finfo(dtype).eps
    var = float(np.mean(sd ** 2))
    priors = {
        "weights": tfd.Dirichlet(tf.ones([k], dtype)),
        "means": tfd.Independent(tfd.Normal(tf.constant(np.broadcast_to(loc, (k, d)), dtype),
                                             tf.constant(10 * np.broadcast_to(sd, (k, d)), dtype)), 2),
    }
    ct = gm.covariance_layout(fitted.covariance_type)
    if ct in ("full", "tied"):
      wishart = tfd.WishartTriL(df=tf.constant(d + 1.0, dtype),
                                scale_tril=tf.constant(np.sqrt(100 * var) * np.eye(d), dtype),
                                input_output_cholesky=False)
      priors["covariances"] = wishart if ct == "tied" else tfd.Sample(wishart, k)
    else:
      shape = (k, d) if ct == "diag" else (k,)
      rate = tf.constant(np.full(shape, 1.0 / (200 * var)), dtype)
      priors["covariances"] = tfd.Independent(tfd.Exponential(rate), len(shape))
    return priors

  def figures(self, fitted, data, feature_names=None):
    from tfp_em.diagnostics import plots  # matplotlib and ArviZ load on first use
    return [(plots.mixture_ellipses(fitted, data, feature_names=feature_names),
             "mixture_ellipses.png", "Data coloured by most probable component; 1- and 2-sd "
             "ellipses of each component (first two features).")]

  def rebuild(self, estimator_class, config, params, n_features):
    est = estimator_class(**json.loads(config))
    est.set_fitted_params(to_tensors(params), n_features)
    est.fit_data_ = None  # the data live in the netCDF file, not in the estimator
    return est
