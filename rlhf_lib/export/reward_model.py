"""The reward model as `AutoModelForSequenceClassification`, when the standard class can give our scores exactly.

A head on the last layer's final token becomes `score` (the bias as `rlhf_score_offset` in config.json); a
head on an earlier block's final token becomes a Llama body cut at that block with its final norm neutralised.
A pooled (mean over the response) RM cannot be expressed so: ExportRefused says why."""

from __future__ import annotations

import copy
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhf_lib import models
from rlhf_lib.artifacts import read_meta
from rlhf_lib.export.common import (
    NORM_NEUTRALISING_CONSTANT,
    REWARD_DIR,
    REWARD_INPUT_KEY,
    REWARD_OWN_FORMAT_DIR,
    SCORE_OFFSET_KEY,
    ExportRefused,
)
from rlhf_lib.export.policies import with_saved_settings
from rlhf_lib.prompting import PLAIN_TEMPLATE, format_prompt, uses_chat_template

# --------------------------------------------------------------------------------------------
# The reward model
# --------------------------------------------------------------------------------------------


@dataclass
class RewardPlan:
    form: str  # "final_layer" or "block"
    block: int  # hidden_states index read by the head (1..num_layers)
    num_layers: int


def reward_export_plan(layer: int, pooling: str, num_layers: int, model_type: str) -> RewardPlan:
    """How an RM with this head can become a standard sequence classifier, or ExportRefused saying why."""
    if pooling != "last":
        raise ExportRefused(
            f"this RM's head reads the MEAN of the response tokens' hidden states (pooling={pooling!r}); a standard "
            "*ForSequenceClassification reads the last non-pad token only, and no weights make it average over a "
            "span (the response) that it cannot tell from the prompt, so its scores would not equal ours. "
            "What you can do: use the own-format copy with rlhf_lib.reward.RewardModel.load, or retrain the RM "
            "with `reward.pooling = \"last\"` (then it exports).")
    block = layer % (num_layers + 1)  # hidden_states has num_layers + 1 entries (0: the embeddings)
    if block == num_layers:
        return RewardPlan("final_layer", block, num_layers)
    if block < 1:
        raise ExportRefused("this RM reads the embeddings (hidden_states[0]); no standard classifier does.")
    if model_type != "llama":
        raise ExportRefused(
            f"this RM reads block {block} of {num_layers} (before the final norm); the exact construction for that "
            f"(see rlhf_lib.export) is written for Llama bodies, not {model_type!r}. Use the own-format copy.")
    return RewardPlan("block", block, num_layers)


def _classifier_config(lm_config, tokenizer, **changes: Any):
    config = copy.deepcopy(lm_config)
    config.num_labels = 1
    config.pad_token_id = tokenizer.pad_token_id
    config.architectures = None
    for key, value in changes.items():
        setattr(config, key, value)
    return config


def _classifier(config):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    config.architectures = [type(model).__name__]
    return model.eval()


@torch.no_grad()
def final_layer_classifier(lm: torch.nn.Module, tokenizer, head: models.ScalarHead) -> tuple[torch.nn.Module, float]:
    """(classifier, offset): the body as is, `score` = the head's weights; logits + offset = head output."""
    model = _classifier(_classifier_config(lm.config, tokenizer))
    getattr(model, model.base_model_prefix).load_state_dict(getattr(lm, lm.base_model_prefix).state_dict())
    model.score.weight.copy_(head.linear.weight.float())
    return model, float(head.linear.bias)


def _pad(tensor: torch.Tensor, rows: int = 0, cols: int = 0) -> torch.Tensor:
    """Append zero rows (dim 0) and columns (dim 1, matrices only)."""
    if rows:
        tensor = torch.cat([tensor, tensor.new_zeros(rows, *tensor.shape[1:])], 0)
    if cols:
        tensor = torch.cat([tensor, tensor.new_zeros(tensor.shape[0], cols)], 1)
    return tensor


