"""PPO and PPO-ptx for RLHF, as in InstructGPT (Ouyang et al., 2022, appendix C.4), in one readable file.

Usage (the notebook 04_ppo does this for PPO and for PPO-ptx)::

    from rlhf_lib.config import load_preset
    from rlhf_lib.ppo import train_ppo
    cfg = load_preset("tiny")
    result = train_ppo(cfg, policy_init_dir=sft_dir, reward_dir=rm_dir, prompts=ppo_prompts,
                       pretrain_texts=prose, out_dir="runs/tiny/ppo-work", ptx=False)
    result.policy_dir        # the trained policy: a peft adapter directory + meta.json
    result.metrics_csv       # one row per iteration (reward, KL, entropy, losses, ...)

Distributed (two CPU processes here; GPUs and nodes the same way)::

    torchrun --nproc_per_node 2 my_script.py   # my_script calls train_ppo; accelerate wraps DDP

One iteration, in the order of the code below. The names follow the paper and the published
implementation details of RLHF with PPO (Huang et al., "The N implementation details of RLHF with PPO"):

 1. rollout       sample a response per prompt from the policy at the rollout temperature; left-padded
                  queries, responses truncated after the first EOS (rlhf_lib.generation.generate).
 2. logprobs      recompute log pi(token) of every response token under the policy and the frozen
                  reference with the SAME temperature (logits / T), and the value of every state.
 3. score         RM score of (prompt, response) read at the last token (EOS); minus
                  `missing_eos_penalty` x the RM's `sft_score_std` (meta.json) when the response hit the
                  length limit without EOS.
 4. rewards       per token r_t = -beta * (log pi(y_t) - log pi_ref(y_t)); the score is added at the last token.
 5. GAE           advantages with gamma = 1, lambda = 0.95, respecting the response mask;
                  returns = advantages + values.
 6. whitening     advantages normalised to mean 0, std 1 over the valid tokens of the batch.
 7. PPO epochs    over shuffled minibatches: clipped ratio loss, clipped value loss, gradient clip (the
                  policy's and the value's each on its own), step. During the first
                  `value_warmup_iterations` only the value function learns (critic warm-up).
 8. PPO-ptx       every step also adds ptx_coef * LM loss on pretraining text (only when ptx is on).
 9. controllers   optional adaptive beta (Ziegler et al.), optional EMA of the policy weights,
                  constant learning rate after a linear warm-up.

Models: ONE frozen base carries every role as a LoRA adapter (rlhf_lib.adapters): "policy" (trainable,
from the SFT adapter), "reference" (the frozen SFT adapter, or the bare base when there is no SFT
adapter), "value" (trainable, from the RM adapter, with a ScalarHead from the RM head) and "reward"
(the frozen RM adapter and head) when the RM shares the base. An RM on another base is a separate
text scorer, `reward_fn(prompts, responses) -> Tensor[B]`.

What a run writes into out_dir::

    metrics.csv, samples.jsonl, tensorboard/   per iteration: metrics; sample (prompt, response, score)
    checkpoint-000012/                         the last good state: trainable weights, optimizer, EMA, counters
    validation.csv, validation_state.json      greedy validation points; the committed selection state
    best-000010/                               the best allowed validation point's policy so far
    policy/                                    the policy to evaluate (the chosen validation point, else the
                                               last iterate; EMA weights when on), in the SFT adapter format
    policy_last/                               the raw last weights, when policy/ is not them
    value/                                     value adapter + head, in the reward-model format
    result.json; DIVERGED.json                 run summary (chosen iteration and why, collapse guard); which
                                               divergence guard fired, if one did

`rollout_batch` and `minibatch` count episodes over all processes (as the paper's 512 and 64 do).

Guards: a non-finite value, mean KL above `max_kl` or entropy below `min_entropy` raise PPODivergence;
the last good checkpoint stays. The collapse guard (`collapse_reason`) compares each rollout's mean response
length and entropy with the first rollout's and stops the run cleanly or flags the iteration (`collapsed`).
Checkpoint choice (`validation_prompts` > 0): greedy answers to held-out PPO prompts, scored as PPO is paid,
every `validation_every` iterations; `select_checkpoint` keeps the best that does not look collapsed. Checkpoints are written every iteration (atomically) and a rerun with
the same `out_dir` resumes from the last one. Randomness is reseeded from (seed, iteration, rank) at
each iteration, so a resumed run reproduces the uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import json
import logging
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from rlhf_lib import models
from rlhf_lib.adapters import (
    RM_ADAPTER,
    RM_HEAD,
    apply_trainability,
    attach_adapter,
    freeze_dropout,
    read_meta,
    save_policy_dir,
    save_reward_dir,
    score_token_ids,
    use_adapter,
)
from rlhf_lib.config import PPOConfig, StudyConfig
from rlhf_lib.generation import Generated, generate, merged_copy
from rlhf_lib.prompting import format_prompt

if TYPE_CHECKING:
    import pandas as pd

    from rlhf_lib.evaluation.base import MetricResult

RewardFn = Callable[[list[str], list[str]], torch.Tensor]
KL_HORIZON = 10_000  # adaptive-KL horizon in episodes (Ziegler et al. 2019)
ADAM_EPS = 1e-5  # as in the PPO reference implementations
# A validation point whose greedy answers repeat (fewer than 90% distinct over the validation prompts) is
# never chosen: one answer for many prompts is how the RM got hacked in the first tiny run.
VALIDATION_MIN_DISTINCT = 0.9
logger = logging.getLogger(__name__)


class PPODivergence(RuntimeError):
    """Training stopped by a divergence guard; `checkpoint` is the last good state (None before the first)."""

    def __init__(self, reason: str, iteration: int, checkpoint: Path | None):
        where = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written yet"
        super().__init__(f"PPO diverged at iteration {iteration}: {reason}; {where}.")
        self.reason, self.iteration, self.checkpoint = reason, iteration, checkpoint


@dataclass
class PPOResult:
    """Where a finished run put its artifacts, and its per-iteration metrics."""

    out_dir: Path
    policy_dir: Path  # the policy to evaluate (EMA weights when ema_decay > 0)
    value_dir: Path  # value adapter + head, in the reward-directory format
    metrics_csv: Path
    samples_jsonl: Path
    tensorboard_dir: Path
    iterations: int  # iterations whose update was taken
    metrics: list[dict[str, float]] = field(default_factory=list)
    chosen_iteration: int | None = None  # the iterate exported as policy_dir (0 = the initial policy)
    selection: str = ""  # why that one
    stop_reason: str | None = None  # the collapse guard's reason when it stopped the run
    validation_csv: Path | None = None  # one row per validation point (None when validation is off)
    missing_eos_penalty: float = float("nan")  # in score units: the knob times the RM's sft_score_std


# ============================================================================================
# The math: pure tensor functions (each tested on a hand-computed toy)
# ============================================================================================


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over positions where mask is 1."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance of x over positions where mask is 1."""
    mean = masked_mean(x, mask)
    count = mask.sum()
    var = masked_mean((x - mean) ** 2, mask)
    return var * count / (count - 1).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the valid positions; shift_mean=False keeps the mean (for rewards)."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def logprobs_and_entropy(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(token) [B, L] and the (detached) entropy [B, L] of the SAMPLING distribution softmax(logits / T)."""
    logits = logits.float() / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    logprobs = logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logprobs, entropy


