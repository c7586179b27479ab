"""Figures of the study: one function per figure; each writes a PNG, its data as CSV beside it, returns the PNG path.

Inputs are the tidy tables of `rlhf_lib.evaluation` (columns method, size, metric, value, ci_low,
ci_high, n) or training logs (metrics.csv). Rates are stored as 0-1 and drawn as percentages; error
bars are the tables' bootstrap 95% intervals; where the paper reports a comparable number it is drawn
as a reference line or marker and labelled as such::

    from rlhf_lib import plots
    from rlhf_lib.evaluation import preference
    png = plots.plot_win_rates(preference.win_rate_table(gens, prompts, judges), "results/tiny/win_rate.png")
    # results/tiny/win_rate.png and results/tiny/win_rate.csv
    from IPython.display import Image; Image(png)          # in a notebook

Figures are drawn on `matplotlib.figure.Figure` objects (the Agg canvas), never through pyplot's global
state, so this works headless, leaks no open figures, and leaves a notebook's backend alone.
"""

from __future__ import annotations

import math
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

from rlhf_lib import paper
from rlhf_lib.config import PRESETS
from rlhf_lib.data.schema import PAPER_CATEGORY_SHARE
from rlhf_lib.evaluation.base import FLAG_KEYS, METHODS

# --------------------------------------------------------------------------------------------
# Paper numbers drawn as references, from rlhf_lib.paper (where each is given), in the figures' units
# --------------------------------------------------------------------------------------------

PAPER_HALLUCINATION = {"InstructGPT (paper)": paper.HALLUCINATION_INSTRUCT.value / 100,
                       "GPT-3 (paper)": paper.HALLUCINATION_GPT.value / 100}
PAPER_SQUAD_F1 = {method: claim.value for method, claim in paper.SQUAD_F1.items()}  # Table 14, by our method names
PAPER_RM_ACCURACY = {"train_labelers": paper.RM_ACCURACY_TRAIN.value / 100,
                     "heldout_labelers": paper.RM_ACCURACY_HELDOUT.value / 100}
PAPER_TOXICITY_NOTE = (f"paper: {paper.TOXICITY_REDUCTION.text} toxic outputs than GPT-3 with the respectful "
                       "instruction")

# One colour per method in every figure (colour-blind safe), so PPO is always the same colour.
_PALETTE = sns.color_palette("colorblind", 10)
METHOD_COLORS: dict[str, Any] = {method: _PALETTE[i] for i, method in enumerate(METHODS)}

FLAG_TITLES = {
    "likert": "Likert score (1-7)",
    "fails_instruction": "Fails to follow instruction",
    "hallucinates": "Hallucinates",
    "toxic": "Toxic",
    "inappropriate_for_customer_assistant": "Inappropriate for a customer assistant",
}
METRIC_LABELS = {
    "mc1": "MC1",
    "mc2": "MC2",
    "true": "% true",
    "informative": "% informative",
    "true_informative": "% true & informative",
    "squad_f1": "SQuAD F1",
    "squad_em": "SQuAD EM",
    "toxic_rate": "toxic-output rate",
    "mean_toxicity": "mean toxicity probability",
}

# Column aliases for training logs written by different trainers (ours, TRL's log history).
PPO_SERIES: dict[str, tuple[str, ...]] = {
    "reward (RM score)": ("reward", "mean_reward", "reward_mean", "rm_score", "score", "scores", "env/reward_mean"),
    "KL(pi || pi_SFT) [nats]": ("kl", "mean_kl", "kl_mean", "sequence_kl", "objective/kl"),
    "entropy [nats/token]": ("entropy", "mean_entropy", "objective/entropy"),
    "clip fraction": ("clip_fraction", "clipfrac", "clip_frac", "policy_clipfrac", "policy/clipfrac"),
    "value loss": ("value_loss", "vf_loss", "loss/value"),
    "pretraining (ptx) loss": ("ptx_loss", "pretrain_loss", "loss/ptx"),
    "policy loss": ("policy_loss", "pg_loss", "loss/policy"),
}
STEP_COLUMNS = ("iteration", "step", "global_step", "update", "episode")
SFT_TRAIN_COLUMNS = ("train_loss", "loss")
SFT_VAL_COLUMNS = ("val_loss", "eval_loss", "validation_loss")


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


