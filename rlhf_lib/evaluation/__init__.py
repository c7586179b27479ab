"""Evaluation of every method x size: one module per metric family (the analysis notebook, 05).

    base             Metric / MetricResult declarations, seeded percentile bootstrap, the Judge protocol
    preference       win rate vs a fixed baseline, Likert and metadata flags (Figures 1 and 4)
    truthfulness     TruthfulQA MC1 / MC2 by log-likelihood; generated answers true / informative
    toxicity         toxic-output rate with and without a "respectful" instruction
    hallucination    closed-domain hallucination rate
    alignment_tax    few-shot SQuAD F1 / EM, LM loss on held-out text
    overoptimization RM score vs gold utility vs sqrt(KL) along PPO checkpoints
    generalization   RM pairwise accuracy by comparison set (train / held-out labelers, HHH), prompts resampled
    stats            Wilson / Clopper-Pearson intervals, cluster (prompt-level) bootstrap of ratios, paired
                     bootstrap of differences between methods, verdicts beside the paper
    text, lm_scoring answer normalisation and similarity; causal-LM log-likelihood scoring
    ppo_logs         a finished PPO run's logs: the guards, within-prompt score trend, answer diversity

Every metric returns a `MetricResult(value, ci_low, ci_high, n)` or a tidy DataFrame with those
columns, ready for `rlhf_lib.plots` and for saving as CSV. `ALL_METRICS` lists every declaration.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rlhf_lib.evaluation import (
    alignment_tax,
    generalization,
    hallucination,
    overoptimization,
    preference,
    stats,
    toxicity,
    truthfulness,
)
from rlhf_lib.evaluation.base import (
    FLAG_KEYS,
    METHODS,
    Judge,
    Metric,
    MetricResult,
    bootstrap_ci,
    summarize,
)

ALL_METRICS: dict[str, Metric] = {
    **preference.METRICS,
    **truthfulness.METRICS,
    **toxicity.METRICS,
    **hallucination.METRICS,
    **alignment_tax.METRICS,
    **overoptimization.METRICS,
    **generalization.METRICS,
}


# Here, not in base, because it reads ALL_METRICS: base importing this package back would be a cycle.
def summary_rows(summary: Mapping[str, MetricResult], **keys: Any) -> list[dict[str, Any]]:
    """Tidy rows from a {metric name: MetricResult} summary (e.g. truthfulqa_mc's), plus grouping keys.

    Collect rows for several methods, then `pandas.DataFrame(rows)` feeds `rlhf_lib.plots`.
    """
    rows = []
    for name, result in summary.items():
        metric = ALL_METRICS.get(name)
        higher = metric.higher_is_better if metric is not None else None
        rows.append({**keys, "metric": name, "higher_is_better": higher, **result.to_dict()})
    return rows


__all__ = [
    "ALL_METRICS",
    "FLAG_KEYS",
    "METHODS",
    "Judge",
    "Metric",
    "MetricResult",
    "alignment_tax",
    "bootstrap_ci",
    "generalization",
    "hallucination",
    "overoptimization",
    "preference",
    "stats",
    "summarize",
    "summary_rows",
    "toxicity",
    "truthfulness",
]
