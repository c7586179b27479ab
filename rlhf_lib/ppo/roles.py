"""One frozen base model that carries every PPO role as a LoRA adapter (rlhf_lib.adapters).

    roles, tokenizer, reward_fn, base_name = build_roles(cfg, sft_dir, rm_dir)
    with roles.role("policy") as model: ...          # the shared model with the policy adapter active
    logprobs, entropy = roles.policy_logprobs(input_ids, attention_mask, response_len)
    values = roles.values(input_ids, attention_mask, response_len)
    scores = roles.reward_scores(input_ids, attention_mask, response_len)

Roles: "policy" (trainable, from the SFT adapter), "reference" (the frozen SFT adapter, or the bare base when
there is no SFT adapter), "value" (trainable, from the RM adapter, with a ScalarHead from the RM head) and
"reward" (the frozen RM adapter and head) when the RM shares the base. An RM on another base is a separate
text scorer, `reward_fn(prompts, responses) -> Tensor[B]`.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rlhf_lib import models
from rlhf_lib.adapters import (
    apply_trainability,
    attach_adapter,
    freeze_blocks_from,
    freeze_dropout,
    score_token_ids,
    use_adapter,
)
from rlhf_lib.artifacts import RM_ADAPTER, RM_HEAD, RewardModel, read_meta
from rlhf_lib.config import StudyConfig
from rlhf_lib.ppo.core import logprobs_and_entropy

RewardFn = Callable[[list[str], list[str]], torch.Tensor]


def response_logprobs(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log pi(token), detached entropy) [B, Lr] of the last `response_len` tokens under softmax(logits / T); 0 where
    attention_mask is 0 (the padding after EOS, which every PPO quantity masks out).

    The LM head runs only at the states that predict a response token (`models.target_logits`)."""
    predicts = torch.zeros_like(attention_mask[:, 1:], dtype=torch.bool)
    predicts[:, -response_len:] = attention_mask[:, -response_len:].bool()
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask,
              "position_ids": models.position_ids_from_mask(attention_mask)}
    logits = models.target_logits(model, inputs, predicts)
    logprobs, entropy = logprobs_and_entropy(logits, input_ids[:, 1:][predicts], temperature)
    in_response = predicts[:, -response_len:]
    zeros = logprobs.new_zeros(in_response.shape)
    return zeros.masked_scatter(in_response, logprobs), zeros.masked_scatter(in_response, entropy)


def lm_loss(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the real tokens (PPO-ptx's pretraining objective); the LM head runs at
    those positions only (`models.target_logits`)."""
    predicts = (attention_mask[:, 1:] * attention_mask[:, :-1]).bool()
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask,
              "position_ids": models.position_ids_from_mask(attention_mask)}
    logits = models.target_logits(model, inputs, predicts).float()
    return F.cross_entropy(logits, input_ids[:, 1:][predicts]) if predicts.any() else logits.sum()


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
            return response_logprobs(model, input_ids, attention_mask, response_len, self.temperature)

    def reference_logprobs(self, input_ids, attention_mask, response_len: int) -> torch.Tensor:
        with self.role("reference") as model:
            return response_logprobs(model, input_ids, attention_mask, response_len, self.temperature)[0]

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
            reward_model = RewardModel.load(reward_dir, device=device_name, quantize_4bit=cfg.model.quantize_4bit)
            batch_size = cfg.generation.batch_size

            def score_with_rm(prompts: list[str], responses: list[str]) -> torch.Tensor:
                # The RM re-tokenises prompt + response + EOS with its own tokenizer and format.
                return reward_model.score_texts(prompts, responses, batch_size=batch_size)

            reward_fn = score_with_rm
    model.set_adapter("policy")
    apply_trainability(model)
    value_block = models.cut_depth(model, value_layer)
    if value_block is not None:  # the value reads a middle layer: the blocks above never run
        freeze_blocks_from(model, "value", value_block)
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
