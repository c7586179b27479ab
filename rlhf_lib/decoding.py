"""One decoding step of a Llama-style decoder written in torch ops: what `generation.generate` runs per new token
on the CPU, where transformers' forward spends a tenth of each step on module calls and mask building.

    step = DecodeStep.for_model(model)            # None: not a model this step knows (then use model's forward)
    logits = step(token, position_ids, cache, attention_bias)   # [B, V]; each cache layer's `update` writes k, v

It knows the decoders whose layer is exactly Llama's (RMSNorm, rotary attention with grouped key/value heads,
SiLU-gated MLP, pre-norm residuals): model types "llama" (SmolLM2 among them) and "qwen2" without sliding layers,
in float32 on the CPU, every projection a plain `nn.Linear` or a peft LoRA layer whose adapter is merged
(`models.adapter_merged`) or switched off. Anything else (4-bit weights, an unmerged adapter, autocast,
gemma's scaled embeddings and capped logits, another device) gets None, and transformers' forward runs instead.
Measured side by side on SmolLM2-135M (bench/results/generation_bench.md, 2026-12-06, a slow hour): one 16-prompt
PPO rollout samples in 6.6 s against 7.7 s through the forward (design hfstep) and 7.3 s with the LM head as one
matmul (flathead, `HEAD_CHUNK` None); at 48 rows the three are within that run's noise (19.5-21.9 s).
Tests compare its tokens and log-probs with the forward's (tests/test_generation.py).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

KNOWN_MODEL_TYPES = ("llama", "qwen2")
# Vocabulary rows of the LM head per matmul in `head_logits` (None: one F.linear over the whole vocabulary).
HEAD_CHUNK = 2048


@torch.no_grad()
def head_logits(hidden: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """[B, V] logits of a few rows of final states [B, H] under the LM head's weight [V, H] (no bias), for sampling.

    As `head @ hidden^T` in blocks of HEAD_CHUNK vocabulary rows: at a few rows, one `hidden @ head^T` over a large
    vocabulary reads the head well below this machine's memory bandwidth; the blocks' tall, thin products read it
    faster (bench/results/generation_bench.md: design ours against flathead). The same sums in another order:
    equal to F.linear up to float rounding."""
    if HEAD_CHUNK is None:
        return F.linear(hidden, head)
    logits = hidden.new_empty((head.shape[0], hidden.shape[0]))
    for start in range(0, head.shape[0], HEAD_CHUNK):
        torch.mm(head[start : start + HEAD_CHUNK], hidden.t(), out=logits[start : start + HEAD_CHUNK])
    return logits.t().contiguous()


def _plain_linear(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, bias) of a projection whose output is exactly F.linear with them, else None: an `nn.Linear`, or a peft
    LoRA layer over one whose forward is its base layer's: its active adapters all merged into the weight, or its
    adapters switched off (`disable_adapter()`) and none merged."""
    if type(module) is nn.Linear:
        return module.weight, module.bias
    if hasattr(module, "get_base_layer") and hasattr(module, "merged_adapters"):
        base = module.get_base_layer()
        merged = set(module.merged_adapters)
        live = [name for name in module.active_adapters if name in getattr(module, "lora_A", {})]
        base_only = not merged if module.disable_adapters else all(name in merged for name in live)
        if type(base) is nn.Linear and base_only:
            return base.weight, base.bias
    return None


@dataclass
class _Layer:
    """The tensors of one decoder layer, read once per `generate` call."""

    attn_norm: torch.Tensor
    attn_eps: float
    q: tuple[torch.Tensor, torch.Tensor | None]
    k: tuple[torch.Tensor, torch.Tensor | None]
    v: tuple[torch.Tensor, torch.Tensor | None]
    o: tuple[torch.Tensor, torch.Tensor | None]
    mlp_norm: torch.Tensor
    mlp_eps: float
    gate: tuple[torch.Tensor, torch.Tensor | None]
    up: tuple[torch.Tensor, torch.Tensor | None]
    down: tuple[torch.Tensor, torch.Tensor | None]
    scaling: float


