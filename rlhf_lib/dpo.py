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

Models. The policy is the SFT adapter, trained further (continued LoRA); after a full fine-tune SFT, a
fresh LoRA (B = 0) is trained on top. Either way the reference is the policy before its first step, so
its log-probabilities are computed once, up front, in one pass without gradients (the adapter merged),
as TRL's `precompute_ref_log_probs` does. Text is laid out as in SFT (`prompting.format_example`: the
study's prompt format, the completion closed by EOS); a pair longer than `reward.max_seq_tokens` is cut
at its end, as the RM saw it.

The loop is ours, not TRL's DPOTrainer: on a CPU TRL 1.16 projects every position through the LM head,
the prompt's included, and computes full-vocabulary metrics beside the log-probabilities (60% of a step
at the tiny preset's shapes, profiled). Here the head runs only at the states that predict a completion
token (`models.target_logits`). bench/bench_dpo.py measures both side by side.

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
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from rlhf_lib import models
from rlhf_lib.adapters import freeze_dropout
from rlhf_lib.artifacts import save_policy_dir
from rlhf_lib.config import StudyConfig
from rlhf_lib.prompting import format_example
from rlhf_lib.reward import ranked_pairs
from rlhf_lib.tracking import open_tracker

MAX_GRAD_NORM = 1.0  # transformers' Trainer default, which the study's TRL DPO runs used


@dataclass
class DPOResult:
    policy_dir: Path  # a policy directory (peft adapter + meta.json), loadable by sft.load_policy
    log_history: pd.DataFrame  # one row per step: loss, rewards/chosen, rewards/margins, ...; then a summary row
    n_pairs: int
    steps: int
    seconds: float


# A pair as token ids: (prompt, chosen completion, rejected completion); each completion ends with EOS.
TokenizedPair = tuple[list[int], list[int], list[int]]


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


def tokenize_pairs(tokenizer, pairs: Sequence[Mapping[str, Any]], max_tokens: int) -> list[TokenizedPair]:
    """Token ids of each pair in the SFT layout (`format_example`), prompt and completion tokenised apart so the
    completion's tokens are exactly what the loss reads. A sequence longer than `max_tokens` loses its end; a pair
    with nothing left of a completion is dropped."""
    out: list[TokenizedPair] = []
    for pair in pairs:
        prompt_text, chosen_text = format_example(tokenizer, str(pair["prompt"]), str(pair["chosen"]))
        _, rejected_text = format_example(tokenizer, str(pair["prompt"]), str(pair["rejected"]))
        prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        room = max_tokens - len(prompt)
        if room <= 0:
            continue
        chosen = tokenizer(chosen_text, add_special_tokens=False)["input_ids"][:room]
        rejected = tokenizer(rejected_text, add_special_tokens=False)["input_ids"][:room]
        if chosen and rejected:
            out.append((prompt, chosen, rejected))
    return out


def pair_batch(pairs: Sequence[TokenizedPair], pad_id: int, device: torch.device | str = "cpu"
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, predicts) of the rows [every chosen sequence; every rejected one], right-padded.
    predicts [rows, length - 1] is True at the positions whose next token is a completion token."""
    rows = [prompt + chosen for prompt, chosen, _ in pairs] + [prompt + rejected for prompt, _, rejected in pairs]
    starts = [len(prompt) for prompt, _, _ in pairs] * 2
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    predicts = torch.zeros((len(rows), width - 1), dtype=torch.bool)
    for i, (row, start) in enumerate(zip(rows, starts, strict=True)):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
        predicts[i, start - 1 : len(row) - 1] = True
    return input_ids.to(device), attention_mask.to(device), predicts.to(device)


def sequence_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, predicts: torch.Tensor
                      ) -> torch.Tensor:
    """log pi(completion | prompt) [rows]: the sum of the completion tokens' log-probabilities, the LM head run at
    the predicting states only (`models.target_logprobs`)."""
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask,
              "position_ids": models.position_ids_from_mask(attention_mask)}
    token_logprobs = models.target_logprobs(model, inputs, predicts)
    return token_logprobs.new_zeros(len(input_ids)).index_add(0, predicts.nonzero()[:, 0], token_logprobs)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean loss, chosen rewards, rejected rewards). The implicit reward of a completion is
    beta * log(pi(y|x) / pi_ref(y|x)); the loss is -log sigmoid(reward(chosen) - reward(rejected))."""
    chosen_rewards = beta * (policy_chosen - reference_chosen)
    rejected_rewards = beta * (policy_rejected - reference_rejected)
    return -F.logsigmoid(chosen_rewards - rejected_rewards).mean(), chosen_rewards.detach(), rejected_rewards.detach()


