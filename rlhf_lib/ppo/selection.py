"""The collapse guard and the choice of the checkpoint to export, from greedy validation points.

    rollout_prompts, held_out = split_validation_prompts(prompts, n=16, seed=0)
    collapse_reason(first_rollout_stats, this_rollout_stats, fraction=0.5)   # why it looks collapsed, or None
    select_checkpoint(validation_rows, fraction=0.5)                         # (iteration, why)
    tracker = ValidationTracker(out_dir, collapse_fraction, enabled=True)    # validation.csv + best-* copy

A policy that hacks the reward model collapses first into short, low-entropy, repeated answers while the
RM score still rises; these checks read exactly those signs.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from rlhf_lib.io import atomic_write_text

# A validation point whose greedy answers repeat (fewer than 90% distinct over the validation prompts) is
# never chosen: one answer for many prompts is how the RM got hacked in the first tiny run.
VALIDATION_MIN_DISTINCT = 0.9


VALIDATION_COLUMNS = (
    "iteration", "score", "rm_score", "response_length", "distinct_fraction", "eos_rate", "prompts", "allowed", "best_so_far",
)


def collapse_reason(start: Mapping[str, float], current: Mapping[str, float], fraction: float) -> str | None:
    """Why `current` looks collapsed next to `start`, or None.

    Collapsed: mean response length or mean token entropy below `fraction` of its start value (the
    first rollout, before any update). The first tiny run went 14 -> 2 tokens and 3.3 -> 0.02 nats while
    the RM score rose: these two numbers caught it, the reward did not. fraction <= 0 turns the guard off.
    """
    if fraction <= 0:
        return None
    reasons = [
        f"mean {key.replace('_', ' ')} {current[key]:.3g} < {fraction:g} x its start value {start[key]:.3g}"
        for key in ("response_length", "entropy")
        if key in start and key in current and current[key] < fraction * start[key]
    ]
    return "; ".join(reasons) or None


def split_validation_prompts(prompts: Sequence[str], n: int, seed: int) -> tuple[list[str], list[str]]:
    """(rollout prompts, validation prompts): a seeded choice of n prompts held out, disjoint from the rest.

    Duplicated prompt strings go wholly to one side, so no validation prompt is ever trained on.
    """
    unique = list(dict.fromkeys(prompts))
    if n <= 0:
        return list(prompts), []
    if n >= len(unique):
        raise ValueError(f"[ppo] validation_prompts ({n}) must leave rollout prompts: there are {len(unique)} distinct.")
    order = torch.randperm(len(unique), generator=torch.Generator().manual_seed(seed * 104_729 + 17)).tolist()
    held = {unique[i] for i in order[:n]}
    return [p for p in prompts if p not in held], [p for p in unique if p in held]


def validation_block_reason(
    first: Mapping[str, float], row: Mapping[str, float], fraction: float, min_distinct: float = VALIDATION_MIN_DISTINCT
) -> str | None:
    """Why a validation point may not be chosen (the collapse guard on greedy answers), or None if it may."""
    reasons = []
    if fraction > 0 and row["response_length"] < fraction * first["response_length"]:
        reasons.append(f"length {row['response_length']:.3g} < {fraction:g} x the first validation's "
                       f"{first['response_length']:.3g}")
    if row["distinct_fraction"] < min_distinct:
        reasons.append(f"distinct fraction {row['distinct_fraction']:.2f} < {min_distinct:g}")
    return "; ".join(reasons) or None


def select_checkpoint(
    rows: Sequence[Mapping[str, float]], fraction: float, min_distinct: float = VALIDATION_MIN_DISTINCT
) -> tuple[int | None, str]:
    """(iteration, why) of the best validation point by mean `score` among those the guard allows.

    `rows` are validation points in order (iteration, score, response_length, distinct_fraction); the first
    is the reference for the length check. Ties go to the earlier iteration (fewer updates, nearer SFT).
    None when no point is allowed (the caller then exports the last iterate).
    """
    if not rows:
        return None, "no validation point"
    allowed = [r for r in rows if validation_block_reason(rows[0], r, fraction, min_distinct) is None]
    if not allowed:
        return None, f"none of {len(rows)} validation points passed the collapse checks"
    best = max(allowed, key=lambda r: (r["score"], -r["iteration"]))
    return int(best["iteration"]), (
        f"best mean validation reward {best['score']:.4f} among {len(allowed)} of {len(rows)} validation points "
        f"that passed the collapse checks (greedy length >= {fraction:g} x the first validation's, "
        f">= {min_distinct:.0%} distinct)")


def csv_float(value: str) -> float:
    """A CSV cell as a number: booleans (the `collapsed` column) as 1.0 / 0.0."""
    if value in ("True", "False"):
        return float(value == "True")
    return float(value) if value != "" else float("nan")


class ValidationTracker:
    """validation.csv, the best-so-far policy copy and their state, beside the checkpoints.

    The commit point is validation_state.json (written atomically, last): rows of validation.csv after its
    `last_validated` iteration and `best-*` copies it does not name are leftovers of an interrupted write and
    are dropped on load. A validation point whose checkpoint exists but which is not yet in the state is
    redone on resume (the weights are the checkpoint's, so the result is the same). Only a `writer` (the
    main process) touches files; the other processes keep the same table in memory.
    """

    def __init__(self, out_dir: Path, collapse_fraction: float, enabled: bool, writer: bool = True):
        self.out_dir, self.collapse_fraction, self.enabled, self.writer = out_dir, collapse_fraction, enabled, writer
        self.csv, self.state_path = out_dir / "validation.csv", out_dir / "validation_state.json"
        self.rows: list[dict[str, float]] = []
        self.last_validated: int | None = None
        self.best_iteration: int | None = None
        if enabled and self.state_path.exists():
            state = json.loads(self.state_path.read_text())
            self.last_validated, self.best_iteration = state["last_validated"], state["best_iteration"]
        if enabled and self.csv.exists():
            with self.csv.open() as handle:
                rows = [{k: csv_float(v) for k, v in r.items()} for r in csv.DictReader(handle)]
            self.rows = [r for r in rows if self.last_validated is not None and r["iteration"] <= self.last_validated]
        if enabled and writer:
            self._write_csv()
            self._drop_stale_copies()

    @property
    def best_dir(self) -> Path | None:
        return None if self.best_iteration is None else self.out_dir / f"best-{self.best_iteration:06d}"

    def due(self, iteration: int, every: int, last: int) -> bool:
        """Whether `iteration` is a validation point not yet recorded (0, every `every`-th, and the last)."""
        point = iteration == 0 or iteration % every == 0 or iteration == last
        return self.enabled and point and (self.last_validated is None or iteration > self.last_validated)

    def record(self, iteration: int, stats: dict[str, float], save_copy: Callable[[Path], None]) -> None:
        """Add a validation row; if selection now picks it, `save_copy(dir)` writes the policy there."""
        row = {"iteration": float(iteration), **stats}
        rows = [*self.rows, row]
        chosen, _ = select_checkpoint(rows, self.collapse_fraction)
        row["allowed"] = validation_block_reason(rows[0], row, self.collapse_fraction) is None
        row["best_so_far"] = chosen == iteration
        self.rows = rows
        if chosen == iteration:
            self.best_iteration = iteration
        self.last_validated = iteration
        if not self.writer:
            return
        self._write_csv()
        if chosen == iteration:
            save_copy(self.out_dir / f"best-{iteration:06d}")
        atomic_write_text(self.state_path,  # the commit point
                          json.dumps({"last_validated": iteration, "best_iteration": self.best_iteration}, indent=1))
        self._drop_stale_copies()

    def selection(self) -> tuple[int | None, str]:
        return select_checkpoint(self.rows, self.collapse_fraction)

    def _write_csv(self) -> None:
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=VALIDATION_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({**row, "iteration": int(row["iteration"]), "prompts": int(row["prompts"]),
                             "allowed": bool(row.get("allowed", False)), "best_so_far": bool(row.get("best_so_far", False))})
        atomic_write_text(self.csv, text.getvalue())

    def _drop_stale_copies(self) -> None:
        for path in self.out_dir.glob("best-*"):
            if path.is_dir() and path != self.best_dir:
                shutil.rmtree(path, ignore_errors=True)
