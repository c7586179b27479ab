"""The PPO math of InstructGPT (Ouyang et al. 2022, appendix C.4), as pure tensor functions, in the paper's order.

Every tensor is [B, L] over the response tokens of B episodes, with `mask` 1 on the valid tokens (up to and
including EOS). One PPO iteration, written with these functions::

    logprobs, entropy = logprobs_and_entropy(policy_logits, tokens, T)   # log pi(y_t) at the sampling temperature
    ref_logprobs, _ = logprobs_and_entropy(reference_logits, tokens, T)  # log pi_SFT(y_t), frozen
    rewards, kl = per_token_rewards(logprobs, ref_logprobs, rm_scores, mask, kl_beta)
        # r_t = -beta * (log pi - log pi_SFT), the RM score added at the last token (EOS)
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    advantages = masked_whiten(advantages, mask)                        # mean 0, std 1 over valid tokens
    # then, for each minibatch, with the policy's new logprobs and values:
    loss = policy_loss(new_logprobs, logprobs, advantages, mask, clip)[0] \
        + value_coef * value_loss(new_values, values, returns, mask, value_clip)[0]
    kl_controller.update(kl.sum(1).mean().item(), episodes)             # adaptive beta (optional)

`learning_rate_at` is the schedule (linear warm-up, then constant); `explained_variance` says how well
the value function predicts the returns. Each function is tested on a hand-computed toy in tests/test_ppo.py;
notebook 04 runs `per_token_rewards` and `gae` on a five-token episode.
"""

from __future__ import annotations

import torch

from rlhf_lib.config import PPOConfig

KL_HORIZON = 10_000  # adaptive-KL horizon in episodes (Ziegler et al. 2019)


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
