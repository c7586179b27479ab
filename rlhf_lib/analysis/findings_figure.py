"""Every finding at a glance: a forest plot of findings.json, ours with its 95% interval beside the paper's mark.

    from rlhf_lib.analysis.findings_figure import plot_findings
    plot_findings(load_findings(results_dir), results_dir / "fig_findings.png")   # SUMMARY.md shows it first

One panel per unit (rates in percent, differences in points, ...), one row per finding that has an interval,
coloured by its verdict; a grey tick marks no effect (50% for a win rate, 0 for a difference) and a red diamond
the paper's number where it gives one. Findings without an interval (a stage's minutes) are left out.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from rlhf_lib.analysis.figures import _save, _style

RESERVED = ("missing", "about")
VERDICT_COLORS = {"agrees": "#1a7f37", "disagrees": "#b42318", "inconclusive": "#b7791f",
                  "fixed by design": "0.55", "": "#1f4e99"}
VERDICT_LABELS = {"agrees": "agrees with the paper", "disagrees": "disagrees with the paper",
                  "inconclusive": "inconclusive", "fixed by design": "fixed by design", "": "no paper claim"}


def findings_frame(findings: Mapping[str, Any]) -> pd.DataFrame:
    """One row per finding with an interval: metric, value, low, high, n, unit, paper, no_effect, verdict."""
    rows = []
    for name, entry in findings.items():
        if name in RESERVED or not isinstance(entry, Mapping) or entry.get("low") is None or entry.get("high") is None:
            continue
        paper = entry.get("paper")
        rows.append({"metric": name, "value": float(entry["value"]), "low": float(entry["low"]),
                     "high": float(entry["high"]), "n": entry.get("n"), "n_unit": entry.get("n_unit", ""),
                     "unit": str(entry.get("unit", "")),
                     "paper": float(paper) if isinstance(paper, int | float) and not isinstance(paper, bool) else None,
                     "no_effect": entry.get("no_effect"), "verdict": str(entry.get("verdict") or "")})
    return pd.DataFrame(rows, columns=["metric", "value", "low", "high", "n", "n_unit", "unit", "paper", "no_effect",
                                       "verdict"])


def plot_findings(findings: Mapping[str, Any], out_path: str | os.PathLike[str], title: str = "") -> Path | None:
    """The forest plot of `findings` (a findings.json record) at out_path (PNG, its data as CSV beside it);
    None when no finding has an interval."""
    frame = findings_frame(findings)
    if frame.empty:
        return None
    units = list(dict.fromkeys(frame["unit"]))
    heights = [max(1, int((frame["unit"] == unit).sum())) for unit in units]
    with _style():
        # On a Figure, not pyplot (as every figure: rlhf_lib.analysis.figures), so no open figure is left behind.
        fig = Figure(figsize=(8.0, 1.0 + 0.32 * sum(heights) + 0.6 * len(units)))
        FigureCanvasAgg(fig)
        axes = fig.subplots(len(units), 1, gridspec_kw={"height_ratios": heights}, squeeze=False)
        shown: set[str] = set()
        for ax, unit in zip(axes[:, 0], units, strict=True):
            part = frame[frame["unit"] == unit].reset_index(drop=True)
            y = list(range(len(part)))[::-1]  # the record's order, top to bottom
            for row, yy in zip(part.itertuples(), y, strict=True):
                color = VERDICT_COLORS.get(row.verdict, VERDICT_COLORS[""])
                label = VERDICT_LABELS.get(row.verdict, row.verdict)
                ax.errorbar(row.value, yy, xerr=[[row.value - row.low], [row.high - row.value]], fmt="o",
                            color=color, capsize=3, label=None if label in shown else label)
                shown.add(label)
                if row.no_effect is not None:
                    ax.plot([row.no_effect, row.no_effect], [yy - 0.35, yy + 0.35], color="0.45", linewidth=1.5)
                if row.paper is not None:
                    ax.plot(row.paper, yy, marker="D", color="#d62728", markersize=6, linestyle="none",
                            label=None if "paper" in shown else "the paper's number")
                    shown.add("paper")
            ax.set_yticks(y)
            ax.set_yticklabels([f"{m} (n={n} {u})".replace(" )", ")") for m, n, u in
                                zip(part["metric"], part["n"], part["n_unit"], strict=True)], fontsize=8)
            ax.set_ylim(-0.7, len(part) - 0.3)
            ax.set_xlabel(unit)
        axes[0, 0].set_title(title or "Findings: ours (95% interval) beside the paper's; grey tick = no effect")
        handles = [h for ax in axes[:, 0] for h in ax.get_legend_handles_labels()[0]]
        labels = [lab for ax in axes[:, 0] for lab in ax.get_legend_handles_labels()[1]]
        fig.tight_layout(rect=(0, 0.06, 1, 1))
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 3), fontsize=8, frameon=False)
        return _save(fig, frame, out_path)
