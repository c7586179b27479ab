"""Steps 1-6 of a PPO iteration: sample responses, score them, and turn them into advantages.

    rollout = collect_rollout(roles, tokenizer, prompts, cfg, kl_beta, seed=seed, missing_eos_penalty=penalty)
    rollout.advantages, rollout.returns   # what ppo_update (rlhf_lib.ppo.update) trains on
    rollout.stats()                       # the iteration's metrics: RM score, KL, entropy, length, ...
    validate_policy(roles, tokenizer, held_out_prompts, cfg, reward_fn, penalty)   # greedy, scored as paid

 1. rollout   sample a response per prompt from the policy at the rollout temperature; left-padded
              queries, responses truncated after the first EOS (rlhf_lib.generation.generate).
 2. logprobs  log pi(token) of every response token under the policy and the frozen reference with the SAME
              temperature (logits / T), and the value of every state. The policy's are recomputed by a forward
              over the sampled text, or taken from the sampler (`ppo.logprobs_from_sampler`, as TRL does).
 3. score     RM score of (prompt, response) read at the last token (EOS); minus `missing_eos_penalty` x
              the RM's `sft_score_std` (meta.json) when the response hit the length limit without EOS.
 4-6.         per-token rewards, GAE, advantage whitening (rlhf_lib.ppo.core).

`PretrainSampler` draws the pretraining batches of PPO-ptx.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from rlhf_lib.config import PPOConfig, StudyConfig
from rlhf_lib.generation import Generated, generate, prefill_chunks
from rlhf_lib.models import adapter_merged
from rlhf_lib.ppo.core import explained_variance, gae, masked_mean, masked_whiten, per_token_rewards
from rlhf_lib.ppo.roles import PolicyValueRoles, RewardFn
from rlhf_lib.prompting import format_prompt


def distinct_fraction(texts: Sequence[str]) -> float:
    """Share of distinct responses (compared after stripping whitespace): 1 = all different, 1/n = one answer."""
    if not texts:
        return float("nan")
    return len({t.strip() for t in texts}) / len(texts)


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

    def per_token(name):  # the sampler's per-token statistics, 0 on the padding added here
        parts = [getattr(c, name) for c in chunks]
        return None if any(part is None for part in parts) else torch.cat([right(part, lr, 0.0) for part in parts])

    return Generated(
        query_ids=torch.cat([left(c.query_ids, lq, pad_id) for c in chunks]),
        query_mask=torch.cat([left(c.query_mask, lq, 0) for c in chunks]),
        response_ids=torch.cat([right(c.response_ids, lr, pad_id) for c in chunks]),
        response_mask=torch.cat([right(c.response_mask, lr, 0) for c in chunks]),
        ended_with_eos=torch.cat([c.ended_with_eos for c in chunks]),
        texts=[t for c in chunks for t in c.texts],
        token_logprobs=per_token("token_logprobs"),
        token_entropy=per_token("token_entropy"),
    )


def trim_left_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the leading columns that are padding in every row (left padding was set by the longest prompt
    of the whole batch). Position ids come from the mask, so the outputs are unchanged; the matmuls shrink."""
    first = int(attention_mask.any(0).float().argmax())
    return input_ids[:, first:], attention_mask[:, first:]


def _chunked(fn: Callable[..., Any], token_budget: int, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
    """fn(ids, mask) over chunks of rows of similar length (`prefill_chunks`: rows x longest sequence within
    `token_budget`), each trimmed of its shared left padding; results put back in row order. Rows in their own order
    pad every chunk to its longest prompt: at 16 rows of the bench's prompt mix the rollout's three forwards took
    1.43x as long (bench/results/rollout_bench.md)."""
    widths = attention_mask.shape[1] - attention_mask.float().argmax(dim=1)  # from the first real token to the end
    chunks = prefill_chunks(widths.tolist(), token_budget)
    outs = [fn(*trim_left_padding(input_ids[rows], attention_mask[rows])) for rows in chunks]
    restore = torch.argsort(torch.tensor([row for rows in chunks for row in rows]))

    def in_row_order(parts):
        return torch.cat(parts)[restore.to(parts[0].device)]

    if isinstance(outs[0], tuple):
        return tuple(in_row_order(parts) for parts in zip(*outs, strict=True))
    return in_row_order(outs)


def _guard_finite(name: str, tensor: torch.Tensor) -> None:
    if not torch.isfinite(tensor).all():
        raise FloatingPointError(f"non-finite {name}")


def _sample_responses(
    roles: PolicyValueRoles, tokenizer, prompts: Sequence[str], cfg: StudyConfig, temperature: float, seed: int
) -> Generated:
    """The policy's responses to raw prompts (temperature 0 = greedy): decoded generation.decode_batch_size rows at
    a time, their prompts read in chunks of generation.prefill_tokens (`generate`)."""
    gen = cfg.generation
    formatted = [format_prompt(tokenizer, p) for p in prompts]
    chunks = []
    # The policy's LoRA merged into the weights once per rollout: no adapter matmuls per token.
    with roles.role("policy") as policy, adapter_merged(policy) as sampler:
        for index, start in enumerate(range(0, len(formatted), gen.decode_batch_size)):
            chunks.append(  # raises FloatingPointError on non-finite sampling probabilities
                generate(
                    sampler, tokenizer, formatted[start : start + gen.decode_batch_size],
                    max_new_tokens=gen.max_new_tokens, temperature=temperature, top_p=1.0,
                    generator_seed=seed * 1_000 + index if temperature > 0 else None,  # greedy: leave the RNG alone
                    prefill_tokens=gen.prefill_tokens,
                )
            )
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
        rm_scores = _chunked(lambda i, m: roles.reward_scores(i, m, response_len), cfg.ppo.forward_tokens,
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
    budget = ppo.forward_tokens
    penalty = ppo.missing_eos_penalty if missing_eos_penalty is None else missing_eos_penalty

    # 1. rollout: pure temperature sampling (top_p 1, top_k 0), so step 2's probabilities are the sampling ones.
    # Prompts are not cut here: the data stage already bounds their length, as for every other policy sample.
    sampled = _sample_responses(roles, tokenizer, prompts, cfg, gen.temperature, seed)
    input_ids = torch.cat([sampled.query_ids, sampled.response_ids], dim=1)
    attention_mask = torch.cat([sampled.query_mask, sampled.response_mask], dim=1)
    mask = sampled.response_mask.float()
    response_len = sampled.response_ids.shape[1]

    # 2. logprobs under the policy and the reference (same temperature), and values, masked. The policy's are the
    # sampler's own where ppo.logprobs_from_sampler says so (as TRL's PPOTrainer takes them): one forward fewer.
    if ppo.logprobs_from_sampler:
        logprobs, entropy = sampled.token_logprobs, sampled.token_entropy
    else:
        logprobs, entropy = _chunked(lambda i, m: roles.policy_logprobs(i, m, response_len), budget, input_ids,
                                     attention_mask)
    ref_logprobs = _chunked(lambda i, m: roles.reference_logprobs(i, m, response_len), budget, input_ids, attention_mask)
    values = _chunked(lambda i, m: roles.values(i, m, response_len), budget, input_ids, attention_mask)
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
