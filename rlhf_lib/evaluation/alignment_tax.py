"""Alignment tax: few-shot SQuAD F1 / exact match, and LM loss on held-out pretraining-like text.

The paper (Table 14) shows PPO losing few-shot SQuADv2 F1 against GPT-3 (69.75 -> 51.95) and PPO-ptx
winning it back (69.93). We run the same kind of test on SQuAD-style items (QA_FEATURES): k worked
examples drawn from *other* items, then the question; greedy decoding; the first line of the output
is the answer, scored with the official SQuAD normalisation, best over the gold answers::

    from rlhf_lib.evaluation import alignment_tax as tax
    summary, per_item = tax.squad_few_shot(model, tokenizer, qa_rows, k=2, n_resamples=1000)
    summary["squad_f1"].value, summary["squad_em"].value
    lm = tax.lm_loss(model, tokenizer, texts, max_tokens=256)   # {"lm_nll": ..., "perplexity": ...}

Prompts are plain text (no chat template) for every model alike, as in the paper's few-shot evals,
so the comparison measures what the training did to the weights, not to the prompt format.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from rlhf_lib.evaluation.base import Metric, MetricResult
from rlhf_lib.evaluation.lm_scoring import document_nll
from rlhf_lib.evaluation.text import squad_exact_match, squad_f1

SQUAD_F1 = Metric("squad_f1", "mean", True, "Few-shot SQuAD token F1 (max over gold answers), 0-1.")
SQUAD_EM = Metric("squad_em", "mean", True, "Few-shot SQuAD exact match after normalisation, 0-1.")
LM_NLL = Metric("lm_nll", "ratio_of_sums", False, "Mean token negative log-likelihood (nats) on held-out text.")
PERPLEXITY = Metric("perplexity", "perplexity", False, "exp(mean token NLL) on held-out text.")
METRICS = {m.name: m for m in (SQUAD_F1, SQUAD_EM, LM_NLL, PERPLEXITY)}

QA_TEMPLATE = "Context: {context}\nQuestion: {question}\nAnswer:"
QA_HEADER = "Answer each question with a short span copied from its context.\n\n"


def _clip(text: str, max_chars: int | None) -> str:
    if max_chars is None or len(text) <= max_chars:
        return text
    return text[:max_chars].rsplit(" ", 1)[0] + " ..."


def select_shots(items: Sequence[Mapping[str, Any]], index: int, k: int, seed: int = 0) -> list[int]:
    """Indices of k other items for item `index`, preferring other contexts (no answer leaks), seeded."""
    if k <= 0:
        return []
    rng = np.random.default_rng([seed, index])
    target = items[index]
    others = [i for i in range(len(items)) if i != index and items[i]["context"] != target["context"]]
    if len(others) < k:  # too few distinct contexts: fall back to other questions on the same one
        others = [i for i in range(len(items)) if i != index]
    if len(others) < k:
        raise ValueError(f"{k}-shot prompts need at least {k + 1} items; got {len(items)}.")
    return [int(i) for i in rng.choice(others, size=k, replace=False)]


def build_squad_prompt(
    item: Mapping[str, Any], shots: Sequence[Mapping[str, Any]], max_context_chars: int | None = 600
) -> str:
    """Header, k solved examples (their first gold answer), then the item's context and question."""
    parts = [QA_HEADER]
    for shot in shots:
        answer = shot["answers"][0] if shot["answers"] else ""
        parts.append(QA_TEMPLATE.format(context=_clip(shot["context"], max_context_chars), question=shot["question"]))
        parts.append(f" {answer}\n\n")
    parts.append(QA_TEMPLATE.format(context=_clip(item["context"], max_context_chars), question=item["question"]))
    return "".join(parts)


def extract_answer(generated: str) -> str:
    """The first non-empty line of a generation: the model's answer before it starts a new example."""
    for line in generated.splitlines():
        if line.strip():
            return line.strip()
    return ""


def score_squad(predictions: Sequence[str], items: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Per item: id, prediction, f1, em (SQuAD normalisation, max over gold answers)."""
    if len(predictions) != len(items):
        raise ValueError(f"{len(predictions)} predictions for {len(items)} items.")
    records = [
        {
            "id": item["id"],
            "prediction": pred,
            "f1": squad_f1(pred, list(item["answers"])),
            "em": squad_exact_match(pred, list(item["answers"])),
        }
        for pred, item in zip(predictions, items, strict=True)
    ]
    return pd.DataFrame(records, columns=["id", "prediction", "f1", "em"])


def squad_few_shot(
    model,
    tokenizer,
    items: Sequence[Mapping[str, Any]],
    k: int = 2,
    max_new_tokens: int = 16,
    batch_size: int = 8,
    max_prompt_tokens: int | None = 900,
    max_context_chars: int | None = 600,
    seed: int = 0,
    n_resamples: int = 1000,
    alpha: float = 0.05,
) -> tuple[dict[str, MetricResult], pd.DataFrame]:
    """Greedy k-shot answers to every item, scored: ({"squad_f1", "squad_em"}, per-item table).

    Over-long prompts are truncated from the left (the oldest shot goes first, the question stays).
    """
    from rlhf_lib.generation import generate

    items = list(items)
    prompts = [
        build_squad_prompt(item, [items[j] for j in select_shots(items, i, k, seed)], max_context_chars)
        for i, item in enumerate(items)
    ]
    old_side = getattr(tokenizer, "truncation_side", "right")
    tokenizer.truncation_side = "left"
    predictions: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            out = generate(
                model,
                tokenizer,
                prompts[start : start + batch_size],
                max_new_tokens=max_new_tokens,
                temperature=0.0,
                max_prompt_tokens=max_prompt_tokens,
            )
            predictions.extend(extract_answer(text) for text in out.texts)
    finally:
        tokenizer.truncation_side = old_side
    per_item = score_squad(predictions, items)
    per_item["prompt"] = prompts
    summary = {
        SQUAD_F1.name: SQUAD_F1.compute(per_item["f1"].to_numpy(), n_resamples, seed, alpha),
        SQUAD_EM.name: SQUAD_EM.compute(per_item["em"].to_numpy(), n_resamples, seed, alpha),
    }
    return summary, per_item


def lm_loss_from_sums(
    nll_sums: Sequence[float], token_counts: Sequence[int], n_resamples: int = 1000, seed: int = 0, alpha: float = 0.05
) -> dict[str, MetricResult]:
    """Token-weighted mean NLL and perplexity, with intervals that resample documents."""
    per_doc = np.column_stack([np.asarray(nll_sums, dtype=float), np.asarray(token_counts, dtype=float)])
    per_doc = per_doc[per_doc[:, 1] > 0]
    return {m.name: m.compute(per_doc, n_resamples, seed, alpha) for m in (LM_NLL, PERPLEXITY)}


def lm_loss(
    model,
    tokenizer,
    texts: Sequence[str],
    max_tokens: int = 256,
    batch_size: int = 4,
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, MetricResult]:
    """Mean token NLL (nats) and perplexity of the model on held-out texts (each cut to `max_tokens`)."""
    sums, counts = document_nll(model, tokenizer, texts, max_tokens=max_tokens, batch_size=batch_size)
    return lm_loss_from_sums(sums, counts, n_resamples, seed, alpha)
