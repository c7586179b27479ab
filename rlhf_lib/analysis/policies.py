"""What the analysis evaluates and with what: the upstream stages' policies, one base model carrying them, the
decoding every output uses, and the held-out labelers who judge.

    upstream_state, find_upstream   when each upstream stage finished; where each method's policy lives (Availability)
    PolicyBank                      the SFT policy's base, every LoRA policy that shares it as a named adapter
    few_shot_demonstrations         GPT prompted's k demonstrations; Decoding and _generate: how outputs are decoded
    heldout_judges                  the held-out labeler population with the reward stage's calibrated noise
"""

from __future__ import annotations

import contextlib
import gc
import json
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from rlhf_lib.config import StudyConfig
from rlhf_lib.pipeline import RunPaths

PPO_RUNS = {"PPO": "ppo", "PPO-ptx": "ppo_ptx"}  # method -> run folder inside the ppo stage


# --------------------------------------------------------------------------------------------
# Upstream artifacts: what exists, and what can be evaluated
# --------------------------------------------------------------------------------------------


def _done_record(paths: RunPaths, stage: str) -> dict[str, Any] | None:
    from rlhf_lib.pipeline import read_done

    return read_done(paths.stage(stage))  # None for a torn record too: that stage reruns


def upstream_state(paths: RunPaths) -> dict[str, str | None]:
    """When each upstream stage finished (None when it has not): a changed entry invalidates the analysis."""
    return {stage: (_done_record(paths, stage) or {}).get("finished_utc") for stage in ("data", "sft", "reward", "ppo")}


@dataclass
class Availability:
    """Where each method's policy lives, and why the others are skipped."""

    policies: dict[str, Path] = field(default_factory=dict)  # LoRA/full policy dirs by method (SFT, PPO, PPO-ptx)
    reward_dir: Path | None = None
    ppo_runs: dict[str, Path] = field(default_factory=dict)  # method -> run dir (metrics.csv, samples.jsonl)
    skipped: dict[str, str] = field(default_factory=dict)  # method or metric -> reason


def find_upstream(paths: RunPaths) -> Availability:
    """Locate the SFT policy (required), the RM and the PPO runs (optional), with a reason for each gap."""
    sft = paths.require("sft")
    found = Availability(policies={"SFT": sft / "policy"})
    if paths.is_done("reward") and (paths.stage("reward") / "model" / "meta.json").exists():
        found.reward_dir = paths.stage("reward")
    else:
        reason = f"no finished reward stage ({paths.stage('reward').name}): run notebook 03"
        found.skipped.update({"best-of-n": reason, "DPO": reason, "rm_accuracy": reason})
    ppo_stage = paths.stage("ppo")
    for method, run in PPO_RUNS.items():
        policy = ppo_stage / run / "policy"
        if paths.is_done("ppo") and (policy / "meta.json").exists():
            found.policies[method] = policy
            found.ppo_runs[method] = ppo_stage / run
        elif not paths.is_done("ppo"):
            found.skipped[method] = f"no finished PPO stage ({ppo_stage.name}): run notebook 04"
        else:
            found.skipped[method] = f"the finished PPO stage has no {run}/policy (was this run switched off?)"
    return found


# --------------------------------------------------------------------------------------------
# One base, several policies
# --------------------------------------------------------------------------------------------


class PolicyBank:
    """The SFT policy's base model, carrying every LoRA policy that shares it as a named adapter.

    `use(method)` yields a model ready to generate or score: the bare base for GPT / GPT prompted
    (adapters switched off), the SFT adapter for SFT, the method's adapter otherwise. Policies on another
    base (or fully fine-tuned) are loaded on their own for the duration of `use` and then freed.
    """

    def __init__(self, cfg: StudyConfig, sft_dir: Path):
        from rlhf_lib.artifacts import load_policy

        self.cfg = cfg
        self.model, self.tokenizer = load_policy(sft_dir)
        self.model.eval()
        self.sft_meta = json.loads((Path(sft_dir) / "meta.json").read_text())
        self.shared: set[str] = set()
        self.separate: dict[str, Path] = {}

    def _shareable(self, meta: Mapping[str, Any]) -> bool:
        return (
            hasattr(self.model, "load_adapter")
            and self.sft_meta.get("finetune", "lora") == "lora"
            and meta.get("finetune", "lora") == "lora"
            and meta.get("base_model") == self.sft_meta.get("base_model")
            and bool(meta.get("quantize_4bit", False)) == bool(self.sft_meta.get("quantize_4bit", False))
        )

    def add(self, method: str, policy_dir: Path) -> None:
        meta = json.loads((Path(policy_dir) / "meta.json").read_text())
        if self._shareable(meta):
            self.model.load_adapter(str(policy_dir), adapter_name=method, is_trainable=False)
            self.shared.add(method)
        else:
            self.separate[method] = Path(policy_dir)

    @contextlib.contextmanager
    def use(self, method: str) -> Iterator[Any]:
        from rlhf_lib.artifacts import base_weights, load_policy

        if method in ("GPT", "GPT prompted"):
            self._activate("default")
            with base_weights(self.model, self.cfg) as base:
                base.eval()
                yield base
        elif method == "SFT":
            self._activate("default")
            yield self.model
        elif method in self.shared:
            self._activate(method)
            try:
                yield self.model
            finally:
                self._activate("default")
        elif method in self.separate:
            model, _ = load_policy(self.separate[method])
            model.eval()
            try:
                yield model
            finally:
                del model
                gc.collect()
        else:
            raise KeyError(f"No policy for method '{method}'.")

    def _activate(self, adapter: str) -> None:
        if hasattr(self.model, "set_adapter"):
            self.model.set_adapter(adapter)
            self.model.requires_grad_(False)  # set_adapter marks the active adapter trainable; nothing trains here


