"""What every export shares: folder names, config.json keys, the refusal, and what the finished study holds."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf_lib.io import read_json
from rlhf_lib.pipeline import STAGES, RunPaths, read_done

REPO = Path(__file__).resolve().parents[2]  # the repository (results/ lives there)
POLICIES = {"sft": ("sft", "policy"), "ppo": ("ppo", "ppo/policy"), "ppo_ptx": ("ppo", "ppo_ptx/policy")}
POLICY_TITLES = {"sft": "SFT", "ppo": "PPO", "ppo_ptx": "PPO-ptx"}
REWARD_DIR, REWARD_OWN_FORMAT_DIR, COMPARISONS_DIR = "reward_model", "reward_model_rlhf_format", "comparisons"
SCORE_OFFSET_KEY = "rlhf_score_offset"  # config.json: logits + offset = the study's score
REWARD_INPUT_KEY = "rlhf_reward_input"  # config.json: how to build the text the RM scores
# The extra coordinate's constant in a mid-block RM: C**2 must dwarf the squared norm of any hidden state
# (its share of the final norm's variance is the relative error, ~|h|^2 / C^2; SmolLM2-135M's mid-depth states
# reach |h| ~ 2.5e4) and C**2 / width must stay finite in float32 (and in bfloat16, which shares its range).
NORM_NEUTRALISING_CONSTANT = 1e10
HUB_SUFFIXES = {"sft": "-sft", "ppo": "-ppo", "ppo_ptx": "-ppo-ptx", REWARD_DIR: "-reward-model",
                REWARD_OWN_FORMAT_DIR: "-reward-model", COMPARISONS_DIR: "-comparisons"}


class ExportRefused(RuntimeError):
    """This artifact cannot be exported in the standard form with equal outputs (the message says why)."""


# --------------------------------------------------------------------------------------------
# What the study holds
# --------------------------------------------------------------------------------------------


@dataclass
class StudyContext:
    """Everything the cards need: preset, seed, stage records, data provenance, findings (or None)."""

    preset: str
    seed: int
    records: dict[str, dict]  # stage -> DONE.json (finished stages only)
    stage_dirs: dict[str, Path]
    data_info: dict[str, Any] = field(default_factory=dict)
    findings: dict[str, Any] | None = None
    base_model: str = ""


def study_context(paths: RunPaths, results_dir: Path) -> StudyContext:
    """Read the finished stages of one preset (DONE.json), the data provenance and findings.json."""
    records, dirs = {}, {}
    for stage in STAGES:
        record = read_done(paths.stage(stage))
        if record is not None:
            records[stage], dirs[stage] = record, paths.stage(stage)
    # A torn file gives None with a warning (read_json): the cards then say "not available" instead of crashing.
    info = read_json(paths.stage("data") / "study" / "info.json")
    findings = read_json(Path(results_dir) / "findings.json")
    return StudyContext(paths.cfg.preset, paths.cfg.seed, records, dirs, info if isinstance(info, dict) else {},
                        findings if isinstance(findings, dict) else None, paths.cfg.model.name)


