"""The bar terms of a mixed-model formula: `(design | group)` and `(design || group)`.

`split_formula` cuts 'y ~ fixed + (a | g) + ...' into the response, the fixed
part (left to formulaic) and the `RandomTerm`s, with lme4's nesting
`(a | g1/g2)` = `(a | g1) + (a | g1:g2)` expanded. `group_terms` gathers the
terms of each grouping factor; `FEATURES` is the reserved design name for
MeNets' Gamma(x).

#### References

[1] D. Bates, M. Maechler, B. Bolker and S. Walker. Fitting linear
    mixed-effects models using lme4. Journal of Statistical Software 67(1),
    2015 (Table 2: the random-effects syntax, nesting g1/g2).
"""
from __future__ import annotations

import re
from typing import NamedTuple

NAME = re.compile(r"[A-Za-z_.][\w.]*")
FEATURES = "features"  # in a bar term: the network's last hidden layer Gamma(x), z = [1, Gamma(x)]


class RandomTerm(NamedTuple):
  """One bar term of a formula (after expanding nesting)."""
  text: str             # as written, for messages
  design: str           # left of the bar
  groups: tuple         # grouping columns; several for an interaction g1:g2
  uncorrelated: bool    # '||'

  @property
  def group_name(self) -> str:
    return ":".join(self.groups)

  @property
  def design_tokens(self) -> list:
    """The '+'-separated pieces of the design, stripped."""
    return [t.strip() for t in self.design.split("+")]

  @property
  def uses_features(self) -> bool:
    """Whether the design names MeNets' Gamma(x) (`FEATURES`)."""
    return FEATURES in self.design_tokens


def nested_groups(text: str, group: str) -> list:
  """'g1/g2/g3' -> [(g1,), (g1, g2), (g1, g2, g3)]; 'g1:g2' -> [(g1, g2)]."""
  parts = [p.strip() for p in group.split("/")]
  chains = [tuple(g.strip() for g in p.split(":")) for p in parts]
  if not all(NAME.fullmatch(g) for chain in chains for g in chain):
    raise ValueError(f"random-effects term {text!r}: the group must be column names "
                     "joined by ':' (interaction) or '/' (nesting)")
  return [sum(chains[:k + 1], ()) for k in range(len(chains))]


def bar_spans(rhs: str) -> list:
  """(start, end, design, bar, group) of each top-level '(design | group)' in rhs;
  the design may hold parentheses, as in (1 + I(t**2) | g)."""
  spans, depth, start = [], 0, 0
  for i, char in enumerate(rhs):
    if char == "(":
      start = i if depth == 0 else start
      depth += 1
    elif char == ")":
      depth -= 1
      if depth < 0:
        raise ValueError(f"formula: unbalanced ')' at position {i} of {rhs!r}")
      inner = rhs[start + 1:i]
      if depth == 0 and _top_level_bar(inner) is not None:
        cut = _top_level_bar(inner)
        bar = "||" if inner[cut:cut + 2] == "||" else "|"
        spans.append((start, i + 1, inner[:cut], bar, inner[cut + len(bar):]))
  if depth != 0:
    raise ValueError(f"formula: unbalanced '(' in {rhs!r}")
  return spans


def _top_level_bar(text: str):
  """Index of the first '|' outside parentheses in text, or None."""
  depth = 0
  for i, char in enumerate(text):
    depth += {"(": 1, ")": -1}.get(char, 0)
    if char == "|" and depth == 0:
      return i
  return None


def split_formula(formula: str) -> tuple[str, str, tuple]:
  """'y ~ fixed + (a | g)' -> (response, fixed part, bar terms).

  A nested term (a | g1/g2) gives two `RandomTerm`s, on g1 and on g1:g2,
  both carrying the text as written.
  """
  if not isinstance(formula, str) or formula.count("~") != 1:
    raise ValueError(f"formula must be a string 'response ~ terms', got {formula!r}")
  response, rhs = (s.strip() for s in formula.split("~"))
  if not response:
    raise ValueError(f"formula {formula!r} has no response left of '~'")
  terms, pieces, end = [], [], 0
  for start, stop, design, bar, group in bar_spans(rhs):
    design, group, text = design.strip(), group.strip(), rhs[start:stop]
    if not design or not group or "|" in group:
      raise ValueError(f"random-effects term {text!r} needs a design and a group: (1 | g)")
    for groups in nested_groups(text, group):
      terms.append(RandomTerm(text, design, groups, bar == "||"))
    pieces.append(rhs[end:start])
    end = stop
  fixed = " ".join(pieces + [rhs[end:]])
  if "|" in fixed:
    raise ValueError(f"formula {formula!r}: a '|' outside a parenthesized random-effects "
                     "term (design | group)")
  if not terms:
    raise ValueError(f"formula {formula!r} has no random-effects term such as (1 | group)")
  fixed = re.sub(r"(\s*\+\s*)+", " + ", fixed).strip(" +")  # the '+' left around removed terms
  return response, fixed or "1", tuple(terms)


def group_terms(terms) -> dict:
  """{group name: [its terms]} in the order the groups first appear."""
  grouped = {}
  for term in terms:
    grouped.setdefault(term.group_name, []).append(term)
  return grouped


def check_features_term(term: RandomTerm, network: bool, alone: bool) -> None:
  """A design naming `FEATURES` must be (features | g), (1 + features | g) or
  (features || g), the only term on its group, with a network f.

  Raises:
    ValueError: naming the term.
  """
  if not network:
    raise ValueError(f"random-effects term {term.text!r}: '{FEATURES}' (MeNets' Gamma(x), the "
                     "network's last hidden layer) needs a network f; pass f='mlp' or a "
                     "Keras model")
  if sorted(set(term.design_tokens) - {"1"}) != [FEATURES]:
    raise ValueError(f"random-effects term {term.text!r}: '{FEATURES}' takes the design "
                     f"z = [1, Gamma(x)] as a whole; write ({FEATURES} | g) or ({FEATURES} || g)")
  if not alone:
    raise ValueError(f"random-effects term {term.text!r}: '{FEATURES}' must be the only term "
                     f"on group {term.group_name!r}")
