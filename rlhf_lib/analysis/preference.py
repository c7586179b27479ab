"""Preference, notebook 05's first two sections: the held-out labelers' win rates and Likert scores, and their figures.

    BASELINE, EXTRA_BASELINES   SFT (the paper's Figure 1 baseline), then GPT and GPT prompted
    add_preference_tables       win_rate (against each baseline evaluated) and likert_flags, judged on the eval split
    plot_win_rates              Figure 1 analogue: win rate against the baseline vs model size, one line per method
    plot_likert_and_flags       Figure 4 analogue: Likert score and metadata-flag rates by method and size
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes

from rlhf_lib.analysis.figures import (
    _color,
    _figure,
    _legend,
    _n_note,
    _only_metric,
    _order,
    _reference,
    _require,
    _save,
    _style,
    _yerr,
)
from rlhf_lib.config import PRESETS
from rlhf_lib.evaluation.base import FLAG_KEYS, METHODS

BASELINE = "SFT"  # the paper's Figure 1 baseline
EXTRA_BASELINES = ("GPT", "GPT prompted")  # the paper's "85 +- 3% vs GPT-3" and "71 +- 4% vs few-shot GPT-3"

FLAG_TITLES = {
    "likert": "Likert score (1-7)",
    "fails_instruction": "Fails to follow instruction",
    "hallucinates": "Hallucinates",
    "toxic": "Toxic",
    "inappropriate_for_customer_assistant": "Inappropriate for a customer assistant",
}


def add_preference_tables(
    tables: dict[str, pd.DataFrame], gens: pd.DataFrame, eval_rows: Sequence[Mapping[str, Any]], judges: Sequence[Any],
    n_boot: int, seed: int,
) -> None:
    """tables["win_rate"] against BASELINE and each of EXTRA_BASELINES that was evaluated (column baseline_method),
    and tables["likert_flags"]: the held-out `judges` on `gens`, bootstrap intervals over the eval prompts."""
    from rlhf_lib.evaluation import preference

    parts = []
    for baseline in (BASELINE, *EXTRA_BASELINES):
        if baseline in set(gens["method"]):
            table = preference.win_rate_table(gens, eval_rows, judges, baseline_method=baseline, n_resamples=n_boot,
                                              seed=seed)
            parts.append(table.assign(baseline_method=baseline))
    tables["win_rate"] = pd.concat(parts, ignore_index=True)
    tables["likert_flags"] = preference.likert_and_flag_table(gens, eval_rows, judges, n_resamples=n_boot, seed=seed)


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def _method_size_lines(ax: Axes, frame: pd.DataFrame, scale: float) -> None:
    """One line per method across sizes (categorical x), with CI error bars, slightly dodged."""
    sizes = _order(frame["size"], PRESETS)
    methods = _order(frame["method"], METHODS)
    dodge = 0.06 if len(methods) > 1 else 0.0
    for j, method in enumerate(methods):
        sub = frame[frame["method"] == method].copy()
        sub["_x"] = sub["size"].map(sizes.index)
        sub = sub.sort_values("_x")
        xs = sub["_x"].to_numpy(float) + dodge * (j - (len(methods) - 1) / 2)
        ax.errorbar(
            xs, sub["value"].to_numpy(float) * scale, yerr=_yerr(sub, scale), marker="o", markersize=5,
            capsize=3, linewidth=1.6, color=_color(method, j), label=method, zorder=3,
        )
    ax.set_xticks(range(len(sizes)))
    ax.set_xticklabels(sizes)
    ax.set_xlim(-0.5, len(sizes) - 0.5)
    ax.set_xlabel("model size (preset)")


def plot_win_rates(table: pd.DataFrame, out_path: str | os.PathLike[str], title: str | None = None) -> Path:
    """Figure 1 analogue: win rate against the baseline vs model size, one line per method, 95% CIs."""
    table = _only_metric(table, "win_rate")
    _require(table, ["method", "size", "value", "ci_low", "ci_high"], "win-rate table")
    baseline = str(table["baseline"].iloc[0]) if "baseline" in table.columns else "baseline"
    with _style():
        fig, (ax,) = _figure(width=6.0, height=4.0)
        _method_size_lines(ax, table, scale=100)
        _reference(ax, 50, f"tie with {baseline}")
        ax.set_ylim(0, 100)
        ax.set_ylabel(f"win rate vs {baseline} [%]")
        ax.set_title(title or f"Held-out labelers' preference vs {baseline} ({_n_note(table)} prompts, 95% CI)")
        _legend(ax, loc="upper left")
        return _save(fig, table, out_path)


def plot_likert_and_flags(table: pd.DataFrame, out_path: str | os.PathLike[str]) -> Path:
    """Figure 4 analogue: Likert score and metadata-flag rates by method and size, 95% CIs."""
    _require(table, ["method", "size", "metric", "value", "ci_low", "ci_high"], "Likert/flag table")
    metrics = [m for m in ("likert", *FLAG_KEYS) if m in set(table["metric"])]
    if not metrics:
        raise ValueError(f"No Likert or flag metrics in the table (metrics: {sorted(table['metric'].unique())}).")
    ncols = min(3, len(metrics))
    nrows = math.ceil((len(metrics) + 1) / ncols) if len(metrics) > 1 else 1  # +1: a free cell for the legend
    with _style():
        fig, axes = _figure(ncols=ncols, nrows=nrows, width=3.8, height=3.2)
        for ax, metric in zip(axes, metrics, strict=False):
            sub = table[table["metric"] == metric]
            if metric == "likert":
                _method_size_lines(ax, sub, scale=1)
                ax.set_ylim(1, 7)
                ax.set_ylabel("mean Likert score (1-7)")
            else:
                _method_size_lines(ax, sub, scale=100)
                # Rates are often small: zoom to the data, but always from 0 so bars compare honestly.
                top = float(np.nanmax(sub[["value", "ci_high"]].to_numpy(float))) * 100
                ax.set_ylim(0, min(100.0, max(10.0, top * 1.25)))
                ax.set_ylabel("rate [%] (lower is better)")
            ax.set_title(FLAG_TITLES.get(metric, metric), fontsize=9)
        spare = axes[len(metrics) :]
        for ax in spare:
            ax.set_axis_off()
        handles, labels = axes[0].get_legend_handles_labels()
        if spare.size:
            spare[0].legend(handles, labels, loc="center", fontsize=9, title="method")
        else:
            _legend(axes[0], loc="best")
        fig.suptitle(f"Held-out labelers' Likert scores and metadata ({_n_note(table)} prompts, 95% CI)")
        return _save(fig, table[table["metric"].isin(metrics)], out_path)
