"""Human-preference metrics, judged by held-out (simulated) labelers: the Figure 1 and Figure 4 analogues.

Input is one DataFrame of generations, with columns `method`, `size`, `prompt_id`, `completion` (one
or more rows per method x size x prompt), the prompt rows by id (PROMPT_FEATURES), and a list of
judges (the held-out labeler population; see `base.Judge`)::

    from rlhf_lib.evaluation import preference
    per_prompt = preference.pairwise_scores(gens, prompts, judges, baseline_method="SFT")
    table = preference.win_rate_table(gens, prompts, judges, baseline_method="SFT", n_resamples=1000)
    meta = preference.likert_and_flag_table(gens, prompts, judges)

Win rate against the baseline (the paper: 175B SFT) is computed per prompt: each judge compares the
method's completion with the baseline's completion of the same prompt (win 1, tie 0.5, loss 0), and
the prompt's score averages over judges (and over completions when a prompt has several). The
interval resamples prompts, since prompts, not judgments, are the independent units. Identical
completions always tie, so the baseline scores exactly 0.5 against itself.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from rlhf_lib.evaluation.base import (
    FLAG_KEYS,
    Judge,
    Metric,
    group_summary,
    prompt_lookup,
    require_columns,
    sort_frame,
)

GENERATION_COLUMNS = ("method", "size", "prompt_id", "completion")

WIN_RATE = Metric(
    "win_rate", "mean", True, "Share of prompts where held-out labelers prefer the method to the baseline (ties 0.5)."
)
LIKERT = Metric("likert", "mean", True, "Mean 1-7 Likert quality score from held-out labelers.")
FLAG_METRICS = {
    "fails_instruction": Metric("fails_instruction", "mean", False, "Rate of failing to follow the instruction."),
    "hallucinates": Metric("hallucinates", "mean", False, "Rate of making up information (all prompts)."),
    "toxic": Metric("toxic", "mean", False, "Rate of toxic outputs, as judged by labelers."),
    "inappropriate_for_customer_assistant": Metric(
        "inappropriate_for_customer_assistant", "mean", False, "Rate of language inappropriate for a customer assistant."
    ),
}
METRICS = {m.name: m for m in (WIN_RATE, LIKERT, *FLAG_METRICS.values())}


def _generations(generations: pd.DataFrame, prompts: Any) -> tuple[pd.DataFrame, dict[str, Mapping[str, Any]]]:
    require_columns(generations, GENERATION_COLUMNS, "generations")
    gens = generations.reset_index(drop=True).copy()
    gens["prompt_id"] = gens["prompt_id"].astype(str)
    gens["completion"] = gens["completion"].fillna("").astype(str)
    lookup = prompt_lookup(prompts)
    missing = sorted(set(gens["prompt_id"]) - set(lookup))
    if missing:
        raise KeyError(f"{len(missing)} generation prompt_id(s) have no prompt row, e.g. {missing[:3]}.")
    return gens, lookup


def resolve_baseline_size(generations: pd.DataFrame, baseline_method: str, baseline_size: str | None) -> str:
    """The baseline's size: as given, or the largest size (by config.PRESETS order) run for that method."""
    from rlhf_lib.config import PRESETS

    sizes = list(dict.fromkeys(generations.loc[generations["method"] == baseline_method, "size"]))
    if not sizes:
        raise KeyError(f"The baseline method '{baseline_method}' has no generations.")
    if baseline_size is not None:
        if baseline_size not in sizes:
            raise KeyError(f"The baseline '{baseline_method}' has no generations at size '{baseline_size}' (has {sizes}).")
        return baseline_size
    known = [s for s in sizes if s in PRESETS]
    if len(known) == len(sizes):
        return max(sizes, key=PRESETS.index)
    if len(sizes) == 1:
        return sizes[0]
    raise ValueError(f"Cannot tell the largest of sizes {sizes}; pass baseline_size explicitly.")


def _judge_utilities(judge: Judge, gens: pd.DataFrame, lookup: Mapping[str, Mapping[str, Any]]) -> np.ndarray:
    """utility of every generation row for one judge; one batched call per prompt when the judge has
    `utilities(prompt_row, completions)` (rlhf_lib.labelers.Labeler does), else one call per row."""
    out = np.empty(len(gens))
    batched = getattr(judge, "utilities", None)
    for prompt_id, index in gens.groupby("prompt_id", sort=False).indices.items():
        completions = gens["completion"].to_numpy()[index].tolist()
        if callable(batched):
            values = np.asarray(batched(lookup[prompt_id], completions), dtype=float)
        else:
            values = np.array([judge.utility(lookup[prompt_id], c) for c in completions], dtype=float)
        out[index] = values
    return out


