"""Reward over-optimisation along PPO, notebook 05's section of that name: the RM's score of each logged PPO sample
against the held-out labelers' utility of the same sample, per iteration, against sqrt(KL); and its figure.

    overoptimization_from_samples   one run's samples.jsonl -> the per-iteration table (overoptimization_table)
    add_overoptimization_table      every PPO run with logged samples -> tables["overoptimization"], summaries
    plot_overoptimization           proxy (RM) and gold (labelers) vs sqrt(KL), 95% bands, the gold peak marked
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rlhf_lib.analysis.figures import _PALETTE, _color, _figure, _legend, _order, _require, _save, _style
from rlhf_lib.analysis.policies import Availability
from rlhf_lib.config import StudyConfig
from rlhf_lib.evaluation.base import METHODS


def _prompt_key(text: str) -> str:
    return " ".join(str(text).split())


def overoptimization_from_samples(
    samples: pd.DataFrame, prompt_rows: Sequence[Mapping[str, Any]], judges: Sequence[Any],
    n_resamples: int = 1000, seed: int = 0,
) -> tuple[pd.DataFrame, int]:
    """Per PPO iteration: the logged samples' RM score, the held-out labelers' mean utility, and sqrt(KL).

    `samples` is a run's samples.jsonl (iteration, prompt, response, rm_score, kl); each sample's prompt
    text is mapped back to its PPO-split row (the labelers need its reference). Returns the
    `overoptimization_table` and the number of samples whose prompt matched no row (dropped).
    """
    from rlhf_lib.evaluation.overoptimization import overoptimization_table

    by_text = {_prompt_key(r["prompt"]): r for r in prompt_rows}
    frame = samples.copy()
    frame["row"] = frame["prompt"].map(lambda p: by_text.get(_prompt_key(p)))
    unmatched = int(frame["row"].isna().sum())
    frame = frame[frame["row"].notna()].reset_index(drop=True)
    if frame.empty:
        raise ValueError("No logged PPO sample's prompt matches a row of the PPO split.")
    frame["response"] = frame["response"].fillna("").astype(str)
    gold = np.zeros(len(frame))
    for _, index in frame.groupby(frame["prompt"].map(_prompt_key), sort=False).indices.items():
        row = frame.at[index[0], "row"]
        completions = frame["response"].to_numpy()[index].tolist()
        gold[index] = np.mean([judge.utilities(row, completions) for judge in judges], axis=0)
    frame["gold_utility"] = gold
    steps, rm, gold_lists, kl = [], [], [], []
    for iteration, group in frame.groupby("iteration", sort=True):
        steps.append(int(iteration))
        rm.append(group["rm_score"].to_numpy(float))
        gold_lists.append(group["gold_utility"].to_numpy(float))
        kl.append(group["kl"].to_numpy(float))
    return overoptimization_table(steps, rm, gold_lists, kl, n_resamples=n_resamples, seed=seed), unmatched


def add_overoptimization_table(
    tables: dict[str, pd.DataFrame], found: Availability, ppo_rows: Sequence[Mapping[str, Any]], judges: Sequence[Any],
    cfg: StudyConfig, notes: list[str],
) -> dict[str, Any]:
    """tables["overoptimization"] from every PPO run's logged samples (column method); returns each run's
    `overoptimization_summary` by method. A run without samples goes into found.skipped; samples whose prompt is in
    no PPO-split row are dropped with a note."""
    from rlhf_lib.evaluation import overoptimization

    size, seed, n_boot = cfg.preset, cfg.seed, cfg.evaluation.bootstrap_samples
    oo_summaries: dict[str, Any] = {}
    parts = []
    for method, run_dir in found.ppo_runs.items():
        samples_path = run_dir / "samples.jsonl"
        if not samples_path.exists() or samples_path.stat().st_size == 0:
            found.skipped[f"overoptimization {method}"] = f"no samples.jsonl in {run_dir}"
            continue
        samples = pd.read_json(samples_path, lines=True)
        table, unmatched = overoptimization_from_samples(samples, ppo_rows, judges, n_resamples=n_boot, seed=seed)
        if unmatched:
            notes.append(f"over-optimisation {method}: {unmatched} logged samples matched no PPO-split prompt (dropped).")
        parts.append(table.assign(method=method, size=size))
        oo_summaries[method] = overoptimization.overoptimization_summary(table)
    if parts:
        tables["overoptimization"] = pd.concat(parts, ignore_index=True)
    return oo_summaries


def plot_overoptimization(
    table: pd.DataFrame, out_path: str | os.PathLike[str], run_column: str | None = None
) -> Path:
    """RM (proxy) score and held-out-labeler (gold) utility vs sqrt(KL) along PPO checkpoints, 95% bands.

    `table` is `overoptimization_table`'s output; to compare runs (PPO vs PPO-ptx), concatenate
    their tables with a column naming the run and pass it as `run_column` (default: 'method' if present).
    """
    _require(table, ["sqrt_kl", "rm_score", "gold_utility"], "over-optimisation table")
    run_column = run_column or ("method" if "method" in table.columns else None)
    runs = _order(table[run_column], METHODS) if run_column else [None]
    with _style():
        fig, axes = _figure(ncols=2, width=4.8, height=3.8)
        for j, run in enumerate(runs):
            sub = table if run is None else table[table[run_column] == run]
            sub = sub.sort_values("sqrt_kl")
            color = _color(str(run), j) if run is not None else _PALETTE[0]
            for ax, col, low, high in (
                (axes[0], "rm_score", "rm_ci_low", "rm_ci_high"),
                (axes[1], "gold_utility", "gold_ci_low", "gold_ci_high"),
            ):
                ax.plot(sub["sqrt_kl"], sub[col], marker="o", markersize=4, color=color, label=str(run) if run else None)
                if low in sub.columns and high in sub.columns:
                    ax.fill_between(sub["sqrt_kl"], sub[low], sub[high], color=color, alpha=0.18, linewidth=0)
            peak = sub.loc[sub["gold_utility"].idxmax()]
            axes[1].axvline(peak["sqrt_kl"], color=color, linestyle=":", linewidth=1)
            axes[1].annotate(
                "gold peak", (peak["sqrt_kl"], peak["gold_utility"]), xytext=(4, 6), textcoords="offset points", fontsize=7.5,
                color=color,
            )
        axes[0].set_title("Proxy: reward-model score", fontsize=9)
        axes[0].set_ylabel("mean RM score")
        axes[1].set_title("Gold: held-out labelers' utility", fontsize=9)
        axes[1].set_ylabel("mean labeler utility")
        for ax in axes:
            ax.set_xlabel("sqrt(KL(pi || pi_SFT)) [sqrt nats]")
            ax.set_xlim(left=0)
        if run_column:
            _legend(axes[0], loc="best")
        fig.suptitle("Reward over-optimisation along PPO (95% bands over prompts)")
        return _save(fig, table, out_path)