@dataclass
class DecodeStep:
    """Next-token logits for one new token per row, the key/value cache extended in place."""

    embed: torch.Tensor
    rotary: nn.Module  # the model's own rotary embedding: (x, position_ids) -> (cos, sin)
    apply_rotary: Callable  # its module's apply_rotary_pos_emb(q, k, cos, sin)
    layers: list[_Layer]
    norm: torch.Tensor
    norm_eps: float
    head: torch.Tensor
    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def for_model(cls, model: nn.Module) -> DecodeStep | None:
        """The step for `model` (a causal LM or a peft model around one), or None where it does not apply."""
        lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        config, inner = getattr(lm, "config", None), getattr(lm, "model", None)
        if config is None or inner is None or getattr(config, "model_type", None) not in KNOWN_MODEL_TYPES:
            return None
        if "sliding_attention" in (getattr(config, "layer_types", None) or ()) or config.hidden_act != "silu":
            return None
        if torch.is_autocast_enabled("cpu") or getattr(config, "final_logit_softcapping", None):
            return None
        head = _plain_linear(lm.get_output_embeddings())
        embed = inner.embed_tokens
        if head is None or head[1] is not None or type(embed) is not nn.Embedding:
            return None
        if embed.weight.device.type != "cpu" or embed.weight.dtype != torch.float32:
            return None
        layers = []
        for block in inner.layers:
            attn, mlp = block.self_attn, block.mlp
            if getattr(attn, "q_norm", None) is not None or not hasattr(attn, "scaling"):
                return None
            projections = [_plain_linear(getattr(attn, name)) for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
            projections += [_plain_linear(getattr(mlp, name)) for name in ("gate_proj", "up_proj", "down_proj")]
            if any(p is None or p[0].dtype != torch.float32 for p in projections):
                return None
            layers.append(_Layer(block.input_layernorm.weight, block.input_layernorm.variance_epsilon, *projections[:4],
                                 block.post_attention_layernorm.weight, block.post_attention_layernorm.variance_epsilon,
                                 *projections[4:], attn.scaling))
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(embed.weight, inner.rotary_emb, sys.modules[type(inner.layers[0].self_attn).__module__].apply_rotary_pos_emb,
                   layers, inner.norm.weight, inner.norm.variance_epsilon, head[0], config.num_attention_heads,
                   config.num_key_value_heads, head_dim)

    def __call__(self, token: torch.Tensor, position_ids: torch.Tensor, cache, attention_bias: torch.Tensor) -> torch.Tensor:
        """[B, V] logits after `token` [B] at `position_ids` [B, 1]. `cache.layers[i].update(keys, values)` appends
        this token's keys and values and returns the whole [B, kv_heads, T, head_dim] of each; `attention_bias` [B, >= T]
        holds 0 where a row attends a cache position and -inf on its padding."""
        rows, group = token.shape[0], self.heads // self.kv_heads
        x = F.embedding(token[:, None], self.embed)  # [B, 1, hidden]
        cos, sin = self.rotary(x, position_ids)
        for layer, cache_layer in zip(self.layers, cache.layers, strict=True):
            h = F.rms_norm(x, (x.shape[-1],), layer.attn_norm, layer.attn_eps)
            q = F.linear(h, *layer.q).view(rows, 1, self.heads, self.head_dim).transpose(1, 2)
            k = F.linear(h, *layer.k).view(rows, 1, self.kv_heads, self.head_dim).transpose(1, 2)
            v = F.linear(h, *layer.v).view(rows, 1, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = self.apply_rotary(q, k, cos, sin)
            keys, values = cache_layer.update(k, v)
            # Grouped-query attention of one query per row: the `group` query heads that share a key/value head are
            # one [group, head_dim] matrix against it, with no copy of the keys per query head.
            scores = torch.matmul(q.reshape(rows, self.kv_heads, group, self.head_dim), keys.transpose(-1, -2))
            scores = scores * layer.scaling + attention_bias[:, None, None, : keys.shape[2]]
            attended = torch.matmul(scores.softmax(dim=-1), values).reshape(rows, 1, self.heads * self.head_dim)
            x = x + F.linear(attended, *layer.o)
            h = F.rms_norm(x, (x.shape[-1],), layer.mlp_norm, layer.mlp_eps)
            x = x + F.linear(F.silu(F.linear(h, *layer.gate)) * F.linear(h, *layer.up), *layer.down)
        return head_logits(F.rms_norm(x[:, 0], (x.shape[-1],), self.norm, self.norm_eps), self.head)
