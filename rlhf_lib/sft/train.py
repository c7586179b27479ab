"""Step 1 of InstructGPT: supervised fine-tuning on human-written demonstrations (TRL's SFTTrainer).

Loss is on the response tokens only (prompt-completion data, `completion_only_loss`); LoRA adapters
by default, QLoRA when the preset sets `model.quantize_4bit`, full fine-tuning with
`model.finetune = "full"`. Cosine decay to `sft.min_lr_ratio` of the peak LR, Adam betas
(0.9, 0.95) as in the paper. Two products, as in the paper:

- the SFT policy: `sft.epochs` epochs, the epoch checkpoint with the best validation criterion;
- the PPO initialisation: `sft.ppo_init_epochs` epochs with `sft.ppo_init_pretrain_mix` of
  pretraining text mixed in.

    from rlhf_lib.sft import train_sft, load_policy
    result = train_sft(cfg, demos, val_demos, out_dir)      # demos: [(prompt, response), ...]
    model, tokenizer = load_policy(result.adapter_dir)

An interrupted training resumes: the Trainer's epoch checkpoints are kept in a work folder
(`checkpoint_dir`; the stage's is runs/<preset>/work-sft-<fingerprint>/, outside the partial stage
directory that a later run removes), each marked complete only once every file of it is on disk, and a
rerun continues from the newest complete one. A checkpoint cut off while being written is skipped with a
warning (the previous one, or a fresh start, is used instead).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from datasets import Dataset

from rlhf_lib import models
from rlhf_lib.artifacts import RewardModel, base_weights, load_policy  # load_policy, base_weights: old path
from rlhf_lib.config import StudyConfig
from rlhf_lib.io import atomic_write_text, read_json
from rlhf_lib.pipeline import is_main_process, wait_for_all_processes
from rlhf_lib.prompting import bos_prefix, format_prompt
from rlhf_lib.tracking import trainer_args, trainer_logging_dir

META = "meta.json"
CHECKPOINT_COMPLETE = "rlhf_complete.json"  # inside a Trainer checkpoint: written last, names every file and its size


@dataclass
class SFTResult:
    adapter_dir: Path  # the chosen checkpoint: a peft adapter (or a full model) + meta.json
    log_history: pd.DataFrame  # step, epoch, train loss, validation loss
    chosen_epoch: float
    seconds: float


def demonstrations_dataset(tokenizer, pairs: Sequence[tuple[str, str]], max_response_chars: int | None = None) -> Dataset:
    """Prompt-completion rows: the prompt in the shared format; TRL appends EOS to each completion.

    TRL tokenises with the tokenizer's default special tokens, so a BOS the format already wrote is
    removed here to keep exactly one (gemma), matching what generation sees.
    """
    bos = bos_prefix(tokenizer)
    rows = []
    for prompt, response in pairs:
        response = response.strip()
        if max_response_chars:
            response = response[:max_response_chars]
        rows.append({"prompt": format_prompt(tokenizer, prompt).removeprefix(bos), "completion": response})
    return Dataset.from_list(rows)


def pretraining_rows(texts: Sequence[str], count: int, seed: int) -> list[dict[str, str]]:
    """Plain prose as prompt-less rows, so its every token carries LM loss (the 10% mix of the PPO init)."""
    rng = random.Random(seed)
    chosen = [texts[rng.randrange(len(texts))] for _ in range(count)] if texts else []
    return [{"prompt": "", "completion": text} for text in chosen]


def trl_common_args(cfg: StudyConfig, progress: bool, part: str = "sft") -> dict[str, Any]:
    """Arguments every TRL trainer of the study shares (SFT, DPO): seeds, logging (to `tracking.report_to`, as
    `part` of the run), and precision."""
    device = models.resolve_device(cfg.model.device)
    dtype = models.resolve_dtype(cfg.model.dtype, device)
    on_gpu = device.type == "cuda"
    return {
        "logging_steps": 1,
        **trainer_args(cfg, part),
        "seed": cfg.seed,
        "data_seed": cfg.seed,
        # TRL's own defaults differ by trainer (DPOConfig turns gradient checkpointing on); ours come from the preset.
        "gradient_checkpointing": cfg.model.gradient_checkpointing,
        "disable_tqdm": not progress,
        "dataloader_num_workers": 0,
        "dataset_num_proc": None,
        # Never by a library default: TRL defaults to bf16, which is ~10x slower on this CPU.
        "bf16": on_gpu and dtype == torch.bfloat16,
        "fp16": on_gpu and dtype == torch.float16,
        "use_cpu": not on_gpu,
    }


def _write_meta(directory: Path, cfg: StudyConfig, **extra) -> None:
    meta = {"base_model": cfg.model.name, "finetune": cfg.model.finetune, "quantize_4bit": cfg.model.quantize_4bit, **extra}
    atomic_write_text(directory / META, json.dumps(meta, indent=1))


def train_sft(
    cfg: StudyConfig,
    demonstrations: Sequence[tuple[str, str]],
    validation: Sequence[tuple[str, str]],
    out_dir: Path,
    epochs: int | None = None,
    pretrain_texts: Sequence[str] = (),
    pretrain_mix: float = 0.0,
    progress: bool = True,
    reward_model_dir: Path | None = None,
    checkpoint_dir: Path | None = None,
    callbacks: Sequence[Any] = (),
    tensorboard_dir: Path | None = None,
) -> SFTResult:
    """Fine-tune the preset's base model on (prompt, response) pairs; keep the best epoch checkpoint.

    The best epoch is the one with the lowest validation loss, or, with `sft.select_by = "reward"`,
    the one whose greedy responses to the validation prompts `reward_model_dir`'s RM scores highest.
    Checkpoints go to `checkpoint_dir` (default out_dir/checkpoints, removed at the end; a given folder is
    left to the caller); training resumes from the newest complete checkpoint of the same set-up found there.
    `callbacks` are extra transformers TrainerCallbacks. Curves go to `tracking.report_to` (TensorBoard events to
    `tensorboard_dir`, default out_dir/tensorboard).
    """
    from trl import SFTConfig, SFTTrainer

    by_reward = cfg.sft.select_by == "reward" and bool(validation)
    if by_reward and reward_model_dir is None:
        raise ValueError("sft.select_by = 'reward' needs a trained reward model (reward_model_dir); none was given.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = models.load_tokenizer(cfg.model.name)
    model = models.load_from_preset(cfg, dropout=cfg.sft.residual_dropout)
    if cfg.model.finetune == "lora":
        # LoRA's A matrices start random: seeded, so a run (and a resumed one's reference) does not depend
        # on whatever drew random numbers before it in this process. The Trainer seeds itself only later.
        torch.manual_seed(cfg.seed)
        model = models.lora_from_config(model, cfg.model)

    train = demonstrations_dataset(tokenizer, demonstrations)
    if pretrain_mix > 0 and pretrain_texts:
        # pretrain_mix is the share of the final mix: n_pre / (n_demo + n_pre) = mix.
        n_pre = max(1, round(len(train) * pretrain_mix / (1 - pretrain_mix)))
        mixed = train.to_list() + pretraining_rows(pretrain_texts, n_pre, cfg.seed)
        train = Dataset.from_list(mixed).shuffle(seed=cfg.seed)
    val = demonstrations_dataset(tokenizer, validation) if validation else None

    epochs = epochs or cfg.sft.epochs
    # The preset's batch is global: under torchrun/accelerate launch each process accumulates its share.
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    grad_accum = max(1, cfg.sft.grad_accum // processes)
    if cfg.sft.grad_accum % processes:
        warnings.warn(f"sft.grad_accum ({cfg.sft.grad_accum}) does not divide by {processes} processes: the global batch is "
                      f"{cfg.sft.batch_size * grad_accum * processes}, not {cfg.sft.batch_size * cfg.sft.grad_accum}.", stacklevel=2)
    steps_per_epoch = math.ceil(len(train) / (cfg.sft.batch_size * grad_accum * processes))
    checkpoint_root = Path(checkpoint_dir) if checkpoint_dir else out_dir / "checkpoints"
    # A checkpoint resumes only the same training: same rows, epochs, batch and processes.
    setup = {"rows": len(train), "validation_rows": len(val) if val is not None else 0, "epochs": epochs,
             "batch_size": cfg.sft.batch_size, "grad_accum": grad_accum, "processes": processes}
    resume_from = resumable_checkpoint(checkpoint_root, setup)
    if resume_from is not None and is_main_process():
        print(f"[sft] resuming from {resume_from} (step {_checkpoint_step(resume_from)} of "
              f"{steps_per_epoch * epochs}), left by an interrupted run")
    args = SFTConfig(
        output_dir=str(checkpoint_root),
        num_train_epochs=epochs,
        per_device_train_batch_size=cfg.sft.batch_size,
        per_device_eval_batch_size=cfg.sft.batch_size,
        gradient_accumulation_steps=grad_accum,
        learning_rate=cfg.sft.learning_rate,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": cfg.sft.min_lr_ratio},
        warmup_steps=round(cfg.sft.warmup_ratio * steps_per_epoch * epochs),
        adam_beta1=cfg.sft.adam_beta1,
        adam_beta2=cfg.sft.adam_beta2,
        weight_decay=cfg.sft.weight_decay,
        max_length=cfg.sft.max_seq_tokens,
        completion_only_loss=True,
        eval_strategy="epoch" if val is not None else "no",
        save_strategy="epoch",
        save_total_limit=None,
        load_best_model_at_end=False,  # we choose the checkpoint ourselves (validation loss or RM score)
        **trl_common_args(cfg, progress, part=f"sft-{Path(out_dir).name.removesuffix('_run')}"),
    )
    started = time.time()
    with trainer_logging_dir(cfg, Path(tensorboard_dir or Path(out_dir) / "tensorboard")):
        trainer = SFTTrainer(model=model, args=args, train_dataset=train, eval_dataset=val, processing_class=tokenizer,
                             callbacks=[completion_marking_callback(setup), *callbacks])
    if resume_from is not None:
        _continue_token_count(trainer, resume_from)
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    seconds = time.time() - started

    history = pd.DataFrame(trainer.state.log_history)  # a resumed run's includes the steps before the interruption
    if resume_from is not None and {"train_loss", "loss"} <= set(history):
        # The Trainer's closing train_loss averages only this call's steps; make it the whole run's, as uninterrupted.
        history.loc[history["train_loss"].notna(), "train_loss"] = history["loss"].dropna().mean()
    final = out_dir / "adapter"
    chosen_epoch = float("nan")
    if is_main_process():  # the Trainer saved checkpoints from the main process only
        history.to_csv(out_dir / "log_history.csv", index=False)
        selection = {"selected_by": "val_loss" if val is not None else "last_epoch"}
        if by_reward:
            del trainer, model  # the checkpoints are reloaded one by one for scoring
            scores = checkpoint_rewards(cfg, checkpoint_root, history, validation, reward_model_dir, progress)
            scores.to_csv(out_dir / "checkpoint_rewards.csv", index=False)
            best = scores.loc[scores["mean_reward"].idxmax()]
            chosen_dir, chosen_epoch = Path(best["checkpoint"]), float(best["epoch"])
            selection = {"selected_by": "reward", "reward_model": str(reward_model_dir), "mean_reward": float(best["mean_reward"])}
        else:
            chosen_dir, chosen_epoch = _choose_checkpoint(checkpoint_root, history)
        if final.exists():
            shutil.rmtree(final)
        _export_checkpoint(chosen_dir, final, cfg)
        _write_meta(final, cfg, chosen_epoch=chosen_epoch, **selection)
        if checkpoint_dir is None:
            shutil.rmtree(checkpoint_root, ignore_errors=True)
    wait_for_all_processes()
    return SFTResult(final, history, chosen_epoch, seconds)


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
    from rlhf_lib.generation import sample_texts

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
                temperature=0.0, batch_size=cfg.generation.batch_size, desc=f"RM-scoring {checkpoint.name}", progress=progress,
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


def loss_curves(history: pd.DataFrame) -> pd.DataFrame:
    """Long table (step, epoch, split, loss) of train and validation loss for plotting."""
    train = history.dropna(subset=["loss"])[["step", "epoch", "loss"]].assign(split="train")
    parts = [train]
    if "eval_loss" in history:
        val = history.dropna(subset=["eval_loss"])[["step", "epoch", "eval_loss"]].rename(columns={"eval_loss": "loss"})
        parts.append(val.assign(split="validation"))
    return pd.concat(parts, ignore_index=True)


# --------------------------------------------------------------------------------------------
# The stage (notebook 02 and run_all)
# --------------------------------------------------------------------------------------------


def run_sft_stage(cfg: StudyConfig, paths, progress: bool = True) -> Path:
    """Train both SFT products and sample base vs SFT on held-out prompts; cached per fingerprint.

    Writes policy/ (the SFT model), ppo_init/ (the PPO initialisation), log_history_*.csv and
    samples.csv (greedy responses of base and SFT to the same eval prompts). An interrupted run keeps the
    Trainer's checkpoints in runs/<preset>/work-sft-<fp>/ and resumes from them; published, the folder goes.
    """
    from rlhf_lib.data.splits import validation_split
    from rlhf_lib.data.study import StudyData
    from rlhf_lib.generation import sample_texts
    from rlhf_lib.pipeline import cached_stage

    data = StudyData.load(paths.require("data") / "study")
    work = sft_work_dir(paths)
    with cached_stage(paths, "sft") as stage:
        if not stage.done:
            rows = list(data.split("sft"))
            # Near-duplicates (e.g. two questions on one passage) stay on one side of the split.
            train_idx, val_idx = validation_split(rows, cfg.data.validation_fraction, cfg.data.near_duplicate_prefix_chars, cfg.seed)
            train = [(rows[i]["prompt"], rows[i]["reference"]) for i in train_idx]
            validation = [(rows[i]["prompt"], rows[i]["reference"]) for i in val_idx]
            # Under torchrun/accelerate launch every process trains; the main one alone writes files.
            main = is_main_process()
            reward_model_dir = None
            if cfg.sft.select_by == "reward":
                # As in the paper, the RM comes from an earlier round: this preset's last finished RM.
                reward_model_dir = latest_reward_model(paths.root)
                if reward_model_dir is None:
                    raise FileNotFoundError(
                        f"sft.select_by = 'reward' needs a reward model from an earlier run of preset '{cfg.preset}', "
                        f"and {paths.root} holds none. Run the study once with select_by = 'val_loss' first."
                    )
            policy = train_sft(cfg, train, validation, stage.dir / "policy_run", progress=progress,
                               reward_model_dir=reward_model_dir, checkpoint_dir=work / "policy",
                               tensorboard_dir=stage.dir / "tensorboard" / "policy")
            if main:
                shutil.move(str(policy.adapter_dir), stage.dir / "policy")
                policy.log_history.to_csv(stage.dir / "log_history_policy.csv", index=False)
                if (stage.dir / "policy_run" / "checkpoint_rewards.csv").exists():
                    shutil.move(str(stage.dir / "policy_run" / "checkpoint_rewards.csv"), stage.dir / "checkpoint_rewards.csv")
            pretrain = list(data.pretrain["text"])
            init = train_sft(
                cfg, train, [], stage.dir / "ppo_init_run", epochs=cfg.sft.ppo_init_epochs,
                pretrain_texts=pretrain, pretrain_mix=cfg.sft.ppo_init_pretrain_mix, progress=progress,
                checkpoint_dir=work / "ppo_init", tensorboard_dir=stage.dir / "tensorboard" / "ppo_init",
            )
            if not main:
                return paths.stage("sft")  # cached_stage publishes after every process got here
            shutil.move(str(init.adapter_dir), stage.dir / "ppo_init")
            init.log_history.to_csv(stage.dir / "log_history_ppo_init.csv", index=False)
            for run in ("policy_run", "ppo_init_run"):
                shutil.rmtree(stage.dir / run, ignore_errors=True)

            eval_rows = list(data.split("eval"))[: cfg.generation.batch_size]
            model, tokenizer = load_policy(stage.dir / "policy")
            texts = [format_prompt(tokenizer, r["prompt"]) for r in eval_rows]
            kwargs = dict(max_new_tokens=cfg.generation.max_new_tokens, temperature=0.0,
                          batch_size=cfg.generation.batch_size, progress=progress)
            sft_out = sample_texts(model, tokenizer, texts, desc="SFT samples", **kwargs)
            with base_weights(model, cfg) as base:
                base_out = sample_texts(base, tokenizer, texts, desc="base samples", **kwargs)
            pd.DataFrame(
                {"prompt_id": [r["id"] for r in eval_rows], "category": [r["category"] for r in eval_rows],
                 "prompt": [r["prompt"] for r in eval_rows], "reference": [r["reference"] for r in eval_rows],
                 "base": base_out, "sft": sft_out}
            ).to_csv(stage.dir / "samples.csv", index=False)
            atomic_write_text(stage.dir / "timing.json",
                              json.dumps({"policy_seconds": policy.seconds, "ppo_init_seconds": init.seconds}, indent=1))
    if is_main_process():
        shutil.rmtree(work, ignore_errors=True)  # the chosen checkpoints are in the published stage now
    return paths.stage("sft")


def sft_work_dir(paths) -> Path:
    """Where the SFT stage's Trainer checkpoints outlive an interruption (the partial stage directory does not)."""
    return paths.root / f"work-sft-{paths.cfg.fingerprint('sft')}"
