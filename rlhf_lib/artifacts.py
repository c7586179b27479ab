"""What each stage leaves on disk, and the loaders that turn it back into a model. Every stage imports this;
it imports no stage (only models, config and prompting), so the stages never import each other to read one
another's output.

Two directory formats connect the stages (SFT -> RM -> PPO -> evaluation); rlhf_lib.sft, rlhf_lib.reward,
rlhf_lib.ppo and rlhf_lib.dpo write them:

    <policy dir>/                    an SFT, PPO or DPO policy: load_policy(dir) -> (model, tokenizer)
        adapter_config.json          peft `save_pretrained` of one LoRA adapter (a full fine-tune: the model's
        adapter_model.safetensors    own files instead, meta.json "finetune": "full")
        meta.json                    {"base_model": "<registry name or Hub id>", "finetune": "lora", ...}

    <reward dir>/                    a reward model (or PPO's value function): RewardModel.load(dir)
        adapter/                     peft `save_pretrained` of its LoRA adapter (full/ for a full fine-tune)
        head.safetensors             models.ScalarHead.save
        meta.json                    {"base_model": "<name>", "bias": <float>, "finetune": "lora", "layer": <int>,
                                      "pooling": "last" | "mean_response", "sft_score_std": <float>, ...}

RM score = head(hidden states of the RM's layer, pooled as its meta.json says: the last token's, or the mean
over the response's tokens) - bias (`RewardModel.score_texts`; rlhf_lib.adapters.score_token_ids does the same
on token ids).

    from rlhf_lib.artifacts import RewardModel, load_policy, read_meta
    model, tokenizer = load_policy(runs / "sft-<fp>" / "policy")
    rm = RewardModel.load(runs / "reward-<fp>" / "model")
    rm.score_texts(["Name a colour."], ["Red."])        # demonstrations average 0
    read_meta(runs / "reward-<fp>" / "model")["base_model"]
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from rlhf_lib import models
from rlhf_lib.config import StudyConfig
from rlhf_lib.prompting import format_prompt

META = "meta.json"  # in every policy and reward directory
RM_ADAPTER = "adapter"  # a reward directory's LoRA adapter
RM_HEAD = "head.safetensors"  # a reward directory's scalar head
HEAD = RM_HEAD  # the name rlhf_lib.reward used


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
# Loading a policy
# --------------------------------------------------------------------------------------------


def load_policy(adapter_dir: Path | str, adapter_name: str = "default", trainable: bool = False):
    """(model, tokenizer) for an SFT product: the base named in meta.json plus the saved adapter."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    meta = json.loads((adapter_dir / META).read_text())
    tokenizer = models.load_tokenizer(meta["base_model"])
    if meta.get("finetune", "lora") == "full":
        model = models.load_causal_lm(str(adapter_dir))
        model.requires_grad_(trainable)
        return model, tokenizer
    base = models.load_causal_lm(meta["base_model"], quantize_4bit=meta.get("quantize_4bit", False))
    model = PeftModel.from_pretrained(base, str(adapter_dir), adapter_name=adapter_name, is_trainable=trainable)
    return model, tokenizer


@contextmanager
def base_weights(model, cfg: StudyConfig):
    """The pretrained base: the same weights with the adapter switched off, or a fresh load after full SFT."""
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield model
    else:
        yield models.load_from_preset(cfg)


# --------------------------------------------------------------------------------------------
# Loading a reward model
# --------------------------------------------------------------------------------------------