def per_token_rewards(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, kl_beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """r_t = -beta * KL_t at every response token, plus the sequence score at the last one.

    KL_t = log pi(y_t) - log pi_ref(y_t) (the sampled-token estimator whose sum over t is an unbiased
    estimate of KL(pi || pi_ref) for the sequence). Returns (rewards, KL_t), both zero where mask is 0.
    """
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_beta * kl
    last = mask.long().sum(1).clamp(min=1) - 1  # responses are a prefix of the row: the last 1 is at sum-1
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards, kl


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the valid prefix of each row.

    delta_t = r_t + gamma * V_{t+1} - V_t,   A_t = delta_t + gamma * lambda * A_{t+1},
    where V_{t+1} and A_{t+1} count as 0 past the last valid token (the episode ends at EOS).
    Returns (advantages, returns = advantages + values), zero where mask is 0.
    """
    mask = mask.to(rewards.dtype)
    length = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(length)):
        if t + 1 < length:
            next_value = values[:, t + 1] * mask[:, t + 1]
            next_advantage = advantages[:, t + 1] * mask[:, t + 1]
        else:
            next_value = torch.zeros_like(values[:, t])
            next_advantage = torch.zeros_like(values[:, t])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = delta + gamma * lam * next_advantage
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped surrogate: mean over valid tokens of max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clip_frac": masked_mean(((ratio - 1.0).abs() > clip_range).float(), mask).item(),
            # k3 estimator of KL(old || new): non-negative, low variance (Schulman's note on KL approximation)
            "approx_kl": masked_mean((ratio - 1.0) - log_ratio, mask).item(),
            "ratio_mean": masked_mean(ratio, mask).item(),
            "ratio_max_dev": ((ratio - 1.0).abs() * mask).max().item(),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """0.5 * mean over valid tokens of max((V - R)^2, (V_clipped - R)^2), V_clipped within +-clip of the old V."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    with torch.no_grad():
        stats = {"value_clip_frac": masked_mean((clipped_error > unclipped_error).float(), mask).item()}
    return loss, stats


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R): 1 is a perfect value function, 0 no better than a constant."""
    var_returns = masked_var(returns, mask)
    if var_returns.item() == 0:
        return float("nan")
    return (1.0 - masked_var(returns - values, mask) / var_returns).item()


def distinct_fraction(texts: Sequence[str]) -> float:
    """Share of distinct responses (compared after stripping whitespace): 1 = all different, 1/n = one answer."""
    if not texts:
        return float("nan")
    return len({t.strip() for t in texts}) / len(texts)


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


def effective_missing_eos_penalty(ppo: PPOConfig, reward_meta: Mapping[str, Any] | None) -> float:
    """`missing_eos_penalty` in score units: the knob (in RM-std units) times meta's `sft_score_std`.

    Without that key (an older RM, or a reward_fn without an RM directory) the std counts as 1.0, with a warning.
    """
    std = (reward_meta or {}).get("sft_score_std")
    if std is None or not math.isfinite(float(std)) or float(std) <= 0:
        warnings.warn(
            "The reward model's meta.json has no usable 'sft_score_std': missing_eos_penalty is taken in raw score "
            "units (std 1.0).", stacklevel=2,
        )
        std = 1.0
    return ppo.missing_eos_penalty * float(std)


class KLController:
    """beta of the KL penalty: fixed, or adapted towards a target sequence KL (Ziegler et al. 2019).

    Adaptive: beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * episodes / KL_HORIZON).
    """

    def __init__(self, beta: float, adaptive: bool = False, target: float = 6.0, horizon: int = KL_HORIZON):
        self.value, self.adaptive, self.target, self.horizon = beta, adaptive, target, horizon

    def update(self, current_kl: float, episodes: int) -> None:
        if not self.adaptive or self.target <= 0:
            return
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * episodes / self.horizon


def learning_rate_at(step: int, ppo: PPOConfig, updates_per_iteration: int, role: str = "value") -> float:
    """Constant LR after a linear warm-up over `warmup_iterations` iterations (the paper: 10).

    The policy's clock starts after the `value_warmup_iterations` in which only the value function
    learns (its LR is 0 until then), so its own warm-up is not spent while it is not training.
    """
    if role == "policy":
        step -= ppo.value_warmup_iterations * updates_per_iteration
        if step < 0:
            return 0.0
    peak = ppo.value_learning_rate if role == "value" and ppo.value_learning_rate > 0 else ppo.learning_rate
    warmup_steps = ppo.warmup_iterations * updates_per_iteration
    if warmup_steps == 0:
        return peak
    return peak * min(1.0, (step + 1) / warmup_steps)


def build_optimizer(roles: PolicyValueRoles, ppo: PPOConfig) -> torch.optim.Optimizer:
    """AdamW with two parameter groups, `role` "policy" and "value", clipped and scheduled separately.

    The policy and the value function are separate networks that happen to share a frozen base; one
    gradient-norm clip over both would let the critic's gradient (the larger one early on, when the
    RM-initialised values still miss the returns) shrink every policy step.
    """
    policy = roles.named_policy_parameters()
    value = [p for name, p in roles.named_trainable().items() if name not in policy]
    value_lr = ppo.value_learning_rate or ppo.learning_rate
    groups = [{"params": list(policy.values()), "role": "policy"}, {"params": value, "role": "value", "lr": value_lr}]
    return torch.optim.AdamW(groups, lr=ppo.learning_rate, eps=ADAM_EPS, weight_decay=0.0)


def clip_gradients(optimizer: torch.optim.Optimizer, max_norm: float, accelerator=None) -> dict[str, float]:
    """Clip each parameter group's gradient norm to max_norm; returns the norms before clipping, by role.

    Sharded engines (FSDP, DeepSpeed) own their gradients: there the whole model is clipped at once.
    """
    sharded = accelerator is not None and accelerator.distributed_type.name in ("FSDP", "DEEPSPEED")
    if sharded:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        norm = accelerator.clip_grad_norm_(params, max_norm)
        return {"grad_norm": float(norm) if norm is not None else float("nan")}
    norms = {}
    for group in optimizer.param_groups:
        params = [p for p in group["params"] if p.grad is not None]
        if params:
            role = group.get("role", "policy")
            norms[role] = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return {"grad_norm": norms.get("policy", float("nan")), "value_grad_norm": norms.get("value", float("nan"))}


class EMA:
    """Exponential moving average of the policy weights (the paper evaluates the EMA, decay 0.992)."""

    def __init__(self, named_params: dict[str, nn.Parameter], decay: float):
        self.params, self.decay = named_params, decay
        self.shadow = {name: p.detach().clone() for name, p in named_params.items()}

    @torch.no_grad()
    def update(self) -> None:
        for name, param in self.params.items():
            self.shadow[name].lerp_(param.detach(), 1.0 - self.decay)

    @contextmanager
    @torch.no_grad()
    def applied(self) -> Iterator[None]:
        """Temporarily load the averaged weights into the model (to save or evaluate them)."""
        backup = {name: p.detach().clone() for name, p in self.params.items()}
        for name, param in self.params.items():
            param.copy_(self.shadow[name])
        try:
            yield
        finally:
            for name, param in self.params.items():
                param.copy_(backup[name])


# ============================================================================================
# The models: one frozen base, four roles
# ============================================================================================


def response_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int) -> torch.Tensor:
    """Logits [B, Lr, V] that predict the last `response_len` tokens (the LM head runs only there)."""
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=models.position_ids_from_mask(attention_mask),
        use_cache=False,
        logits_to_keep=response_len + 1,
    )
    return out.logits[:, :-1]


def lm_loss(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the real tokens (PPO-ptx's pretraining objective)."""
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=models.position_ids_from_mask(attention_mask), use_cache=False
    ).logits[:, :-1]
    targets = input_ids[:, 1:]
    target_mask = attention_mask[:, 1:] * attention_mask[:, :-1]
    nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return masked_mean(nll.view_as(targets), target_mask)


