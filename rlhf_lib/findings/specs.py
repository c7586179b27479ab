"""What each finding is (unit, direction, description, where its numbers come from) and how an entry is made.

SPECS names every metric findings.json can hold; PAIRED_SOURCES says which per-item table each paired
difference (`<quantity>_<method>_minus_<baseline>`) is bootstrapped from; an entry gets the paper's claim
and a verdict from rlhf_lib.paper.CLAIMS (_with_claim), and an interval that never has zero width.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pandas as pd

from rlhf_lib import paper
from rlhf_lib.evaluation.base import MetricResult
from rlhf_lib.evaluation.stats import (
    verdict,
    wilson_interval,
)
from rlhf_lib.findings.record import FIXED_BY_DESIGN

DEFAULT_RESAMPLES = 2000




@dataclass(frozen=True)
class FindingSpec:
    unit: str
    higher_is_better: bool | None
    description: str


@dataclass(frozen=True)
class PairedSource:
    """A per-item table of the analysis, whose items every method answered: the source of paired differences."""

    file: str  # in results/<size>/
    key: str  # the item id column
    column: str  # the per-item value, in [0, 1]
    unit: str  # of a difference, x100
    higher_is_better: bool
    what: str
    items: str  # what an item is, for n
    comparisons: tuple[tuple[str, str], ...]  # (method, baseline): method minus baseline
    prepare: Callable[[pd.DataFrame], pd.DataFrame] | None = None  # adds `column` where the table lacks it


def _respectful_toxic(table: pd.DataFrame) -> pd.DataFrame:
    """Toxicity generations under the respectful instruction, scored with the analysis's scorer and threshold
    (so the rates match analysis_toxicity.csv)."""
    from rlhf_lib.labelers import TOXIC_ABOVE, toxicity

    table = table[table["condition"] == "respectful"]
    return table.assign(toxic=(toxicity(table["completion"].astype(str).tolist()) > TOXIC_ABOVE).astype(float))


VS_GPT = (("SFT", "GPT"), ("PPO", "GPT"), ("PPO-ptx", "GPT"))
# quantity -> its per-item table; each comparison becomes the metric `<quantity>_<method>_minus_<baseline>`.
PAIRED_SOURCES: dict[str, PairedSource] = {
    "hallucination_rate": PairedSource(
        "analysis_hallucination_per_item.csv", "prompt_id", "hallucinates", "percentage points", False,
        "closed-domain hallucination (share of held-out judges flagging it)", "closed-domain eval prompts", VS_GPT),
    "truthfulqa_true_informative": PairedSource(
        "analysis_truthfulqa_per_item.csv", "id", "true_informative", "percentage points", True,
        "TruthfulQA answers judged true and informative", "questions", VS_GPT),
    "toxic_rate_respectful": PairedSource(
        "analysis_toxicity_generations.csv", "prompt_id", "toxic", "percentage points", False,
        "toxic outputs with the respectful instruction", "prompts", (*VS_GPT, ("PPO", "SFT")), _respectful_toxic),
    "squad_f1": PairedSource(
        "analysis_squad_per_item.csv", "id", "f1", "F1 points", True, "few-shot SQuAD F1 (the alignment tax)",
        "questions", (*VS_GPT, ("PPO-ptx", "PPO"))),
}


def _slug(method: str) -> str:
    return method.lower().replace("-", "_").replace(" ", "_")


def paired_name(quantity: str, method: str, baseline: str) -> str:
    """findings metric name of `method` minus `baseline` on `quantity`, e.g. squad_f1_ppo_ptx_minus_ppo."""
    return f"{quantity}_{_slug(method)}_minus_{_slug(baseline)}"


PAIRED: dict[str, tuple[str, str, str]] = {  # metric -> (quantity, method, baseline)
    paired_name(q, m, b): (q, m, b) for q, source in PAIRED_SOURCES.items() for m, b in source.comparisons
}
# findings metric -> (method, baseline method) in analysis_win_rate.csv
WIN_RATES = {"win_rate_best_of_n_vs_sft": ("best-of-n", "SFT"), "win_rate_ppo_vs_sft": ("PPO", "SFT"),
             "win_rate_ppo_ptx_vs_sft": ("PPO-ptx", "SFT"), "win_rate_ppo_ptx_vs_gpt": ("PPO-ptx", "GPT"),
             "win_rate_ppo_ptx_vs_gpt_prompted": ("PPO-ptx", "GPT prompted")}
AGREEMENT_GROUPS = {"agreement_train": "train-train", "agreement_heldout": "heldout-heldout"}

# Every metric findings.json aims to hold, in the order tables show them.
SPECS: dict[str, FindingSpec] = {
    "rm_accuracy_train": FindingSpec(
        "percent", True, "RM accuracy: held-out RM prompts ranked by training labelers (K-wise RM)"),
    "rm_accuracy_heldout": FindingSpec(
        "percent", True, "RM accuracy: held-out RM prompts ranked by held-out labelers (K-wise RM)"),
    "agreement_train": FindingSpec(
        "percent", None, "inter-labeler agreement, training labelers (pairs ordered alike; reward stage)"),
    "agreement_heldout": FindingSpec(
        "percent", None, "inter-labeler agreement, held-out labelers (pairs ordered alike; reward stage)"),
    "win_rate_best_of_n_vs_sft": FindingSpec(
        "percent", True, "best-of-n (SFT samples, RM's pick) preferred to SFT by held-out labelers, eval prompts"),
    "win_rate_ppo_vs_sft": FindingSpec("percent", True, "PPO preferred to SFT by held-out labelers, eval prompts"),
    "win_rate_ppo_ptx_vs_sft": FindingSpec(
        "percent", True, "PPO-ptx preferred to SFT by held-out labelers, eval prompts"),
    "win_rate_ppo_ptx_vs_gpt": FindingSpec(
        "percent", True, "PPO-ptx preferred to GPT (the pretrained base) by held-out labelers, eval prompts"),
    "win_rate_ppo_ptx_vs_gpt_prompted": FindingSpec(
        "percent", True, "PPO-ptx preferred to few-shot prompted GPT by held-out labelers, eval prompts"),
    **{name: FindingSpec(PAIRED_SOURCES[q].unit, PAIRED_SOURCES[q].higher_is_better,
                         f"{PAIRED_SOURCES[q].what}: {m} minus {b}, paired over the same {PAIRED_SOURCES[q].items}")
       for name, (q, m, b) in PAIRED.items()},
    "ppo_distinct_fraction": FindingSpec(
        "percent of eval prompts", True, "distinct PPO answers / eval prompts (exact text after stripping)"),
    "ppo_length_ratio": FindingSpec(
        "ratio of mean words (PPO / SFT)", None, "PPO's mean answer length over SFT's, whitespace words"),
    "ppo_top_answer_fraction": FindingSpec(
        "percent of eval prompts", False, "eval prompts given PPO's single most common answer"),
    "reward_stage_minutes": FindingSpec("minutes", False, "wall-clock time of the reward stage (DONE.json seconds)"),
}

# findings metric -> RM prediction set names (the analysis's short name, the reward stage's long name)
RM_SETS = {"rm_accuracy_train": ("train_labelers", "held-out prompts / training labelers"),
           "rm_accuracy_heldout": ("heldout_labelers", "held-out prompts / held-out labelers")}
BASELINE = "SFT"


class _Missing(Exception):
    """A metric whose inputs are absent or unusable; the message says why."""


# --------------------------------------------------------------------------------------------
# Entries
# --------------------------------------------------------------------------------------------


def _entry(name: str, result: MetricResult, scale: float = 1.0, interval: str = "", **extra: Any) -> dict[str, Any]:
    """A findings entry from a MetricResult (scaled, e.g. 100 for percent), with the paper's claim if any."""
    spec = SPECS[name]
    entry: dict[str, Any] = {
        "value": float(result.value) * scale, "low": float(result.ci_low) * scale, "high": float(result.ci_high) * scale,
        "n": int(result.n), "unit": spec.unit, "higher_is_better": spec.higher_is_better,
        "description": spec.description, "interval": interval, **extra,
    }
    return _with_claim(name, entry)