# --------------------------------------------------------------------------------------------
# Generation helpers
# --------------------------------------------------------------------------------------------


def few_shot_demonstrations(sft_rows: Sequence[Mapping[str, Any]], k: int, seed: int) -> list[tuple[str, str]]:
    """k (prompt, reference) demonstrations for GPT prompted: a seeded draw from the shorter half of the SFT split.

    Short demonstrations keep the few-shot prompt within the model's context; the same k are used for
    every prompt, as a fixed instruction prefix would be.
    """
    usable = [r for r in sft_rows if str(r["reference"]).strip()]
    if k <= 0 or not usable:
        return []
    by_length = sorted(usable, key=lambda r: (len(r["prompt"]) + len(r["reference"]), str(r["id"])))
    pool = by_length[: max(k, len(by_length) // 2)]
    chosen = random.Random(f"{seed}:few_shot").sample(pool, min(k, len(pool)))
    return [(str(r["prompt"]), str(r["reference"])) for r in chosen]


@dataclass
class Decoding:
    """How every evaluation output is decoded."""

    max_new_tokens: int
    probe_max_new_tokens: int
    temperature: float
    top_p: float
    batching: dict[str, int]  # sample_texts' batch_size, decode_batch_size and prefill_tokens (generation.batching)
    seed: int

    @classmethod
    def from_config(cls, cfg: StudyConfig) -> Decoding:
        from rlhf_lib.generation import batching

        ev, gen = cfg.evaluation, cfg.generation
        return cls(gen.max_new_tokens, ev.probe_max_new_tokens or gen.max_new_tokens, ev.temperature,
                   gen.top_p if ev.temperature > 0 else 1.0, batching(gen), cfg.seed)

    @property
    def batch_size(self) -> int:
        """Rows per forward where texts are scored rather than sampled."""
        return self.batching["batch_size"]

    def describe(self) -> str:
        how = "greedy" if self.temperature == 0 else f"sampled at temperature {self.temperature:g} (top_p {self.top_p:g})"
        return f"{how}, seed {self.seed}, {self.max_new_tokens} new tokens ({self.probe_max_new_tokens} for probes)"


def _generate(model, tokenizer, texts: Sequence[str], dec: Decoding, desc: str, progress: bool,
              max_new_tokens: int | None = None, temperature: float | None = None, seed: int | None = None) -> list[str]:
    from rlhf_lib.generation import sample_texts

    if not texts:
        return []
    return sample_texts(
        model, tokenizer, list(texts), max_new_tokens=max_new_tokens or dec.max_new_tokens,
        temperature=dec.temperature if temperature is None else temperature, top_p=dec.top_p,
        **dec.batching, seed=dec.seed if seed is None else seed, desc=desc, progress=progress,
    )


# --------------------------------------------------------------------------------------------
# Judges
# --------------------------------------------------------------------------------------------


def heldout_judges(cfg: StudyConfig, reward_dir: Path | None) -> tuple[list, float]:
    """The held-out labeler population, with the noise the reward stage calibrated (else the preset's)."""
    from rlhf_lib import labelers as lab

    noise = cfg.labelers.noise_scale
    if reward_dir is not None and (reward_dir / "agreement.csv").exists():
        agreement = pd.read_csv(reward_dir / "agreement.csv")
        if "noise_scale" in agreement and agreement["noise_scale"].notna().any():
            noise = float(agreement["noise_scale"].dropna().iloc[0])
    return lab.with_noise(lab.make_population(cfg.labelers, "heldout", seed=cfg.seed), noise), noise
