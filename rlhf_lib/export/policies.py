"""The policies (SFT, PPO, PPO-ptx) with their LoRA merged, as plain transformers causal-LM checkpoints."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from rlhf_lib import models
from rlhf_lib.artifacts import read_meta

# --------------------------------------------------------------------------------------------
# Policies
# --------------------------------------------------------------------------------------------


def merged_policy(policy_dir: Path) -> tuple[torch.nn.Module, Any]:
    """(causal LM with the policy's LoRA merged into its weights, tokenizer), float32 on CPU.

    A 4-bit study's adapter is merged into the full-precision base: merging into 4-bit weights would
    re-quantise them (lossy); the card says so.
    """
    from peft import PeftModel

    meta = read_meta(policy_dir)
    tokenizer = models.load_tokenizer(meta["base_model"])
    if meta.get("finetune", "lora") == "full":
        return models.load_causal_lm(str(policy_dir), device="cpu", dtype="float32"), tokenizer
    base = models.load_causal_lm(meta["base_model"], device="cpu", dtype="float32", quantize_4bit=False)
    return PeftModel.from_pretrained(base, str(policy_dir)).merge_and_unload(), tokenizer


def with_saved_settings(tokenizer, **settings: Any):
    """A copy of `tokenizer` with `settings` that survive save_pretrained (it writes only init kwargs)."""
    tokenizer = copy.deepcopy(tokenizer)
    for key, value in settings.items():
        setattr(tokenizer, key, value)
        tokenizer.init_kwargs[key] = value
    return tokenizer


def export_policy(policy_dir: Path, out_dir: Path) -> Path:
    """Save one policy as a standard checkpoint (safetensors + config + generation config + tokenizer)."""
    model, tokenizer = merged_policy(policy_dir)
    tokenizer = with_saved_settings(tokenizer, padding_side="left")  # batched generation needs left padding
    with models.atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out_dir