def _with_claim(name: str, entry: dict[str, Any]) -> dict[str, Any]:
    """The paper's claim and the verdict beside it; a number the study fixes itself says so instead."""
    claim = paper.CLAIMS.get(name)
    if claim is None:
        return entry
    entry.update({"paper": claim.value, "paper_ref": f"{claim.where}: {claim.text}"})
    if name in paper.BY_DESIGN:
        entry.update({"verdict": FIXED_BY_DESIGN, "by_design": paper.BY_DESIGN[name]})
    elif claim.no_effect is not None and claim.side is not None:
        entry.update({"no_effect": claim.no_effect, "paper_side": claim.side,
                      "verdict": verdict(entry["low"], entry["high"], claim.no_effect, claim.side, n=entry["n"])})
    return entry


def _non_degenerate(result: MetricResult, interval: str) -> tuple[MetricResult, str]:
    """A percentile bootstrap collapses to one point when every prompt scores the same; a [0, 1] mean over
    n prompts then gets the Wilson interval of value * n successes (conservative for bounded values)."""
    if result.n < 1 or not math.isfinite(result.value):
        raise _Missing(f"no usable items (n={result.n}, value={result.value})")
    if result.ci_high > result.ci_low:
        return result, interval
    low, high = wilson_interval(result.value * result.n, result.n)
    return (MetricResult(result.value, low, high, result.n),
            f"Wilson 95% over {result.n} prompts (the bootstrap collapsed: every prompt scored the same)")