def reference_logprobs(model: nn.Module, pairs: Sequence[TokenizedPair], batch_pairs: int, pad_id: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) log-probabilities [pairs] under `model` as it is, without gradients, in batches of pairs
    sorted by length (less padding), the adapter merged for the pass."""
    device = next(model.parameters()).device
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + max(len(pairs[i][1]), len(pairs[i][2])))
    chunks = [order[i : i + batch_pairs] for i in range(0, len(order), batch_pairs)]
    chosen, rejected = torch.zeros(len(pairs)), torch.zeros(len(pairs))
    with torch.no_grad(), models.merged_for_batches(model, len(chunks)) as merged:
        for chunk in chunks:
            logprobs = sequence_logprobs(merged, *pair_batch([pairs[i] for i in chunk], pad_id, device)).cpu()
            chosen[chunk], rejected[chunk] = logprobs[: len(chunk)], logprobs[len(chunk) :]
    return chosen, rejected


def length_grouped_batches(lengths: Sequence[int], batch_size: int, generator: torch.Generator,
                           group_batches: int = 8) -> list[list[int]]:
    """One epoch's batches of indices: a random order, sorted by length within runs of `group_batches` batches (so a
    batch pads less), the batches then shuffled. At the bench's pairs, random batches of 4 spend 68% of their
    tokens on real text and grouped ones 87%; every index appears once, in a seeded random batch."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    group = batch_size * group_batches
    batches = []
    for start in range(0, len(order), group):
        run = sorted(order[start : start + group], key=lambda i: lengths[i])
        batches += [run[i : i + batch_size] for i in range(0, len(run), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def _trainable_policy(cfg: StudyConfig, sft_dir: Path) -> tuple[nn.Module, Any, str]:
    """(model, tokenizer, base name for meta.json): the SFT adapter, trainable; after a full fine-tune, the SFT
    model with a fresh LoRA (its B = 0, so the model starts as the SFT model)."""
    from rlhf_lib.artifacts import load_policy

    meta = json.loads((sft_dir / "meta.json").read_text())
    model, tokenizer = load_policy(sft_dir, trainable=True)
    if meta.get("finetune", "lora") == "full":
        return models.lora_from_config(model, cfg.model), tokenizer, str(sft_dir.resolve())
    return model, tokenizer, meta["base_model"]


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
    reward.max_seq_tokens (the RM saw the same texts at that length). AdamW at a constant learning rate,
    gradients clipped at norm 1, batches of similar lengths in an order seeded by `seed` (`length_grouped_batches`).
    `max_steps` caps the optimizer steps (tests).
    """
    from tqdm.auto import tqdm

    sft_dir, out_dir = Path(sft_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ev = cfg.evaluation
    torch.manual_seed(cfg.seed)
    model, tokenizer, base_name = _trainable_policy(cfg, sft_dir)
    freeze_dropout(model)  # the log-prob ratios assume a deterministic network (TRL's disable_dropout)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    tokenized = tokenize_pairs(tokenizer, pairs, cfg.reward.max_seq_tokens)
    if not tokenized:
        raise ValueError("DPO needs at least one preference pair (every ranking tied, or every pair cut away?).")
    started = time.time()
    reference_chosen, reference_rejected = reference_logprobs(model, tokenized, ev.dpo_batch_size, pad_id)

    device = next(model.parameters()).device
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=ev.dpo_learning_rate, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(tokenized) / ev.dpo_batch_size)
    total_steps = max_steps if max_steps is not None else steps_per_epoch * ev.dpo_epochs
    order_seed = torch.Generator().manual_seed(cfg.seed)
    lengths = [len(prompt) + max(len(chosen), len(rejected)) for prompt, chosen, rejected in tokenized]
    history: list[dict[str, float]] = []
    model.train()
    with open_tracker(cfg, "dpo", out_dir / "tensorboard") as tracker, \
            tqdm(total=total_steps, desc="DPO", disable=not progress) as bar:
        while len(history) < total_steps:
            for chunk in length_grouped_batches(lengths, ev.dpo_batch_size, order_seed):
                if len(history) == total_steps:
                    break
                logprobs = sequence_logprobs(model, *pair_batch([tokenized[i] for i in chunk], pad_id, device))
                chosen, rejected = logprobs[: len(chunk)], logprobs[len(chunk) :]
                loss, chosen_rewards, rejected_rewards = dpo_loss(
                    chosen, rejected, reference_chosen[chunk].to(device), reference_rejected[chunk].to(device), ev.dpo_beta)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
                optimizer.step()
                step = len(history) + 1
                row = {"step": step, "epoch": step / steps_per_epoch, "loss": loss.item(), "grad_norm": grad_norm.item(),
                       "learning_rate": ev.dpo_learning_rate,
                       "rewards/chosen": chosen_rewards.mean().item(), "rewards/rejected": rejected_rewards.mean().item(),
                       "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
                       "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
                       "logps/chosen": chosen.detach().mean().item(), "logps/rejected": rejected.detach().mean().item()}
                history.append(row)
                tracker.log({f"dpo/{key}": value for key, value in row.items() if key != "step"}, step)
                bar.update()
                bar.set_postfix(loss=f"{row['loss']:.3f}", margin=f"{row['rewards/margins']:.3f}")
    seconds = time.time() - started
    log = pd.DataFrame([*history, {"step": len(history), "epoch": len(history) / steps_per_epoch,
                                   "train_runtime": seconds, "train_loss": sum(r["loss"] for r in history) / len(history)}])
    log.to_csv(out_dir / "log_history.csv", index=False)
    policy_dir = save_policy_dir(
        model, "default", out_dir / "policy", base_name,
        finetune="lora", quantize_4bit=cfg.model.quantize_4bit, method="dpo", dpo_beta=ev.dpo_beta,
        pairs=len(tokenized), steps=len(history), initialised_from=str(sft_dir),
    )
    del model, optimizer
    return DPOResult(policy_dir, log, len(tokenized), len(history), seconds)