class PolicyValueRoles(nn.Module):
    """The four PPO roles on one PeftModel. `forward` is the trainable part (policy + value [+ ptx]).

    `adapters` maps each role to its adapter name (None for "reference" means the bare base).
    Only the policy and value adapters and the value head require grad; `forward` runs every trainable
    parameter once per call, which is what DistributedDataParallel expects.
    """

    def __init__(
        self,
        model: nn.Module,
        value_head: models.ScalarHead,
        adapters: dict[str, str | None],
        temperature: float,
        reward_head: models.ScalarHead | None = None,
        reward_bias: float = 0.0,
        reward_layer: int = -1,
        reward_pooling: str = "last",
        value_layer: int = -1,
    ):
        super().__init__()
        self.model = model
        self.value_head = value_head
        self.reward_head = reward_head
        self.adapters = dict(adapters)
        self.temperature = temperature
        self.reward_bias = reward_bias
        # Which hidden layer the RM's head reads and how it pools it (the RM's meta.json); the value head reads
        # the same layer per position when it starts as the RM.
        self.reward_layer, self.reward_pooling, self.value_layer = reward_layer, reward_pooling, value_layer
        if reward_head is not None:
            reward_head.requires_grad_(False)

    @contextmanager
    def role(self, name: str) -> Iterator[nn.Module]:
        """The network of one role (here: the shared model with that role's adapter active)."""
        with use_adapter(self.model, self.adapters[name]):
            yield self.model

    @property
    def scores_internally(self) -> bool:
        return self.reward_head is not None and "reward" in self.adapters

    def named_trainable(self) -> dict[str, nn.Parameter]:
        return {name: p for name, p in self.named_parameters() if p.requires_grad}

    def named_policy_parameters(self) -> dict[str, nn.Parameter]:
        adapter = self.adapters["policy"]
        return {name: p for name, p in self.named_trainable().items() if f".{adapter}." in name}

    def policy_logprobs(self, input_ids, attention_mask, response_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        with self.role("policy") as model:
            logits = response_logits(model, input_ids, attention_mask, response_len)
        return logprobs_and_entropy(logits, input_ids[:, -response_len:], self.temperature)

    def reference_logprobs(self, input_ids, attention_mask, response_len: int) -> torch.Tensor:
        with self.role("reference") as model:
            logits = response_logits(model, input_ids, attention_mask, response_len)
        return logprobs_and_entropy(logits, input_ids[:, -response_len:], self.temperature)[0]

    def values(self, input_ids, attention_mask, response_len: int) -> torch.Tensor:
        """V(state before response token t), read at the token that precedes it."""
        with self.role("value") as model:
            per_position = models.scalar_outputs(model, self.value_head, input_ids, attention_mask, layer=self.value_layer)
            return per_position[:, -response_len - 1 : -1].float()

    def reward_scores(self, input_ids, attention_mask, response_len: int | None = None) -> torch.Tensor:
        """RM score of [query | response] rows, the response in the last `response_len` columns."""
        with self.role("reward") as model:
            return score_token_ids(model, self.reward_head, input_ids, attention_mask, self.reward_bias, response_len,
                                   self.reward_layer, self.reward_pooling).float()

    def ptx_loss(self, input_ids, attention_mask) -> torch.Tensor:
        with self.role("policy") as model:
            return lm_loss(model, input_ids, attention_mask)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        response_len: int,
        ptx_ids: torch.Tensor | None = None,
        ptx_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(policy logprobs, entropy, values, ptx LM loss or None) for one minibatch, with gradients."""
        logprobs, entropy = self.policy_logprobs(input_ids, attention_mask, response_len)
        values = self.values(input_ids, attention_mask, response_len)
        ptx = self.ptx_loss(ptx_ids, ptx_mask) if ptx_ids is not None else None
        return logprobs, entropy, values, ptx


def _lora_config(model_cfg):
    from peft import LoraConfig

    return LoraConfig(
        r=model_cfg.lora_rank,
        lora_alpha=model_cfg.lora_alpha,
        lora_dropout=0.0,
        target_modules=list(model_cfg.lora_target_modules),
        task_type="CAUSAL_LM",
    )


def _keep_4bit_differentiable(model: nn.Module) -> None:
    """Stop bitsandbytes repacking 4-bit weights for CPU inference on the first no-grad forward.

    The repacked layout has no backward, so after one rollout no gradient would reach the LoRA
    adapters behind any 4-bit layer. Rollouts and training share the weights, so never repack.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _present_targets(model: nn.Module, wanted: Sequence[str]) -> list[str]:
    present = {name.split(".")[-1] for name, _ in model.named_modules()}
    return [t for t in wanted if t in present]


def build_roles(
    cfg: StudyConfig,
    policy_init_dir: str | Path | None,
    reward_dir: str | Path | None,
    device: torch.device | str | None = None,
    need_reward: bool = True,
) -> tuple[PolicyValueRoles, Any, RewardFn | None, str]:
    """Load the base once and attach the roles. Returns (roles, tokenizer, external reward_fn or None, base name).

    The base is the SFT adapter's base (its meta.json), or cfg.model.name without an SFT adapter.
    The RM's adapter becomes the "reward" and "value" roles when the RM shares this base; otherwise
    the RM is loaded separately as a text scorer and the value starts from the SFT adapter with a
    zero head (values 0 at first), which departs from the paper (value initialised from the RM).
    """
    if cfg.model.finetune != "lora":
        raise ValueError("rlhf_lib.ppo trains LoRA adapters on a shared frozen base; set [model] finetune = 'lora'.")
    base_name = read_meta(policy_init_dir)["base_model"] if policy_init_dir else cfg.model.name
    rm_meta = read_meta(reward_dir) if reward_dir else None
    shares_base = rm_meta is not None and rm_meta["base_model"] == base_name and rm_meta.get("finetune", "lora") == "lora"
    device_name = str(device) if device is not None else cfg.model.device
    base = models.load_causal_lm(
        base_name, device=device_name, dtype=cfg.model.dtype, quantize_4bit=cfg.model.quantize_4bit, dropout=0.0
    )
    _keep_4bit_differentiable(base)
    lora = _lora_config(cfg.model)
    lora.target_modules = _present_targets(base, cfg.model.lora_target_modules)

    adapters: dict[str, str | None] = {"policy": "policy", "value": "value"}
    model = attach_adapter(base, policy_init_dir, "policy", trainable=True, lora_config=copy.deepcopy(lora))
    if policy_init_dir:
        attach_adapter(model, policy_init_dir, "reference", trainable=False)
        adapters["reference"] = "reference"
    else:
        adapters["reference"] = None  # the SFT policy IS the base: disable adapters for the reference
    model_device = next(model.parameters()).device

    reward_head, reward_bias, reward_fn = None, 0.0, None
    reward_layer, reward_pooling = int((rm_meta or {}).get("layer", -1)), str((rm_meta or {}).get("pooling", "last"))
    value_layer = -1
    if shares_base:
        value_layer = reward_layer  # the value head starts as the RM's head, so it reads the RM's layer
        attach_adapter(model, Path(reward_dir) / RM_ADAPTER, "value", trainable=True)
        value_head = models.ScalarHead.load(Path(reward_dir) / RM_HEAD, device=model_device)
        # The value starts as the RM *with its normalisation*: V(full response) = the score PPO is paid. With the
        # raw head every value sits `bias` too high, and GAE turns that offset into a negative advantage on each
        # response's last tokens (EOS above all), whatever the reward: the policy learns to ramble.
        with torch.no_grad():
            value_head.linear.bias -= float(rm_meta.get("bias", 0.0))
        if need_reward:
            attach_adapter(model, Path(reward_dir) / RM_ADAPTER, "reward", trainable=False)
            adapters["reward"] = "reward"
            reward_head = models.ScalarHead.load(Path(reward_dir) / RM_HEAD, device=model_device)
            reward_bias = float(rm_meta.get("bias", 0.0))
    else:
        why = "No reward directory" if rm_meta is None else (
            f"The RM ({rm_meta['base_model']}, {rm_meta.get('finetune', 'lora')}) is not a LoRA adapter on {base_name}")
        warnings.warn(
            f"{why}: the value function starts from the SFT adapter with a zero head, not from the RM.",
            stacklevel=2,
        )
        attach_adapter(model, policy_init_dir, "value", trainable=True, lora_config=copy.deepcopy(lora))
        value_head = models.ScalarHead(models.hidden_size_of(model)).to(model_device)
        nn.init.zeros_(value_head.linear.weight)
        if need_reward and reward_dir:
            from rlhf_lib.reward import RewardModel

            reward_model = RewardModel.load(reward_dir, device=device_name, quantize_4bit=cfg.model.quantize_4bit)
            batch_size = cfg.generation.batch_size

            def score_with_rm(prompts: list[str], responses: list[str]) -> torch.Tensor:
                # The RM re-tokenises prompt + response + EOS with its own tokenizer and format.
                return reward_model.score_texts(prompts, responses, batch_size=batch_size)

            reward_fn = score_with_rm
    model.set_adapter("policy")
    apply_trainability(model)
    value_head.float().requires_grad_(True)
    freeze_dropout(model)
    model.eval()  # dropout off everywhere; gradients flow in eval mode too
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tokenizer = models.load_tokenizer(base_name)
    roles = PolicyValueRoles(
        model, value_head, adapters, temperature=cfg.generation.temperature, reward_head=reward_head, reward_bias=reward_bias,
        reward_layer=reward_layer, reward_pooling=reward_pooling, value_layer=value_layer,
    )
    return roles, tokenizer, reward_fn, base_name


# ============================================================================================
# Steps 1-6: rollout, logprobs, score, rewards, GAE, whitening
# ============================================================================================


@dataclass
class Rollout:
    """One batch of episodes with everything the PPO update needs, aligned as [query | response]."""

    prompts: list[str]
    responses: list[str]
    query_ids: torch.Tensor  # [B, Lq] left-padded
    query_mask: torch.Tensor
    response_ids: torch.Tensor  # [B, Lr] pad after the first EOS
    response_mask: torch.Tensor  # [B, Lr] float, 1 up to and including EOS
    ended_with_eos: torch.Tensor  # [B] bool
    logprobs: torch.Tensor  # [B, Lr] log pi_old(y_t)
    ref_logprobs: torch.Tensor  # [B, Lr] log pi_ref(y_t)
    entropy: torch.Tensor  # [B, Lr]
    values: torch.Tensor  # [B, Lr] V_old(s_t)
    rm_scores: torch.Tensor  # [B] raw RM score
    scores: torch.Tensor  # [B] RM score minus the missing-EOS penalty
    kl: torch.Tensor  # [B, Lr] log pi - log pi_ref
    rewards: torch.Tensor  # [B, Lr]
    advantages: torch.Tensor  # [B, Lr] whitened
    returns: torch.Tensor  # [B, Lr]

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.query_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.query_mask, self.response_mask.long()], dim=1)

    def __len__(self) -> int:
        return len(self.prompts)

    def stats(self) -> dict[str, float]:
        """Per-iteration rollout metrics (means over episodes or valid tokens)."""
        mask = self.response_mask
        return {
            "rm_score": self.rm_scores.mean().item(),
            "score": self.scores.mean().item(),
            "reward": self.rewards.sum(1).mean().item(),  # score - beta * sequence KL
            "kl": self.kl.sum(1).mean().item(),
            "entropy": masked_mean(self.entropy, mask).item(),
            "response_length": mask.sum(1).mean().item(),
            "distinct_fraction": distinct_fraction(self.responses),  # of this process's episodes
            "eos_rate": self.ended_with_eos.float().mean().item(),
            "explained_variance": explained_variance(self.values, self.returns, mask),
            "value_mean": masked_mean(self.values, mask).item(),
        }


