"""The SFT Trainer's checkpoints: marked complete when whole, resumed from after an interruption, and the
one to keep chosen (by validation loss, or by the reward model's score of its samples) and exported."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from rlhf_lib.artifacts import RewardModel, load_policy  # load_policy, base_weights: old path
from rlhf_lib.config import StudyConfig
from rlhf_lib.io import atomic_write_text, read_json
from rlhf_lib.pipeline import is_main_process, wait_for_all_processes
from rlhf_lib.prompting import format_prompt

META = "meta.json"
CHECKPOINT_COMPLETE = "rlhf_complete.json"  # inside a Trainer checkpoint: written last, names every file and its size



def _continue_token_count(trainer, checkpoint: Path) -> None:
    """Start TRL's running count of training tokens (logged as num_tokens) where the checkpoint's log left it.

    TRL keeps the count on the trainer, outside the state a checkpoint restores, so a resumed run would log it
    from 0 again. A TRL without the counter (it is private) is left as it is: only that logged column differs.
    """
    state = read_json(checkpoint / "trainer_state.json", quiet=True) or {}
    counts = [row["num_tokens"] for row in state.get("log_history", []) if "num_tokens" in row and "loss" in row]
    if counts and hasattr(trainer, "_total_train_tokens"):
        trainer._total_train_tokens = counts[-1]


def _checkpoint_step(path: Path) -> int:
    return int(path.name.split("-")[1])


def _trainer_checkpoints(checkpoint_root: Path) -> list[Path]:
    """checkpoint-<step> folders under `checkpoint_root`, oldest first."""
    found = [p for p in Path(checkpoint_root).glob("checkpoint-*") if p.is_dir() and p.name.split("-")[1].isdigit()]
    return sorted(found, key=_checkpoint_step)


def mark_checkpoint_complete(checkpoint: Path, setup: dict[str, Any]) -> None:
    """Flush every file of a finished Trainer checkpoint to disk, then record their names and sizes (atomically).

    The Trainer writes a checkpoint in place, file by file, without fsync: a kill or a power cut in between
    leaves a folder that looks like a checkpoint. Only one with this record, matching the files, is resumed.
    """
    files = {}
    for item in sorted(p for p in checkpoint.rglob("*") if p.is_file() and p.name != CHECKPOINT_COMPLETE):
        with open(item, "rb") as handle:
            os.fsync(handle.fileno())
        files[str(item.relative_to(checkpoint))] = item.stat().st_size
    record = {"step": _checkpoint_step(checkpoint), "setup": setup, "files": files}
    atomic_write_text(checkpoint / CHECKPOINT_COMPLETE, json.dumps(record, indent=1))


def checkpoint_problem(checkpoint: Path, setup: dict[str, Any]) -> str | None:
    """Why `checkpoint` cannot be resumed (torn, or from another training set-up); None when it can."""
    record = read_json(checkpoint / CHECKPOINT_COMPLETE, quiet=True)
    if not isinstance(record, dict) or not isinstance(record.get("files"), dict):
        return "it has no completion record (cut off while being written)"
    if record.get("setup") != setup:
        return f"it belongs to another training set-up ({record.get('setup')}, now {setup})"
    for name, size in record["files"].items():
        path = checkpoint / name
        if not path.is_file() or path.stat().st_size != size:
            return f"{name} is missing or not the size recorded ({size} bytes)"
    return None


def resumable_checkpoint(checkpoint_root: Path, setup: dict[str, Any]) -> Path | None:
    """The newest complete checkpoint of this set-up under `checkpoint_root`, or None (train from scratch).

    Newer checkpoints that are torn are skipped with a warning and removed (by the main process), so the
    resumed training writes them afresh and the epoch selection never reads them.
    """
    for checkpoint in reversed(_trainer_checkpoints(checkpoint_root)):
        problem = checkpoint_problem(checkpoint, setup)
        if problem is None:
            return checkpoint
        warnings.warn(f"SFT checkpoint {checkpoint} is not resumable: {problem}. Skipping it; training resumes from "
                      f"the previous complete checkpoint, or from scratch if there is none.", stacklevel=2)
        if is_main_process():
            shutil.rmtree(checkpoint, ignore_errors=True)
    return None


def completion_marking_callback(setup: dict[str, Any]):
    """A TrainerCallback that marks each checkpoint complete once the Trainer saved it (every process's files).

    The class is built here, on first use: importing transformers' callbacks costs seconds at import time.
    """
    from transformers import TrainerCallback

    class MarkCompleteCheckpoints(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            wait_for_all_processes()  # each process writes its own RNG state into the checkpoint
            if state.is_world_process_zero:
                mark_checkpoint_complete(Path(args.output_dir) / f"checkpoint-{state.global_step}", setup)
            return control

    return MarkCompleteCheckpoints()


def _choose_checkpoint(checkpoint_root: Path, history: pd.DataFrame) -> tuple[Path, float]:
    """The epoch checkpoint with the lowest validation loss (the last one when there is no validation)."""
    checkpoints = _trainer_checkpoints(checkpoint_root)
    if not checkpoints:
        raise RuntimeError(f"SFT wrote no checkpoint under {checkpoint_root}")
    if "eval_loss" not in history or history["eval_loss"].isna().all():
        return checkpoints[-1], float(history["epoch"].max())
    evals = history.dropna(subset=["eval_loss"])
    best = evals.loc[evals["eval_loss"].idxmin()]
    by_step = {int(p.name.split("-")[1]): p for p in checkpoints}
    return by_step[int(best["step"])], float(best["epoch"])


def checkpoint_rewards(
    cfg: StudyConfig,
    checkpoint_root: Path,
    history: pd.DataFrame,
    validation: Sequence[tuple[str, str]],
    reward_model_dir: Path,
    progress: bool = True,
) -> pd.DataFrame:
    """Mean RM score of each epoch checkpoint's greedy responses to the validation prompts.

    The paper chose its final SFT model this way (RM score on the validation set, Appendix C.1).
    Returns one row per checkpoint: checkpoint, step, epoch, mean_reward, prompts.
    """
    from rlhf_lib.generation import batching, sample_texts

    checkpoints = _trainer_checkpoints(checkpoint_root)
    if not checkpoints:
        raise RuntimeError(f"SFT wrote no checkpoint under {checkpoint_root}")
    epoch_at_step = dict(zip(history["step"].astype(int), history["epoch"], strict=False))
    prompts = [p for p, _ in validation]
    rm = RewardModel.load(reward_model_dir)
    rows = []
    for checkpoint in checkpoints:
        with tempfile.TemporaryDirectory(dir=checkpoint_root) as tmp:
            exported = Path(tmp) / "adapter"
            _export_checkpoint(checkpoint, exported, cfg)
            _write_meta(exported, cfg)
            model, tokenizer = load_policy(exported)
            responses = sample_texts(
                model, tokenizer, [format_prompt(tokenizer, p) for p in prompts], max_new_tokens=cfg.generation.max_new_tokens,
                temperature=0.0, **batching(cfg.generation), desc=f"RM-scoring {checkpoint.name}", progress=progress,
            )
            del model
        step = int(checkpoint.name.split("-")[1])
        rows.append({"checkpoint": str(checkpoint), "step": step, "epoch": float(epoch_at_step.get(step, float("nan"))),
                     "mean_reward": float(rm.score_texts(prompts, responses).mean()), "prompts": len(prompts)})
    return pd.DataFrame(rows)


def latest_reward_model(runs_root: Path) -> Path | None:
    """The RM of the most recently finished reward stage under runs/<preset>/, if any."""
    finished = sorted(Path(runs_root).glob("reward-*/DONE.json"), key=lambda p: p.stat().st_mtime)
    return finished[-1].parent / "model" if finished else None


def _export_checkpoint(checkpoint: Path, target: Path, cfg: StudyConfig) -> None:
    """Keep only the weights (adapter or full model) and tokenizer of a Trainer checkpoint."""
    target.mkdir(parents=True)
    keep = ("adapter_model.safetensors", "adapter_config.json", "model.safetensors", "config.json", "generation_config.json")
    for item in checkpoint.iterdir():
        if item.name in keep or item.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy2(item, target / item.name)

def _write_meta(directory: Path, cfg: StudyConfig, **extra) -> None:
    meta = {"base_model": cfg.model.name, "finetune": cfg.model.finetune, "quantize_4bit": cfg.model.quantize_4bit, **extra}
    atomic_write_text(directory / META, json.dumps(meta, indent=1))
