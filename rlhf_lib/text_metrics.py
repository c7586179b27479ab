"""Text overlap metrics shared by the simulated labelers and the evaluation code.

Every score is a float in [0, 1] where 1 means "the same" (or "fully repetitive" for
`repetition_rate`). All functions are pure and work on plain strings::

    from rlhf_lib.text_metrics import token_f1, rouge_l_f1, char_ngram_f1, text_similarity
    token_f1("The cat sat.", "a cat sat down")        # 0.8 (SQuAD-style: articles and punctuation ignored)
    rouge_l_f1("the cat sat", "the cat sat down")     # LCS-based F1 over words
    char_ngram_f1("colour", "colours")                # partial credit for shared spelling
    text_similarity(prediction, reference)            # mean of the three above

Tokenisation is deliberately simple and language-agnostic: lower-cased runs of letters, or numbers
(with inner "." / "," kept, so "3.5" and "1,000" stay one token). Underscores split words, so a
label such as ``add_to_playlist`` matches the text "add to playlist".
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

_TOKEN_RE = re.compile(r"\d+(?:[.,]\d+)*|[^\W\d_]+(?:'[^\W\d_]+)*")
_ARTICLES = frozenset({"a", "an", "the"})

# Function words that carry little topical content. Hand-written (no NLTK offline); used to find
# content words for keyword coverage and for hallucination checks.
STOPWORDS = frozenset(
    """
    a about above after again against all also am an and any are as at be because been before being
    below between both but by can could did do does doing done down during each either else even ever
    every few for from further get gets got had has have having he her here hers herself him himself his
    how however i if in into is it its itself just let lets like may me might more most much must my
    myself neither no nor not now of off often on once one only or other others otherwise our ours
    ourselves out over own per perhaps quite rather really same shall she should so some something
    such than that thats the their theirs them themselves then there therefore these they this those
    though through thus to too under until up upon us very was we well were what when where whether
    which while who whom whose why will with within without would yet you your yours yourself
    yourselves im ive id youre dont doesnt didnt cant wont isnt arent wasnt werent
    """.split()
)


def words(text: str) -> list[str]:
    """Lower-cased word and number tokens of `text` (punctuation dropped, apostrophes removed)."""
    return [tok.replace("'", "").replace(",", "") for tok in _TOKEN_RE.findall(text.lower())]


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation: lower case, no punctuation, no articles, single spaces."""
    return " ".join(tok for tok in words(text) if tok not in _ARTICLES)


def answer_tokens(text: str) -> list[str]:
    """Tokens of `normalize_answer(text)`: what token F1 and ROUGE-L compare."""
    return [tok for tok in words(text) if tok not in _ARTICLES]


def exact_match(prediction: str, reference: str) -> float:
    """1.0 if both normalise to the same string, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def _f1(overlap: float, n_pred: int, n_ref: int) -> float:
    if n_pred == 0 and n_ref == 0:
        return 1.0  # two empty answers agree (SQuAD convention)
    if overlap == 0 or n_pred == 0 or n_ref == 0:
        return 0.0
    precision, recall = overlap / n_pred, overlap / n_ref
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1: harmonic mean of precision and recall of the bag of normalised words."""
    pred, ref = answer_tokens(prediction), answer_tokens(reference)
    overlap = sum((Counter(pred) & Counter(ref)).values())
    return _f1(overlap, len(pred), len(ref))


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token sequences (O(len(a)*len(b)))."""
    if len(a) < len(b):
        a, b = b, a  # keep the DP row over the shorter sequence
    if not b:
        return 0
    previous = [0] * (len(b) + 1)
    for token_a in a:
        current = [0]
        for j, token_b in enumerate(b, start=1):
            if token_a == token_b:
                current.append(previous[j - 1] + 1)
            else:
                current.append(max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


# Long prompts/contexts make the quadratic LCS slow; ROUGE-L on the first tokens is plenty for ranking.
MAX_LCS_TOKENS = 400


def rouge_l_f1(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (beta = 1) over normalised words: rewards shared words in the same order."""
    pred = answer_tokens(prediction)[:MAX_LCS_TOKENS]
    ref = answer_tokens(reference)[:MAX_LCS_TOKENS]
    return _f1(lcs_length(pred, ref), len(pred), len(ref))


def char_ngrams(text: str, n: int = 3) -> Counter[str]:
    """Multiset of character n-grams of the normalised text, with word-boundary spaces."""
    norm = normalize_answer(text)
    if not norm:
        return Counter()
    padded = f" {norm} "
    return Counter(padded[i : i + n] for i in range(len(padded) - n + 1))


def char_ngram_f1(prediction: str, reference: str, n: int = 3) -> float:
    """F1 of shared character n-grams: partial credit for shared stems and spellings, where token F1 is 0."""
    pred, ref = char_ngrams(prediction, n), char_ngrams(reference, n)
    overlap = sum((pred & ref).values())
    return _f1(overlap, sum(pred.values()), sum(ref.values()))


def text_similarity(prediction: str, reference: str) -> float:
    """Mean of token F1, ROUGE-L F1 and character-trigram F1: one graded similarity in [0, 1]."""
    return (token_f1(prediction, reference) + rouge_l_f1(prediction, reference) + char_ngram_f1(prediction, reference)) / 3


def best_similarity(prediction: str, references: Sequence[str]) -> float:
    """Highest `text_similarity` against any of `references` (0.0 when there are none)."""
    return max((text_similarity(prediction, ref) for ref in references), default=0.0)


def contains_phrase(text: str, phrase: str) -> bool:
    """Whether the normalised `phrase` occurs as a whole-word run inside the normalised `text`."""
    needle = answer_tokens(phrase)
    haystack = answer_tokens(text)
    return bool(needle) and find_phrase(haystack, needle) >= 0


def find_phrase(haystack: Sequence[str], needle: Sequence[str]) -> int:
    """Index of the first occurrence of token run `needle` in `haystack`, or -1."""
    n = len(needle)
    for start in range(len(haystack) - n + 1):
        if list(haystack[start : start + n]) == list(needle):
            return start
    return -1


def light_stem(word: str) -> str:
    """A crude suffix stripper so "elections"/"elected"/"election" share a stem (no NLTK offline)."""
    for suffix in ("ingly", "ations", "ation", "ments", "ment", "ness", "ings", "ing", "edly", "ies", "ied", "ed", "es", "ly", "s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            word = word[: -len(suffix)]
            break
    return word[:6]


def content_words(text: str) -> list[str]:
    """Words of `text` that carry content: not stopwords, and numbers or at least 3 letters long."""
    return [tok for tok in words(text) if tok not in STOPWORDS and (tok[0].isdigit() or len(tok) >= 3)]


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    """Consecutive token n-grams."""
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def repetition_rate(text: str, n: int = 3) -> float:
    """Share of word n-grams that repeat an earlier one: 0 for ordinary prose, near 1 for loops.

    "yes yes yes yes" -> 0.5; "the cat sat on the mat" -> 0.0. Texts with fewer than n + 1 words
    cannot loop and score 0.
    """
    grams = ngrams(words(text), n)
    if len(grams) < 2:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)
