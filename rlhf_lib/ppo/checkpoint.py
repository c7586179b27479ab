"""A PPO run's resumable state: trainable weights, optimizer moments, EMA and counters, one directory each.

    save_checkpoint(out_dir, roles, optimizer, TrainState(iteration=3, ...), ema, run_info)  # checkpoint-000003/
    path = latest_checkpoint(out_dir)                     # None before the first
    state = load_checkpoint(path, roles, optimizer, ema)  # the weights are loaded in place

A checkpoint is written into a temporary directory and renamed into place, so a crash leaves the previous
one; older checkpoints are removed once the new one is there.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from rlhf_lib import models
from rlhf_lib.config import PPOConfig
from rlhf_lib.ppo.roles import PolicyValueRoles
from rlhf_lib.ppo.update import EMA

CHECKPOINT_PREFIX = "checkpoint-"


@dataclass
class TrainState:
    """Counters and controller values that a checkpoint restores besides the weights."""

    iteration: int = 0
    optimizer_steps: int = 0
    kl_beta: float = 0.0
    # The collapse guard's reference: mean response length and entropy of the first rollout (before any update).
    start_stats: dict[str, float] = field(default_factory=dict)


def remove_interrupted_writes(out_dir: Path) -> list[Path]:
    """Delete the `.<name>.partial-*` directories in `out_dir`: a process killed while writing a checkpoint,
    a best-* copy or a policy leaves one, and only the run's next start (the same single writer) can know it is dead."""
    stale = [p for p in Path(out_dir).glob(".*.partial-*") if p.is_dir()]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def latest_checkpoint(out_dir: Path) -> Path | None:
    found = sorted(p for p in Path(out_dir).glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and p.name[len(CHECKPOINT_PREFIX):].isdigit())
    return found[-1] if found else None


def save_checkpoint(
    out_dir: Path, roles: PolicyValueRoles, optimizer: torch.optim.Optimizer, state: TrainState, ema: EMA | None, extra: dict
) -> Path:
    """Trainable weights, optimizer moments, EMA, counters: into a temp dir, renamed into place, older ones removed."""
    from safetensors.torch import save_file

    final = out_dir / f"{CHECKPOINT_PREFIX}{state.iteration:06d}"
    with models.atomic_directory(final) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in roles.named_trainable().items()}, str(tmp / "trainable.safetensors"))
        if ema is not None:
            save_file({k: v.cpu().contiguous() for k, v in ema.shadow.items()}, str(tmp / "ema.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({**asdict(state), **extra}, indent=1))
    for older in Path(out_dir).glob(f"{CHECKPOINT_PREFIX}*"):
        if older != final and older.is_dir():
            shutil.rmtree(older, ignore_errors=True)
    return final


def load_checkpoint(path: Path, roles: PolicyValueRoles, optimizer: torch.optim.Optimizer, ema: EMA | None) -> TrainState:
    from safetensors.torch import load_file

    device = next(roles.parameters()).device
    trainable = roles.named_trainable()
    saved = load_file(str(path / "trainable.safetensors"), device=str(device))
    if set(saved) != set(trainable):
        raise ValueError(f"{path}: checkpoint weights do not match this model's trainable parameters (another config?).")
    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(saved[name])
    optimizer.load_state_dict(models.safe_torch_load(path / "optimizer.pt", map_location=device))
    if ema is not None:
        ema.shadow = load_file(str(path / "ema.safetensors"), device=str(device))
    record = json.loads((path / "state.json").read_text())
    return TrainState(iteration=record["iteration"], optimizer_steps=record["optimizer_steps"], kl_beta=record["kl_beta"],
                      start_stats=record.get("start_stats", {}))


def check_resumable(checkpoint: Path, ppo: PPOConfig) -> None:
    """Warn when a run resumes with PPO knobs other than those it started with (iterations aside)."""
    saved = json.loads((checkpoint / "state.json").read_text()).get("ppo", {})
    changed = sorted(k for k, v in asdict(ppo).items() if k != "iterations" and k in saved and saved[k] != v)
    if changed:
        warnings.warn(f"Resuming {checkpoint} with changed [ppo] knobs: {', '.join(changed)}.", stacklevel=3)