def _label_column(frame: pd.DataFrame) -> pd.Series:
    """`method`, or `method (size)` when the table spans several sizes."""
    if "size" in frame.columns and frame["size"].nunique() > 1:
        return frame["method"].astype(str) + " (" + frame["size"].astype(str) + ")"
    return frame["method"].astype(str)


def _label_order(frame: pd.DataFrame) -> list[str]:
    methods = _order(frame["method"], METHODS)
    sizes = _order(frame["size"], PRESETS) if "size" in frame.columns else [None]
    labels = _label_column(frame)
    wanted = []
    for method in methods:
        for size in sizes:
            mask = frame["method"] == method
            if size is not None:
                mask &= frame["size"] == size
            wanted.extend(labels[mask].unique().tolist())
    return list(dict.fromkeys(wanted))


def _label_colors(frame: pd.DataFrame, labels: Sequence[str], always: bool = False) -> dict[str, Any] | None:
    """Method colours for bar labels; with several sizes per method (hues by label) only if `always`."""
    if not always and "size" in frame.columns and frame["size"].nunique() > 1:
        return None  # one hue per (method, size): let each get its own colour
    method_of = dict(zip(frame["label"], frame["method"].astype(str), strict=True))
    return {label: _color(method_of.get(label, label), i) for i, label in enumerate(labels)}


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


def _read_log(metrics: str | os.PathLike[str] | pd.DataFrame) -> pd.DataFrame:
    return metrics.copy() if isinstance(metrics, pd.DataFrame) else pd.read_csv(metrics)


def _first_present(frame: pd.DataFrame, names: Sequence[str]) -> str | None:
    return next((name for name in names if name in frame.columns and frame[name].notna().any()), None)


def _fullest_present(frame: pd.DataFrame, names: Sequence[str]) -> str | None:
    """The alias with the most values (the first on a tie): a Trainer's log history has `train_loss` only in its
    final summary row and the per-step loss in `loss`, so the first alias present would draw one point."""
    counts = {name: int(frame[name].notna().sum()) for name in names if name in frame.columns}
    best = max(counts.values(), default=0)
    return next((name for name, count in counts.items() if count == best), None) if best else None


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


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


def plot_truthfulness(table: pd.DataFrame, out_path: str | os.PathLike[str]) -> Path:
    """TruthfulQA: MC1, MC2, % true, % informative, % true & informative by method, 95% CIs."""
    _require(table, ["method", "metric", "value", "ci_low", "ci_high"], "truthfulness table")
    frame = table.copy()
    frame["label"] = _label_column(frame)
    metrics = _order(frame["metric"], ("mc1", "mc2", "true", "informative", "true_informative"))
    labels = _label_order(frame)
    with _style():
        fig, (ax,) = _figure(width=max(6.0, 1.3 * len(metrics) + 0.4 * len(labels)), height=4.0)
        _grouped_bars(ax, frame, "metric", "label", metrics, labels, 100, METRIC_LABELS, _label_colors(frame, labels))
        ax.set_ylim(0, 100)
        ax.set_ylabel("score [%]")
        ax.set_title(f"TruthfulQA ({_n_note(frame)} questions, 95% CI); paper: InstructGPT ~2x GPT-3 on true & informative")
        _legend(ax, loc="upper right", ncols=2)
        return _save(fig, table, out_path)


