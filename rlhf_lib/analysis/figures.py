"""The figures' shared parts: method colours, a scoped style, a blank figure, saving PNG + CSV, bars, reference lines.

Every figure of the study is one function beside the analysis it draws (`preference`, `benchmarks`,
`overoptimization`, `reward_model`, `training_curves`, `prompt_mix`; `rlhf_lib.plots` re-exports them all); each
writes a PNG, its data as CSV beside it, and returns the PNG path.

Inputs are the tidy tables of `rlhf_lib.evaluation` (columns method, size, metric, value, ci_low,
ci_high, n) or training logs (metrics.csv). Rates are stored as 0-1 and drawn as percentages; error
bars are the tables' bootstrap 95% intervals; where the paper reports a comparable number it is drawn
as a reference line or marker and labelled as such.

Figures are drawn on `matplotlib.figure.Figure` objects (the Agg canvas), never through pyplot's global
state, so this works headless, leaks no open figures, and leaves a notebook's backend alone.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from rlhf_lib.evaluation.base import METHODS

# One colour per method in every figure (colour-blind safe), so PPO is always the same colour.
_PALETTE = sns.color_palette("colorblind", 10)
METHOD_COLORS: dict[str, Any] = {method: _PALETTE[i] for i, method in enumerate(METHODS)}


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


@contextmanager
def _style():
    # Scoped seaborn style: global rcParams stay untouched for whoever imports this module.
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.85):
        yield


def _figure(ncols: int = 1, nrows: int = 1, width: float = 5.0, height: float = 3.6) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes.ravel()


def _png_path(out_path: str | os.PathLike[str]) -> Path:
    path = Path(out_path)
    return path if path.suffix == ".png" else path.with_suffix(".png")


def _atomic_write(final: Path, write) -> None:
    # Write beside the target and rename, so a reader never sees a half-written figure or table.
    final.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{final.stem}-", suffix=final.suffix, dir=final.parent)
    os.close(handle)
    try:
        write(tmp)
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _save(fig: Figure, data: pd.DataFrame, out_path: str | os.PathLike[str]) -> Path:
    """PNG at out_path (suffix forced to .png) and the figure's data as CSV with the same stem."""
    png = _png_path(out_path)
    _atomic_write(png, lambda tmp: fig.savefig(tmp, dpi=150, format="png"))
    _atomic_write(png.with_suffix(".csv"), lambda tmp: data.to_csv(tmp, index=False))
    return png


def _require(frame: pd.DataFrame, columns: Iterable[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise KeyError(f"{what} needs column(s) {missing}; it has {list(frame.columns)}.")
    if frame.empty:
        raise ValueError(f"{what} is empty: nothing to plot.")


def _order(values: Iterable[Any], preferred: Sequence[str]) -> list[Any]:
    unique = list(dict.fromkeys(values))
    known = [v for v in preferred if v in unique]
    return known + [v for v in unique if v not in preferred]


def _color(label: str, fallback_index: int) -> Any:
    if label in METHOD_COLORS:
        return METHOD_COLORS[label]
    return _PALETTE[(len(METHODS) + fallback_index) % len(_PALETTE)]


def _yerr(frame: pd.DataFrame, scale: float) -> np.ndarray:
    value = frame["value"].to_numpy(float)
    low = np.nan_to_num(value - frame["ci_low"].to_numpy(float), nan=0.0)
    high = np.nan_to_num(frame["ci_high"].to_numpy(float) - value, nan=0.0)
    return np.clip(np.vstack([low, high]), 0, None) * scale


def _reference(ax: Axes, y: float, label: str, color: Any = "0.35", style: str = "--") -> None:
    ax.axhline(y, color=color, linestyle=style, linewidth=1.0, zorder=1)
    ax.annotate(
        label, xy=(1.0, y), xycoords=("axes fraction", "data"), xytext=(-3, 2), textcoords="offset points",
        ha="right", va="bottom", fontsize=7.5, color=color, zorder=5,
        bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none", "alpha": 0.8},
    )


def _grouped_bars(
    ax: Axes,
    frame: pd.DataFrame,
    group_col: str,
    hue_col: str,
    group_order: Sequence[Any],
    hue_order: Sequence[Any],
    scale: float = 1.0,
    group_labels: Mapping[Any, str] | None = None,
    hue_colors: Mapping[Any, Any] | None = None,
    group_colors: Mapping[Any, Any] | None = None,
) -> dict[tuple[Any, Any], float]:
    """Bars of `value` with CI error bars; returns the x position of each (group, hue) bar.

    Colours come from `group_colors` per bar when given (single-hue charts), else one per hue.
    """
    width = 0.8 / max(len(hue_order), 1)
    positions: dict[tuple[Any, Any], float] = {}
    for j, hue in enumerate(hue_order):
        sub = frame[frame[hue_col] == hue]
        if sub[group_col].duplicated().any():
            raise ValueError(f"Several rows for one ({group_col}, {hue_col}) bar in hue '{hue}'; filter the table first.")
        sub = sub.set_index(group_col).reindex([g for g in group_order if g in set(sub[group_col])]).reset_index()
        xs = np.array([group_order.index(g) for g in sub[group_col]]) - 0.4 + width * (j + 0.5)
        color: Any = (hue_colors or {}).get(hue, _color(str(hue), j))
        if group_colors is not None:
            color = [group_colors.get(g, color) for g in sub[group_col]]
        yerr = _yerr(sub, scale)
        ax.bar(
            xs, sub["value"].to_numpy(float) * scale, width * 0.92, color=color,
            label=str(hue) if len(hue_order) > 1 else None,  # a single hue needs no legend entry
            yerr=yerr if yerr.any() else None,  # no zero-width caps for exact numbers (paper shares)
            capsize=2.5, error_kw={"elinewidth": 0.9, "ecolor": "0.2"}, zorder=2,
        )
        positions.update({(g, hue): float(x) for g, x in zip(sub[group_col], xs, strict=True)})
    ax.set_xticks(range(len(group_order)))
    ax.set_xticklabels([(group_labels or {}).get(g, str(g)) for g in group_order])
    return positions


def _slant_xticks(ax: Axes, degrees: float = 25) -> None:
    for label in ax.get_xticklabels():
        label.set_rotation(degrees)
        label.set_horizontalalignment("right")
        label.set_rotation_mode("anchor")


def _legend(ax: Axes, **kwargs: Any) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, fontsize=8, frameon=True, **kwargs)


def _n_note(frame: pd.DataFrame) -> str:
    if "n" not in frame.columns or frame["n"].isna().all():
        return ""
    low, high = int(frame["n"].min()), int(frame["n"].max())
    return f"n = {low}" if low == high else f"n = {low}-{high}"


def _only_metric(table: pd.DataFrame, metric: str | None) -> pd.DataFrame:
    if metric is None or "metric" not in table.columns:
        return table
    sub = table[table["metric"] == metric]
    if sub.empty:
        raise ValueError(f"No rows for metric '{metric}'; metrics present: {sorted(table['metric'].unique())}.")
    return sub
