"""HTML building blocks of the diagnostic report, and its atomic file writes.

Tables are written cell by cell (one header row, a number format per
column), wrapped in a block that scrolls sideways on a narrow screen instead
of widening the page; figures scale to the page width.
"""
from __future__ import annotations

import html
import json
import math
import os
from numbers import Number
from typing import NamedTuple

import numpy as np

from tfp_em.engine import outputs

CSS = """
body { font-family: -apple-system, Segoe UI, Helvetica, Arial, sans-serif; margin: 1.5em auto;
       max-width: 1100px; color: #222; line-height: 1.45; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { border-bottom: 1px solid #ddd; margin-top: 1.6em; }
.table { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; font-size: 0.86em; margin: 0.6em 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
th { background: #f3f3f3; } .text { text-align: left; }
figure { margin: 0.6em 0; } img { max-width: 100%; height: auto; border: 1px solid #eee; }
.pass { color: #17702a; font-weight: bold; } .fail { color: #b3261e; font-weight: bold; }
.warn { color: #a05a00; font-weight: bold; } .chosen { font-weight: bold; background: #fff6d5; }
.note { color: #555; font-size: 0.9em; } code { background: #f5f5f5; padding: 0 3px; }
"""


def esc(text) -> str:
  return html.escape(str(text))


def number(value, digits: int = 4) -> str:
  """`digits` significant digits; integers and strings as they are; NaN as '—'."""
  if isinstance(value, (bool, np.bool_)):
    return "yes" if value else "no"
  if isinstance(value, (int, np.integer)):
    return str(int(value))
  if isinstance(value, Number):
    return "—" if math.isnan(value) else f"{value:.{digits}g}"
  return str(value)


class Marked(NamedTuple):
  """A table cell's value with a CSS class of its own (e.g. the chosen model: 'chosen')."""
  value: object
  css: str


def _is_number(value) -> bool:
  value = value.value if isinstance(value, Marked) else value
  return isinstance(value, (Number, np.number)) and not isinstance(value, (bool, np.bool_))


def table(header, rows, formats=None, row_class=None) -> str:
  """An HTML table; a column of numbers is right-aligned, any other left-aligned.

  Args:
    header: column titles.
    rows: sequences of cell values, one per column (a `Marked` value gets its
      own CSS class).
    formats: {column index: callable(value) -> HTML}; default `number` (escaped).
    row_class: optional [len(rows)] CSS classes of the rows ('' for none).
  """
  formats = formats or {}
  rows = [list(r) for r in rows]
  numeric = [all(_is_number(r[j]) for r in rows) for j in range(len(header))]
  align = lambda j: "" if numeric[j] else ' class="text"'  # noqa: E731
  head = "".join(f"<th{align(j)}>{esc(h)}</th>" for j, h in enumerate(header))
  body = []
  for r, row in enumerate(rows):
    cells = []
    for j, value in enumerate(row):
      css = "" if numeric[j] else "text"
      if isinstance(value, Marked):
        value, css = value.value, f"{css} {value.css}".strip()
      shown = formats[j](value) if j in formats else esc(number(value))
      cells.append(f'<td class="{css}">{shown}</td>' if css else f"<td>{shown}</td>")
    cls = f' class="{row_class[r]}"' if row_class and row_class[r] else ""
    body.append(f"<tr{cls}>{''.join(cells)}</tr>")
  return f'<div class="table"><table><tr>{head}</tr>{"".join(body)}</table></div>'


def config_table(config_json: str, per_row: int = 3) -> str:
  """The estimator's constructor arguments as name / value pairs, `per_row` pairs a row."""
  config = json.loads(config_json)
  pairs = [(k, "—" if v is None else v) for k, v in config.items()]
  rows = []
  for i in range(0, len(pairs), per_row):
    chunk = pairs[i:i + per_row]
    chunk += [("", "")] * (per_row - len(chunk))
    rows.append("".join(f'<th class="text">{esc(k)}</th><td class="text">{esc(number(v, 6))}</td>'
                        for k, v in chunk))
  return ('<div class="table"><table>' + "".join(f"<tr>{r}</tr>" for r in rows)
          + "</table></div>")


def verdict(ok) -> str:
  """pass / FAIL / warn (ok is None) as a coloured word."""
  if ok is None:
    return '<span class="warn">warn</span>'
  return '<span class="pass">pass</span>' if ok else '<span class="fail">FAIL</span>'


def figure(name: str, caption: str) -> str:
  """An <img> of the file `name` (relative) with its caption."""
  return (f'<figure><img src="{esc(name)}" alt="{esc(caption)}">'
          f'<figcaption class="note">{esc(caption)}</figcaption></figure>')


def document(title: str, parts) -> str:
  return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
          "<meta name='viewport' content='width=device-width, initial-scale=1'>"
          f"<title>{esc(title)}</title><style>{CSS}</style></head><body>{''.join(parts)}"
          "</body></html>")


def save(fig, out_dir, name: str, caption: str) -> str:
  """Saves `fig` as out_dir/name (PNG, atomic) and returns its <figure> HTML."""
  outputs.save_figure(fig, os.path.join(out_dir, name), dpi=100)
  return figure(name, caption)


def write_netcdf(idata, path) -> None:
  """Atomic: a report regenerated in place may still hold `path` open."""
  with outputs.atomic_path(path) as tmp:
    idata.to_netcdf(tmp)