def _widened_body_state(body_state: dict[str, torch.Tensor], block: int, extra: int, norm_scale: float) -> dict:
    """A Llama body's weights with `extra` more residual coordinates that nothing reads: embeddings and every
    writer get zero rows, every reader zero columns; norm weights rescaled for the wider mean (see caller)."""
    state, width = {}, body_state["embed_tokens.weight"].shape[1]
    for name, tensor in body_state.items():
        parts = name.split(".")
        if parts[0] == "layers" and int(parts[1]) >= block:
            continue  # blocks after the one the head reads are cut
        if name == "embed_tokens.weight":
            state[name] = _pad(tensor, cols=extra)
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            state[name] = _pad(tensor, rows=extra)
        elif name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight")):
            state[name] = _pad(tensor, cols=extra)
        elif name.endswith("layernorm.weight"):
            state[name] = torch.cat([tensor * norm_scale, tensor.new_ones(extra)])
        elif name == "norm.weight":
            continue  # the final norm is set by the caller
        elif tensor.dim() >= 1 and tensor.shape[0] == width and not name.endswith("bias"):
            raise ExportRefused(f"unexpected residual-stream weight {name}: cannot widen this body safely.")
        else:
            state[name] = tensor
    return state


@torch.no_grad()
def block_classifier(lm: torch.nn.Module, tokenizer, head: models.ScalarHead, block: int,
                     shift: float = 0.0) -> torch.nn.Module:
    """A Llama classifier whose logits equal head(hidden_states[block]) - shift at the last token, the head's
    bias included.

    The body is cut after `block` and widened to d + n_heads coordinates (Llama's config wants the width a
    multiple of the head count; attention keeps its own head_dim). Earlier norms see the new coordinates at
    0; their mean over `width` entries is d/width of ours, which eps * d/width and weights * sqrt(d/width)
    undo. Block `block`'s MLP bias writes C into the last coordinate after everything has read the stream;
    the final norm's variance is then (C^2 + |h|^2)/width ~ C^2/width, so weights 1/r0 (r0 = its rsqrt) give h
    back and weight 1/(C r0) gives 1 in the last coordinate; `score` = [head weights, 0..., head bias].
    """
    d, extra, C = lm.config.hidden_size, lm.config.num_attention_heads, NORM_NEUTRALISING_CONSTANT
    width = d + extra
    head_dim = getattr(lm.config, "head_dim", None) or d // lm.config.num_attention_heads
    changes: dict[str, Any] = {"hidden_size": width, "head_dim": head_dim, "num_hidden_layers": block, "mlp_bias": True,
                               "rms_norm_eps": lm.config.rms_norm_eps * d / width, "tie_word_embeddings": False}
    if getattr(lm.config, "layer_types", None):
        changes["layer_types"] = list(lm.config.layer_types)[:block]
    model = _classifier(_classifier_config(lm.config, tokenizer, **changes))
    body = getattr(model, model.base_model_prefix)
    state = _widened_body_state(getattr(lm, lm.base_model_prefix).state_dict(), block, extra, math.sqrt(d / width))
    for name, param in body.state_dict().items():
        if name not in state and name.endswith("bias"):  # mlp_bias adds biases: zero except the constant
            state[name] = torch.zeros_like(param)
    state[f"layers.{block - 1}.mlp.down_proj.bias"][-1] = C
    r0 = torch.rsqrt(torch.tensor(C, dtype=torch.float32) ** 2 / width + changes["rms_norm_eps"])
    state["norm.weight"] = torch.cat([torch.full((d,), 1.0) / r0, torch.zeros(extra - 1), (1.0 / (C * r0)).reshape(1)])
    missing, unexpected = body.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ExportRefused(f"widening the body left weights unset {missing} or unused {unexpected}.")
    model.score.weight.copy_(torch.cat([head.linear.weight.float(), torch.zeros(1, extra - 1),
                                        (head.linear.bias.float() - shift).reshape(1, 1)], 1))
    return model


