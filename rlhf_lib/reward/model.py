"""The reward model: the SFT model with a scalar head read at the final token (artifacts.RewardModel), built new."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from rlhf_lib import models
from rlhf_lib.artifacts import META, RewardModel, load_policy  # RewardModel re-exported: its old path
from rlhf_lib.config import StudyConfig

# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


def new_reward_model(cfg: StudyConfig, init_dir: Path | str | None = None, trainable: bool = True) -> RewardModel:
    """An untrained RM, dropout off: the SFT policy in `init_dir` (the paper) or the preset's base with a fresh
    LoRA, plus a fresh scalar head. `trainable=False` freezes the body (the cached-head path trains the head only)."""
    if init_dir is not None:
        body, tokenizer = load_policy(init_dir, trainable=trainable)
        name = json.loads((Path(init_dir) / META).read_text())["base_model"]
    else:
        name = cfg.model.reward_model_name or cfg.model.name
        body = models.load_causal_lm(name, device=cfg.model.device, dtype=cfg.model.dtype, quantize_4bit=cfg.model.quantize_4bit)
        if cfg.model.finetune == "lora":
            body = models.lora_from_config(body, cfg.model)  # "default": saved straight into adapter/
        tokenizer = models.load_tokenizer(name)
        if not trainable:
            body.requires_grad_(False)
    body.eval()  # no dropout in a reward model
    device = next(body.parameters()).device
    torch.manual_seed(cfg.seed)
    head = models.ScalarHead(models.hidden_size_of(body)).to(device)
    layer = layer_index(body, cfg.reward.feature_layers[-1])
    return RewardModel(body, head, tokenizer, name, 0.0, cfg.reward.max_seq_tokens, layer, cfg.reward.pooling)


def layer_index(model: torch.nn.Module, depth: float) -> int:
    """Index into `hidden_states` of the block at `depth` (a fraction of the model's blocks; 1.0 = the last)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return max(1, round(depth * config.num_hidden_layers))



def _add_meta(model_dir: Path, **values: Any) -> None:
    meta_path = Path(model_dir) / META
    meta = json.loads(meta_path.read_text())
    meta.update(values)
    from rlhf_lib.io import atomic_write_text

    atomic_write_text(meta_path, json.dumps(meta, indent=1))