def plot_toxicity(table: pd.DataFrame, out_path: str | os.PathLike[str], metric: str = "toxic_rate") -> Path:
    """Toxic-output rate per method, with vs without the respectful instruction, 95% CIs."""
    table = _only_metric(table, metric)
    _require(table, ["method", "condition", "value", "ci_low", "ci_high"], "toxicity table")
    frame = table.copy()
    frame["label"] = _label_column(frame)
    labels = _label_order(frame)
    conditions = _order(frame["condition"], ("plain", "respectful"))
    colors = {"plain": "#b0b0b0", "respectful": _PALETTE[2]}
    scale = 100 if metric == "toxic_rate" else 1
    with _style():
        fig, (ax,) = _figure(width=max(5.5, 1.1 * len(labels) + 2), height=4.0)
        pos = _grouped_bars(ax, frame, "label", "condition", labels, conditions, scale=scale, hue_colors=colors)
        # Relative change from plain to respectful above each method's pair of bars.
        for label in labels:
            sub = frame[frame["label"] == label].set_index("condition")
            rows = sub["value"]
            if {"plain", "respectful"} <= set(rows.index) and rows["plain"] > 0:
                change = rows["respectful"] / rows["plain"] - 1
                top = float(np.nanmax(sub[["value", "ci_high"]].to_numpy(float))) * scale
                x = np.mean([pos[(label, c)] for c in ("plain", "respectful")])
                ax.annotate(f"{change:+.0%}", (x, top), xytext=(0, 4), textcoords="offset points", ha="center", fontsize=8)
        ax.set_ylabel(f"{METRIC_LABELS.get(metric, metric)}" + (" [%]" if scale == 100 else ""))
        # Headroom for the change labels and the legend above the tallest interval.
        highest = float(np.nanmax(frame[["value", "ci_high"]].to_numpy(float))) * scale
        ax.set_ylim(0, max(highest * 1.35, 1e-3))
        ax.set_title(f"Toxicity with and without a respectful instruction ({_n_note(frame)} prompts, 95% CI)\n{PAPER_TOXICITY_NOTE}")
        _legend(ax, title="instruction (label: change with respectful)", loc="upper center", ncols=2)
        return _save(fig, table, out_path)


def plot_hallucination(
    table: pd.DataFrame, out_path: str | os.PathLike[str], paper: Mapping[str, float] | None = PAPER_HALLUCINATION
) -> Path:
    """Closed-domain hallucination rate per method, 95% CIs, with the paper's 21% / 41% as references."""
    table = _only_metric(table, "hallucination_rate")
    _require(table, ["method", "value", "ci_low", "ci_high"], "hallucination table")
    frame = table.copy()
    frame["label"] = _label_column(frame)
    frame["_all"] = "all"
    labels = _label_order(frame)
    with _style():
        fig, (ax,) = _figure(width=max(5.0, 0.9 * len(labels) + 2.5), height=4.0)
        _grouped_bars(ax, frame, "label", "_all", labels, ["all"], 100, group_colors=_label_colors(frame, labels, True))
        for name, value in (paper or {}).items():
            _reference(ax, value * 100, f"{name}: {value:.0%}")
        ax.set_ylim(0, 100)
        ax.set_ylabel("hallucination rate [%] (lower is better)")
        ax.set_title(f"Closed-domain hallucination ({_n_note(frame)} prompts, 95% CI)")
        return _save(fig, table, out_path)


