"""Diagnostics of fitted estimators: ArviZ export, standard errors, HMC, plots, report.

Modules (imported one by one: ArviZ and matplotlib are slow to import, and an
estimator needs only `mixin`):
  inference_data    `to_inference_data`, `load_fitted`
  standard_errors   `standard_errors`, `summary`, `bootstrap_standard_errors`
  hmc               `sample_posterior`, `compare_with_em`
  plots             figures of traces, ellipses, predictive checks
  report            `write_report` (self-contained HTML)
  adapters          the `Adapter` interface and the registry by estimator class;
                    each family registers its adapter (tfp_em.<family>.adapter)
"""
