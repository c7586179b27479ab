"""Loading models: device and dtype choice, tokenizers and causal LMs (offline names, Hub ids or local
directories), 4-bit nf4 quantisation (bitsandbytes), LoRA adapters (peft), and a weights-only `torch.load`.

Safety: safetensors only, never ``trust_remote_code``, ``torch.load`` only with ``weights_only=True``. A Hub id
is loaded from local files only when the Hub cannot be reached, and fails in seconds with what to do.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from rlhf_lib.models.offline import _normalise_tokenizer, checkpoint_path
from rlhf_lib.models.registry import REGISTRY, ModelUnavailableError

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase

    from rlhf_lib.config import ModelConfig, StudyConfig


# --------------------------------------------------------------------------------------------
# Devices and dtypes
# --------------------------------------------------------------------------------------------


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` -> cuda when present (this process's GPU under torchrun/accelerate launch), else cpu."""
    if device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        # One GPU per process when launched distributed; LOCAL_RANK is set by both launchers.
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelUnavailableError("device='cuda' was asked for but no CUDA device is visible; use 'auto' or 'cpu'.")
    return torch.device(device)


def resolve_dtype(dtype: str = "auto", device: torch.device | str = "cpu") -> torch.dtype:
    """`auto` -> fp32 on CPU (bf16 is slow without hardware support), bf16 on a capable GPU."""
    device = torch.device(device)
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]

# --------------------------------------------------------------------------------------------
# Hub ids and local directories
# --------------------------------------------------------------------------------------------


def _hub_error(name: str, err: Exception) -> ModelUnavailableError:
    return ModelUnavailableError(
        f"Could not load '{name}' from the Hugging Face Hub or its local cache ({type(err).__name__}: {err}).\n"
        f"Offline models available here: {', '.join(REGISTRY)}.\n"
        f"To use '{name}', download it on a machine with network access "
        f"(`hf download {name}`), then copy the Hub cache (~/.cache/huggingface) here "
        "or pass the local directory as the model name."
    )


def hub_reachable(timeout: float = 3.0) -> bool:
    """Can the Hub endpoint be reached at all? Checked once, so an offline machine fails in seconds."""
    global _HUB_REACHABLE
    if _HUB_REACHABLE is None:
        import socket
        from urllib.parse import urlparse

        endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
        try:
            socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
            _HUB_REACHABLE = True
        except OSError:
            _HUB_REACHABLE = False
    return _HUB_REACHABLE


_HUB_REACHABLE: bool | None = None


def _hub_kwargs(name: str) -> dict[str, Any]:
    """Never trust remote code; use only local files when offline (Hub cache or a local directory)."""
    kwargs: dict[str, Any] = {"trust_remote_code": False}
    if name not in REGISTRY and not Path(name).is_dir():
        if os.environ.get("HF_HUB_OFFLINE") == "1" or not hub_reachable():
            kwargs["local_files_only"] = True
    return kwargs


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """Tokenizer for a registry name, Hub id or local directory, left-padded, pad != eos."""
    from transformers import AutoTokenizer

    path = checkpoint_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **_hub_kwargs(name))
    except OSError as err:
        raise _hub_error(name, err) from err
    return _normalise_tokenizer(tokenizer)


def load_causal_lm(
    name: str,
    device: str = "auto",
    dtype: str = "auto",
    quantize_4bit: bool = False,
    dropout: float | None = 0.0,
) -> nn.Module:
    """A causal LM on `device`: fp32 on CPU, optionally a frozen 4-bit nf4 base (bitsandbytes).

    `dropout` overrides the config's dropout probabilities (PPO wants none; SFT may want some).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    path = checkpoint_path(name)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "use_safetensors": True, **_hub_kwargs(name)}
    try:
        config = AutoConfig.from_pretrained(path, **_hub_kwargs(name))
    except OSError as err:
        raise _hub_error(name, err) from err
    if dropout is not None:
        for key in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout"):
            if hasattr(config, key):
                setattr(config, key, dropout)
    kwargs["config"] = config
    if quantize_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch_dtype,
        )
        kwargs["device_map"] = {"": torch_device.index or 0} if torch_device.type == "cuda" else {"": "cpu"}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as err:
        raise _hub_error(name, err) from err
    if not quantize_4bit:
        model.to(torch_device)
    model.generation_config.pad_token_id = load_tokenizer(name).pad_token_id
    return model


def add_lora(
    model: nn.Module,
    rank: int = 16,
    alpha: int = 32,
    dropout: float = 0.0,
    target_modules: Iterable[str] | None = None,
    adapter_name: str = "default",
) -> PeftModel:
    """Wrap `model` with trainable LoRA adapters (peft). A 4-bit base is prepared for k-bit training."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    present = {n.split(".")[-1] for n, _ in model.named_modules()}
    targets = [t for t in (target_modules or ["q_proj", "k_proj", "v_proj", "o_proj"]) if t in present]
    if not targets:
        raise ValueError(f"None of the LoRA target modules {list(target_modules or [])} exist in this model.")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(model, config, adapter_name=adapter_name)