@dataclass
class RewardModel:
    """A causal LM body + scalar head that scores (prompt, response) text; frozen after training.

    The head reads the hidden states of block `layer` (an index into `hidden_states`; -1 = the last), pooled
    over the text (`pooling`): the final token's state ("last", the usual RM), or the mean over the response's
    tokens ("mean_response"). `layer` and `pooling` are saved in meta.json; PPO reads them to score and to
    start its value function the same way.
    """

    model: torch.nn.Module
    head: models.ScalarHead
    tokenizer: object
    base_name: str
    bias: float = 0.0
    max_tokens: int = 320
    layer: int = -1
    pooling: str = "last"

    def encode(
        self, prompts: Sequence[str], responses: Sequence[str], ended: Sequence[bool] | None = None
    ) -> dict[str, torch.Tensor]:
        """Token ids of prompt + response (+ EOS where the response ended with one), left-padded, and a
        `response_mask` that is 1 on the response's tokens (EOS included)."""
        ended = [True] * len(prompts) if ended is None else list(ended)
        eos = self.tokenizer.eos_token or ""
        queries = [format_prompt(self.tokenizer, p) for p in prompts]
        texts = [q + r.strip() + (eos if done else "") for q, r, done in zip(queries, responses, ended, strict=True)]
        self.tokenizer.padding_side = "left"
        # Truncate from the left so the final token, where the score is read, always survives.
        self.tokenizer.truncation_side = "left"
        batch = self.tokenizer(
            texts, return_tensors="pt", padding=True, truncation=True, max_length=self.max_tokens, add_special_tokens=False
        )
        query_lengths = [len(ids) for ids in self.tokenizer(queries, add_special_tokens=False)["input_ids"]]
        full_lengths = [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        width = batch["input_ids"].shape[1]
        response_mask = torch.zeros_like(batch["attention_mask"])
        for row, (q, f) in enumerate(zip(query_lengths, full_lengths, strict=True)):
            n_response = min(max(f - q, 0), width)
            if n_response:
                response_mask[row, width - n_response :] = 1
        batch["response_mask"] = response_mask
        device = next(self.model.parameters()).device
        return {k: v.to(device) for k, v in batch.items()}

    def pooled_states(
        self, prompts: Sequence[str], responses: Sequence[str], ended: Sequence[bool] | None = None,
        layers: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """[len(layers), B, H] pooled hidden states of each layer (default: this RM's): what the head reads."""
        batch = self.encode(prompts, responses, ended)
        mask = batch["attention_mask"]
        states = models.layer_states(self.model, batch["input_ids"], mask, [self.layer] if layers is None else layers)
        pooled = [models.pool_states(state, mask, batch["response_mask"], self.pooling) for state in states]
        return torch.stack(pooled).to(self.head.linear.weight.dtype)

    def raw_scores(self, prompts: Sequence[str], responses: Sequence[str], ended: Sequence[bool] | None = None) -> torch.Tensor:
        """Head output on the pooled states, before the normalisation bias (differentiable)."""
        return self.head(self.pooled_states(prompts, responses, ended)[0])

    @torch.no_grad()
    def features(
        self, prompts: Sequence[str], responses: Sequence[str], ended: Sequence[bool] | None = None,
        batch_size: int = 8, progress: bool = False, desc: str = "RM features", layers: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """`pooled_states` of many texts, batched by length (no gradients): [N, H] for this RM's layer, or
        [len(layers), N, H] when `layers` is given. scores = head(features) - bias."""
        ended = [True] * len(prompts) if ended is None else list(ended)
        n_layers = 1 if layers is None else len(layers)
        if not prompts:
            empty = torch.empty(n_layers, 0, models.hidden_size_of(self.model))
            return empty[0] if layers is None else empty
        was_training = self.model.training
        self.model.eval()
        # Batches of similar length pad little (a few long HHH dialogues would otherwise pad whole batches).
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(responses[i]))
        chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        with models.merged_for_batches(self.model, len(chunks)):  # a LoRA RM's adapter merged once for all batches
            out = [
                self.pooled_states([prompts[j] for j in chunk], [responses[j] for j in chunk],
                                   [ended[j] for j in chunk], layers).float().cpu()
                for chunk in tqdm(chunks, desc=desc, disable=not progress, unit="batch")
            ]
        self.model.train(was_training)
        features = torch.empty(n_layers, len(prompts), out[0].shape[2])
        features[:, torch.tensor(order)] = torch.cat(out, dim=1)
        return features[0] if layers is None else features

    @torch.no_grad()
    def score_features(self, features: torch.Tensor) -> torch.Tensor:
        """Normalised reward from cached `features` (the same numbers as `score_texts`)."""
        return self.head(features.to(self.head.linear.weight)).float().cpu() - self.bias

    @torch.no_grad()
    def score_texts(
        self, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 8, ended: Sequence[bool] | None = None
    ) -> torch.Tensor:
        """Normalised reward of each (prompt, response): demonstrations average 0. `ended`: default all True."""
        if not prompts:
            return torch.empty(0)
        return self.score_features(self.features(prompts, responses, ended, batch_size=batch_size))

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if hasattr(self.model, "peft_config"):
            self.model.save_pretrained(directory / "adapter")
            finetune = "lora"
        else:
            self.model.save_pretrained(directory / "full", safe_serialization=True)
            self.tokenizer.save_pretrained(directory / "full")
            finetune = "full"
        self.head.save(directory / HEAD)
        meta = {"base_model": self.base_name, "bias": self.bias, "finetune": finetune, "max_tokens": self.max_tokens,
                "layer": self.layer, "pooling": self.pooling, "quantize_4bit": models.is_quantized(self.model)}
        (directory / META).write_text(json.dumps(meta, indent=1))

    @classmethod
    def load(cls, directory: Path | str, device: str = "auto", quantize_4bit: bool | None = None) -> RewardModel:
        """The saved RM, frozen. `quantize_4bit`: None loads the base as it was trained (4-bit or not, from
        meta.json); True/False overrides that."""
        from peft import PeftModel

        directory = Path(directory)
        meta = json.loads((directory / META).read_text())
        tokenizer = models.load_tokenizer(meta["base_model"])
        if quantize_4bit is None:
            quantize_4bit = bool(meta.get("quantize_4bit", False))
        if meta["finetune"] == "lora":
            base = models.load_causal_lm(meta["base_model"], device=device, quantize_4bit=quantize_4bit)
            model = PeftModel.from_pretrained(base, str(directory / "adapter"), adapter_name="reward")
        else:
            model = models.load_causal_lm(str(directory / "full"), device=device)
        model.requires_grad_(False)
        model.eval()
        head = models.ScalarHead.load(directory / HEAD, device=next(model.parameters()).device)
        head.requires_grad_(False)
        return cls(model, head, tokenizer, meta["base_model"], meta["bias"], meta.get("max_tokens", 320),
                   meta.get("layer", -1), meta.get("pooling", "last"))
