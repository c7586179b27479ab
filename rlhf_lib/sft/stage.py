"""The SFT stage (notebook 02 and run_all): the policy and the PPO-ptx init, resumable, published whole.

    from rlhf_lib.sft import run_sft_stage
    stage_dir = run_sft_stage(cfg, paths)          # runs/<preset>/sft-<fingerprint>/ (cached per fingerprint)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd

from rlhf_lib.artifacts import base_weights, load_policy  # load_policy, base_weights: old path
from rlhf_lib.config import StudyConfig
from rlhf_lib.io import atomic_write_text
from rlhf_lib.pipeline import is_main_process
from rlhf_lib.prompting import format_prompt
from rlhf_lib.sft.checkpoints import latest_reward_model
from rlhf_lib.sft.train import train_sft

# --------------------------------------------------------------------------------------------
# The stage (notebook 02 and run_all)
# --------------------------------------------------------------------------------------------


def run_sft_stage(cfg: StudyConfig, paths, progress: bool = True) -> Path:
    """Train both SFT products and sample base vs SFT on held-out prompts; cached per fingerprint.

    Writes policy/ (the SFT model), ppo_init/ (the PPO initialisation), log_history_*.csv and
    samples.csv (greedy responses of base and SFT to the same eval prompts). An interrupted run keeps the
    Trainer's checkpoints in runs/<preset>/work-sft-<fp>/ and resumes from them; published, the folder goes.
    """
    from rlhf_lib.data.splits import validation_split
    from rlhf_lib.data.study import StudyData
    from rlhf_lib.generation import batching, sample_texts
    from rlhf_lib.pipeline import cached_stage

    data = StudyData.load(paths.require("data") / "study")
    work = sft_work_dir(paths)
    with cached_stage(paths, "sft") as stage:
        if not stage.done:
            rows = list(data.split("sft"))
            # Near-duplicates (e.g. two questions on one passage) stay on one side of the split.
            train_idx, val_idx = validation_split(rows, cfg.data.validation_fraction, cfg.data.near_duplicate_prefix_chars, cfg.seed)
            train = [(rows[i]["prompt"], rows[i]["reference"]) for i in train_idx]
            validation = [(rows[i]["prompt"], rows[i]["reference"]) for i in val_idx]
            # Under torchrun/accelerate launch every process trains; the main one alone writes files.
            main = is_main_process()
            reward_model_dir = None
            if cfg.sft.select_by == "reward":
                # As in the paper, the RM comes from an earlier round: this preset's last finished RM.
                reward_model_dir = latest_reward_model(paths.root)
                if reward_model_dir is None:
                    raise FileNotFoundError(
                        f"sft.select_by = 'reward' needs a reward model from an earlier run of preset '{cfg.preset}', "
                        f"and {paths.root} holds none. Run the study once with select_by = 'val_loss' first."
                    )
            policy = train_sft(cfg, train, validation, stage.dir / "policy_run", progress=progress,
                               reward_model_dir=reward_model_dir, checkpoint_dir=work / "policy",
                               tensorboard_dir=stage.dir / "tensorboard" / "policy")
            if main:
                shutil.move(str(policy.adapter_dir), stage.dir / "policy")
                policy.log_history.to_csv(stage.dir / "log_history_policy.csv", index=False)
                if (stage.dir / "policy_run" / "checkpoint_rewards.csv").exists():
                    shutil.move(str(stage.dir / "policy_run" / "checkpoint_rewards.csv"), stage.dir / "checkpoint_rewards.csv")
            pretrain = list(data.pretrain["text"])
            init = train_sft(
                cfg, train, [], stage.dir / "ppo_init_run", epochs=cfg.sft.ppo_init_epochs,
                pretrain_texts=pretrain, pretrain_mix=cfg.sft.ppo_init_pretrain_mix, progress=progress,
                checkpoint_dir=work / "ppo_init", tensorboard_dir=stage.dir / "tensorboard" / "ppo_init",
            )
            if not main:
                return paths.stage("sft")  # cached_stage publishes after every process got here
            shutil.move(str(init.adapter_dir), stage.dir / "ppo_init")
            init.log_history.to_csv(stage.dir / "log_history_ppo_init.csv", index=False)
            for run in ("policy_run", "ppo_init_run"):
                shutil.rmtree(stage.dir / run, ignore_errors=True)

            eval_rows = list(data.split("eval"))[: cfg.generation.batch_size]
            model, tokenizer = load_policy(stage.dir / "policy")
            texts = [format_prompt(tokenizer, r["prompt"]) for r in eval_rows]
            kwargs = dict(max_new_tokens=cfg.generation.max_new_tokens, temperature=0.0, **batching(cfg.generation),
                          progress=progress)
            sft_out = sample_texts(model, tokenizer, texts, desc="SFT samples", **kwargs)
            with base_weights(model, cfg) as base:
                base_out = sample_texts(base, tokenizer, texts, desc="base samples", **kwargs)
            pd.DataFrame(
                {"prompt_id": [r["id"] for r in eval_rows], "category": [r["category"] for r in eval_rows],
                 "prompt": [r["prompt"] for r in eval_rows], "reference": [r["reference"] for r in eval_rows],
                 "base": base_out, "sft": sft_out}
            ).to_csv(stage.dir / "samples.csv", index=False)
            atomic_write_text(stage.dir / "timing.json",
                              json.dumps({"policy_seconds": policy.seconds, "ppo_init_seconds": init.seconds}, indent=1))
    if is_main_process():
        shutil.rmtree(work, ignore_errors=True)  # the chosen checkpoints are in the published stage now
    return paths.stage("sft")


def sft_work_dir(paths) -> Path:
    """Where the SFT stage's Trainer checkpoints outlive an interruption (the partial stage directory does not)."""
    return paths.root / f"work-sft-{paths.cfg.fingerprint('sft')}"
