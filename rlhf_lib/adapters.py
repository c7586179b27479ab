"""Adapter artifacts on disk, and one frozen base that carries several LoRA roles (used by rlhf_lib.ppo).

Two artifact formats connect the stages (SFT -> RM -> PPO -> evaluation); rlhf_lib.sft and
rlhf_lib.reward write them, and PPO writes its outputs in the same formats:

    <policy dir>/                    an SFT or PPO policy (rlhf_lib.sft.load_policy reads it)
        adapter_config.json          peft `save_pretrained` of one LoRA adapter
        adapter_model.safetensors
        meta.json                    {"base_model": "<registry name or Hub id>", "finetune": "lora", ...}

    <reward dir>/                    a reward model (rlhf_lib.reward.RewardModel.load reads it)
        adapter/                     peft `save_pretrained` of its LoRA adapter
        head.safetensors             models.ScalarHead.save
        meta.json                    {"base_model": "<name>", "bias": <float>, "finetune": "lora", ...}

RM score = head(hidden states of the RM's layer, pooled as its meta.json says: the last token's, or the mean
over the response's tokens) - bias, exactly as rlhf_lib.reward computes it (`score_token_ids`).

Several roles on ONE frozen base::

    peft_model = attach_adapter(base, sft_dir, "policy", trainable=True)
    attach_adapter(peft_model, sft_dir, "reference", trainable=False)
    with use_adapter(peft_model, "reference"): ...            # trainability restored on exit

peft's `set_adapter` (and `disable_adapter`) make the active adapter trainable and every other adapter
frozen. With roles that must stay trainable while inactive (policy and value), that would silently stop
their gradients or, worse, unfreeze the reference. `use_adapter` therefore re-applies the trainability
recorded by `attach_adapter` after every switch.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlhf_lib import models

META = "meta.json"  # the same names as rlhf_lib.sft / rlhf_lib.reward
RM_ADAPTER = "adapter"
RM_HEAD = "head.safetensors"
TRAINABLE_ATTR = "_rlhf_trainable_adapters"  # set on the PeftModel: names of adapters that train


# --------------------------------------------------------------------------------------------
# Metadata and saving
# --------------------------------------------------------------------------------------------


def read_meta(directory: str | Path) -> dict[str, Any]:
    """meta.json of a policy or reward directory, with a clear error when it is not one."""
    path = Path(directory) / META
    if not path.exists():
        raise FileNotFoundError(f"{directory} has no {META}: not a policy/reward directory written by rlhf_lib.")
    meta = json.loads(path.read_text())
    if "base_model" not in meta:
        raise ValueError(f"{path} lacks 'base_model'.")
    return meta


def is_reward_dir(directory: str | Path) -> bool:
    directory = Path(directory)
    return (directory / RM_ADAPTER).is_dir() and (directory / RM_HEAD).exists()


@contextmanager
def _atomic_dir(final: Path) -> Iterator[Path]:
    """Write into a temporary sibling, then swap it into place (a reader never sees half a directory)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        yield tmp
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _save_one_adapter(peft_model, adapter_name: str, out_dir: Path) -> None:
    """peft writes a non-default adapter into a sub-folder named after it; flatten that."""
    peft_model.save_pretrained(str(out_dir), selected_adapters=[adapter_name])
    nested = out_dir / adapter_name
    if adapter_name != "default" and nested.is_dir():
        for item in nested.iterdir():
            os.replace(item, out_dir / item.name)
        nested.rmdir()


def save_policy_dir(peft_model, adapter_name: str, out_dir: str | Path, base_model: str, **meta: Any) -> Path:
    """Save one adapter of `peft_model` as a policy directory (peft files + meta.json), atomically."""
    out_dir = Path(out_dir)
    with _atomic_dir(out_dir) as tmp:
        _save_one_adapter(peft_model, adapter_name, tmp)
        (tmp / META).write_text(json.dumps({"base_model": base_model, "finetune": "lora", **meta}, indent=1))
    return out_dir


def save_reward_dir(
    peft_model, adapter_name: str, head: models.ScalarHead, out_dir: str | Path, base_model: str, bias: float, **meta: Any
) -> Path:
    """Save an adapter + scalar head as a reward (or value) directory, atomically."""
    out_dir = Path(out_dir)
    with _atomic_dir(out_dir) as tmp:
        (tmp / RM_ADAPTER).mkdir()
        _save_one_adapter(peft_model, adapter_name, tmp / RM_ADAPTER)
        head.save(tmp / RM_HEAD)
        meta = {"base_model": base_model, "bias": float(bias), "finetune": "lora", **meta}
        (tmp / META).write_text(json.dumps(meta, indent=1))
    return out_dir


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
    """requires_grad = True exactly on the adapters recorded as trainable; everything else frozen."""
    trainable = getattr(peft_model, TRAINABLE_ATTR, set())
    adapters = list(peft_model.peft_config)
    for name, param in peft_model.named_parameters():
        param.requires_grad_(_adapter_of(name, adapters) in trainable)


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
