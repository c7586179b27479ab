"""Supervised fine-tuning itself: demonstrations as a prompt-completion dataset, TRL's arguments, `train_sft`.

    from rlhf_lib.sft import train_sft, load_policy
    result = train_sft(cfg, demos, val_demos, out_dir)      # demos: [(prompt, response), ...]
    model, tokenizer = load_policy(result.adapter_dir)

An interrupted training resumes from its work folder's newest complete checkpoint (rlhf_lib.sft.checkpoints).
"""

from __future__ import annotations

import math
import os
import random
import shutil
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
from rlhf_lib.config import StudyConfig
from rlhf_lib.pipeline import is_main_process, wait_for_all_processes
from rlhf_lib.prompting import bos_prefix, format_prompt
from rlhf_lib.sft.checkpoints import (
    _checkpoint_step,
    _choose_checkpoint,
    _continue_token_count,
    _export_checkpoint,
    _write_meta,
    checkpoint_rewards,
    completion_marking_callback,
    resumable_checkpoint,
)
from rlhf_lib.tracking import trainer_args, trainer_logging_dir


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


def labelled_token_loss(model, inputs: dict[str, torch.Tensor], num_items_in_batch: torch.Tensor | int | None = None
                        ) -> torch.Tensor:
    """The causal-LM cross-entropy of transformers' models, with the LM head applied only where a label is.

    A model's own loss projects every position through the [hidden, vocabulary] head and takes a full-vocabulary
    log-softmax of each, then drops the prompt positions (label -100): at notebook 02's shapes about two thirds of
    that work, and of its [tokens, vocabulary] gradient, is thrown away. Here the decoder runs as usual, the final
    states are gathered at the labelled positions (shifted by one, as the model's loss shifts them), and only those
    go through the head. Same reduction as transformers': summed over labelled tokens and divided by
    `num_items_in_batch` when given (the Trainer's count over the accumulated batch), else their mean.
    """
    targets = inputs["labels"][:, 1:]
    keep = targets != -100
    decoder_inputs = {name: inputs[name] for name in ("input_ids", "attention_mask", "position_ids") if name in inputs}
    logits = models.target_logits(model, decoder_inputs, keep).float()
    loss = torch.nn.functional.cross_entropy(logits, targets[keep], reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else keep.sum()
    if torch.is_tensor(count):
        count = count.to(loss.device)
    return loss / count


def _model_loss_sft_trainer():
    """SFTTrainer whose training loss is `labelled_token_loss` instead of TRL 1.16's fused LM head, which SFTTrainer
    always takes and which is slower per step on the 2-core CPU (bench/results/training_bench.md). Evaluation, and
    a model `labelled_token_loss` cannot serve (a logit transform, or several processes, where the forward must go
    through the distributed wrapper), use transformers' `Trainer.compute_loss`: the model's own loss, the same
    number. TRL's entropy and token-accuracy metrics, computed by its own compute_loss, are then not logged; the
    study reads only the losses and, to resume, the running token count (num_tokens), which is kept as TRL keeps it."""
    from transformers import Trainer
    from trl import SFTTrainer

    class ModelLossSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs["use_cache"] = False  # as TRL: no key/value cache in a training forward
            if self.model.training:
                tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
                self._total_train_tokens += tokens // getattr(self, "_tp_size", 1)
                self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
            if (not return_outputs and "labels" in inputs and self.accelerator.num_processes == 1
                    and models.logits_are_head_output(model)):
                # The Trainer hands the model the token count only when the model accepts it; mirror that.
                return labelled_token_loss(model, inputs, num_items_in_batch if self.model_accepts_loss_kwargs else None)
            return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    return ModelLossSFTTrainer


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
        trainer_class = SFTTrainer if cfg.sft.fused_lm_head else _model_loss_sft_trainer()
        trainer = trainer_class(model=model, args=args, train_dataset=train, eval_dataset=val, processing_class=tokenizer,
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


def loss_curves(history: pd.DataFrame) -> pd.DataFrame:
    """Long table (step, epoch, split, loss) of train and validation loss for plotting."""
    train = history.dropna(subset=["loss"])[["step", "epoch", "loss"]].assign(split="train")
    parts = [train]
    if "eval_loss" in history:
        val = history.dropna(subset=["eval_loss"])[["step", "epoch", "eval_loss"]].rename(columns={"eval_loss": "loss"})
        parts.append(val.assign(split="validation"))
    return pd.concat(parts, ignore_index=True)


