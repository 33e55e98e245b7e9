"""`VerificationReport`: what `tfp_em.verify` found, as a table, dict or error."""
from __future__ import annotations

import json
from typing import NamedTuple

import numpy as np

CHECK_TITLES = {
    "1": "likelihood",
    "2": "posterior",
    "2b": "E-step statistics",
    "3": "Fisher identity",
    "4a": "M-step in support",
    "4b": "M-step gradient",
    "4c": "M-step Q increase",
    "4d": "M-step Q maximum",
    "4e": "fixed params kept",
    "5": "monotone loglik",
    "6a": "stationary point",
    "6b": "L-BFGS agreement",
}

# The step each check examines: 'E' (the E-step's loglik, posterior or
# statistics), 'M' (the M-step) or 'EM' (the iteration as a whole).
CHECK_STEPS = {"1": "E", "2": "E", "2b": "E", "3": "E", "4a": "M", "4b": "M", "4c": "M", "4d": "M",
               "4e": "M", "5": "EM", "6a": "EM", "6b": "EM"}
_STEP_NAMES = {"E": "E-step", "M": "M-step", "EM": "EM iteration"}

# What a failure of each check means, in the user's terms. `{detail}` is the
# worst case the check found (where, which field, how large).
MEANINGS = {
    "1": ("the log-likelihood returned by your E-step is not log p(data | theta) from the "
          "JointDistribution (or the model's marginal_log_prob disagrees with it): {detail}"),
    "2": ("your E-step posterior differs from the exact posterior of the JointDistribution "
          "(check the normalization axis and the log-space arithmetic): {detail}"),
    "2b": ("the statistics your E-step returns are not their expectation under the exact "
           "posterior: {detail}"),
    "3": ("the Fisher identity fails, grad Q(theta | theta_old) at theta_old != grad loglik(theta_old), "
          "so Q built from your E-step is not the EM Q: {detail}"),
    "4a": ("your M-step returns parameters outside the model's support (e.g. weights that do not "
           "sum to 1, a covariance that is not symmetric positive definite): {detail}"),
    "4b": "your M-step does not maximize Q: grad Q(theta_new) = {detail}",
    "4c": "your M-step decreases Q: Q(theta_new) < Q(theta_old) by {detail}",
    "4d": ("your M-step does not maximize Q: a small perturbation of theta_new increases Q by "
           "{detail}"),
    "4e": "your M-step changes a parameter declared fixed: {detail}",
    "5": "the objective (loglik, + log prior for MAP) decreased along EM iterations: {detail}",
    "6a": ("EM did not converge to a stationary point of the objective: "
           "grad(theta*) = {detail}"),
    "6b": ("the EM optimum is not an optimum of the objective found by L-BFGS (started at "
           "theta_EM, and at the same start after matching labels): {detail}"),
}


def meaning(result) -> str:
  """'E-step: <what the failure means>', or what the exception was."""
  step = _STEP_NAMES[CHECK_STEPS[result.check]]
  if result.raised:
    return f"{step}: the check stopped on an exception in your code: {result.detail}"
  return f"{step}: " + MEANINGS[result.check].format(detail=result.detail)


class CheckResult(NamedTuple):
  """One row of the report.

  Attributes:
    check: id ('1', '2', '2b', '3', '4a'..'4e', '5', '6a', '6b').
    name: short title.
    abs_error: largest absolute error over parameter points and fields.
    rel_error: largest error divided by the check's scale (see `Tolerances`).
    tolerance: the bound on `rel_error`.
    passed: True, False, or None when the check was skipped.
    detail: where the worst error occurred, or why the check was skipped.
    raised: the check stopped on an exception in the user's code (`detail`
      names it, with the file and line).
  """
  check: str
  name: str
  abs_error: float
  rel_error: float
  tolerance: float
  passed: bool | None
  detail: str = ""
  raised: bool = False

  @property
  def step(self) -> str:
    """'E', 'M' or 'EM': the step this check examines."""
    return CHECK_STEPS[self.check]


class VerificationError(AssertionError):
  """Raised by `VerificationReport.raise_if_failed`."""


