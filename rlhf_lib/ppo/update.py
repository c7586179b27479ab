"""Steps 7-9 of a PPO iteration: epochs of clipped updates over minibatches, and the policy's EMA.

    optimizer = build_optimizer(roles, cfg.ppo)     # AdamW: a "policy" and a "value" parameter group
    history = ppo_update(roles, optimizer, rollout, cfg.ppo, minibatch_size, generator,
                         ptx_coef=0.0, lr_schedule=..., ema=None)   # one stats dict per optimizer step

loss = policy loss + value_loss_coef * value loss (+ ptx_coef * LM loss on pretraining text, PPO-ptx), the
gradient clipped per parameter group; during the critic warm-up only the value function learns.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from rlhf_lib.config import PPOConfig
from rlhf_lib.ppo.core import masked_mean, policy_loss, value_loss
from rlhf_lib.ppo.roles import PolicyValueRoles
from rlhf_lib.ppo.rollout import PretrainSampler, Rollout, trim_left_padding

ADAM_EPS = 1e-5  # as in the PPO reference implementations


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


def _policy_term(logprobs: torch.Tensor, rollout: Rollout, rows: torch.Tensor, ppo: PPOConfig) -> torch.Tensor:
    """The clipped policy loss of rollout rows `rows`, given their new log-probs."""
    return policy_loss(logprobs, rollout.logprobs[rows], rollout.advantages[rows], rollout.response_mask[rows],
                       ppo.clip_range)[0]


def _value_term(values: torch.Tensor, rollout: Rollout, rows: torch.Tensor, ppo: PPOConfig) -> torch.Tensor:
    """value_loss_coef times the clipped value loss of rollout rows `rows`, given their new values."""
    return ppo.value_loss_coef * value_loss(values, rollout.values[rows], rollout.returns[rows],
                                            rollout.response_mask[rows], ppo.value_clip_range)[0]


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
    backward_per_network: bool | None = None,
) -> list[dict[str, float]]:
    """Step 7 (+8): `ppo_epochs` passes over shuffled minibatches; one optimizer step per minibatch.

    loss = policy loss + value_loss_coef * value loss (+ ptx_coef * LM loss on pretraining text).
    update_policy=False (the critic warm-up) trains the value function alone: the policy's parameter
    group (`role` "policy", see build_optimizer) takes no step and keeps no optimizer state.
    `model` is PolicyValueRoles, possibly wrapped by accelerate/DDP. A minibatch larger than
    `micro_batch_size` rows is run in pieces whose gradients add up to the whole minibatch's (each piece's
    loss is weighted by its share of the minibatch's tokens). Returns one stats dict per optimizer step.
    Raises FloatingPointError on a non-finite loss (on every rank at once) before the step is taken.
    backward_per_network (default: in one process) backpropagates the policy's loss (with PPO-ptx's) before the
    value's forward: the same gradients, with one network's activations held at a time instead of both. DDP needs
    the joint forward of `model` (every trainable parameter in one call), so it is refused there.
    """
    input_ids, attention_mask = rollout.input_ids, rollout.attention_mask
    response_len = rollout.response_ids.shape[1]
    policy_group = [g for g in optimizer.param_groups if g.get("role") == "policy"]
    if not update_policy and not policy_group:
        raise ValueError("update_policy=False needs an optimizer whose policy group has role 'policy' (build_optimizer).")
    distributed = accelerator is not None and accelerator.num_processes > 1
    backward_per_network = not distributed if backward_per_network is None else backward_per_network
    if distributed and backward_per_network:
        raise ValueError("backward_per_network needs one process: DDP runs one forward over every network.")
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
                ids, ids_mask = trim_left_padding(input_ids[piece], attention_mask[piece])
                share = rollout.response_mask[piece].sum() / minibatch_tokens  # of the minibatch's tokens
                if backward_per_network:
                    # The policy and the value are separate networks on one frozen base, so each loss is
                    # backpropagated right after its own forward: one network's activations are held at a time.
                    roles = accelerator.unwrap_model(model) if accelerator is not None else model
                    backward = accelerator.backward if accelerator is not None else torch.Tensor.backward
                    with torch.set_grad_enabled(update_policy):  # the critic warm-up: the policy's statistics only
                        logprobs, entropy = roles.policy_logprobs(ids, ids_mask, response_len)
                        loss = share * _policy_term(logprobs, rollout, piece, ppo)
                        if ptx_ids is not None and last:
                            ptx = roles.ptx_loss(ptx_ids, ptx_mask)
                            loss = loss + ptx_coef * ptx
                    if update_policy:
                        backward(loss)
                    finite = finite and bool(torch.isfinite(loss))
                    values = roles.values(ids, ids_mask, response_len)
                    loss = share * _value_term(values, rollout, piece, ppo)
                    backward(loss)
                    finite = finite and bool(torch.isfinite(loss))
                else:
                    # DDP all-reduces gradients on the last piece's backward only.
                    sync = contextlib.nullcontext() if last or accelerator is None else accelerator.no_sync(model)
                    with sync:
                        logprobs, entropy, values, piece_ptx = model(
                            ids, ids_mask, response_len, ptx_ids if last else None, ptx_mask if last else None,
                        )
                        # In the critic warm-up the policy term stays in the graph with weight 0: DDP expects a
                        # gradient (here zero) for every trainable parameter.
                        policy_weight = float(update_policy)
                        loss = share * (policy_weight * _policy_term(logprobs, rollout, piece, ppo)
                                        + _value_term(values, rollout, piece, ppo))
                        if piece_ptx is not None:
                            ptx = piece_ptx
                            loss = loss + ptx_coef * piece_ptx
                        finite = finite and bool(torch.isfinite(loss))
                        # Backward even when non-finite: other DDP ranks wait for this all-reduce.
                        if accelerator is not None:
                            accelerator.backward(loss)
                        else:
                            loss.backward()
                outputs.append((logprobs.detach(), entropy.detach(), values.detach()))

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