def plot_alignment_tax(
    table: pd.DataFrame, out_path: str | os.PathLike[str], paper_squad_f1: Mapping[str, float] | None = PAPER_SQUAD_F1
) -> Path:
    """Alignment tax: few-shot SQuAD F1/EM (left) and held-out LM loss (right) for GPT / PPO / PPO-ptx."""
    _require(table, ["method", "metric", "value", "ci_low", "ci_high"], "alignment-tax table")
    frame = table.copy()
    frame["label"] = _label_column(frame)
    labels = _label_order(frame)
    colors = _label_colors(frame, labels)
    squad = frame[frame["metric"].isin(["squad_f1", "squad_em"])]
    loss = frame[frame["metric"] == "lm_nll"]
    panels = [p for p in (squad, loss) if not p.empty]
    if not panels:
        raise ValueError("The alignment-tax table needs squad_f1 / squad_em and/or lm_nll rows.")
    with _style():
        fig, axes = _figure(ncols=len(panels), width=5.0, height=4.0)
        ax_iter = iter(axes)
        if not squad.empty:
            ax = next(ax_iter)
            metrics = _order(squad["metric"], ("squad_f1", "squad_em"))
            hues = [lab for lab in labels if lab in set(squad["label"])]
            pos = _grouped_bars(ax, squad, "metric", "label", metrics, hues, 100, METRIC_LABELS, colors)
            shown = False
            for (metric, label), x in pos.items():
                method = squad.loc[squad["label"] == label, "method"].iloc[0]
                if metric == "squad_f1" and paper_squad_f1 and method in paper_squad_f1:
                    ax.scatter([x], [paper_squad_f1[method]], marker="D", color="black", s=22, zorder=4,
                               label=None if shown else "paper, 175B SQuADv2 F1")
                    shown = True
            ax.set_ylim(0, 100)
            ax.set_ylabel("few-shot SQuAD score [%]")
            ax.set_title(f"Few-shot SQuAD ({_n_note(squad)} questions, 95% CI)", fontsize=9)
            _legend(ax, loc="upper right")
        if not loss.empty:
            ax = next(ax_iter)
            hues = [lab for lab in labels if lab in set(loss["label"])]
            _grouped_bars(ax, loss.assign(_m="lm_nll"), "label", "_m", hues, ["lm_nll"], 1.0,
                          group_colors=_label_colors(frame, labels, True))
            ax.set_ylabel("mean token NLL [nats] (lower is better)")
            ax.set_title(f"LM loss on held-out text ({_n_note(loss)} documents, 95% CI)", fontsize=9)
        fig.suptitle("Alignment tax: does RLHF cost benchmark performance?")
        return _save(fig, table, out_path)


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


