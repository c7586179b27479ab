"""Comparison collection for the reward model: K completions per prompt, ranked by labelers.

For each RM prompt, K (uniform in [labelers.k_min, labelers.k_max], seeded) completions are sampled,
a share `reward.sft_share` from the SFT policy and the rest from the pretrained base (the paper mixed
sources too), each at a temperature drawn from `reward.temperatures`: diversity within a prompt is
what a ranking can teach, more than the number of prompts. Each completion records whether it ended
with EOS, so the reward model later sees a truncated answer as truncated.

    from rlhf_lib.comparisons import sample_k_completions
    samples = sample_k_completions(cfg, sft_adapter_dir, prompt_rows)
    samples.completions[0], samples.sources[0], samples.temperatures[0], samples.ended[0]
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rlhf_lib.config import StudyConfig
from rlhf_lib.generation import batching, sample_texts
from rlhf_lib.io import atomic_write_text
from rlhf_lib.prompting import format_prompt

SOURCES = ("sft", "base")


@dataclass
class SampledCompletions:
    """K completions per prompt and, for each, where it came from."""

    prompt_ids: list[str]
    completions: list[list[str]]
    sources: list[list[str]]  # "sft" or "base"
    temperatures: list[list[float]]
    ended: list[list[bool]]  # True: ended with EOS; False: cut at generation.max_new_tokens


def plan_sources(cfg: StudyConfig, n_prompts: int, seed: int) -> list[list[tuple[str, float]]]:
    """For each prompt, the (model, temperature) of each of its K completions."""
    rng = random.Random(seed)
    temperatures = list(cfg.reward.temperatures)
    plans = []
    for _ in range(n_prompts):
        k = rng.randint(cfg.labelers.k_min, cfg.labelers.k_max)
        n_sft = round(k * cfg.reward.sft_share)
        sources = ["sft"] * n_sft + ["base"] * (k - n_sft)
        # Temperatures cycle so that every prompt with K >= 2 * len(temperatures) sees each one per source.
        plan = [(source, temperatures[i % len(temperatures)]) for i, source in enumerate(sources)]
        rng.shuffle(plan)  # so position in the list says nothing about the source
        plans.append(plan)
    return plans


def sample_k_completions(
    cfg: StudyConfig,
    sft_adapter_dir: Path,
    prompt_rows: Sequence[Mapping[str, Any]],
    cache_file: Path | None = None,
    progress: bool = True,
) -> SampledCompletions:
    """K completions per prompt from SFT and base, batched per (source, temperature); cached to JSON when given."""
    prompt_ids = [str(r["id"]) for r in prompt_rows]
    if cache_file is not None and Path(cache_file).exists():
        saved = json.loads(Path(cache_file).read_text())
        if saved.get("prompt_ids") == prompt_ids and "ended" in saved:
            return SampledCompletions(**saved)
    from rlhf_lib.artifacts import base_weights, load_policy

    plans = plan_sources(cfg, len(prompt_rows), cfg.seed)
    model, tokenizer = load_policy(sft_adapter_dir)
    formatted = [format_prompt(tokenizer, r["prompt"]) for r in prompt_rows]
    completions: list[list[str]] = [[""] * len(plan) for plan in plans]
    ended: list[list[bool]] = [[False] * len(plan) for plan in plans]
    gen = cfg.generation
    for source_index, source in enumerate(SOURCES):
        for temperature_index, temperature in enumerate(cfg.reward.temperatures):
            slots = [(i, j) for i, plan in enumerate(plans) for j, s in enumerate(plan) if s == (source, temperature)]
            if not slots:
                continue
            # Prompts of similar length share a batch: less padding; still deterministic (each batch is seeded).
            slots.sort(key=lambda slot: len(formatted[slot[0]]))
            kwargs = dict(max_new_tokens=gen.max_new_tokens, temperature=temperature, top_p=gen.top_p,
                          **batching(gen), seed=cfg.seed * 10 + source_index * 100 + temperature_index,
                          desc=f"RM completions ({source}, T={temperature:g})", progress=progress, return_ended=True)
            texts = [formatted[i] for i, _ in slots]
            # Each (source, temperature) group is saved as it finishes: an interrupted run resumes from it.
            group_file = None if cache_file is None else Path(cache_file).with_suffix(f".{source}-T{temperature:g}.json")
            saved_group = json.loads(group_file.read_text()) if group_file is not None and group_file.exists() else None
            if saved_group is not None and saved_group["prompts"] == texts:
                outputs, finished = saved_group["texts"], saved_group["ended"]
            elif source == "sft":
                outputs, finished = sample_texts(model, tokenizer, texts, **kwargs)  # merges the LoRA for speed
            else:
                with base_weights(model, cfg) as base:
                    outputs, finished = sample_texts(base, tokenizer, texts, **kwargs)
            if group_file is not None:
                atomic_write_text(group_file, json.dumps({"prompts": texts, "texts": outputs, "ended": finished}))
            for (i, j), text, done in zip(slots, outputs, finished, strict=True):
                completions[i][j] = text
                ended[i][j] = done
    result = SampledCompletions(
        prompt_ids=prompt_ids,
        completions=completions,
        sources=[[s for s, _ in plan] for plan in plans],
        temperatures=[[t for _, t in plan] for plan in plans],
        ended=ended,
    )
    if cache_file is not None:
        atomic_write_text(Path(cache_file), json.dumps(asdict(result)))
    return result
