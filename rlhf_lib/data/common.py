"""Helpers shared by every data source: parse results with skip counts, length proxy, text keys.

    from rlhf_lib.data.common import approx_tokens, truncate_reference, normalise_for_dedup
    approx_tokens("Name a primary colour.")              # 6 (characters / CHARS_PER_TOKEN, rounded up)
    truncate_reference(long_answer, max_tokens=24)       # cut at a sentence end (else a word end)
    normalise_for_dedup("  The Cat -- sat!")             # "the cat sat"

Lengths use a character proxy rather than a tokenizer so the data stage does not depend on which
model is trained: measured here, the SmolLM2 tokenizer averages 4.2 characters per token on
natural_instructions prompts and references (gemma's larger vocabulary gives fewer tokens), so
4 characters per token slightly over-counts tokens, which keeps prompts within the token caps.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from datasets import Dataset, Features

from rlhf_lib.data.schema import to_dataset

CHARS_PER_TOKEN = 4.0

_NON_ALNUM = re.compile(r"[^0-9a-z]+")
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def approx_tokens(text: str) -> int:
    """Token count estimated from characters (see module docstring)."""
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def max_chars(tokens: int) -> int:
    """Characters that fit in `tokens` under the proxy."""
    return int(tokens * CHARS_PER_TOKEN)


def truncate_reference(text: str, max_tokens: int) -> str:
    """Shorten a human reference to about `max_tokens`, ending at a sentence if one fits.

    A demonstration that stops mid-word teaches the policy to stop mid-word; so cut after the last
    sentence end within the budget, else after the last whole word, else hard-cut (one huge word).
    """
    text = text.strip()
    budget = max_chars(max_tokens)
    if len(text) <= budget:
        return text
    head = text[:budget]
    ends = [m.end() for m in _SENTENCE_END.finditer(head)]
    if ends and ends[-1] >= budget // 3:  # a sentence end that keeps at least a third of the budget
        return head[: ends[-1]].strip()
    space = head.rfind(" ")
    if space > 0:
        return head[:space].rstrip(" ,;:-")
    return head


def normalise_for_dedup(text: str) -> str:
    """Lower-case, punctuation and whitespace collapsed to single spaces: what near-duplicates share."""
    return _NON_ALNUM.sub(" ", text.lower()).strip()


def strip_quotes(text: str) -> str:
    """Remove one pair of wrapping double quotes (topical_chat wraps every turn in them)."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return text[1:-1].strip()
    return text


@dataclass
class ParseResult:
    """Rows in one schema, plus how many well-formed input rows were skipped and why ("task: reason")."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    skips: Counter = field(default_factory=Counter)

    def extend(self, other: ParseResult) -> ParseResult:
        self.rows.extend(other.rows)
        self.skips.update(other.skips)
        return self

    def dataset(self, features: Features, source: str) -> Dataset:
        """A validated Dataset; no rows at all is a DataError naming `source`."""
        return to_dataset(self.rows, features, source)