def _concat_generated(chunks: list[Generated], pad_id: int) -> Generated:
    """Stack generation chunks: pad queries on the left and responses on the right to common widths."""
    if len(chunks) == 1:
        return chunks[0]
    lq = max(c.query_ids.shape[1] for c in chunks)
    lr = max(c.response_ids.shape[1] for c in chunks)

    def left(x, width, value):
        return F.pad(x, (width - x.shape[1], 0), value=value)

    def right(x, width, value):
        return F.pad(x, (0, width - x.shape[1]), value=value)

    return Generated(
        query_ids=torch.cat([left(c.query_ids, lq, pad_id) for c in chunks]),
        query_mask=torch.cat([left(c.query_mask, lq, 0) for c in chunks]),
        response_ids=torch.cat([right(c.response_ids, lr, pad_id) for c in chunks]),
        response_mask=torch.cat([right(c.response_mask, lr, 0) for c in chunks]),
        ended_with_eos=torch.cat([c.ended_with_eos for c in chunks]),
        texts=[t for c in chunks for t in c.texts],
    )


def trim_left_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the leading columns that are padding in every row (left padding was set by the longest prompt
    of the whole batch). Position ids come from the mask, so the outputs are unchanged; the matmuls shrink."""
    first = int(attention_mask.any(0).float().argmax())
    return input_ids[:, first:], attention_mask[:, first:]


def _chunked(fn: Callable[..., Any], batch_size: int, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
    """fn(ids, mask) over row chunks (each trimmed of shared left padding), results concatenated by row."""
    outs = [fn(*trim_left_padding(input_ids[i : i + batch_size], attention_mask[i : i + batch_size]))
            for i in range(0, input_ids.shape[0], batch_size)]
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*outs, strict=True))
    return torch.cat(outs)


def _guard_finite(name: str, tensor: torch.Tensor) -> None:
    if not torch.isfinite(tensor).all():
        raise FloatingPointError(f"non-finite {name}")


def _sample_responses(
    roles: PolicyValueRoles, tokenizer, prompts: Sequence[str], cfg: StudyConfig, temperature: float, seed: int
) -> Generated:
    """The policy's responses to raw prompts, in chunks of generation.batch_size (temperature 0 = greedy)."""
    gen = cfg.generation
    formatted = [format_prompt(tokenizer, p) for p in prompts]
    chunks = []
    with roles.role("policy") as policy:
        sampler = merged_copy(policy)  # the policy's LoRA merged into a copy once per rollout: no adapter matmuls per token
        for index, start in enumerate(range(0, len(formatted), gen.batch_size)):
            try:
                chunks.append(
                    generate(
                        sampler, tokenizer, formatted[start : start + gen.batch_size], max_new_tokens=gen.max_new_tokens,
                        temperature=temperature, top_p=1.0,
                        generator_seed=seed * 1_000 + index if temperature > 0 else None,  # greedy: leave the RNG alone
                    )
                )
            except RuntimeError as err:  # torch.multinomial on NaN/inf probabilities
                if "inf" in str(err) or "nan" in str(err):
                    raise FloatingPointError(f"non-finite sampling probabilities ({err})") from err
                raise
    return _concat_generated(chunks, tokenizer.pad_token_id)


