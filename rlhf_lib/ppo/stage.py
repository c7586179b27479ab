"""The PPO stage (notebook 04 and run_all): PPO and PPO-ptx from the SFT model's PPO init against the trained RM.

    from rlhf_lib.ppo import run_ppo_stage
    stage_dir = run_ppo_stage(cfg, paths)       # runs/<preset>/ppo-<fingerprint>/{ppo,ppo_ptx}/
"""

from __future__ import annotations

import shutil
from pathlib import Path

from rlhf_lib.config import StudyConfig
from rlhf_lib.ppo.checkpoint import (
    CHECKPOINT_PREFIX,
)
from rlhf_lib.ppo.trainer import train_ppo

# ============================================================================================
# The stage (notebook 04 and run_all)
# ============================================================================================


def run_ppo_stage(cfg: StudyConfig, paths, progress: bool = True) -> Path:
    """PPO and PPO-ptx from the PPO initialisation against the trained RM; cached per fingerprint.

    Writes ppo/ and ppo_ptx/ (policy, value, metrics.csv, samples.jsonl, tensorboard/). Each run
    trains in runs/<preset>/work-ppo-<fp>/ first, so an interrupted run resumes from its last
    checkpoint; only finished runs are published.
    """
    from rlhf_lib.data.study import StudyData
    from rlhf_lib.pipeline import cached_stage, is_main_process, wait_for_all_processes

    data = StudyData.load(paths.require("data") / "study")
    init_dir = paths.require("sft") / "ppo_init"
    reward_dir = paths.require("reward") / "model"
    prompts = list(data.split("ppo")["prompt"])
    pretrain = list(data.pretrain["text"])
    work = paths.root / f"work-ppo-{cfg.fingerprint('ppo')}"
    with cached_stage(paths, "ppo") as stage:
        if not stage.done:
            for name, ptx in (("ppo", False), ("ppo_ptx", True)):
                # Under torchrun/accelerate launch every process trains (accelerate DDP); the main one writes.
                train_ppo(cfg, init_dir, reward_dir, prompts, pretrain, work / name, ptx=ptx,
                          progress=progress, samples_per_iteration=cfg.ppo.rollout_batch)
                if is_main_process():  # the chosen best-* copy is published as policy/
                    shutil.copytree(work / name, stage.dir / name,
                                    ignore=shutil.ignore_patterns(f"{CHECKPOINT_PREFIX}*", "best-*"))
                wait_for_all_processes()
    if is_main_process():
        shutil.rmtree(work, ignore_errors=True)
    return paths.stage("ppo")