def reward_tokenizer(tokenizer, max_tokens: int):
    """The tokenizer as the exported RM needs it: right padding, cut from the left at the RM's length."""
    return with_saved_settings(tokenizer, padding_side="right", truncation_side="left", model_max_length=max_tokens)


def reward_text(tokenizer, prompt: str, response: str, ended: bool = True) -> str:
    """The exact text the study's RM scores: formatted prompt + answer + EOS only if the answer ended."""
    return format_prompt(tokenizer, prompt) + response.strip() + ((tokenizer.eos_token or "") if ended else "")


@torch.no_grad()
def exported_scores(model, tokenizer, prompts: Sequence[str], responses: Sequence[str],
                    ended: Sequence[bool] | None = None) -> torch.Tensor:
    """Scores of an exported RM (logits + the config's offset): how to call it, and what the tests compare."""
    ended = [True] * len(prompts) if ended is None else list(ended)
    texts = [reward_text(tokenizer, p, r, e) for p, r, e in zip(prompts, responses, ended, strict=True)]
    batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, add_special_tokens=False)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    return logits.float() + float(getattr(model.config, SCORE_OFFSET_KEY, 0.0))


def _reward_input_spec(tokenizer, max_tokens: int) -> dict[str, Any]:
    return {"text": "prompt_text + response.strip() + (eos_token if the response ended with EOS else '')",
            "prompt_text": "tokenizer.apply_chat_template([{'role': 'user', 'content': prompt}], tokenize=False, "
                           "add_generation_prompt=True)" if uses_chat_template(tokenizer)
            else PLAIN_TEMPLATE.replace("{prompt}", "<prompt>"),
            "add_special_tokens": False, "padding_side": "right", "truncation_side": "left", "max_length": max_tokens}


def export_reward_model(reward_dir: Path, out_root: Path) -> tuple[Path, dict[str, Any]]:
    """Export the RM as a sequence classifier, or copy our format when that cannot give equal scores.

    Returns (folder written, summary); the summary's "refused" holds the reason when the copy was made.
    """
    from rlhf_lib.artifacts import RewardModel

    meta = read_meta(reward_dir)
    rm = RewardModel.load(reward_dir, device="cpu", quantize_4bit=False)
    lm = rm.model.merge_and_unload() if hasattr(rm.model, "merge_and_unload") else rm.model
    summary: dict[str, Any] = {"method": meta.get("method", "lora"), "layer": rm.layer, "pooling": rm.pooling,
                               "bias": rm.bias, "num_hidden_layers": lm.config.num_hidden_layers,
                               "quantize_4bit": bool(meta.get("quantize_4bit", False))}
    try:
        plan = reward_export_plan(rm.layer, rm.pooling, lm.config.num_hidden_layers, lm.config.model_type)
    except ExportRefused as err:
        out_dir = out_root / REWARD_OWN_FORMAT_DIR
        with models.atomic_directory(out_dir) as tmp:
            shutil.copytree(reward_dir, tmp, dirs_exist_ok=True)
        return out_dir, summary | {"refused": str(err)}
    tokenizer = reward_tokenizer(rm.tokenizer, rm.max_tokens)
    if plan.form == "final_layer":
        model, head_bias = final_layer_classifier(lm, tokenizer, rm.head)
        offset = head_bias - rm.bias
    else:
        model, offset = block_classifier(lm, tokenizer, rm.head, plan.block, shift=rm.bias), 0.0
    setattr(model.config, SCORE_OFFSET_KEY, offset)
    setattr(model.config, REWARD_INPUT_KEY, _reward_input_spec(tokenizer, rm.max_tokens))
    out_dir = out_root / REWARD_DIR
    with models.atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out_dir, summary | {"form": plan.form, "block": plan.block, "score_offset": offset}


