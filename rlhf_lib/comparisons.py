"""Comparison collection for the reward model: K completions per prompt, ranked by labelers.

For each RM prompt, K (uniform in [labelers.k_min, labelers.k_max], seeded) completions are sampled
at the rollout temperature, a share `reward.sft_share` from the SFT policy and the rest from the
pretrained base (the paper mixed sources too), then ranked by one training labeler per prompt.

    from rlhf_lib.comparisons import sample_k_completions
    completions, sources = sample_k_completions(cfg, sft_adapter_dir, prompt_rows)
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rlhf_lib.config import StudyConfig
from rlhf_lib.generation import sample_texts
from rlhf_lib.prompting import format_prompt


def plan_sources(cfg: StudyConfig, n_prompts: int, seed: int) -> list[list[str]]:
    """For each prompt, the model each of its K completions comes from ("sft" or "base")."""
    rng = random.Random(seed)
    plans = []
    for _ in range(n_prompts):
        k = rng.randint(cfg.labelers.k_min, cfg.labelers.k_max)
        n_sft = round(k * cfg.reward.sft_share)
        sources = ["sft"] * n_sft + ["base"] * (k - n_sft)
        rng.shuffle(sources)  # so position in the list says nothing about the source
        plans.append(sources)
    return plans


def sample_k_completions(
    cfg: StudyConfig,
    sft_adapter_dir: Path,
    prompt_rows: Sequence[Mapping[str, Any]],
    cache_file: Path | None = None,
    progress: bool = True,
) -> tuple[list[list[str]], list[list[str]]]:
    """K completions per prompt from SFT and base, batched per source; cached to JSONL when given."""
    if cache_file is not None and Path(cache_file).exists():
        saved = json.loads(Path(cache_file).read_text())
        if saved["prompt_ids"] == [r["id"] for r in prompt_rows]:
            return saved["completions"], saved["sources"]
    from rlhf_lib.sft import base_weights, load_policy

    plans = plan_sources(cfg, len(prompt_rows), cfg.seed)
    model, tokenizer = load_policy(sft_adapter_dir)
    formatted = [format_prompt(tokenizer, r["prompt"]) for r in prompt_rows]
    completions: list[list[str]] = [[""] * len(plan) for plan in plans]
    gen = cfg.generation
    for source_index, source in enumerate(("sft", "base")):
        slots = [(i, j) for i, plan in enumerate(plans) for j, s in enumerate(plan) if s == source]
        if not slots:
            continue
        texts = [formatted[i] for i, _ in slots]
        kwargs = dict(max_new_tokens=gen.max_new_tokens, temperature=gen.temperature, top_p=gen.top_p,
                      batch_size=gen.batch_size, seed=cfg.seed * 10 + source_index,
                      desc=f"RM completions ({source})", progress=progress)
        if source == "sft":
            outputs = sample_texts(model, tokenizer, texts, **kwargs)
        else:
            with base_weights(model, cfg) as base:
                outputs = sample_texts(base, tokenizer, texts, **kwargs)
        for (i, j), text in zip(slots, outputs, strict=True):
            completions[i][j] = text
    if cache_file is not None:
        Path(cache_file).parent.mkdir(parents=True, exist_ok=True)
        payload = {"prompt_ids": [r["id"] for r in prompt_rows], "completions": completions, "sources": plans}
        tmp = Path(cache_file).with_suffix(".tmp")
        tmp.write_text(json.dumps(payload))
        tmp.replace(cache_file)
    return completions, plans
