"""Training curves, the figures of notebooks 02 (SFT loss) and 04 (PPO and PPO-ptx), drawn from the runs' logs.

    plot_sft_curves    SFT train and validation loss vs optimizer step
    plot_ppo_curves    PPO training curves (reward, KL, entropy, clip fraction, value loss, ptx loss), runs overlaid
    plot_ppo_health    is PPO collapsing? response length, distinct fraction, entropy; the checkpoint choice

Logs are metrics.csv files or DataFrames; columns are found by aliases (PPO_SERIES, STEP_COLUMNS,
SFT_TRAIN_COLUMNS, SFT_VAL_COLUMNS), so TRL's log-history names work too.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from rlhf_lib.analysis.figures import (
    _PALETTE,
    METHOD_COLORS,
    _color,
    _figure,
    _legend,
    _require,
    _save,
    _style,
)

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