def _fmt(x: float) -> str:
  if x is None or (isinstance(x, float) and np.isnan(x)):
    return "-"
  return f"{x:.2e}"


def _status(passed) -> str:
  return {True: "pass", False: "FAIL", None: "skipped"}[passed]


class VerificationReport:
  """Result of `tfp_em.verify`.

  Attributes:
    model: the model's name.
    results: list of `CheckResult`, in check order.
    seconds: wall time of the verification.
    info: extra facts (number of points, EM iterations to convergence...).
  """

  def __init__(self, model: str, results, seconds: float = float("nan"), info=None):
    self.model = model
    self.results = list(results)
    self.seconds = seconds
    self.info = dict(info or {})

  @property
  def passed(self) -> bool:
    """True when no check failed (skipped checks do not fail)."""
    return not self.failed

  @property
  def failed(self) -> list:
    return [r for r in self.results if r.passed is False]

  @property
  def failed_checks(self) -> list:
    """Ids of the failed checks, e.g. ['4b', '4d']."""
    return [r.check for r in self.failed]

  @property
  def blamed_steps(self) -> list:
    """The steps the failed checks name: a subset of ['E', 'M'] (checks 5 and 6
    follow the whole iteration and name none)."""
    return sorted({r.step for r in self.failed} - {"EM"})

  @property
  def notes(self) -> list:
    """What the reader should know besides the checks (code that ran eagerly,
    degenerate starts replaced)."""
    return list(self.info.get("notes", []))

  def __getitem__(self, check: str) -> CheckResult:
    for r in self.results:
      if r.check == check:
        return r
    raise KeyError(check)

  def table(self) -> str:
    """Fixed-width table: check, name, max abs error, max rel error, tolerance, status."""
    header = ("check", "step", "name", "max abs err", "max rel err", "tolerance", "status")
    rows = [(r.check, r.step, r.name, _fmt(r.abs_error), _fmt(r.rel_error), _fmt(r.tolerance),
             _status(r.passed)) for r in self.results]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda row: "  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])

  def __str__(self) -> str:
    verdict = "PASSED" if self.passed else f"FAILED ({', '.join(self.failed_checks)})"
    lines = [f"tfp_em.verify: {self.model} -- {verdict} in {self.seconds:.1f} s", self.table()]
    for r in self.results:
      if r.passed is False:
        lines.append(f"  [{r.check}] " + meaning(r))
      elif r.passed is None:
        lines.append(f"  [{r.check}] skipped: {r.detail}")
    lines += [f"  note: {n}" for n in self.notes]
    return "\n".join(lines)

  __repr__ = __str__

  def to_dict(self) -> dict:
    """JSON-serializable dict."""
    return {
        "model": self.model, "passed": self.passed, "seconds": self.seconds,
        "failed_checks": self.failed_checks, "info": _jsonable(self.info),
        "blamed_steps": self.blamed_steps,
        "checks": [dict(r._asdict(), step=r.step, meaning=(meaning(r) if r.passed is False else None))
                   for r in self.results],
    }

  def to_json(self, **kwargs) -> str:
    return json.dumps(self.to_dict(), **kwargs)

  def to_markdown(self) -> str:
    """GitHub-flavoured markdown table."""
    lines = [f"**{self.model}**: {'passed' if self.passed else 'FAILED ' + ', '.join(self.failed_checks)}"
             f" ({self.seconds:.1f} s)", "",
             "| check | name | max abs err | max rel err | tolerance | status |",
             "|---|---|---|---|---|---|"]
    for r in self.results:
      lines.append(f"| {r.check} | {r.name} | {_fmt(r.abs_error)} | {_fmt(r.rel_error)} | "
                   f"{_fmt(r.tolerance)} | {_status(r.passed)} |")
    return "\n".join(lines)

  def raise_if_failed(self) -> "VerificationReport":
    """Raises `VerificationError` naming each failed check and what it means."""
    if self.passed:
      return self
    reasons = "\n".join(f"- check {r.check} ({r.name}): " + meaning(r) for r in self.failed)
    raise VerificationError(f"{self.model} failed verification:\n{reasons}\n\n{self.table()}")


def _jsonable(x):
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.floating, np.integer, np.bool_)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  return x