def _score_responses(
    roles: PolicyValueRoles, sampled: Generated, prompts: Sequence[str], cfg: StudyConfig, reward_fn: RewardFn | None,
    missing_eos_penalty: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(raw RM scores, scores PPO is paid = RM score minus the missing-EOS penalty), both [B]."""
    input_ids = torch.cat([sampled.query_ids, sampled.response_ids], dim=1)
    attention_mask = torch.cat([sampled.query_mask, sampled.response_mask], dim=1)
    if reward_fn is not None:
        rm_scores = reward_fn(list(prompts), sampled.texts).to(sampled.response_mask.device).float()
    elif not roles.scores_internally:
        raise ValueError("No reward: the roles carry no reward adapter and no reward_fn was given.")
    else:
        response_len = sampled.response_ids.shape[1]
        rm_scores = _chunked(lambda i, m: roles.reward_scores(i, m, response_len), cfg.generation.batch_size,
                             input_ids, attention_mask)
    _guard_finite("reward-model scores", rm_scores)
    return rm_scores, rm_scores - missing_eos_penalty * (~sampled.ended_with_eos).float()


@torch.no_grad()
def collect_rollout(
    roles: PolicyValueRoles,
    tokenizer,
    prompts: Sequence[str],
    cfg: StudyConfig,
    kl_beta: float,
    reward_fn: RewardFn | None = None,
    seed: int = 0,
    missing_eos_penalty: float | None = None,
) -> Rollout:
    """Steps 1-6 for one batch of raw prompts. Raises FloatingPointError on a non-finite quantity.

    missing_eos_penalty: in score units (train_ppo passes the knob times the RM's sft_score_std);
    None = `cfg.ppo.missing_eos_penalty` as it stands (an RM std of 1).
    """
    ppo, gen = cfg.ppo, cfg.generation
    batch = gen.batch_size
    penalty = ppo.missing_eos_penalty if missing_eos_penalty is None else missing_eos_penalty

    # 1. rollout: pure temperature sampling (top_p 1, top_k 0) so step 2 can recompute the exact probabilities.
    # Prompts are not cut here: the data stage already bounds their length, as for every other policy sample.
    sampled = _sample_responses(roles, tokenizer, prompts, cfg, gen.temperature, seed)
    input_ids = torch.cat([sampled.query_ids, sampled.response_ids], dim=1)
    attention_mask = torch.cat([sampled.query_mask, sampled.response_mask], dim=1)
    mask = sampled.response_mask.float()
    response_len = sampled.response_ids.shape[1]

    # 2. logprobs under the policy and the reference (same temperature), and values, masked
    logprobs, entropy = _chunked(lambda i, m: roles.policy_logprobs(i, m, response_len), batch, input_ids, attention_mask)
    ref_logprobs = _chunked(lambda i, m: roles.reference_logprobs(i, m, response_len), batch, input_ids, attention_mask)
    values = _chunked(lambda i, m: roles.values(i, m, response_len), batch, input_ids, attention_mask)
    logprobs, ref_logprobs, entropy, values = logprobs * mask, ref_logprobs * mask, entropy * mask, values * mask
    for name, tensor in (("policy logprobs", logprobs), ("reference logprobs", ref_logprobs), ("values", values)):
        _guard_finite(name, tensor)

    # 3. score at EOS; a response that ran out of tokens without EOS is penalised
    rm_scores, scores = _score_responses(roles, sampled, prompts, cfg, reward_fn, penalty)

    # 4. per-token rewards: KL penalty everywhere, score at the last token
    rewards, kl = per_token_rewards(logprobs, ref_logprobs, scores, mask, kl_beta)
    if ppo.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)

    # 5. GAE (gamma = 1, lambda = 0.95 in the paper's setting) and returns
    advantages, returns = gae(rewards, values, mask, ppo.gamma, ppo.gae_lambda)

    # 6. advantage whitening over every valid token of the batch
    advantages = masked_whiten(advantages, mask)

    return Rollout(
        prompts=list(prompts), responses=sampled.texts, query_ids=sampled.query_ids, query_mask=sampled.query_mask,
        response_ids=sampled.response_ids, response_mask=mask, ended_with_eos=sampled.ended_with_eos,
        logprobs=logprobs, ref_logprobs=ref_logprobs, entropy=entropy, values=values, rm_scores=rm_scores,
        scores=scores, kl=kl, rewards=rewards, advantages=advantages, returns=returns,
    )


@torch.no_grad()
def validate_policy(
    roles: PolicyValueRoles,
    tokenizer,
    prompts: Sequence[str],
    cfg: StudyConfig,
    reward_fn: RewardFn | None,
    missing_eos_penalty: float,
) -> dict[str, float]:
    """Greedy responses of the current policy to the validation prompts, scored as PPO is paid.

    Returns means over prompts: `score` (RM score minus the missing-EOS penalty: what selects the
    checkpoint), `rm_score`, `response_length` (tokens, EOS included), `eos_rate`, and `distinct_fraction`.
    """
    sampled = _sample_responses(roles, tokenizer, prompts, cfg, temperature=0.0, seed=0)
    rm_scores, scores = _score_responses(roles, sampled, prompts, cfg, reward_fn, missing_eos_penalty)
    return {
        "score": scores.mean().item(), "rm_score": rm_scores.mean().item(),
        "response_length": sampled.response_mask.float().sum(1).mean().item(),
        "eos_rate": sampled.ended_with_eos.float().mean().item(), "distinct_fraction": distinct_fraction(sampled.texts),
        "prompts": len(prompts),
    }


# ============================================================================================
# Steps 7-8: PPO epochs over minibatches, with the optional pretraining (ptx) term
# ============================================================================================


class PretrainSampler:
    """Batches of pretraining text for PPO-ptx, drawn by a seeded generator, tokenised on demand."""

    def __init__(self, texts: Sequence[str], tokenizer, batch_size: int, max_tokens: int, device: torch.device):
        if not texts:
            raise ValueError("PPO-ptx needs pretraining texts; got none.")
        self.texts, self.tokenizer, self.batch_size, self.max_tokens, self.device = list(texts), tokenizer, batch_size, max_tokens, device

    def batch(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        picks = torch.randint(len(self.texts), (self.batch_size,), generator=generator).tolist()
        self.tokenizer.padding_side = "left"
        enc = self.tokenizer([self.texts[i] for i in picks], return_tensors="pt", padding=True, truncation=True,
                             max_length=self.max_tokens, add_special_tokens=False).to(self.device)
        return enc["input_ids"], enc["attention_mask"]


def ppo_update(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    rollout: Rollout,
    ppo: PPOConfig,
    minibatch_size: int,
    generator: torch.Generator,
    *,
    accelerator=None,
    micro_batch_size: int | None = None,
    ptx_coef: float = 0.0,
    ptx_sampler: PretrainSampler | None = None,
    lr_schedule: Callable[[int, str], float] | None = None,
    first_step: int = 0,
    ema: EMA | None = None,
    update_policy: bool = True,
) -> list[dict[str, float]]:
    """Step 7 (+8): `ppo_epochs` passes over shuffled minibatches; one optimizer step per minibatch.

    loss = policy loss + value_loss_coef * value loss (+ ptx_coef * LM loss on pretraining text).
    update_policy=False (the critic warm-up) trains the value function alone: the policy's parameter
    group (`role` "policy", see build_optimizer) takes no step and keeps no optimizer state.
    `model` is PolicyValueRoles, possibly wrapped by accelerate/DDP. A minibatch larger than
    `micro_batch_size` rows is run in pieces whose gradients add up to the whole minibatch's (each piece's
    loss is weighted by its share of the minibatch's tokens). Returns one stats dict per optimizer step.
    Raises FloatingPointError on a non-finite loss (on every rank at once) before the step is taken.
    """
    input_ids, attention_mask = rollout.input_ids, rollout.attention_mask
    response_len = rollout.response_ids.shape[1]
    policy_group = [g for g in optimizer.param_groups if g.get("role") == "policy"]
    if not update_policy and not policy_group:
        raise ValueError("update_policy=False needs an optimizer whose policy group has role 'policy' (build_optimizer).")
    distributed = accelerator is not None and accelerator.num_processes > 1
    micro_batch_size = micro_batch_size or minibatch_size
    history: list[dict[str, float]] = []
    step = first_step
    for epoch in range(ppo.ppo_epochs):
        order = torch.randperm(len(rollout), generator=generator).to(input_ids.device)
        for start in range(0, len(rollout), minibatch_size):
            idx = order[start : start + minibatch_size]
            pieces = idx.split(micro_batch_size)
            minibatch_tokens = rollout.response_mask[idx].sum().clamp(min=1)
            ptx_ids = ptx_mask = None
            if ptx_coef > 0 and update_policy:  # with ptx off the pretraining forward never runs: no ptx gradient
                ptx_ids, ptx_mask = ptx_sampler.batch(generator)
            if lr_schedule is not None:
                for group in optimizer.param_groups:
                    group["lr"] = lr_schedule(step, group.get("role", "policy"))
            optimizer.zero_grad(set_to_none=True)

            finite, ptx, outputs = True, None, []
            for k, piece in enumerate(pieces):
                last = k == len(pieces) - 1
                # DDP all-reduces gradients on the last piece's backward only.
                sync = contextlib.nullcontext() if last or accelerator is None else accelerator.no_sync(model)
                with sync:
                    logprobs, entropy, values, piece_ptx = model(
                        *trim_left_padding(input_ids[piece], attention_mask[piece]), response_len,
                        ptx_ids if last else None, ptx_mask if last else None,
                    )
                    mask = rollout.response_mask[piece]
                    share = mask.sum() / minibatch_tokens
                    pg_loss, _ = policy_loss(logprobs, rollout.logprobs[piece], rollout.advantages[piece], mask, ppo.clip_range)
                    vf_loss, _ = value_loss(values, rollout.values[piece], rollout.returns[piece], mask, ppo.value_clip_range)
                    # In the critic warm-up the policy term stays in the graph with weight 0: DDP expects a
                    # gradient (here zero) for every trainable parameter.
                    loss = share * (pg_loss * float(update_policy) + ppo.value_loss_coef * vf_loss)
                    if piece_ptx is not None:
                        ptx = piece_ptx
                        loss = loss + ptx_coef * piece_ptx
                    finite = finite and bool(torch.isfinite(loss))
                    # Backward even when non-finite: other DDP ranks wait for this all-reduce.
                    if accelerator is not None:
                        accelerator.backward(loss)
                    else:
                        loss.backward()
                outputs.append((logprobs.detach(), entropy, values.detach()))

            bad = torch.tensor(0.0 if finite else 1.0, device=input_ids.device)
            if distributed:  # every rank must stop together, or the others would wait in all-reduce forever
                bad = accelerator.reduce(bad, reduction="sum")
            if bad.item() > 0:
                raise FloatingPointError("non-finite loss")
            if not update_policy:
                for param in policy_group[0]["params"]:
                    param.grad = None  # AdamW skips it: no step, no moments
            grad_norms = clip_gradients(optimizer, ppo.max_grad_norm, accelerator)
            optimizer.step()
            if ema is not None:
                ema.update()

            # Statistics of the whole minibatch, from the pieces' detached outputs.
            logprobs, entropy, values = (torch.cat(parts) for parts in zip(*outputs, strict=True))
            mask = rollout.response_mask[idx]
            with torch.no_grad():
                pg_loss, pg_stats = policy_loss(logprobs, rollout.logprobs[idx], rollout.advantages[idx], mask, ppo.clip_range)
                vf_loss, vf_stats = value_loss(values, rollout.values[idx], rollout.returns[idx], mask, ppo.value_clip_range)
            ptx_value = ptx.item() if ptx is not None else float("nan")
            history.append({
                "epoch": epoch, "step": step, "policy_loss": pg_loss.item(), "value_loss": vf_loss.item(),
                "ptx_loss": ptx_value, "loss": pg_loss.item() + ppo.value_loss_coef * vf_loss.item()
                + (ptx_coef * ptx_value if ptx is not None else 0.0),
                **grad_norms, "train_entropy": masked_mean(entropy, mask).item(),
                "lr": (policy_group or optimizer.param_groups)[0]["lr"], **pg_stats, **vf_stats,
            })
            step += 1
    return history


# ============================================================================================
# Checkpoints, prompt schedule, logs
# ============================================================================================

CHECKPOINT_PREFIX = "checkpoint-"
METRIC_COLUMNS = (
    "iteration", "episodes", "time_s", "episodes_per_s", "lr", "kl_beta",
    "rm_score", "score", "reward", "kl", "entropy", "response_length", "distinct_fraction", "collapsed", "eos_rate",
    "explained_variance", "value_mean",
    "policy_loss", "value_loss", "ptx_loss", "loss", "approx_kl", "clip_frac", "value_clip_frac", "grad_norm",
    "value_grad_norm", "train_entropy", "ratio_mean",
)
VALIDATION_COLUMNS = (
    "iteration", "score", "rm_score", "response_length", "distinct_fraction", "eos_rate", "prompts", "allowed", "best_so_far",
)


@dataclass
class TrainState:
    """Counters and controller values that a checkpoint restores besides the weights."""

    iteration: int = 0
    optimizer_steps: int = 0
    kl_beta: float = 0.0
    # The collapse guard's reference: mean response length and entropy of the first rollout (before any update).
    start_stats: dict[str, float] = field(default_factory=dict)


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


def iteration_prompts(prompts: Sequence[str], iteration: int, batch: int, seed: int) -> list[str]:
    """The `batch` prompts of iteration i (1-based): consecutive slices of seeded per-epoch permutations."""
    n = len(prompts)
    picks, perms = [], {}
    for k in range((iteration - 1) * batch, iteration * batch):
        epoch, position = divmod(k, n)
        if epoch not in perms:
            perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()
        picks.append(prompts[perms[epoch][position]])
    return picks


def _iteration_seed(seed: int, iteration: int, rank: int) -> int:
    return (seed * 1_000_003 + iteration * 9_176 + rank * 101) % (2**31)


class RunLog:
    """metrics.csv, samples.jsonl and TensorBoard events of a run (only the main process writes).

    On resume, rows of iterations after the checkpoint are dropped first: those iterations are redone.
    """

    def __init__(self, out_dir: Path, resume_from: int, enabled: bool):
        self.metrics, self.samples, self.tensorboard = out_dir / "metrics.csv", out_dir / "samples.jsonl", out_dir / "tensorboard"
        self.enabled, self.writer = enabled, None
        if enabled:
            self._trim(resume_from)
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.tensorboard), purge_step=resume_from + 1)

    def _trim(self, keep_through: int) -> None:
        if self.metrics.exists():
            lines = self.metrics.read_text().splitlines(keepends=True)
            self.metrics.write_text("".join(lines[:1] + [x for x in lines[1:] if int(x.split(",", 1)[0]) <= keep_through]))
        if self.samples.exists():
            lines = self.samples.read_text().splitlines(keepends=True)
            self.samples.write_text("".join(x for x in lines if json.loads(x)["iteration"] <= keep_through))

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
        for key in METRIC_COLUMNS[1:]:
            self.writer.add_scalar(f"ppo/{key}", float(row[key]), row["iteration"])
        self.writer.flush()

    def rows(self) -> list[dict[str, float]]:
        if not self.metrics.exists():
            return []
        with self.metrics.open() as handle:
            return [{k: _as_float(v) for k, v in r.items()} for r in csv.DictReader(handle)]

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _as_float(value: str) -> float:
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
                rows = [{k: _as_float(v) for k, v in r.items()} for r in csv.DictReader(handle)]
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
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"last_validated": iteration, "best_iteration": self.best_iteration}, indent=1))
        os.replace(tmp, self.state_path)  # the commit point
        self._drop_stale_copies()

    def selection(self) -> tuple[int | None, str]:
        return select_checkpoint(self.rows, self.collapse_fraction)

    def _write_csv(self) -> None:
        with self.csv.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=VALIDATION_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            for row in self.rows:
                writer.writerow({**row, "iteration": int(row["iteration"]), "prompts": int(row["prompts"]),
                                 "allowed": bool(row.get("allowed", False)), "best_so_far": bool(row.get("best_so_far", False))})

    def _drop_stale_copies(self) -> None:
        for path in self.out_dir.glob("best-*"):
            if path.is_dir() and path != self.best_dir:
                shutil.rmtree(path, ignore_errors=True)


def _mean(history: list[dict[str, float]], key: str) -> float:
    values = [h[key] for h in history if not math.isnan(h[key])]
    return sum(values) / len(values) if values else float("nan")


def _check_resumable(checkpoint: Path, ppo: PPOConfig) -> None:
    """Warn when a run resumes with PPO knobs other than those it started with (iterations aside)."""
    saved = json.loads((checkpoint / "state.json").read_text()).get("ppo", {})
    changed = sorted(k for k, v in asdict(ppo).items() if k != "iterations" and k in saved and saved[k] != v)
    if changed:
        warnings.warn(f"Resuming {checkpoint} with changed [ppo] knobs: {', '.join(changed)}.", stacklevel=3)


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
            (tmp / "meta.json").write_text(json.dumps({**saved, **meta}, indent=1))
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


# ============================================================================================
# The loop
# ============================================================================================


def train_ppo(
    cfg: StudyConfig,
    policy_init_dir: str | Path | None,
    reward_dir: str | Path | None,
    prompts: list[str],
    pretrain_texts: list[str],
    out_dir: str | Path,
    ptx: bool,
    *,
    reward_fn: RewardFn | None = None,
    accelerator=None,
    progress: bool = True,
    samples_per_iteration: int = 8,
) -> PPOResult:
    """Train a policy with PPO (ptx=False) or PPO-ptx (ptx=True) and return where everything went.

    policy_init_dir: SFT adapter directory (None: start from the base, which is then also the reference).
    reward_dir: RM directory; `reward_fn` overrides its scoring (e.g. a gold labeler), while a same-base
    RM still initialises the value function. Rerunning with the same out_dir resumes from its last
    checkpoint; raising `cfg.ppo.iterations` continues a finished run. Forward passes (rollout scoring
    and PPO minibatches) run at most `cfg.generation.batch_size` sequences at a time.
    With `[ppo] validation_prompts` > 0 that many of `prompts` are held out from rollouts and the exported
    policy is the validation point chosen by `select_checkpoint` (see validation.csv, result.json).
    The collapse guard (`collapse_fraction`, `collapse_action`) stops or flags a policy whose response
    length or entropy fell below that share of the first rollout's.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    ppo = cfg.ppo
    ptx_coef = ppo.ptx_coef if ptx else 0.0
    if ptx and ptx_coef <= 0:
        raise ValueError("ptx=True needs [ppo] ptx_coef > 0 (the paper's gamma is 27.8); with 0 PPO-ptx would equal PPO.")
    if cfg.generation.temperature <= 0:
        raise ValueError("PPO samples its rollouts: [generation] temperature must be > 0 (the paper uses 1).")
    if not prompts:
        raise ValueError("train_ppo needs at least one prompt.")
    if reward_dir is None and reward_fn is None:
        raise ValueError("Pass reward_dir (a trained RM) or reward_fn.")
    rollout_prompts, validation_prompts = split_validation_prompts(prompts, ppo.validation_prompts, cfg.seed)
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    if ppo.rollout_batch % world or ppo.minibatch % world:
        raise ValueError(f"rollout_batch ({ppo.rollout_batch}) and minibatch ({ppo.minibatch}) must divide by the {world} processes.")
    local_minibatch = ppo.minibatch // world  # rollout_batch and minibatch are global, as in the paper
    updates_per_iteration = ppo.ppo_epochs * (ppo.rollout_batch // ppo.minibatch)
    reward_meta = read_meta(reward_dir) if reward_dir else None
    eos_penalty = effective_missing_eos_penalty(ppo, reward_meta)
    if main:
        logger.info("PPO missing-EOS penalty: %.4g score units (%.4g x the RM's SFT-sample score std).",
                    eos_penalty, ppo.missing_eos_penalty)

    # Models, optimizer, controllers; then the last checkpoint, if any.
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    roles, tokenizer, rm_fn, base_name = build_roles(
        cfg, policy_init_dir, reward_dir, device=accelerator.device, need_reward=reward_fn is None
    )
    reward_fn = reward_fn or rm_fn
    optimizer = build_optimizer(roles, ppo)
    ema = EMA(roles.named_policy_parameters(), ppo.ema_decay) if ppo.ema_decay > 0 else None
    kl_ctl = KLController(ppo.kl_beta, ppo.adaptive_kl, ppo.target_kl, horizon=ppo.kl_horizon)
    state = TrainState(kl_beta=kl_ctl.value)
    checkpoint = latest_checkpoint(out_dir)
    if checkpoint is not None:
        _check_resumable(checkpoint, ppo)
        state = load_checkpoint(checkpoint, roles, optimizer, ema)
        kl_ctl.value = state.kl_beta
    model, optimizer = accelerator.prepare(roles, optimizer)  # DDP around the trainable forward when distributed
    ptx_sampler = None
    if ptx_coef > 0:
        ptx_sampler = PretrainSampler(pretrain_texts, tokenizer, ppo.ptx_batch, cfg.sft.max_seq_tokens, accelerator.device)

    log = RunLog(out_dir, state.iteration, enabled=main)
    # The main process trims the validation files of an interrupted run before the others read them.
    tracker = ValidationTracker(out_dir, ppo.collapse_fraction, bool(validation_prompts), writer=True) if main else None
    accelerator.wait_for_everyone()
    tracker = tracker or ValidationTracker(out_dir, ppo.collapse_fraction, bool(validation_prompts), writer=False)
    run_info = {"seed": cfg.seed, "base_model": base_name, "ptx": ptx, "world_size": world, "ppo": asdict(ppo),
                "missing_eos_penalty_score_units": eos_penalty,
                "sft_score_std": (reward_meta or {}).get("sft_score_std"),
                "validation_prompt_list": validation_prompts}
    policy_meta = {"method": "ppo-ptx" if ptx else "ppo", "ema_decay": ppo.ema_decay, "finetune": "lora",
                   "quantize_4bit": cfg.model.quantize_4bit}

    def validate(iteration: int) -> None:
        # Every process generates (sharded engines need all ranks in each forward); the main one records.
        with ema.applied() if ema is not None else contextlib.nullcontext():
            try:
                stats = validate_policy(roles, tokenizer, validation_prompts, cfg, reward_fn, eos_penalty)
            except FloatingPointError as err:
                raise PPODivergence(f"validation: {err}", iteration, latest_checkpoint(out_dir)) from err
            tracker.record(iteration, stats, lambda d: save_policy_dir(
                roles.model, "policy", d, base_name, **policy_meta, iteration=iteration, validation_score=stats["score"]))
        accelerator.wait_for_everyone()

    if tracker.due(state.iteration, ppo.validation_every, ppo.iterations):
        validate(state.iteration)  # iteration 0 (the initial policy), or a point whose validation was interrupted
    stop_reason = None
    bar = tqdm(range(state.iteration + 1, ppo.iterations + 1), initial=state.iteration, total=ppo.iterations,
               desc="PPO-ptx" if ptx else "PPO", unit="it", disable=not (progress and main))
    try:
        for iteration in bar:
            started = time.time()
            seed = _iteration_seed(cfg.seed, iteration, rank)
            torch.manual_seed(seed)
            generator = torch.Generator().manual_seed(seed)
            batch_prompts = iteration_prompts(rollout_prompts, iteration, ppo.rollout_batch, cfg.seed)[rank::world]
            try:
                # Steps 1-6.
                rollout = collect_rollout(roles, tokenizer, batch_prompts, cfg, kl_ctl.value, reward_fn, seed=seed,
                                          missing_eos_penalty=eos_penalty)
                stats = rollout.stats()
                # Divergence and collapse guards read means over all ranks, so every rank stops together.
                kl, entropy, length = accelerator.reduce(torch.tensor(
                    [stats["kl"], stats["entropy"], stats["response_length"]], device=accelerator.device), "mean").tolist()
                if kl > ppo.max_kl:
                    raise FloatingPointError(f"mean sequence KL {kl:.3f} > max_kl {ppo.max_kl}")
                if entropy < ppo.min_entropy:
                    raise FloatingPointError(f"mean token entropy {entropy:.4f} < min_entropy {ppo.min_entropy}")
                now = {"response_length": length, "entropy": entropy}
                start_stats = state.start_stats or now  # the first rollout, before any update
                collapse = collapse_reason(start_stats, now, ppo.collapse_fraction)
                steps: list[dict[str, float]] = []
                if collapse and ppo.collapse_action == "stop":
                    # A collapsed policy is not updated further; the last checkpoint stays the last iterate.
                    stop_reason = f"collapse guard at iteration {iteration}: {collapse}"
                else:
                    # Steps 7-8.
                    if cfg.model.gradient_checkpointing:
                        roles.train()  # HF only checkpoints in train mode; dropout is already zero everywhere
                    steps = ppo_update(
                        model, optimizer, rollout, ppo, local_minibatch, generator, accelerator=accelerator,
                        micro_batch_size=cfg.generation.batch_size, ptx_coef=ptx_coef, ptx_sampler=ptx_sampler,
                        lr_schedule=lambda step, role: learning_rate_at(step, ppo, updates_per_iteration, role),
                        first_step=state.optimizer_steps, ema=ema, update_policy=iteration > ppo.value_warmup_iterations,
                    )
                    roles.eval()
            except FloatingPointError as err:
                if main:
                    (out_dir / "DIVERGED.json").write_text(json.dumps({"iteration": iteration, "reason": str(err)}, indent=1))
                raise PPODivergence(str(err), iteration, latest_checkpoint(out_dir)) from err

            # Step 9: the KL controller; then metrics (averaged over ranks), logs and the checkpoint.
            row = {**stats, **{k: _mean(steps, k) for k in (
                "policy_loss", "value_loss", "ptx_loss", "loss", "approx_kl", "clip_frac", "value_clip_frac",
                "grad_norm", "value_grad_norm", "train_entropy", "ratio_mean")}}
            keys = sorted(row)
            means = accelerator.reduce(torch.tensor([row[k] for k in keys], device=accelerator.device, dtype=torch.float64), "mean")
            row = dict(zip(keys, means.tolist(), strict=True))
            if world > 1:  # distinct over the whole batch, not a mean of per-process shares
                from accelerate.utils import gather_object

                row["distinct_fraction"] = distinct_fraction(gather_object(list(rollout.responses)))
            elapsed = time.time() - started
            row.update(iteration=iteration, episodes=iteration * ppo.rollout_batch, time_s=elapsed,
                       episodes_per_s=ppo.rollout_batch / elapsed, lr=steps[-1]["lr"] if steps else float("nan"),
                       kl_beta=kl_ctl.value, collapsed=collapse is not None)
            if stop_reason is not None:
                log.write(row, rollout, samples_per_iteration)  # the collapsed rollout is kept for inspection
                warnings.warn(f"PPO stopped by the {stop_reason}; the policy after iteration {state.iteration} is the "
                              "last iterate.", stacklevel=2)
                break
            kl_ctl.update(row["kl"], ppo.rollout_batch)
            row["kl_beta"] = kl_ctl.value
            state = TrainState(iteration=iteration, optimizer_steps=state.optimizer_steps + len(steps), kl_beta=kl_ctl.value,
                               start_stats=start_stats)
            log.write(row, rollout, samples_per_iteration)
            if main:
                save_checkpoint(out_dir, roles, optimizer, state, ema, run_info)
                bar.set_postfix(score=f"{row['score']:.3f}", kl=f"{row['kl']:.3f}")
            accelerator.wait_for_everyone()
            if tracker.due(iteration, ppo.validation_every, ppo.iterations):
                validate(iteration)
    finally:
        bar.close()
        log.close()

    if validation_prompts:
        chosen, selection = tracker.selection()
        chosen_dir = tracker.best_dir if chosen is not None and chosen == tracker.best_iteration else None
        if chosen_dir is None:
            chosen = state.iteration
            selection = f"{selection}; the last iterate (iteration {state.iteration}) is exported"
    else:
        chosen, chosen_dir = state.iteration, None
        selection = "validation off ([ppo] validation_prompts = 0): the last iterate is exported"
    policy_dir, value_dir = out_dir / "policy", out_dir / "value"
    if main:
        meta = {**policy_meta, "iterations": state.iteration, "chosen_iteration": chosen, "selection": selection}
        export_run(roles, ema, out_dir, base_name, meta, chosen_dir=chosen_dir)
        collapsed = [int(r["iteration"]) for r in log.rows() if r.get("collapsed", 0.0) > 0]
        (out_dir / "result.json").write_text(json.dumps({
            **run_info, "iterations_done": state.iteration, "chosen_iteration": chosen, "selection": selection,
            "stop_reason": stop_reason, "collapsed_iterations": collapsed,
        }, indent=1))
    accelerator.wait_for_everyone()
    return PPOResult(out_dir=out_dir, policy_dir=policy_dir, value_dir=value_dir, metrics_csv=log.metrics,
                     samples_jsonl=log.samples, tensorboard_dir=log.tensorboard, iterations=state.iteration,
                     metrics=log.rows(), chosen_iteration=chosen, selection=selection, stop_reason=stop_reason,
                     validation_csv=tracker.csv if validation_prompts else None, missing_eos_penalty=eos_penalty)


# ============================================================================================
# The stage (notebook 04 and run_all)
# ============================================================================================


def run_ppo_stage(cfg: StudyConfig, paths, progress: bool = True) -> Path:
    """PPO and PPO-ptx from the PPO initialisation against the trained RM; cached per fingerprint.

    Writes ppo/ and ppo_ptx/ (policy, value, metrics.csv, samples.jsonl, tensorboard/). Each run
    trains in runs/<preset>/work-ppo-<fp>/ first, so an interrupted run resumes from its last
    checkpoint; only finished runs are published.
    """
    from rlhf_lib.data.study import StudyData
    from rlhf_lib.pipeline import cached_stage, is_main_process, wait_for_all_processes

    data = StudyData.load(paths.require("data") / "study")
    init_dir = paths.require("sft") / "ppo_init"
    reward_dir = paths.require("reward") / "model"
    prompts = list(data.split("ppo")["prompt"])
    pretrain = list(data.pretrain["text"])
    work = paths.root / f"work-ppo-{cfg.fingerprint('ppo')}"
    with cached_stage(paths, "ppo") as stage:
        if not stage.done:
            for name, ptx in (("ppo", False), ("ppo_ptx", True)):
                # Under torchrun/accelerate launch every process trains (accelerate DDP); the main one writes.
                train_ppo(cfg, init_dir, reward_dir, prompts, pretrain, work / name, ptx=ptx,
                          progress=progress, samples_per_iteration=cfg.ppo.rollout_batch)
                if is_main_process():  # the chosen best-* copy is published as policy/
                    shutil.copytree(work / name, stage.dir / name,
                                    ignore=shutil.ignore_patterns(f"{CHECKPOINT_PREFIX}*", "best-*"))
                wait_for_all_processes()
    if is_main_process():
        shutil.rmtree(work, ignore_errors=True)
    return paths.stage("ppo")


def guard_and_selection(run_dir: str | Path) -> dict[str, Any]:
    """What the collapse guard and the checkpoint choice did in a finished run (its result.json), one flat dict:
    iterations trained, whether and why the guard stopped it, which iterations it flagged, the exported
    (chosen) iteration and why, the missing-EOS penalty in score units and the last KL beta."""
    run_dir = Path(run_dir)
    result = json.loads((run_dir / "result.json").read_text())
    metrics = list(csv.DictReader((run_dir / "metrics.csv").open())) if (run_dir / "metrics.csv").exists() else []
    collapsed = result.get("collapsed_iterations", [])
    return {
        "iterations_trained": result.get("iterations_done"),
        "guard_fired": bool(collapsed or result.get("stop_reason")),
        "stopped_by_guard": result.get("stop_reason"),
        "collapsed_iterations": ", ".join(map(str, collapsed)) or "none",
        "chosen_iteration": result.get("chosen_iteration"),
        "selection": result.get("selection"),
        "missing_eos_penalty": result.get("missing_eos_penalty_score_units"),
        "kl_beta_last": float(metrics[-1]["kl_beta"]) if metrics else float("nan"),
    }


def score_trend(samples: pd.DataFrame, column: str = "rm_score", n_resamples: int = 1000, seed: int = 0) -> MetricResult:
    """How much `column` of the logged rollouts changed per iteration, within prompts, with a 95% interval.

    Each iteration draws other prompts, and prompts differ far more in score than PPO moves it in a few
    iterations, so a plain first-vs-last comparison mostly measures which prompts were drawn. Here every
    prompt seen in two or more iterations is compared with itself: the slope of (score - the prompt's mean)
    on (iteration - the prompt's mean iteration), pooled over prompts. The bootstrap resamples prompts,
    keeping each prompt's episodes together. `samples` is a run's samples.jsonl as a DataFrame.
    Returns an `evaluation.base.MetricResult` (value in score units per iteration; n = prompts used).
    """
    import numpy as np
    import pandas as pd

    from rlhf_lib.evaluation.base import summarize

    frame = samples[["prompt", "iteration", column]].dropna()
    groups = frame.groupby("prompt")
    x = frame["iteration"] - groups["iteration"].transform("mean")
    y = frame[column] - groups[column].transform("mean")
    per_prompt = pd.DataFrame({"prompt": frame["prompt"], "xy": x * y, "xx": x * x}).groupby("prompt")[["xy", "xx"]].sum()
    per_prompt = per_prompt[per_prompt["xx"] > 0]  # prompts seen in one iteration only carry no slope
    return summarize(np.asarray(per_prompt, dtype=float), "ratio_of_sums", n_resamples=n_resamples, seed=seed)


def response_diversity(samples: pd.DataFrame) -> pd.DataFrame:
    """Per iteration: how many different responses the policy gave, and its most common one.

    A rising RM score means better answers only while the answers stay varied. A policy that answers
    most prompts with one string (say "No") has found what the reward model over-scores: reward hacking
    (over-optimisation), which the RM score alone cannot show. `samples` is a run's samples.jsonl as a
    DataFrame; responses are compared after stripping whitespace. Returns one row per iteration with
    `episodes`, `distinct_share` (distinct responses / episodes), `top_response` and `top_share` (its
    share of the episodes).
    """
    import pandas as pd

    rows = []
    for iteration, group in samples.groupby("iteration", sort=True):
        responses = group["response"].fillna("").astype(str).str.strip()
        counts = responses.value_counts()
        rows.append({
            "iteration": int(iteration), "episodes": len(responses), "distinct_share": counts.size / len(responses),
            "top_response": counts.index[0], "top_share": counts.iloc[0] / len(responses),
        })
    return pd.DataFrame(rows).set_index("iteration")
