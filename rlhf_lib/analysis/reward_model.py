"""Reward-model generalisation, notebook 05's section of that name (and notebook 03's accuracy and learning-curve
figures): the RM's pairwise accuracy by comparison set, from the reward stage's saved predictions.

    rm_predictions_with_short_sets   the reward stage's set names -> generalization.SETS names, plus a pooled `hhh`
    add_rm_accuracy_table            tables["rm_accuracy"]; the K-wise accuracy per set and the labeler agreement
    plot_rm_accuracy                 accuracy by set, chance and the paper's accuracies (PAPER_RM_ACCURACY) marked
    plot_rm_learning_curve           held-out accuracy against the number of training prompts
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from rlhf_lib import paper
from rlhf_lib.analysis.figures import (
    _PALETTE,
    _figure,
    _grouped_bars,
    _legend,
    _n_note,
    _only_metric,
    _reference,
    _require,
    _save,
    _slant_xticks,
    _style,
)
from rlhf_lib.analysis.tables import _metric_dict

RM_SET_NAMES = {
    # reward-stage set names -> the short names of rlhf_lib.evaluation.generalization.SETS (and plots' paper markers)
    "train prompts / training labelers": "train_fit",
    "held-out prompts / training labelers": "train_labelers",
    "held-out prompts / held-out labelers": "heldout_labelers",
}
PAPER_RM_ACCURACY = {"train_labelers": paper.RM_ACCURACY_TRAIN.value / 100,
                     "heldout_labelers": paper.RM_ACCURACY_HELDOUT.value / 100}


def rm_predictions_with_short_sets(predictions: pd.DataFrame) -> pd.DataFrame:
    """The reward stage's predictions with generalization.SETS names, plus a pooled `hhh` set."""
    frame = predictions.copy()
    frame["source_set"] = frame["set"]

    def short(name: str) -> str:
        if name in RM_SET_NAMES:
            return RM_SET_NAMES[name]
        if name.lower().startswith("hhh"):
            return "hhh/" + name.split("/", 1)[1] if "/" in name else "hhh"
        return name

    frame["set"] = frame["set"].map(short)
    hhh = frame[frame["set"].str.startswith("hhh/")].assign(set="hhh")
    return pd.concat([frame, hhh], ignore_index=True)


