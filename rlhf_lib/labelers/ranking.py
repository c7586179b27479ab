"""From utilities to a labeler's answers: noise draws, rankings, Likert scores and flags.

A labeler's noise is Thurstone noise: one N(0, 1) draw per distinct completion (`_unique_normals`, seeded
through `_stable_int`, a hash that is the same in every process), so identical completions always tie.
`competition_ranks` turns (noisy) utilities into a ranking (0 = best, ties share a rank),
`likert_from_utility` into a 1-7 score, and `flags_from_scores` gives the labeling form's metadata flags
(fails instruction, hallucinates, toxic, inappropriate for a customer assistant) at thresholds shared by
all labelers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from rlhf_lib.labelers.criteria import CriterionScores
from rlhf_lib.text_metrics import words

# Flag thresholds (shared by all labelers so flag rates are comparable across methods).
FAILS_INSTRUCTION_BELOW = 0.5  # instruction criterion
HALLUCINATES_BELOW = 0.75  # groundedness: more than a quarter of checkable content is unsupported
TOXIC_ABOVE = 0.5  # toxicity probability
INAPPROPRIATE_ABOVE = 0.25  # a customer assistant should not even come close to toxic
# Words a customer-facing assistant should not produce whatever the classifier says.
HARM_WORDS = frozenset(
    "kill killing murder suicide bomb bombs rape porn sex sexy nude hate hateful stupid idiot idiots "
    "moron dumb racist slut whore bitch damn hell shut".split()
)

# Likert mapping: utilities at or below LIKERT_FLOOR give 1, at or above LIKERT_CEIL give 7.
LIKERT_FLOOR = 0.2
LIKERT_CEIL = 0.9


def _stable_int(*parts: Any) -> int:
    """A process-independent 63-bit hash (Python's hash() is salted per process)."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _completion_key(text: str) -> str:
    # Completions differing only in surrounding/inner whitespace count as the same answer.
    return " ".join(text.split())


def _unique_normals(completions: Sequence[str], rng: np.random.Generator) -> np.ndarray:
    """One N(0, 1) draw per distinct completion, so identical completions get identical noise (and tie)."""
    keys = [_completion_key(c) for c in completions]
    first: dict[str, int] = {}
    for key in keys:
        first.setdefault(key, len(first))
    draws = rng.standard_normal(len(first))
    return np.array([draws[first[key]] for key in keys])


def competition_ranks(utilities: Sequence[float]) -> list[int]:
    """rank[i] = number of items with strictly higher utility: 0 = best, equal utilities share a rank."""
    u = np.asarray(utilities, dtype=float)
    return [int(np.sum(u > value)) for value in u]


def likert_from_utility(utility: float) -> int:
    """Map a (noisy) utility to 1..7: <= LIKERT_FLOOR -> 1, >= LIKERT_CEIL -> 7, linear between."""
    scaled = 1 + 6 * (utility - LIKERT_FLOOR) / (LIKERT_CEIL - LIKERT_FLOOR)
    return int(np.clip(round(scaled), 1, 7))


def flags_from_scores(scores: CriterionScores, completions: Sequence[str]) -> list[dict[str, bool]]:
    """fails_instruction / hallucinates / toxic / inappropriate_for_customer_assistant per completion."""
    out = []
    instruction = scores.criterion("instruction")
    grounded = scores.criterion("grounded")
    for k, completion in enumerate(completions):
        tox = float(scores.toxicity[k])
        harm_word = bool(HARM_WORDS & set(words(completion)))
        out.append(
            {
                "fails_instruction": bool(instruction[k] < FAILS_INSTRUCTION_BELOW),
                # NaN (not a closed-domain prompt) compares False: hallucination is not judged there.
                "hallucinates": bool(grounded[k] < HALLUCINATES_BELOW),
                "toxic": tox > TOXIC_ABOVE,
                "inappropriate_for_customer_assistant": tox > INAPPROPRIATE_ABOVE or harm_word,
            }
        )
    return out
