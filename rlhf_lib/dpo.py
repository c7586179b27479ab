"""DPO (Rafailov et al., 2023) on the reward model's own comparisons: a method beyond the paper.

DPO skips the reward model and PPO: it fits the policy directly to preference pairs with the loss
-log sigmoid(beta * [(log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))]).
Here it sees exactly the data the RM was trained on (the reward stage's comparisons_train.jsonl),
so DPO and PPO start from the same SFT policy and the same labels, and differ only in the method.

Pairs. A ranking of K completions holds C(K,2) pairs (up to 36); DPO treats each pair as one example
with two forward passes through policy and reference, so on a CPU all of them cost too much. Each
prompt therefore contributes its best-vs-worst pair first (the widest rank gap: the label least likely
to be noise), then its next-widest pairs up to `evaluation.dpo_pairs_per_prompt`. Tied completions and
pairs with identical text give no pair.

Models. The policy is the SFT adapter, trained further (continued LoRA); the reference is the same SFT
adapter frozen, which TRL's DPOTrainer copies into a "ref" adapter on the same base. After a full
fine-tune SFT, a fresh LoRA is trained on top and the reference is the SFT model itself. fp32 on CPU:
TRL defaults to bf16, about 10x slower here, so precision is set explicitly from the device.

    from rlhf_lib.dpo import preference_pairs, train_dpo
    from rlhf_lib.artifacts import load_policy
    rows = pd.read_json(reward_dir / "comparisons_train.jsonl", lines=True).to_dict("records")
    pairs = preference_pairs(rows, per_prompt=cfg.evaluation.dpo_pairs_per_prompt)
    result = train_dpo(cfg, sft_dir / "policy", pairs, out_dir)     # result.policy_dir
    model, tokenizer = load_policy(result.policy_dir)
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from datasets import Dataset

from rlhf_lib.artifacts import save_policy_dir
from rlhf_lib.config import StudyConfig
from rlhf_lib.prompting import bos_prefix, format_prompt
from rlhf_lib.reward import ranked_pairs
from rlhf_lib.sft import trl_common_args
from rlhf_lib.tracking import trainer_logging_dir


@dataclass
class DPOResult:
    policy_dir: Path  # a policy directory (peft adapter + meta.json), loadable by sft.load_policy
    log_history: pd.DataFrame  # TRL's log history: loss, rewards/chosen, rewards/margins, ...
    n_pairs: int
    steps: int
    seconds: float


def preference_pairs(comparisons: Sequence[Mapping[str, Any]], per_prompt: int = 1) -> list[dict[str, Any]]:
    """(prompt, chosen, rejected) pairs from ranked comparisons (COMPARISON_FEATURES rows), widest rank gap first.

    Per prompt: every untied pair ordered by rank gap (largest first, so the first is best vs worst),
    then by position for determinism; pairs whose two texts are the same after stripping are dropped;
    at most `per_prompt` are kept. Each pair records its prompt_id and rank gap.
    """
    if per_prompt < 1:
        raise ValueError(f"per_prompt must be >= 1, got {per_prompt}.")
    pairs: list[dict[str, Any]] = []
    for row in comparisons:
        ranks = list(row["ranks"])
        completions = list(row["completions"])
        if len(ranks) != len(completions):
            raise ValueError(f"Comparison {row.get('prompt_id')!r}: {len(completions)} completions but {len(ranks)} ranks.")
        candidates = [
            (ranks[loser] - ranks[winner], winner, loser)
            for winner, loser in ranked_pairs(ranks)
            if completions[winner].strip() != completions[loser].strip()
        ]
        candidates.sort(key=lambda c: (-c[0], c[1], c[2]))
        for gap, winner, loser in candidates[:per_prompt]:
            pairs.append(
                {
                    "prompt_id": str(row.get("prompt_id", "")),
                    "prompt": str(row["prompt"]),
                    "chosen": completions[winner].strip(),
                    "rejected": completions[loser].strip(),
                    "rank_gap": int(gap),
                }
            )
    return pairs


def dpo_dataset(tokenizer, pairs: Sequence[Mapping[str, Any]]) -> Dataset:
    """TRL's standard (non-conversational) preference rows, the prompt in the study's shared format.

    TRL tokenises with the tokenizer's default special tokens and appends EOS to both completions, so
    a BOS the format already wrote is removed to keep exactly one, as in SFT.
    """
    bos = bos_prefix(tokenizer)
    rows = [
        {"prompt": format_prompt(tokenizer, p["prompt"]).removeprefix(bos), "chosen": p["chosen"], "rejected": p["rejected"]}
        for p in pairs
    ]
    return Dataset.from_list(rows)


def _policy_and_reference(cfg: StudyConfig, sft_dir: Path):
    """(model, tokenizer, peft_config or None, base name for meta.json) for DPO from an SFT product."""
    from rlhf_lib.artifacts import load_policy

    meta = json.loads((sft_dir / "meta.json").read_text())
    model, tokenizer = load_policy(sft_dir, trainable=True)
    if meta.get("finetune", "lora") == "full":
        # A new LoRA on the fully fine-tuned SFT weights; TRL's reference is then the adapter-free model = SFT.
        from peft import LoraConfig

        present = {name.split(".")[-1] for name, _ in model.named_modules()}
        targets = [t for t in cfg.model.lora_target_modules if t in present]
        lora = LoraConfig(r=cfg.model.lora_rank, lora_alpha=cfg.model.lora_alpha, lora_dropout=cfg.model.lora_dropout,
                          target_modules=targets, task_type="CAUSAL_LM")
        return model, tokenizer, lora, str(sft_dir.resolve())
    return model, tokenizer, None, meta["base_model"]


def train_dpo(
    cfg: StudyConfig,
    sft_dir: Path | str,
    pairs: Sequence[Mapping[str, Any]],
    out_dir: Path | str,
    max_steps: int | None = None,
    progress: bool = True,
) -> DPOResult:
    """Train DPO from the SFT policy on `pairs`; save `out_dir/policy` (adapter + meta.json) and log_history.csv.

    Knobs: evaluation.dpo_beta, dpo_epochs, dpo_learning_rate, dpo_batch_size; sequences are cut at
    reward.max_seq_tokens (the RM saw the same texts at that length). `max_steps` caps the optimizer
    steps (tests).
    """
    from trl import DPOConfig, DPOTrainer

    if not pairs:
        raise ValueError("DPO needs at least one preference pair (every ranking tied?).")
    sft_dir, out_dir = Path(sft_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ev = cfg.evaluation
    model, tokenizer, peft_config, base_name = _policy_and_reference(cfg, sft_dir)
    dataset = dpo_dataset(tokenizer, pairs)
    steps_per_epoch = math.ceil(len(dataset) / ev.dpo_batch_size)
    args = DPOConfig(
        output_dir=str(out_dir / "checkpoints"),
        num_train_epochs=ev.dpo_epochs,
        max_steps=max_steps if max_steps is not None else -1,
        per_device_train_batch_size=ev.dpo_batch_size,
        learning_rate=ev.dpo_learning_rate,
        lr_scheduler_type="constant",
        beta=ev.dpo_beta,
        max_length=cfg.reward.max_seq_tokens,
        save_strategy="no",  # only the final adapter is kept
        **trl_common_args(cfg, progress, part="dpo"),
    )
    started = time.time()
    with trainer_logging_dir(cfg, out_dir / "tensorboard"):
        trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=peft_config)
    trainer.train()
    seconds = time.time() - started

    trained = trainer.accelerator.unwrap_model(trainer.model)
    history = pd.DataFrame(trainer.state.log_history)
    history.to_csv(out_dir / "log_history.csv", index=False)
    # Only the trained "default" adapter is saved: TRL's frozen "ref" copy is the SFT adapter itself.
    policy_dir = save_policy_dir(
        trained, "default", out_dir / "policy", base_name,
        finetune="lora", quantize_4bit=cfg.model.quantize_4bit, method="dpo", dpo_beta=ev.dpo_beta,
        pairs=len(dataset), steps=int(trainer.state.global_step), initialised_from=str(sft_dir),
    )
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    steps = int(trainer.state.global_step) or steps_per_epoch * ev.dpo_epochs
    del trainer, trained, model
    return DPOResult(policy_dir, history, len(dataset), steps, seconds)
