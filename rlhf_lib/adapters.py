"""One frozen base that carries several LoRA roles (used by rlhf_lib.ppo.roles), and scoring on token ids.

Several roles on ONE frozen base::

    peft_model = attach_adapter(base, sft_dir, "policy", trainable=True)
    attach_adapter(peft_model, sft_dir, "reference", trainable=False)
    with use_adapter(peft_model, "reference"): ...            # trainability restored on exit
    score_token_ids(peft_model, head, input_ids, attention_mask, bias)   # the RM score, as RewardModel's

peft's `set_adapter` (and `disable_adapter`) make the active adapter trainable and every other adapter
frozen. With roles that must stay trainable while inactive (policy and value), that would silently stop
their gradients or, worse, unfreeze the reference. `use_adapter` therefore re-applies the trainability
recorded by `attach_adapter` after every switch.

The directory formats (policy dir, reward dir) and their savers and loaders are in rlhf_lib.artifacts; the
names below them are re-exported here for code written against this module.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from rlhf_lib import models
from rlhf_lib.artifacts import (  # re-exported: their home before rlhf_lib.artifacts
    META,
    RM_ADAPTER,
    RM_HEAD,
    is_reward_dir,
    read_meta,
    save_policy_dir,
    save_reward_dir,
)

TRAINABLE_ATTR = "_rlhf_trainable_adapters"  # set on the PeftModel: names of adapters that train
FROZEN_ATTR = "_rlhf_frozen_parameters"  # set on the PeftModel: parameters of trainable adapters that stay frozen


# --------------------------------------------------------------------------------------------
# Several adapters on one base
# --------------------------------------------------------------------------------------------


def _adapter_of(param_name: str, adapters: Sequence[str]) -> str | None:
    """Which adapter a peft parameter belongs to: names look like `...q_proj.lora_A.<adapter>.weight`.

    Only the component right after a `lora_*` component counts, so an adapter named like a module
    (`value` in some architectures) is never confused with one.
    """
    parts = param_name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.startswith("lora_") and parts[i + 1] in adapters:
            return parts[i + 1]
    return None


def apply_trainability(peft_model) -> None:
    """requires_grad = True exactly on the adapters recorded as trainable (less the parameters `freeze_blocks_from`
    recorded); everything else frozen."""
    trainable = getattr(peft_model, TRAINABLE_ATTR, set())
    frozen = getattr(peft_model, FROZEN_ATTR, frozenset())
    adapters = list(peft_model.peft_config)
    for name, param in peft_model.named_parameters():
        param.requires_grad_(_adapter_of(name, adapters) in trainable and name not in frozen)


def freeze_blocks_from(peft_model, adapter: str, first_block: int) -> int:
    """Keep adapter `adapter`'s weights in blocks `first_block` and above frozen from now on (returns how many
    tensors). For a head that reads hidden_states[first_block]: those blocks cannot change what it reads, so their
    gradient is exactly zero, and they no longer run (rlhf_lib.models.hidden_layer); DistributedDataParallel
    expects a gradient for every trainable parameter."""
    adapters = list(peft_model.peft_config)
    frozen = set(getattr(peft_model, FROZEN_ATTR, frozenset()))
    for name, _ in peft_model.named_parameters():
        block = re.search(r"\.layers\.(\d+)\.", name)
        if block and int(block.group(1)) >= first_block and _adapter_of(name, adapters) == adapter:
            frozen.add(name)
    setattr(peft_model, FROZEN_ATTR, frozenset(frozen))
    apply_trainability(peft_model)
    return len(frozen)


def attach_adapter(model, adapter_dir: str | Path | None, name: str, trainable: bool, lora_config=None):
    """Add adapter `name` to `model` (a base model, or a PeftModel that already carries others).

    `adapter_dir` is a peft directory to load; None creates a fresh adapter from `lora_config`
    (peft initialises LoRA's B to zero, so a fresh adapter starts equal to the base).
    Returns the PeftModel. A 4-bit base is prepared for k-bit training first.
    """
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

    if not isinstance(model, PeftModel):
        if getattr(model, "is_loaded_in_4bit", False):
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        if adapter_dir is not None:
            model = PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=name, is_trainable=trainable)
        else:
            model = get_peft_model(model, lora_config, adapter_name=name)
    elif adapter_dir is not None:
        model.load_adapter(str(adapter_dir), adapter_name=name, is_trainable=trainable)
    else:
        model.add_adapter(name, lora_config)
    roles = set(getattr(model, TRAINABLE_ATTR, set()))
    roles.discard(name)
    if trainable:
        roles.add(name)
    setattr(model, TRAINABLE_ATTR, roles)
    # peft does not switch the active adapter on load; keep the first one active and re-apply flags.
    model.set_adapter(model.active_adapter)
    apply_trainability(model)
    return model


@contextmanager
def use_adapter(peft_model, name: str | None) -> Iterator[None]:
    """Run the block with adapter `name` active (None: the bare base, adapters disabled).

    Restores the previously active adapter and the recorded trainability on exit, because peft's
    `set_adapter`/`disable_adapter` flip `requires_grad` of every adapter as a side effect.
    """
    previous = peft_model.active_adapter
    try:
        if name is None:
            with peft_model.disable_adapter():
                apply_trainability(peft_model)
                yield
        else:
            peft_model.set_adapter(name)
            apply_trainability(peft_model)
            yield
    finally:
        peft_model.set_adapter(previous)
        apply_trainability(peft_model)


def freeze_dropout(model: nn.Module) -> None:
    """Dropout off everywhere (PPO's ratios and values assume a deterministic network)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


def score_token_ids(
    model, head: models.ScalarHead, input_ids: torch.Tensor, attention_mask: torch.Tensor, bias: float = 0.0,
    response_len: int | None = None, layer: int = -1, pooling: str = "last",
) -> torch.Tensor:
    """RM score [B] of [query | response] rows (the response in the last `response_len` columns), exactly as
    rlhf_lib.reward scores text: head(pooled hidden states of layer `layer`) - bias (see models.pool_states)."""
    hidden = models.hidden_layer(model, input_ids, attention_mask, layer)
    response_mask = torch.zeros_like(attention_mask)
    if response_len:
        response_mask[:, -response_len:] = 1
    pooled = models.pool_states(hidden, attention_mask, response_mask, pooling)
    return head(pooled.to(head.linear.weight.dtype)) - bias


__all__ = [
    "FROZEN_ATTR", "META", "RM_ADAPTER", "RM_HEAD", "TRAINABLE_ATTR", "apply_trainability", "attach_adapter",
    "freeze_blocks_from", "freeze_dropout",
    "is_reward_dir", "read_meta", "save_policy_dir", "save_reward_dir", "score_token_ids", "use_adapter",
]