def plot_ppo_curves(
    metrics: str | os.PathLike[str] | pd.DataFrame | Mapping[str, str | os.PathLike[str] | pd.DataFrame],
    out_path: str | os.PathLike[str],
) -> Path:
    """PPO training curves from metrics.csv files: reward, KL, entropy, clip fraction, value loss, ptx loss.

    `metrics` is one run's log or a mapping run name -> log (PPO and PPO-ptx), drawn overlaid in one colour per
    run. Columns are found by the aliases in PPO_SERIES (so TRL-style names work too); a panel no run has is
    skipped. A run with more than 20 points also gets its moving average over 10% of them (thick line, the raw
    values thin), since one iteration's mean swings with the prompts it drew.
    """
    sources = dict(metrics) if isinstance(metrics, Mapping) else {"PPO": metrics}
    frames = {name: _read_log(source) for name, source in sources.items()}
    steps = {name: _first_present(frame, STEP_COLUMNS) for name, frame in frames.items()}
    columns = {name: {title: col for title, names in PPO_SERIES.items() if (col := _first_present(frame, names))}
               for name, frame in frames.items()}
    titles = [title for title in PPO_SERIES if any(title in found for found in columns.values())]
    if not titles:
        raise KeyError(f"No PPO metric columns found; expected one of {sum(PPO_SERIES.values(), ())}.")
    ncols = min(3, len(titles))
    nrows = math.ceil(len(titles) / ncols)
    with _style():
        fig, axes = _figure(ncols=ncols, nrows=nrows, width=3.8, height=3.0)
        for ax, title in zip(axes, titles, strict=False):
            for i, (name, frame) in enumerate(frames.items()):
                col = columns[name].get(title)
                if col is None:
                    continue
                x = frame[steps[name]] if steps[name] else pd.Series(np.arange(len(frame)), name="row")
                y = frame[col]
                ok = y.notna().to_numpy()
                color = METHOD_COLORS.get(name, _PALETTE[i % len(_PALETTE)])
                smooth = ok.sum() > 20
                ax.plot(x[ok], y[ok], color=color, linewidth=0.8 if smooth else 1.2, alpha=0.45 if smooth else 1.0,
                        marker=None if smooth else "o", markersize=3, label=None if smooth else name)
                if smooth:
                    window = max(3, int(ok.sum()) // 10)
                    ax.plot(x[ok], y[ok].rolling(window, min_periods=1).mean(), color=color, linewidth=1.8,
                            label=f"{name} (moving avg of {window})")
            ax.set_title(title, fontsize=9)
            ax.set_xlabel(next((s for s in steps.values() if s), "row"))
            _legend(ax, loc="best")
        for ax in axes[len(titles) :]:
            ax.set_visible(False)
        fig.suptitle("PPO training" if len(frames) == 1 else f"PPO training: {', '.join(frames)}")
        data = pd.concat([frame[([steps[name]] if steps[name] else []) + list(columns[name].values())].assign(run=name)
                          for name, frame in frames.items()], ignore_index=True)
        return _save(fig, data, out_path)


def plot_ppo_health(
    runs: Mapping[str, str | os.PathLike[str] | pd.DataFrame],
    out_path: str | os.PathLike[str],
    validation: Mapping[str, str | os.PathLike[str] | pd.DataFrame | None] | None = None,
    chosen: Mapping[str, int | None] | None = None,
) -> Path:
    """Is PPO collapsing? Response length, distinct fraction and entropy per iteration, runs overlaid.

    `runs` maps a run name (PPO, PPO-ptx) to its metrics.csv; iterations the collapse guard marked
    (`collapsed`) get a red cross. With `validation` (run name -> validation.csv) a fourth panel draws the
    mean validation reward of greedy answers: filled points could be chosen, hollow ones were barred by
    the collapse checks, and a star marks `chosen[name]` (the exported iteration).
    """
    panels = {"response_length": "mean response length [tokens]", "distinct_fraction": "distinct responses (share)",
              "entropy": "entropy [nats/token]"}
    validation = {k: v for k, v in (validation or {}).items() if v is not None}
    chosen = chosen or {}
    frames = []
    with _style():
        fig, axes = _figure(ncols=4 if validation else 3, width=3.6, height=3.0)
        for i, (name, metrics) in enumerate(runs.items()):
            frame = _read_log(metrics)
            _require(frame, ["iteration", *panels], f"metrics of {name}")
            color = _color(name, i)
            flagged = frame["collapsed"].astype(str).isin(["True", "1", "1.0"]) if "collapsed" in frame else None
            for ax, (col, title) in zip(axes, panels.items(), strict=False):
                ax.plot(frame["iteration"], frame[col], color=color, linewidth=1.2, marker="o", markersize=2.5, label=name)
                if flagged is not None and flagged.any():
                    ax.scatter(frame.loc[flagged, "iteration"], frame.loc[flagged, col], marker="x", color="red", s=40,
                               zorder=5, label=f"{name}: collapse guard fired")
                ax.set_title(title, fontsize=9)
                ax.set_xlabel("iteration")
            frames.append(frame[["iteration", *panels]].assign(run=name, source="training",
                                                                collapsed=flagged if flagged is not None else False))
        axes[1].set_ylim(0, 1.05)
        _legend(axes[0], loc="best")
        if validation:
            ax = axes[3]
            for i, (name, table) in enumerate(validation.items()):
                frame = _read_log(table)
                _require(frame, ["iteration", "score"], f"validation of {name}")
                color = _color(name, i)
                allowed = frame["allowed"].astype(str).isin(["True", "1", "1.0"]) if "allowed" in frame else pd.Series(True, frame.index)
                ax.plot(frame["iteration"], frame["score"], color=color, linewidth=1.2, label=name)
                ax.scatter(frame.loc[allowed, "iteration"], frame.loc[allowed, "score"], color=color, s=18, zorder=4)
                ax.scatter(frame.loc[~allowed, "iteration"], frame.loc[~allowed, "score"], facecolors="white",
                           edgecolors=color, s=22, zorder=4, label=f"{name}: barred by the collapse checks" if (~allowed).any() else None)
                pick = chosen.get(name)
                if pick is not None and (frame["iteration"] == pick).any():
                    y = float(frame.loc[frame["iteration"] == pick, "score"].iloc[0])
                    ax.scatter([pick], [y], marker="*", s=160, color=color, edgecolors="black", zorder=6,
                               label=f"{name}: chosen (iteration {pick})")
                frames.append(frame.assign(run=name, source="validation", chosen=frame["iteration"] == pick))
            ax.set_title("validation reward (greedy, RM - EOS penalty)", fontsize=9)
            ax.set_xlabel("iteration")
            _legend(ax, loc="best")
        fig.suptitle("PPO: collapse guard and checkpoint choice")
        return _save(fig, pd.concat(frames, ignore_index=True), out_path)


def plot_sft_curves(metrics: str | os.PathLike[str] | pd.DataFrame, out_path: str | os.PathLike[str]) -> Path:
    """SFT train and validation loss vs optimizer step (TRL log history or our metrics.csv)."""
    frame = _read_log(metrics)
    step = _first_present(frame, STEP_COLUMNS)
    train, val = _fullest_present(frame, SFT_TRAIN_COLUMNS), _fullest_present(frame, SFT_VAL_COLUMNS)
    if not train and not val:
        raise KeyError(f"No loss columns; expected one of {SFT_TRAIN_COLUMNS + SFT_VAL_COLUMNS}.")
    x = frame[step] if step else pd.Series(np.arange(len(frame)), name="row")
    with _style():
        fig, (ax,) = _figure(width=6.0, height=3.8)
        for col, label, color in ((train, "train", _PALETTE[0]), (val, "validation", _PALETTE[1])):
            if col:
                ok = frame[col].notna().to_numpy()
                ax.plot(x[ok], frame.loc[ok, col], marker="o" if ok.sum() <= 40 else None, markersize=3, color=color,
                        label=f"{label} ({col})")
        if val:
            best = frame[val].idxmin()
            ax.scatter([x[best]], [frame.at[best, val]], s=60, facecolors="none", edgecolors="black", zorder=4,
                       label="lowest validation loss")
        ax.set_xlabel(step or "row")
        ax.set_ylabel("token cross-entropy [nats]")
        ax.set_title("Supervised fine-tuning loss")
        _legend(ax, loc="upper right")
        columns = ([step] if step else []) + [c for c in (train, val) if c]
        return _save(fig, frame[columns], out_path)


def plot_category_mix(
    ours: Mapping[str, float] | pd.Series | pd.DataFrame,
    out_path: str | os.PathLike[str],
    paper: Mapping[str, float] = PAPER_CATEGORY_SHARE,
) -> Path:
    """Our prompt mix by use-case category vs the paper's API distribution (Table 1), in percent.

    `ours` is category -> count (a mapping or Series), or a DataFrame of prompts with a `category` column.
    """
    if isinstance(ours, pd.DataFrame):
        _require(ours, ["category"], "prompt table")
        counts = ours["category"].value_counts()
    else:
        counts = pd.Series(dict(ours), dtype=float)
    total = float(counts.sum())
    if total <= 0:
        raise ValueError("The prompt mix has no prompts.")
    categories = _order(list(paper) + list(counts.index), list(paper))
    data = pd.DataFrame(
        {
            "category": categories,
            "ours_count": [float(counts.get(c, 0)) for c in categories],
            "ours_percent": [100 * float(counts.get(c, 0)) / total for c in categories],
            "paper_percent": [float(paper.get(c, np.nan)) for c in categories],
        }
    )
    long = data.melt(id_vars="category", value_vars=["ours_percent", "paper_percent"], var_name="source", value_name="value")
    long["source"] = long["source"].map({"ours_percent": f"this study (n = {int(total)})", "paper_percent": "InstructGPT API (Table 1)"})
    long["ci_low"] = long["ci_high"] = long["value"]
    sources = list(dict.fromkeys(long["source"]))
    with _style():
        fig, (ax,) = _figure(width=8.0, height=4.0)
        _grouped_bars(ax, long.dropna(subset=["value"]), "category", "source", categories, sources,
                      group_labels={c: c.replace("_", " ") for c in categories},
                      hue_colors=dict(zip(sources, [_PALETTE[0], "#b0b0b0"], strict=True)))
        ax.set_ylabel("share of prompts [%]")
        ax.set_title("Prompt mix by use-case category vs the paper's API distribution")
        _slant_xticks(ax, 30)
        _legend(ax, loc="upper right")
        return _save(fig, data, out_path)
