"""Reading a finished PPO run's logs (notebook 04): what the guards did, the score's trend, answer diversity.

    from rlhf_lib.evaluation.ppo_logs import guard_and_selection, response_diversity, score_trend
    guard_and_selection("runs/tiny/ppo-<fp>/ppo")      # iterations, collapse guard, chosen checkpoint and why
    samples = pd.read_json(run_dir / "samples.jsonl", lines=True)
    score_trend(samples)                               # RM score change per iteration, within prompts, 95% CI
    response_diversity(samples)                        # per iteration: distinct answers, the most common one

These read the files rlhf_lib.ppo.trainer writes (result.json, metrics.csv, samples.jsonl); they never train.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

    from rlhf_lib.evaluation.base import MetricResult


def guard_and_selection(run_dir: str | Path) -> dict[str, Any]:
    """What the collapse guard and the checkpoint choice did in a finished run (its result.json), one flat dict:
    iterations trained, whether and why the guard stopped it, which iterations it flagged, the exported
    (chosen) iteration and why, the missing-EOS penalty in score units and the last KL beta."""
    run_dir = Path(run_dir)
    result = json.loads((run_dir / "result.json").read_text())
    metrics = list(csv.DictReader((run_dir / "metrics.csv").open())) if (run_dir / "metrics.csv").exists() else []
    collapsed = result.get("collapsed_iterations", [])
    return {
        "iterations_trained": result.get("iterations_done"),
        "guard_fired": bool(collapsed or result.get("stop_reason")),
        "stopped_by_guard": result.get("stop_reason"),
        "collapsed_iterations": ", ".join(map(str, collapsed)) or "none",
        "chosen_iteration": result.get("chosen_iteration"),
        "selection": result.get("selection"),
        "missing_eos_penalty": result.get("missing_eos_penalty_score_units"),
        "kl_beta_last": float(metrics[-1]["kl_beta"]) if metrics else float("nan"),
    }


def score_trend(samples: pd.DataFrame, column: str = "rm_score", n_resamples: int = 1000, seed: int = 0) -> MetricResult:
    """How much `column` of the logged rollouts changed per iteration, within prompts, with a 95% interval.

    Each iteration draws other prompts, and prompts differ far more in score than PPO moves it in a few
    iterations, so a plain first-vs-last comparison mostly measures which prompts were drawn. Here every
    prompt seen in two or more iterations is compared with itself: the slope of (score - the prompt's mean)
    on (iteration - the prompt's mean iteration), pooled over prompts. The bootstrap resamples prompts,
    keeping each prompt's episodes together. `samples` is a run's samples.jsonl as a DataFrame.
    Returns an `evaluation.base.MetricResult` (value in score units per iteration; n = prompts used).
    """
    import numpy as np
    import pandas as pd

    from rlhf_lib.evaluation.base import summarize

    frame = samples[["prompt", "iteration", column]].dropna()
    groups = frame.groupby("prompt")
    x = frame["iteration"] - groups["iteration"].transform("mean")
    y = frame[column] - groups[column].transform("mean")
    per_prompt = pd.DataFrame({"prompt": frame["prompt"], "xy": x * y, "xx": x * x}).groupby("prompt")[["xy", "xx"]].sum()
    per_prompt = per_prompt[per_prompt["xx"] > 0]  # prompts seen in one iteration only carry no slope
    return summarize(np.asarray(per_prompt, dtype=float), "ratio_of_sums", n_resamples=n_resamples, seed=seed)


def response_diversity(samples: pd.DataFrame) -> pd.DataFrame:
    """Per iteration: how many different responses the policy gave, and its most common one.

    A rising RM score means better answers only while the answers stay varied. A policy that answers
    most prompts with one string (say "No") has found what the reward model over-scores: reward hacking
    (over-optimisation), which the RM score alone cannot show. `samples` is a run's samples.jsonl as a
    DataFrame; responses are compared after stripping whitespace. Returns one row per iteration with
    `episodes`, `distinct_share` (distinct responses / episodes), `top_response` and `top_share` (its
    share of the episodes).
    """
    import pandas as pd

    rows = []
    for iteration, group in samples.groupby("iteration", sort=True):
        responses = group["response"].fillna("").astype(str).str.strip()
        counts = responses.value_counts()
        rows.append({
            "iteration": int(iteration), "episodes": len(responses), "distinct_share": counts.size / len(responses),
            "top_response": counts.index[0], "top_share": counts.iloc[0] / len(responses),
        })
    return pd.DataFrame(rows).set_index("iteration")
