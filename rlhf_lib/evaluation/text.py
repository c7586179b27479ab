"""Answer-string comparisons used by the evaluation: SQuAD normalisation, token F1, exact match, ROUGE-L.

These follow the official SQuAD v1.1/v2 evaluation script (lowercase, strip punctuation, drop the
articles a/an/the, collapse whitespace; F1 over the bag of normalised tokens; best over gold answers),
so our numbers are comparable in kind with the paper's SQuAD F1::

    from rlhf_lib.evaluation.text import squad_f1, squad_exact_match
    squad_f1("The Eiffel tower", ["Eiffel Tower", "tower"])   # 1.0
    squad_exact_match("Paris.", ["paris"])                    # 1.0

`rlhf_lib.text_metrics` (the labelers' similarity measures) tokenises differently on purpose (it
keeps "3.5" as one token, splits on underscores); benchmark numbers use the official rules here.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b", flags=re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, remove punctuation, articles and extra whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def answer_tokens(text: str) -> list[str]:
    return normalize_answer(text).split()


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall after normalisation (SQuAD's F1).

    As in the official script, two empty answers agree (1.0) and an empty one against a non-empty
    one scores 0 (this is how SQuAD v2 scores "no answer").
    """
    pred, ref = answer_tokens(prediction), answer_tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = Counter(pred) & Counter(ref)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    # Classic O(len(a) * len(b)) dynamic programme with one rolling row.
    if not a or not b:
        return 0
    previous = [0] * (len(b) + 1)
    for token_a in a:
        current = [0]
        for j, token_b in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if token_a == token_b else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (beta = 1) over normalised tokens: order-aware overlap."""
    pred, ref = answer_tokens(prediction), answer_tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    lcs = _lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def best_over_references(score: Callable[[str, str], float], prediction: str, references: Sequence[str]) -> float:
    """Best score against any reference (SQuAD takes the max over its gold answers); 0 if none."""
    return max((score(prediction, ref) for ref in references), default=0.0)


def squad_f1(prediction: str, gold_answers: Sequence[str]) -> float:
    return best_over_references(token_f1, prediction, gold_answers)


def squad_exact_match(prediction: str, gold_answers: Sequence[str]) -> float:
    return best_over_references(exact_match, prediction, gold_answers)


SIMILARITIES: dict[str, Callable[[str, str], float]] = {"token_f1": token_f1, "rouge_l": rouge_l}