def lora_from_config(model: nn.Module, model_cfg: ModelConfig, adapter_name: str = "default") -> PeftModel:
    """`add_lora` with the knobs of a preset's [model] section."""
    return add_lora(
        model,
        rank=model_cfg.lora_rank,
        alpha=model_cfg.lora_alpha,
        dropout=model_cfg.lora_dropout,
        target_modules=model_cfg.lora_target_modules,
        adapter_name=adapter_name,
    )


def load_from_preset(cfg: StudyConfig, name: str | None = None, dropout: float | None = 0.0) -> nn.Module:
    """The base causal LM named by a preset, with its device, dtype and quantisation settings."""
    m = cfg.model
    return load_causal_lm(name or m.name, device=m.device, dtype=m.dtype, quantize_4bit=m.quantize_4bit, dropout=dropout)


def is_quantized(model: nn.Module) -> bool:
    """Does the model hold bitsandbytes 4-/8-bit weights? (Merging LoRA into them would re-quantize: lossy.)"""
    return any(type(module).__name__ in ("Linear4bit", "Linear8bitLt") for module in model.modules())


def _adapter_can_merge(model) -> bool:
    """Whether `model` has an active LoRA adapter that merging would remove from every token's work: a peft model,
    its adapter switched on (`disable_adapter()` means the caller wants the base), its base not quantized (a merge
    would re-quantize the weights and change the policy)."""
    if not hasattr(model, "merge_and_unload") or is_quantized(model):
        return False
    return not any(getattr(module, "_disable_adapters", False) for module in model.modules())


@contextmanager
def adapter_merged(model) -> Iterator:
    """Within: `model` with its active LoRA adapter merged into its weights, so sampling and scoring skip the adapter's
    extra matmuls on every token (bench/bench_generation.py, bench/bench_scoring.py measure it); on exit the original weight tensors are put
    back, bit for bit, and the adapter is live again. The model itself, unchanged, where `_adapter_can_merge` says no.

    The merged weights are new tensors: each adapted layer's weight (and bias) is copied, and peft merges into the
    copy in place. The originals are kept aside, not un-merged by subtraction, whose rounding would drift a shared
    frozen base over a run. Cheaper than a merged deep copy of the whole peft model (PPO's carries four adapters):
    only the adapted layers' weights are new (bench/results/ppo_bench_2026-12-05e.md against 05d: half a second less
    per rollout). Non-finite merged weights are refused, as peft's safe merge refuses them, but by one sum per layer
    (NaN and inf survive a sum) instead of its element-wise test: that test was half the merge's time (profiled).
    """
    if not _adapter_can_merge(model):
        yield model
        return
    from peft.tuners.lora import LoraLayer

    adapter = model.active_adapter
    merged: list[tuple[LoraLayer, torch.Tensor, torch.Tensor | None]] = []
    try:
        with torch.no_grad():  # the delta B @ A of a trainable adapter must not join a graph
            sums: dict[str, torch.Tensor] = {}
            for name, module in model.named_modules():
                if isinstance(module, LoraLayer) and adapter in module.lora_A:
                    base = module.get_base_layer()
                    bias = getattr(base, "bias", None)
                    merged.append((module, base.weight.data, bias.data if bias is not None else None))
                    base.weight.data = base.weight.data.clone()  # peft's unsafe merge adds in place: into the copy
                    if bias is not None:
                        base.bias.data = bias.data.clone()
                    module.merge(safe_merge=False, adapter_names=[adapter])
                    sums[name] = base.weight.data.sum()
            if sums and not torch.isfinite(torch.stack(list(sums.values()))).all():
                broken = [name for name, total in sums.items() if not torch.isfinite(total)]
                raise ValueError(f"adapter {adapter!r} gives non-finite weights when merged ({len(broken)} layers, "
                                 f"first {broken[0]}): it has diverged (NaN or inf in its LoRA matrices).")
        yield model
    finally:
        for module, weight, bias in merged:
            base = module.get_base_layer()
            base.weight.data = weight
            if bias is not None:
                base.bias.data = bias
            if adapter in module.merged_adapters:  # peft itself un-merges (in place, on the new tensor) if disabled
                module.merged_adapters.remove(adapter)


def merged_for_batches(model, batches: int):
    """`adapter_merged(model)` when the model is about to read more than one batch without gradients, else the model
    as it is. A merge costs about what one batch gains from it: for SmolLM2-135M ~0.3 s, while a forward of
    8 x 83 tokens runs 0.26 s faster merged (bench/results/scoring_bench.md measures the whole effect)."""
    return adapter_merged(model) if batches > 1 else nullcontext(model)


def safe_torch_load(path: Path | str, map_location: str | torch.device = "cpu") -> Any:
    """`torch.load` restricted to tensors and plain containers (never arbitrary pickles)."""
    return torch.load(path, map_location=map_location, weights_only=True)
