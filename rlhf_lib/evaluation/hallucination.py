"""Closed-domain hallucination: how often an output makes up information not in its input.

The paper measures this on closed-domain tasks (summarisation, closed QA, extraction: the answer must
be grounded in text the prompt gives) and reports 21% for InstructGPT vs 41% for GPT-3. Here a
prompt is closed-domain when its row carries a non-empty `context` (PROMPT_FEATURES), optionally
restricted to some categories; the held-out judges' `hallucinates` flag decides each output::

    from rlhf_lib.evaluation import hallucination
    table = hallucination.hallucination_table(gens, prompts, judges, n_resamples=1000)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from rlhf_lib.evaluation.base import Judge, Metric, group_summary, prompt_lookup, require_columns

CLOSED_DOMAIN_CATEGORIES = ("closed_qa", "summarization", "extraction")

HALLUCINATION_RATE = Metric(
    "hallucination_rate", "mean", False, "Share of closed-domain outputs flagged as making up information."
)
METRICS = {HALLUCINATION_RATE.name: HALLUCINATION_RATE}


def is_closed_domain(prompt_row: Mapping[str, Any], categories: Iterable[str] | None = None) -> bool:
    """A prompt with grounding context (and, if `categories` is given, one of those categories)."""
    if not str(prompt_row.get("context", "") or "").strip():
        return False
    return categories is None or prompt_row.get("category") in set(categories)


def hallucination_flags(
    generations: pd.DataFrame, prompts: Any, judges: Sequence[Judge], categories: Iterable[str] | None = None
) -> pd.DataFrame:
    """Per closed-domain method x size x prompt: the share of judges flagging a hallucination."""
    if not judges:
        raise ValueError("Need at least one judge.")
    require_columns(generations, ["method", "size", "prompt_id", "completion"], "generations")
    lookup = prompt_lookup(prompts)
    cats = None if categories is None else tuple(categories)
    records = []
    for row in generations.itertuples(index=False):
        prompt_row = lookup.get(str(row.prompt_id))
        if prompt_row is None:
            raise KeyError(f"Generation prompt_id {row.prompt_id!r} has no prompt row.")
        if not is_closed_domain(prompt_row, cats):
            continue
        completion = "" if row.completion is None else str(row.completion)
        flagged = [bool(judge.flags(prompt_row, completion)["hallucinates"]) for judge in judges]
        records.append((row.method, row.size, str(row.prompt_id), float(np.mean(flagged))))
    frame = pd.DataFrame(records, columns=["method", "size", "prompt_id", "hallucinates"])
    return frame.groupby(["method", "size", "prompt_id"], sort=False, as_index=False)["hallucinates"].mean()


def hallucination_table(
    generations: pd.DataFrame,
    prompts: Any,
    judges: Sequence[Judge],
    categories: Iterable[str] | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> pd.DataFrame:
    """Hallucination rate per method x size with a bootstrap interval over closed-domain prompts."""
    per_prompt = hallucination_flags(generations, prompts, judges, categories)
    if per_prompt.empty:
        raise ValueError("No generation answers a closed-domain prompt (prompt rows with a non-empty 'context').")
    return group_summary(per_prompt, "hallucinates", HALLUCINATION_RATE, ["method", "size"], n_resamples, seed, alpha)
