"""How good a reward model is: its predictions on each comparison set, pairwise accuracy, calibration, the
accuracy ceilings of judges that know the labelers' criteria, and summaries of the comparisons."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rlhf_lib.artifacts import RewardModel  # RewardModel re-exported: its old path
from rlhf_lib.config import StudyConfig
from rlhf_lib.reward.loss import ranked_pairs

COMPARISON_SETS = {  # file name -> the set name used in predictions.csv
    "comparisons_train.jsonl": "train prompts / training labelers",
    "comparisons_heldout_trainlabelers.jsonl": "held-out prompts / training labelers",
    "comparisons_heldout_heldoutlabelers.jsonl": "held-out prompts / held-out labelers",
}


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def _prediction_rows(comparisons: Sequence[Mapping[str, Any]], scores_per_row: Sequence[Sequence[float]], set_name: str) -> list[dict]:
    rows = []
    for row, scores in zip(comparisons, scores_per_row, strict=True):
        for w, lo in ranked_pairs(row["ranks"]):
            rows.append({"set": set_name, "prompt_id": row["prompt_id"], "labeler_id": row["labeler_id"],
                         "score_chosen": float(scores[w]), "score_rejected": float(scores[lo])})
    return rows


def comparison_predictions(rm: RewardModel, comparisons: Sequence[dict], set_name: str) -> pd.DataFrame:
    """One row per untied pair: both scores and which one the labeler preferred (saved for recomputation)."""
    scores = [
        rm.score_texts([row["prompt"]] * len(row["completions"]), list(row["completions"]),
                       ended=row.get("completion_ended") or None).tolist()
        for row in comparisons
    ]
    return pd.DataFrame(_prediction_rows(comparisons, scores, set_name))


def preference_pair_predictions(
    rm: RewardModel | None, pairs: Sequence[dict], set_name: str = "hhh",
    scores: tuple[Sequence[float], Sequence[float]] | None = None,
) -> pd.DataFrame:
    """RM scores on human preference pairs (PREFERENCE_PAIR_FEATURES rows); `scores` = (chosen, rejected) when
    they were already computed (the cached-head path), else `rm` scores the texts."""
    if scores is None:
        prompts = [p["prompt"] for p in pairs]
        scores = (rm.score_texts(prompts, [p["chosen"] for p in pairs]).tolist(),
                  rm.score_texts(prompts, [p["rejected"] for p in pairs]).tolist())
    return pd.DataFrame(
        {
            "set": [f"{set_name}/{p['subset']}" for p in pairs],
            "prompt_id": [p["id"] for p in pairs],
            "labeler_id": "human",
            "score_chosen": list(scores[0]),
            "score_rejected": list(scores[1]),
        }
    )


def pairwise_accuracy(predictions: pd.DataFrame) -> float:
    """Share of pairs where the preferred completion scores higher (a tie counts half)."""
    diff = predictions["score_chosen"] - predictions["score_rejected"]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def calibration_table(predictions: pd.DataFrame, bins: int = 8) -> pd.DataFrame:
    """Predicted P(chosen > rejected) = sigmoid(score difference) vs how often it really was, by bin."""
    diff = (predictions["score_chosen"] - predictions["score_rejected"]).to_numpy()
    # Each pair appears once with its sign chosen at random so both halves of the curve are populated.
    rng = np.random.default_rng(0)
    flip = rng.random(len(diff)) < 0.5
    signed = np.where(flip, -diff, diff)
    outcome = np.where(flip, 0.0, 1.0)
    predicted = 1 / (1 + np.exp(-signed))
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(predicted, edges) - 1, 0, bins - 1)
    frame = pd.DataFrame({"bin": which, "predicted": predicted, "observed": outcome})
    table = frame.groupby("bin").agg(predicted=("predicted", "mean"), observed=("observed", "mean"), n=("observed", "size"))
    return table.reset_index(drop=True)



def comparison_summary(comparisons: pd.DataFrame) -> pd.DataFrame:
    """What the RM learns from, per set: prompts, rankings, labelers per prompt, K, pairs, EOS share, sources."""
    rows = []
    for set_name, frame in comparisons.groupby("set", sort=False):
        k = frame["completions"].map(len)
        pairs = frame["ranks"].map(lambda r: len(ranked_pairs(r)))
        ended = [e for flags in frame["completion_ended"] for e in flags]
        mix = pd.Series([f"{s} T={t:g}" for srcs, temps in zip(frame["completion_sources"], frame["completion_temperatures"], strict=True)
                         for s, t in zip(srcs, temps, strict=True)]).value_counts(normalize=True)
        rows.append({"set": set_name, "prompts": frame["prompt_id"].nunique(), "rankings": len(frame),
                     "labelers_per_prompt": round(len(frame) / max(1, frame["prompt_id"].nunique()), 2),
                     "K_min": int(k.min()), "K_max": int(k.max()), "K_mean": round(float(k.mean()), 2),
                     "untied_pairs": int(pairs.sum()), "ended_with_eos_%": round(100 * float(np.mean(ended)), 1),
                     **{f"{name} %": round(100 * share, 1) for name, share in mix.sort_index().items()}})
    return pd.DataFrame(rows)


def load_comparisons(rm_dir: Path | str) -> pd.DataFrame:
    """The reward stage's three comparison files in one table, with their set names in `set`."""
    return pd.concat([pd.read_json(Path(rm_dir) / name, lines=True).assign(set=set_name)
                      for name, set_name in COMPARISON_SETS.items()], ignore_index=True)


def accuracy_ceilings(cfg: StudyConfig, rm_dir: Path | str, prompt_rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Where an RM's held-out accuracy must stop: accuracy tables (as `accuracy_table`) of two noise-free judges
    built from the training-labeler population, on the same held-out comparisons as the RM.

    - "population utility": the mean of the training labelers' noise-free utilities, which sees everything they
      do (the reference answer included). No RM trained on these labels can expect to beat it: the rest is the
      labelers' noise.
    - "population utility without the reference": the same, blind to the reference-agreement criterion as any RM
      is (it never sees the reference answer). An RM must infer that part from the prompt and the completion.
    """
    import dataclasses

    from rlhf_lib import labelers as lab

    population = lab.make_population(cfg.labelers, "train", seed=cfg.seed)
    blind = [dataclasses.replace(labeler, weights={**labeler.weights, "reference": 0.0}) for labeler in population]
    rows_by_id = {str(r["id"]): r for r in prompt_rows}
    comparisons = load_comparisons(rm_dir)
    comparisons = comparisons[comparisons["set"].str.startswith("held-out")]
    parts = []
    for judge_name, judges in (("population utility", population), ("population utility without the reference", blind)):
        cache: dict[str, np.ndarray] = {}
        for record in comparisons.to_dict(orient="records"):
            prompt_id = str(record["prompt_id"])
            if prompt_id not in cache:
                scores = lab.score_completions(rows_by_id[prompt_id], record["completions"])
                cache[prompt_id] = np.mean([j.utilities_from_scores(rows_by_id[prompt_id], scores) for j in judges], axis=0)
            parts.append(pd.DataFrame(_prediction_rows([record], [cache[prompt_id].tolist()], record["set"])).assign(mode=judge_name))
    return accuracy_table(pd.concat(parts, ignore_index=True))


def accuracy_table(predictions: pd.DataFrame) -> pd.DataFrame:
    """Accuracy with bootstrap 95% intervals per (mode, set), from saved predictions."""
    from rlhf_lib.evaluation.generalization import rm_accuracy_table

    return rm_accuracy_table(predictions, by=("mode", "set"))
