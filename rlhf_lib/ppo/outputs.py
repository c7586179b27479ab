"""What a PPO run writes: its per-iteration log (metrics.csv, samples.jsonl, the tracker's curves) and, at the end,
the policy to evaluate and the value function."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

from rlhf_lib import models
from rlhf_lib.artifacts import save_policy_dir, save_reward_dir
from rlhf_lib.config import StudyConfig
from rlhf_lib.io import atomic_write_text
from rlhf_lib.ppo.roles import PolicyValueRoles
from rlhf_lib.ppo.rollout import (
    Rollout,
)
from rlhf_lib.ppo.selection import (
    csv_float,
)
from rlhf_lib.ppo.update import EMA
from rlhf_lib.tracking import Tracker, new_tracker

METRIC_COLUMNS = (
    "iteration", "episodes", "time_s", "episodes_per_s", "lr", "kl_beta",
    "rm_score", "score", "reward", "kl", "entropy", "response_length", "distinct_fraction", "collapsed", "eos_rate",
    "explained_variance", "value_mean",
    "policy_loss", "value_loss", "ptx_loss", "loss", "approx_kl", "clip_frac", "value_clip_frac", "grad_norm",
    "value_grad_norm", "train_entropy", "ratio_mean",
)



class RunLog:
    """metrics.csv, samples.jsonl and the curves for `tracking.report_to` (TensorBoard: events in tensorboard/) of
    a run; only the main process writes.

    On resume, rows of iterations after the checkpoint are dropped first (and TensorBoard's events after it):
    those iterations are redone.
    """

    def __init__(self, out_dir: Path, resume_from: int, enabled: bool, cfg: StudyConfig | None = None):
        self.metrics, self.samples, self.tensorboard = out_dir / "metrics.csv", out_dir / "samples.jsonl", out_dir / "tensorboard"
        self.enabled, self.writer = enabled, Tracker()
        if enabled:
            self._trim(resume_from)
            if cfg is not None:
                self.writer = new_tracker(cfg, out_dir.name, self.tensorboard, purge_step=resume_from + 1)

    def _trim(self, keep_through: int) -> None:
        if self.metrics.exists():
            lines = self.metrics.read_text().splitlines(keepends=True)
            atomic_write_text(self.metrics,
                              "".join(lines[:1] + [x for x in lines[1:] if int(x.split(",", 1)[0]) <= keep_through]))
        if self.samples.exists():
            lines = self.samples.read_text().splitlines(keepends=True)
            atomic_write_text(self.samples, "".join(x for x in lines if json.loads(x)["iteration"] <= keep_through))

    def write(self, row: dict[str, float], rollout: Rollout, n_samples: int) -> None:
        if not self.enabled:
            return
        new_file = not self.metrics.exists()
        with self.metrics.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
            if new_file:
                writer.writeheader()
            writer.writerow(row)
        with self.samples.open("a") as handle:
            for i in range(min(n_samples, len(rollout))):
                handle.write(json.dumps({
                    "iteration": row["iteration"], "prompt": rollout.prompts[i], "response": rollout.responses[i],
                    "score": rollout.scores[i].item(), "rm_score": rollout.rm_scores[i].item(),
                    "kl": rollout.kl[i].sum().item(), "ended_with_eos": bool(rollout.ended_with_eos[i]),
                }) + "\n")
        self.writer.log({f"ppo/{key}": row[key] for key in METRIC_COLUMNS[1:]}, step=int(row["iteration"]))

    def rows(self) -> list[dict[str, float]]:
        if not self.metrics.exists():
            return []
        with self.metrics.open() as handle:
            return [{k: csv_float(v) for k, v in r.items()} for r in csv.DictReader(handle)]

    def close(self) -> None:
        self.writer.close()


def export_run(
    roles: PolicyValueRoles, ema: EMA | None, out_dir: Path, base_name: str, meta: dict, chosen_dir: Path | None = None
) -> tuple[Path, Path]:
    """Save the policy to evaluate and the value function.

    policy/ is the chosen validation copy `chosen_dir` when given (its meta.json updated with `meta`), else
    the last iterate (EMA weights when on). policy_last/ holds the raw last weights whenever policy/ is not them.
    """
    policy_dir, value_dir = out_dir / "policy", out_dir / "value"
    if chosen_dir is not None:
        with models.atomic_directory(policy_dir) as tmp:
            shutil.copytree(chosen_dir, tmp, dirs_exist_ok=True)
            saved = json.loads((tmp / "meta.json").read_text())
            (tmp / "meta.json").write_text(json.dumps({**saved, **meta}, indent=1))  # tmp is published whole
    elif ema is not None:
        with ema.applied():
            save_policy_dir(roles.model, "policy", policy_dir, base_name, **meta)
    else:
        save_policy_dir(roles.model, "policy", policy_dir, base_name, **meta)
    if chosen_dir is not None or ema is not None:
        save_policy_dir(roles.model, "policy", out_dir / "policy_last", base_name, **meta)
    save_reward_dir(roles.model, "value", roles.value_head, value_dir, base_name, bias=0.0, role="value",
                    layer=roles.value_layer, pooling="last")
    return policy_dir, value_dir