def add_rm_accuracy_table(
    tables: dict[str, pd.DataFrame], reward_dir: Path, n_boot: int, seed: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """tables["rm_accuracy"] from the reward stage's predictions.csv; returns the K-wise accuracy by set and the
    labeler agreement of its agreement.csv (metrics.json "rm_accuracy" and "labeler_agreement")."""
    from rlhf_lib.evaluation import generalization

    agreement: dict[str, Any] = {}
    predictions = rm_predictions_with_short_sets(pd.read_csv(reward_dir / "predictions.csv"))
    by = ("mode", "set") if "mode" in predictions.columns else ("set",)
    rm_table = generalization.rm_accuracy_table(predictions, by=by, n_resamples=n_boot, seed=seed)
    tables["rm_accuracy"] = rm_table
    kwise = rm_table[rm_table["mode"] == "kwise"] if "mode" in rm_table.columns else rm_table
    rm_headline: dict[str, Any] = {row["set"]: _metric_dict(pd.DataFrame([row])) for _, row in kwise.iterrows()}
    if (reward_dir / "agreement.csv").exists():
        for _, row in pd.read_csv(reward_dir / "agreement.csv").iterrows():
            agreement[row["group"]] = {"value": float(row["mean"]), "ci_low": float(row["low"]),
                                       "ci_high": float(row["high"]), "n": int(row["n_prompts"])}
    return rm_headline, agreement


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def plot_rm_accuracy(
    table: pd.DataFrame, out_path: str | os.PathLike[str], paper: Mapping[str, float] | None = PAPER_RM_ACCURACY
) -> Path:
    """RM pairwise accuracy by comparison set, 95% CIs, chance at 50% and the paper's accuracies as markers."""
    table = _only_metric(table, "rm_accuracy")
    _require(table, ["set", "value", "ci_low", "ci_high"], "RM accuracy table")
    frame = table.assign(_all="all")
    sets = list(dict.fromkeys(frame["set"]))
    with _style():
        fig, (ax,) = _figure(width=max(5.0, 0.9 * len(sets) + 2), height=4.0)
        _grouped_bars(ax, frame, "set", "_all", sets, ["all"], 100, {s: s.replace("_", " ") for s in sets}, {"all": _PALETTE[0]})
        shown = False
        for i, name in enumerate(sets):
            if paper and name in paper:
                ax.scatter([i], [paper[name] * 100], marker="D", color="black", s=24, zorder=4,
                           label=None if shown else "paper (6B RM)")
                shown = True
        _reference(ax, 50, "chance")
        ax.set_ylim(0, 100)
        ax.set_ylabel("pairwise accuracy [%]")
        ax.set_title(f"Reward-model accuracy by comparison set\n({_n_note(frame)} pairs, 95% CI)")
        _slant_xticks(ax)
        _legend(ax, loc="lower right")
        return _save(fig, table, out_path)


def plot_rm_learning_curve(
    curve: pd.DataFrame, out_path: str | os.PathLike[str], paper: Mapping[str, float] | None = PAPER_RM_ACCURACY
) -> Path:
    """Held-out RM accuracy against the number of training prompts (rlhf_lib.reward.learning_curve), one line per
    comparison set, chance at 50% and the paper's accuracies as dotted lines. Still rising at the right: more
    comparisons would help."""
    _require(curve, ["train_prompts", "set", "accuracy"], "RM learning curve")
    with _style():
        fig, (ax,) = _figure(width=5.5, height=3.8)
        for i, (name, frame) in enumerate(curve.groupby("set", sort=False)):
            ax.plot(frame["train_prompts"], frame["accuracy"], marker="o", color=_PALETTE[i], label=name)
        _reference(ax, 50, "chance")
        for i, (name, value) in enumerate((paper or {}).items()):
            _reference(ax, value * 100, f"paper ({name.replace('_', ' ')})", color=_PALETTE[i], style=":")
        ax.set_xlabel("training prompts (all their rankings)")
        ax.set_ylabel("held-out pairwise accuracy [%]")
        ax.set_title("Reward-model learning curve")
        _legend(ax, loc="lower right")
        return _save(fig, curve, out_path)


def plot_rm_reliability(calibration: pd.DataFrame, out_path: str | os.PathLike[str]) -> Path:
    """Reliability diagram of the RM (rlhf_lib.reward.calibration_table): in each bin of predicted P(preferred
    completion wins) = sigmoid(score difference), how often it did win, with a Wilson 95% interval and n per bin.
    A calibrated RM lies on the diagonal; points flatter than it mean the RM is over-confident."""
    from rlhf_lib.evaluation.stats import wilson_interval

    _require(calibration, ["predicted", "observed", "n"], "RM calibration")
    data = calibration.copy()
    bounds = [wilson_interval(observed * n, int(n)) for observed, n in zip(data["observed"], data["n"], strict=True)]
    data["ci_low"], data["ci_high"] = [b[0] for b in bounds], [b[1] for b in bounds]
    with _style():
        fig, (ax,) = _figure(width=4.6, height=4.2)
        ax.plot([0, 1], [0, 1], linestyle="--", color="0.5", label="calibrated")
        ax.errorbar(data["predicted"], data["observed"],
                    yerr=[data["observed"] - data["ci_low"], data["ci_high"] - data["observed"]],
                    fmt="o", color=_PALETTE[0], capsize=3, label="RM (95% Wilson interval)")
        for x, y, n in zip(data["predicted"], data["observed"], data["n"], strict=True):
            ax.annotate(f"n={int(n)}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("predicted P(preferred wins) = sigmoid(score difference)")
        ax.set_ylabel("observed share the preferred one won")
        ax.set_title(f"Reward-model calibration ({int(data['n'].sum())} held-out pairs)")
        _legend(ax, loc="upper left")
        return _save(fig, data, out_path)
