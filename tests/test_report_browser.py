"""The HTML report as a browser shows it: headless Chromium (Debian's `chromium-headless-shell`
or `chromium`, installed by .ci/run) loads it at 800 and 1400 px and reports, from JavaScript
run in the page, which images failed to load and which elements stick out of the window.

Skipped when no Chromium is installed, unless TFP_EM_REQUIRE_BROWSER=1 (set by .ci/run).
"""
import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

DATA = Path(__file__).resolve().parents[1] / "tfp_em" / "cli" / "data" / "old_faithful.csv"
BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser")

# Run in the page once it has loaded: every image decoded, and no element (outside a table's
# own scrolling box) wider than the window.
PROBE = """<script>
window.addEventListener('load', () => {
  const vw = document.documentElement.clientWidth;
  const images = [...document.images];
  const broken = images.filter(i => !i.complete || i.naturalWidth === 0)
                       .map(i => i.getAttribute('src'));
  const over = [];
  for (const el of document.body.querySelectorAll('*')) {
    if (el.parentElement && el.parentElement.closest('.table')) continue;
    const r = el.getBoundingClientRect();
    if (r.right > vw + 1) over.push(el.tagName + ' ' + (el.getAttribute('src') || el.className));
  }
  const result = {vw, images: images.length, broken, over,
                  scroll: document.documentElement.scrollWidth, text: document.body.innerText};
  document.body.innerHTML = '<pre id="probe"></pre>';
  document.getElementById('probe').textContent = JSON.stringify(result);
});
</script>"""


def _browser():
  found = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
  if found is None:
    if os.environ.get("TFP_EM_REQUIRE_BROWSER") == "1":
      pytest.fail(f"no headless Chromium found (looked for {BROWSERS})")
    pytest.skip("no headless Chromium installed (apt-get install chromium-headless-shell)")
  return found


def render(index: Path, width: int) -> dict:
  """Loads `index` with the probe in headless Chromium at `width` px; the probe's findings."""
  probe = index.with_name("probe.html")
  probe.write_text(index.read_text().replace("</body>", PROBE + "</body>"))
  done = subprocess.run(
      [_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
       f"--window-size={width},1000", "--virtual-time-budget=20000", "--dump-dom",
       probe.as_uri()], capture_output=True, text=True, timeout=120)
  found = re.search(r'<pre id="probe">(.*?)</pre>', done.stdout, re.S)
  assert found, f"the probe did not run: {done.stderr[-2000:]}"
  return json.loads(html.unescape(found.group(1)))


SHORT_HMC = dict(num_chains=2, num_results=60, num_burnin=60)  # enough for the plots


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  from tfp_em.diagnostics.report import write_report
  from tfp_em.mixture.estimator import GaussianMixture
  x = pd.read_csv(DATA)
  rows, fits = [], {}
  for cov in ("full", "diag"):
    for k in (1, 2, 3):
      est = GaussianMixture(k, covariance_type=cov, n_init=2, seed=0).fit(x.values)
      rows.append(dict(k=k, covariance_type=cov, bic=est.bic(x.values)))
      fits[k, cov] = est
  chosen = min(rows, key=lambda r: r["bic"])
  est = fits[chosen["k"], chosen["covariance_type"]]
  out = tmp_path_factory.mktemp("browser") / "report"
  index = write_report(est, x, out, model_selection=rows, progress=False,
                       hmc_kwargs=SHORT_HMC)
  return index, est


def rendered_cleanly(index: Path, width: int) -> tuple[str, list]:
  """Renders `index` at `width` px, asserts every image loads and nothing sticks out;
  returns the page's text and its image files."""
  found = render(index, width)
  assert found["vw"] <= width
  files = re.findall(r'<img src="([^"]+)"', index.read_text())
  assert found["images"] == len(files) and not found["broken"], found["broken"]
  assert not found["over"], f"sticking out at {width} px: {found['over'][:5]}"
  assert found["scroll"] <= found["vw"], "the page scrolls sideways"
  return found["text"], files


@pytest.mark.slow
@pytest.mark.parametrize("width", [800, 1400])
def test_report_in_headless_chromium(report, width):
  index, est = report
  text, files = rendered_cleanly(index, width)
  for name in ("model_selection.png", "clusters.png", "parameter_traces.png", "hmc_trace.png",
               "hmc_rank.png", "ppc.png", "mixture_ellipses.png"):
    assert name in files
  assert "lower is better" in text and "Model selection" in text
  # parameters named by component and column, the symmetric entry once
  assert "means[component 0, eruptions]" in text and "weights[component 1]" in text
  if est.covariance_type == "full":
    assert "covariances[component 0, eruptions, waiting]" in text
    assert "covariances[component 0, waiting, eruptions]" not in text


@pytest.fixture(scope="module")
def mixed_report(tmp_path_factory):
  """A random intercept and slope for each of 150 subjects; X a DataFrame."""
  import numpy as np
  from tfp_em.diagnostics.report import write_report
  from tfp_em.mixed_effects.estimator import MixedEffectsRegressor
  rng = np.random.default_rng(0)
  groups, n = 150, 5
  member = np.repeat(np.arange(groups), n)
  subject = np.array([f"subject {i:03d}" for i in member])
  days = np.tile(np.arange(n, dtype=float), groups)
  u = rng.multivariate_normal([0, 0], [[1.0, 0.2], [0.2, 0.25]], groups)
  X = pd.DataFrame({"dose": rng.normal(size=groups * n), "age": rng.normal(size=groups * n)})
  y = (1 + 0.5 * X["dose"] - X["age"] + u[member, 0] + u[member, 1] * days
       + rng.normal(0, 0.7, groups * n)).to_numpy()
  est = MixedEffectsRegressor(random_effects="slopes").fit(X, y, subject, time=days)
  out = tmp_path_factory.mktemp("browser") / "mixed"
  return write_report(est, X, out, y=y, clusters=subject, time=days, progress=False,
                      hmc_kwargs=SHORT_HMC)


@pytest.mark.slow
def test_mixed_model_report_in_headless_chromium(mixed_report):
  text, files = rendered_cleanly(mixed_report, 800)
  assert {"caterpillar.png", "residuals.png", "hmc_trace.png"} <= set(files)
  assert "Variance components" in text and "Std.Dev." in text and "Residual" in text
  assert "beta[dose]" in text and "covariance[(Intercept), time]" in text
  assert "covariance[time, (Intercept)]" not in text          # the symmetric entry once
  assert "Caterpillar plot of the random effects" in text


@pytest.fixture(scope="module")
def classifier_report(tmp_path_factory):
  from sklearn.datasets import load_iris
  from tfp_em.bernoulli_mlp.estimator import BernoulliMLPClassifier
  from tfp_em.diagnostics.report import write_report
  X, y = load_iris(return_X_y=True, as_frame=True)
  y = load_iris().target_names[y]
  est = BernoulliMLPClassifier(n_hidden=2, l2=1.0, n_init=2, seed=0).fit(X, y)
  out = tmp_path_factory.mktemp("browser") / "mlp"
  return write_report(est, X, out, y=y, progress=False,
                      hmc_kwargs=SHORT_HMC)


@pytest.mark.slow
def test_classifier_report_in_headless_chromium(classifier_report):
  text, files = rendered_cleanly(classifier_report, 800)
  assert {"classifier.png", "hidden_units.png", "parameter_traces.png"} <= set(files)
  assert "ppc.png" not in files                     # the class counts are its predictive check
  assert "hidden_weights[petal width (cm), unit 1]" in text
  assert "output_weights[unit 0, class virginica]" in text and "accuracy" in text
