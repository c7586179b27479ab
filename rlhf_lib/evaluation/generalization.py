"""Reward-model generalisation: pairwise accuracy on comparisons from different sources.

The paper reports RM accuracy of 72.4 +- 0.4% on training labelers' comparisons and 69.6 +- 0.9% on
held-out labelers'. We add real human preference pairs (BIG-bench's HHH alignment set, by subset).
Input is the RM's saved predictions, one row per pair::

    from rlhf_lib.evaluation import generalization
    preds = pd.DataFrame({"set": [...], "score_chosen": [...], "score_rejected": [...]})
    table = generalization.rm_accuracy_table(preds, n_resamples=1000)   # one row per set

A pair is correct when the chosen completion scores higher; exact ties count half (what a coin flip
would earn), so a constant RM scores 0.5, not 0 or 1.

The pairs of one prompt share its completions and its labeler's ranking, so they are not independent:
when the predictions carry a `prompt_id` column the interval resamples prompts, each with all its pairs
(DESIGN.md, "Statistics"), and `n` counts prompts (`n_pairs` the pairs). The value is still the pooled
share of correct pairs, the paper's definition.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from rlhf_lib.evaluation.base import (
    Metric,
    MetricResult,
    group_summary,
    require_columns,
    result_row,
    sort_frame,
)
from rlhf_lib.evaluation.stats import clustered_accuracy

RM_ACCURACY = Metric("rm_accuracy", "mean", True, "Share of pairs where the RM scores the preferred completion higher.")
METRICS = {RM_ACCURACY.name: RM_ACCURACY}

# Suggested set names, in plotting order (the HHH subsets as "hhh/<subset>").
SETS = ("train_labelers", "heldout_labelers", "hhh/harmless", "hhh/helpful", "hhh/honest", "hhh/other", "hhh")


def pair_correct(score_chosen: Sequence[float], score_rejected: Sequence[float]) -> np.ndarray:
    """1 where chosen > rejected, 0.5 on exact ties, 0 otherwise."""
    chosen = np.asarray(score_chosen, dtype=float)
    rejected = np.asarray(score_rejected, dtype=float)
    if chosen.shape != rejected.shape:
        raise ValueError(f"{chosen.shape} chosen scores vs {rejected.shape} rejected scores.")
    return np.where(chosen > rejected, 1.0, np.where(chosen == rejected, 0.5, 0.0))


def pairwise_accuracy(
    score_chosen: Sequence[float],
    score_rejected: Sequence[float],
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    prompt_ids: Sequence[object] | None = None,
) -> MetricResult:
    """RM accuracy over pairs; the interval resamples prompts (n = prompts) when `prompt_ids` are given,
    else pairs (n = pairs: only right when every pair comes from its own prompt, as in HHH)."""
    correct = pair_correct(score_chosen, score_rejected)
    if prompt_ids is not None:
        return clustered_accuracy(correct, prompt_ids, n_resamples=n_resamples, seed=seed, alpha=alpha)
    return RM_ACCURACY.compute(correct, n_resamples, seed, alpha)


def rm_accuracy_table(
    predictions: pd.DataFrame,
    by: Sequence[str] = ("set",),
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    cluster: str | None = "prompt_id",
) -> pd.DataFrame:
    """RM accuracy per group (default: per `set`), tidy rows with CIs, sets in SETS order first.

    With a `cluster` column (default `prompt_id`) in the predictions, intervals resample its values
    (prompts, each with all its pairs) and `n` counts them; `n_pairs` always counts the pairs. Without
    it, pairs are resampled (n = pairs), which is only right when each pair has its own prompt.
    """
    require_columns(predictions, [*by, "score_chosen", "score_rejected"], "RM predictions")
    frame = predictions.copy()
    frame["correct"] = pair_correct(frame["score_chosen"], frame["score_rejected"])
    if cluster is not None and cluster in frame.columns:
        rows = []
        for keys, group in frame.groupby(list(by), sort=False, dropna=False):
            keys = keys if isinstance(keys, tuple) else (keys,)
            result = clustered_accuracy(group["correct"], group[cluster], n_resamples=n_resamples, seed=seed, alpha=alpha)
            rows.append({**result_row(RM_ACCURACY, result, **dict(zip(by, keys, strict=True))), "n_pairs": len(group)})
        columns = [*by, "metric", "higher_is_better", "value", "ci_low", "ci_high", "n", "n_pairs"]
        table = sort_frame(pd.DataFrame(rows, columns=columns))
    else:
        table = group_summary(frame, "correct", RM_ACCURACY, list(by), n_resamples, seed, alpha)
        table["n_pairs"] = table["n"]
    if "set" in table.columns:
        rank = {name: i for i, name in enumerate(SETS)}
        table = table.sort_values("set", key=lambda s: s.map(lambda v: rank.get(v, len(SETS))), kind="stable")
    return table.reset_index(drop=True)
