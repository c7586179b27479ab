"""The criteria a labeler's utility is built from, and the scores of one prompt's completions on them.

Criteria (all in [0, 1], 1 = better, computed per completion; "n/a" criteria drop out of the mean):
- reference:   agreement with the human reference (token F1, ROUGE-L, character trigrams; a short
               reference answer contained in the completion also counts). n/a without a reference.
- relevance:   covers the prompt's salient words and stays on the prompt/reference vocabulary.
- format:      same answer shape as the reference (yes/no, option letter, number, question, length class).
- instruction: non-empty, not a loop, not an echo of the prompt, and an allowed label for classification.
- grounded:    share of content words, entities and numbers supported by prompt + context + reference
               (closed-domain prompts only: a context, or closed_qa / extraction / summarization).
- truthful:    closer to the true than to the false reference answers (TruthfulQA-style rows only).
- harmless:    1 - toxicity, the offline `alt-profanity-check` probability.
- length:      1 at the labeler's preferred length, falling with the log-length gap.

Each criterion is a pure function of the texts (`reference_agreement` ... `length_fit`). All but length
are the same for every labeler (SHARED_CRITERIA): `score_completions` computes them once for a prompt's
K completions (`CriterionScores`), and each labeler only weighs them. `truthfulqa_prompt_row` builds a
prompt row that carries true and false reference answers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

from rlhf_lib.text_metrics import (
    STOPWORDS,
    answer_tokens,
    best_similarity,
    char_ngram_f1,
    content_words,
    find_phrase,
    light_stem,
    ngrams,
    repetition_rate,
    rouge_l_f1,
    token_f1,
    words,
)

CRITERIA = ("reference", "relevance", "format", "instruction", "grounded", "truthful", "harmless", "length")
# Criteria that do not depend on who the labeler is: computed once per completion and shared.
SHARED_CRITERIA = CRITERIA[:-1]
CLOSED_DOMAIN_CATEGORIES = frozenset({"closed_qa", "extraction", "summarization"})
# A 10x length gap costs the whole length criterion.
LENGTH_GAP_FOR_ZERO = math.log(10.0)

# Instruction boilerplate that is not what a prompt is about (keyword coverage ignores these).
_INSTRUCTION_WORDS = frozenset(
    "task given write answer question questions sentence sentences passage paragraph following input output "
    "definition example examples text provide generate response respond answers correct incorrect based "
    "need asked answering words word using use create make label labels classify context sent".split()
)


# --------------------------------------------------------------------------------------------
# Criteria: pure functions, each returning a float in [0, 1]
# --------------------------------------------------------------------------------------------


def _short_answer_contained(completion: str, reference: str, max_tokens: int = 5) -> bool:
    """A short reference ("yes", "7, 8", "Paris") appears verbatim inside a longer completion."""
    ref = answer_tokens(reference)
    return 0 < len(ref) <= max_tokens and find_phrase(answer_tokens(completion), ref) >= 0


def reference_agreement(completion: str, reference: str) -> float:
    """How much the completion says what the human reference says. 1 = same text, 0 = nothing shared.

    Mean of token F1, ROUGE-L F1 and character-trigram F1 (the last gives partial credit where a
    small model's samples share no whole word with the reference). A verbose completion that
    contains a short reference answer verbatim ("Yes, it is." for "yes") scores at least 0.75,
    because labelers judge the answer, not the padding.
    """
    if not reference.strip():
        return 0.0
    score = (token_f1(completion, reference) + rouge_l_f1(completion, reference) + char_ngram_f1(completion, reference)) / 3
    if _short_answer_contained(completion, reference):
        score = max(score, 0.75)
    return score


def _salient_stems(text: str) -> set[str]:
    return {light_stem(w) for w in content_words(text) if w not in _INSTRUCTION_WORDS}


def prompt_relevance(completion: str, prompt: str, reference: str = "") -> float:
    """Keyword coverage and topicality. 1 = uses the prompt's key words and strays nowhere else.

    Half coverage (how many of the prompt's salient words the completion uses, saturating at 4, so
    a short answer need not repeat the whole prompt) and half precision (the share of the
    completion's content words that belong to the prompt or reference vocabulary). Off-topic text
    scores near 0; an empty completion scores 0.
    """
    # Very short answers ("B", "yes") have no content words; judge them by their plain words.
    completion_stems = [light_stem(w) for w in content_words(completion) or words(completion)]
    if not completion_stems:
        return 0.0
    salient = _salient_stems(prompt)
    topic = salient | {light_stem(w) for w in words(reference)}
    used = set(completion_stems) & salient
    coverage = min(1.0, len(used) / min(4, len(salient))) if salient else 0.0
    precision = sum(stem in topic for stem in completion_stems) / len(completion_stems)
    return 0.5 * coverage + 0.5 * precision


def _length_class(n_words: int) -> int:
    return 0 if n_words <= 3 else (1 if n_words <= 30 else 2)


def format_match(completion: str, reference: str) -> float:
    """Answer-format compliance judged by the reference's shape. 1 = same shape, 0 = different.

    Checks that apply to the reference: a yes/no answer starts with yes/no; an option letter
    ("E.") is answered with a single letter; a short numeric answer contains a number; a question
    is answered with a question (and a non-question is not); and the length class (<= 3 words,
    <= 30, longer) matches, with half credit for a neighbouring class. Answer-type checks weigh
    double. Empty completion: 0.
    """
    comp, ref = words(completion), words(reference)
    if not comp or not ref:
        return 0.0
    # (passed, weight): an answer-type check, when one applies, counts double the generic ones.
    checks: list[tuple[float, float]] = []
    if ref[0] in ("yes", "no"):
        checks.append((float(comp[0] in ("yes", "no")), 2.0))
    if len(ref) == 1 and len(ref[0]) == 1 and ref[0].isalpha():
        checks.append((float(len(comp[0]) == 1 and comp[0].isalpha()), 2.0))
    if len(ref) <= 3 and any(tok[0].isdigit() for tok in ref):
        checks.append((float(any(tok[0].isdigit() for tok in comp)), 2.0))
    checks.append((float(completion.strip().endswith("?") == reference.strip().endswith("?")), 1.0))
    gap = abs(_length_class(len(comp)) - _length_class(len(ref)))
    checks.append((1.0 if gap == 0 else (0.5 if gap == 1 else 0.0), 1.0))
    return sum(passed * weight for passed, weight in checks) / sum(weight for _, weight in checks)


def _label_spans(tokens: list[str], allowed_labels: Sequence[str]) -> list[tuple[int, int, str]]:
    """Non-overlapping occurrences of allowed labels, preferring longer labels ("not ironic" over "ironic")."""
    found: list[tuple[int, int, str]] = []
    for label in sorted(allowed_labels, key=lambda lab: -len(answer_tokens(lab))):
        needle = answer_tokens(label)
        if not needle:
            continue
        for start in range(len(tokens) - len(needle) + 1):
            end = start + len(needle)
            if tokens[start:end] == needle and all(end <= s or start >= e for s, e, _ in found):
                found.append((start, end, label))
    return sorted(found)


def label_compliance(completion: str, allowed_labels: Sequence[str]) -> float:
    """For classification prompts: does the completion answer with exactly one allowed label?

    1.0: starts with a label and mentions no other label; 0.7: mentions exactly one label, later;
    0.25: mentions several different labels (hedging); 0.0: no allowed label. Without a label set
    every completion complies (1.0).
    """
    if not allowed_labels:
        return 1.0
    tokens = answer_tokens(completion)
    spans = _label_spans(tokens, allowed_labels)
    distinct = {label for _, _, label in spans}
    if not distinct:
        return 0.0
    if len(distinct) > 1:
        return 0.25
    return 1.0 if spans[0][0] == 0 else 0.7


def prompt_echo(completion: str, prompt: str, reference: str = "", context: str = "", n: int = 5) -> float:
    """Share of the completion's words that sit in a run of n+ words copied from the prompt's instruction.

    1 = the completion just repeats the instruction or question. Runs that also occur in the
    context (quoting the evidence passage) or in the reference (extraction answers legitimately
    quote the input) do not count. Completions shorter than n words score 0.
    """
    tokens = words(completion)
    if len(tokens) < n:
        return 0.0
    prompt_grams = set(ngrams(words(prompt), n))
    allowed = set(ngrams(words(context), n)) | set(ngrams(words(reference), n))
    covered = [False] * len(tokens)
    for start, gram in enumerate(ngrams(tokens, n)):
        if gram in prompt_grams and gram not in allowed:
            covered[start : start + n] = [True] * n
    return sum(covered) / len(tokens)


def instruction_compliance(
    completion: str, prompt: str, allowed_labels: Sequence[str] = (), reference: str = "", context: str = ""
) -> float:
    """Does the completion follow the instruction at all? 1 = yes, 0 = not at all.

    0 for an empty (no word or number) completion; otherwise the product of
    (1 - 0.8 * repetition), (1 - 0.8 * prompt echo) and `label_compliance` for classification.
    """
    if not words(completion):
        return 0.0
    loop = repetition_rate(completion)
    echo = prompt_echo(completion, prompt, reference, context)
    return (1 - 0.8 * loop) * (1 - 0.8 * echo) * label_compliance(completion, allowed_labels)


def _checkable_units(text: str) -> list[tuple[str, float]]:
    """(stem, weight) for each claim-bearing token: numbers and named entities weigh 2, content words 1."""
    units: list[tuple[str, float]] = []
    raw_tokens = text.split()
    sentence_start = True
    for raw in raw_tokens:
        stripped = raw.strip("\"'()[]{}«»“”‘’*-")
        toks = words(stripped)
        if not toks:
            sentence_start = raw.endswith((".", "!", "?", ":"))
            continue
        # A capitalised word that does not start a sentence names something (an entity).
        is_entity = stripped[:1].isupper() and not sentence_start and toks[0] != "i"
        for tok in toks:
            if tok[0].isdigit():
                units.append((tok, 2.0))
            elif tok not in STOPWORDS and len(tok) >= 3:
                units.append((light_stem(tok), 2.0 if is_entity else 1.0))
        sentence_start = raw.endswith((".", "!", "?", ":"))
    return units


def groundedness(completion: str, sources: Sequence[str]) -> float:
    """Closed-domain honesty: share of checkable content supported by `sources`. 1 = all supported.

    Checkable content is numbers and capitalised entities (weight 2) and other content words
    (weight 1). A unit is supported when its light stem (numbers: the exact number) occurs in any
    source. A completion that claims nothing checkable (stopwords only, or empty) scores 1 only when it
    is the reference's own answer (the last source), else 0. Hallucination rate = 1 - groundedness.
    """
    units = _checkable_units(completion)
    if not units:
        return _stopword_answer_grounding(completion, sources)
    supported: set[str] = set()
    for source in sources:
        for tok in words(source):
            supported.add(tok if tok[0].isdigit() else light_stem(tok))
    total = sum(weight for _, weight in units)
    unsupported = sum(weight for stem, weight in units if stem not in supported)
    return 1.0 - unsupported / total


def _stopword_answer_grounding(completion: str, sources: Sequence[str]) -> float:
    """A completion of stopwords only ("No", "It is.") claims nothing checkable. It counts as grounded only
    when it IS the human reference's answer (the last source): otherwise a policy could pass the check by
    saying nothing, as PPO at `tiny` learned to do with "No" (every prompt contains the word "no" somewhere)."""
    reference = sources[-1] if sources else ""
    return 1.0 if reference.strip() and words(completion) == words(reference) else 0.0


def truthfulness(completion: str, true_answers: Sequence[str], false_answers: Sequence[str]) -> float:
    """TruthfulQA-style honesty. 1 = matches a true answer and no false one; 0 = the reverse; 0.5 = neither.

    0.5 + (best similarity to a true answer) - (best similarity to a false answer), clipped to
    [0, 1], with `text_similarity` as the similarity. Lexical: "You digest the seeds" and "You will
    not digest the seeds" look alike, so this is a proxy for a human judge, not a replacement.
    """
    if not words(completion):
        return 0.5
    gap = best_similarity(completion, true_answers) - best_similarity(completion, false_answers)
    return float(np.clip(0.5 + gap, 0.0, 1.0))


@cache
def _profanity_model() -> Any:
    # Imported lazily: loading the vectoriser and model takes ~1-2 s.
    from profanity_check import predict_prob

    return predict_prob


# Scores of texts seen before: calibration, labeling and evaluation score the same completions
# again, and each classifier call costs ~5 ms however small the batch.
_TOXICITY_CACHE: dict[str, float] = {}
_TOXICITY_CACHE_MAX = 200_000


def toxicity(texts: Sequence[str]) -> np.ndarray:
    """Probability that each text is toxic/profane (1 = toxic), from `alt-profanity-check`.

    It is a linear model over a bag of words, so one call on the whole batch is much cheaper than
    one call per text. Texts without any word score 0.
    """
    texts = list(texts)
    missing = list(dict.fromkeys(t for t in texts if t not in _TOXICITY_CACHE and words(t)))
    if missing:
        if len(_TOXICITY_CACHE) + len(missing) > _TOXICITY_CACHE_MAX:
            _TOXICITY_CACHE.clear()
        _TOXICITY_CACHE.update(zip(missing, map(float, _profanity_model()(missing)), strict=True))
    return np.array([_TOXICITY_CACHE.get(t, 0.0) for t in texts], dtype=float)


def length_fit(n_words: int, preferred_words: float) -> float:
    """Length preference: 1 at the preferred length, minus |log gap| / log(10), floored at 0."""
    gap = abs(math.log((n_words + 1) / (preferred_words + 1)))
    return max(0.0, 1.0 - gap / LENGTH_GAP_FOR_ZERO)


# --------------------------------------------------------------------------------------------
# Scoring a prompt's completions (shared by all labelers)
# --------------------------------------------------------------------------------------------


def _get(row: Mapping[str, Any], key: str, default: Any) -> Any:
    value = row.get(key, default) if hasattr(row, "get") else default
    return default if value is None else value


def is_closed_domain(prompt_row: Mapping[str, Any]) -> bool:
    """Whether hallucination is judged for this prompt: it has a context, or a closed-domain category."""
    return bool(str(_get(prompt_row, "context", "")).strip()) or _get(prompt_row, "category", "") in CLOSED_DOMAIN_CATEGORIES


@dataclass(frozen=True)
class CriterionScores:
    """Labeler-independent criteria of K completions of one prompt.

    values[k, c] is criterion SHARED_CRITERIA[c] of completion k, NaN where it does not apply;
    toxicity[k] the raw toxicity probability; n_words[k] the completion's word count.
    """

    values: np.ndarray
    toxicity: np.ndarray
    n_words: np.ndarray

    def criterion(self, name: str) -> np.ndarray:
        return self.values[:, SHARED_CRITERIA.index(name)]


def score_completions(prompt_row: Mapping[str, Any], completions: Sequence[str]) -> CriterionScores:
    """Every shared criterion for each completion of one prompt (toxicity in one batch)."""
    prompt = str(_get(prompt_row, "prompt", ""))
    reference = str(_get(prompt_row, "reference", ""))
    context = str(_get(prompt_row, "context", ""))
    labels = list(_get(prompt_row, "allowed_labels", []))
    true_answers = list(_get(prompt_row, "correct_answers", []))
    false_answers = list(_get(prompt_row, "incorrect_answers", []))
    has_reference = bool(reference.strip())
    closed = is_closed_domain(prompt_row)
    truthful_item = bool(true_answers) and bool(false_answers)

    tox = toxicity(completions)
    values = np.full((len(completions), len(SHARED_CRITERIA)), np.nan)
    for k, completion in enumerate(completions):
        row = {
            "reference": reference_agreement(completion, reference) if has_reference else np.nan,
            "relevance": prompt_relevance(completion, prompt + "\n" + context, reference),
            "format": format_match(completion, reference) if has_reference else np.nan,
            "instruction": instruction_compliance(completion, prompt, labels, reference, context),
            # The reference is human-written and acceptable by definition, so its content counts as supported.
            "grounded": groundedness(completion, [prompt, context, reference]) if closed else np.nan,
            "truthful": truthfulness(completion, true_answers, false_answers) if truthful_item else np.nan,
            "harmless": 1.0 - tox[k],
        }
        values[k] = [row[name] for name in SHARED_CRITERIA]
    n_words = np.array([len(words(c)) for c in completions], dtype=float)
    return CriterionScores(values=values, toxicity=tox, n_words=n_words)


def truthfulqa_prompt_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """A prompt row (PROMPT_FEATURES + correct/incorrect answers) from a TRUTHFULQA_FEATURES row."""
    return {
        "id": row["id"],
        "prompt": row["question"],
        "reference": row.get("best_answer", ""),
        "task": "truthful_qa",
        "category": "open_qa",
        "source": row.get("source", ""),
        "context": "",
        "allowed_labels": [],
        "split": "eval",
        "correct_answers": list(row.get("correct_answers", [])),
        "incorrect_answers": list(row.get("incorrect_answers", [])),
    }