def pairwise_scores(
    generations: pd.DataFrame,
    prompts: Any,
    judges: Sequence[Judge],
    baseline_method: str = "SFT",
    baseline_size: str | None = None,
    tie_tolerance: float = 0.0,
) -> pd.DataFrame:
    """Per method x size x prompt: the mean over judges of win (1) / tie (0.5) / loss (0) vs the baseline.

    Two completions tie when their texts are identical (after stripping whitespace) or a judge's
    utilities differ by at most `tie_tolerance`. Prompts the baseline did not answer are dropped.
    Returns columns method, size, prompt_id, score, n_judgments.
    """
    if not judges:
        raise ValueError("Need at least one judge.")
    gens, lookup = _generations(generations, prompts)
    size = resolve_baseline_size(gens, baseline_method, baseline_size)
    # One utility per judge and row, computed once: judges can be costly (classifiers, references).
    utilities = np.stack([_judge_utilities(judge, gens, lookup) for judge in judges])
    texts = gens["completion"].str.strip().to_numpy()
    is_baseline = (gens["method"] == baseline_method) & (gens["size"] == size)
    baseline_rows: dict[str, list[int]] = defaultdict(list)
    for i in np.flatnonzero(is_baseline.to_numpy()):
        baseline_rows[gens.at[i, "prompt_id"]].append(int(i))

    records = []
    for i, row in gens.iterrows():
        opponents = baseline_rows.get(row["prompt_id"])
        if not opponents:
            continue
        outcomes = []
        for b in opponents:
            if texts[i] == texts[b]:
                outcomes.extend([0.5] * len(judges))
                continue
            diff = utilities[:, i] - utilities[:, b]
            outcomes.extend(np.where(np.abs(diff) <= tie_tolerance, 0.5, (diff > 0).astype(float)))
        records.append((row["method"], row["size"], row["prompt_id"], float(np.mean(outcomes)), len(outcomes)))
    frame = pd.DataFrame(records, columns=["method", "size", "prompt_id", "score", "n_judgments"])
    if frame.empty:
        raise ValueError("No generation shares a prompt with the baseline; nothing to compare.")
    # Several completions of one prompt average into one score: the prompt is the resampling unit.
    frame = frame.groupby(["method", "size", "prompt_id"], sort=False, as_index=False).agg(
        score=("score", "mean"), n_judgments=("n_judgments", "sum")
    )
    return sort_frame(frame)


def win_rate_table(
    generations: pd.DataFrame,
    prompts: Any,
    judges: Sequence[Judge],
    baseline_method: str = "SFT",
    baseline_size: str | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    tie_tolerance: float = 0.0,
) -> pd.DataFrame:
    """Win rate of each method x size against the baseline, with a bootstrap interval over prompts.

    Columns: method, size, metric ('win_rate'), higher_is_better, value, ci_low, ci_high, n (prompts),
    baseline (e.g. 'SFT@small').
    """
    per_prompt = pairwise_scores(generations, prompts, judges, baseline_method, baseline_size, tie_tolerance)
    table = group_summary(per_prompt, "score", WIN_RATE, ["method", "size"], n_resamples, seed, alpha)
    size = resolve_baseline_size(generations, baseline_method, baseline_size)
    table["baseline"] = f"{baseline_method}@{size}"
    return table


def judge_metadata(generations: pd.DataFrame, prompts: Any, judges: Sequence[Judge]) -> pd.DataFrame:
    """Per method x size x prompt: Likert mean and each flag's rate, averaged over judges (and completions)."""
    if not judges:
        raise ValueError("Need at least one judge.")
    gens, lookup = _generations(generations, prompts)
    records = []
    for _, row in gens.iterrows():
        prompt_row, completion = lookup[row["prompt_id"]], row["completion"]
        likerts, flags = [], {key: [] for key in FLAG_KEYS}
        for judge in judges:
            score = int(judge.likert(prompt_row, completion))
            if not 1 <= score <= 7:
                raise ValueError(f"Likert scores are 1..7; a judge returned {score}.")
            likerts.append(score)
            judged = judge.flags(prompt_row, completion)
            missing = [key for key in FLAG_KEYS if key not in judged]
            if missing:
                raise KeyError(f"A judge's flags lack {missing}; expected keys {FLAG_KEYS}.")
            for key in FLAG_KEYS:
                flags[key].append(bool(judged[key]))
        records.append(
            {
                "method": row["method"],
                "size": row["size"],
                "prompt_id": row["prompt_id"],
                "likert": float(np.mean(likerts)),
                **{key: float(np.mean(values)) for key, values in flags.items()},
            }
        )
    frame = pd.DataFrame(records)
    frame = frame.groupby(["method", "size", "prompt_id"], sort=False, as_index=False).mean(numeric_only=True)
    return sort_frame(frame)


def likert_and_flag_table(
    generations: pd.DataFrame,
    prompts: Any,
    judges: Sequence[Judge],
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> pd.DataFrame:
    """Likert mean and metadata-flag rates per method x size (tidy: one row per metric), with CIs over prompts."""
    per_prompt = judge_metadata(generations, prompts, judges)
    parts = [
        group_summary(per_prompt, metric.name, metric, ["method", "size"], n_resamples, seed, alpha)
        for metric in (LIKERT, *FLAG_METRICS.values())
    ]
    return sort_frame(pd.concat(parts, ignore_index=True))
