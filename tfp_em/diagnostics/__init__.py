"""Diagnostics of fitted estimators: ArviZ export, standard errors, HMC, plots, report.

Modules (imported one by one: ArviZ and matplotlib are slow to import, and an
estimator needs only `mixin`):
  inference_data    `to_inference_data`, `load_fitted`
  standard_errors   `standard_errors`, `summary`, `bootstrap_standard_errors`,
                    intervals on each entry's link scale (`link_interval`)
  hmc               `sample_posterior`, `compare_with_em`
  naming            readable entry names ('means[component 1, waiting]', the adapter's
                    `coords`), symmetric repeats
  restarts          did the restarts find one optimum, or stop early near it
  plots, hmc_plots  figures of traces (small multiples), ellipses, predictive checks
  selection         BIC/ICL panel of a model search; cluster sizes and uncertainty
  group_plots       random effects by group (caterpillar), residuals by group
  classifier_plots  confusion matrix, calibration, class-count predictive check
  report            `write_report` (self-contained HTML); report_hmc, page: its parts
  adapters          the `Adapter` interface and the registry by estimator class;
                    each family registers its adapter (tfp_em.<family>.adapter)
"""
