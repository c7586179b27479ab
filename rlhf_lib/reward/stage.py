"""The reward stage (notebook 03): comparisons, labels, the reward model by `reward.method`, every prediction.

    from rlhf_lib.reward.stage import run_reward_stage
    rm_dir = run_reward_stage(cfg, paths)      # runs/<preset>/reward-<fingerprint>/ (cached per fingerprint)

The methods live in rlhf_lib.reward (`lora`: end to end on a GPU; `cached_head`: a head on the frozen SFT model's
cached features) and rlhf_lib.reward_blocks (`cached_blocks`: the top blocks too); this module sits above both.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pandas as pd

from rlhf_lib.config import StudyConfig
from rlhf_lib.reward.blocks import train_cached_blocks_rms
from rlhf_lib.reward.cached_head import collect_comparisons, train_cached_head_rms, train_lora_rms
from rlhf_lib.tracking import open_tracker

# reward.method -> (cfg, paths, comparison tables, stage dir, progress) -> (timings, predictions)
METHODS = {"lora": train_lora_rms, "cached_head": train_cached_head_rms, "cached_blocks": train_cached_blocks_rms}


def run_reward_stage(cfg: StudyConfig, paths, progress: bool = True) -> Path:
    """Collect K-wise comparisons, calibrate the labelers, train the RM (and the shuffled-pairs ablation)
    by `reward.method`, and save every prediction needed to recompute its accuracies. Cached per fingerprint.

    An interrupted run keeps its sampled completions and labels in runs/<preset>/work-reward-<fp>/. The training
    histories also go to `tracking.report_to` (TensorBoard: the stage's tensorboard/ folder).
    """
    from rlhf_lib.pipeline import cached_stage

    work = paths.root / f"work-reward-{cfg.fingerprint('reward')}"
    with cached_stage(paths, "reward") as stage:
        if not stage.done:
            started = time.time()
            tables = collect_comparisons(cfg, paths, work, stage.dir, progress)
            sampled = time.time() - started
            timings, predictions = METHODS[cfg.reward.method](cfg, paths, tables, stage.dir, progress)
            predictions.to_csv(stage.dir / "predictions.csv", index=False)
            timings |= {"method": cfg.reward.method, "comparisons_seconds": sampled, "total_seconds": time.time() - started}
            (stage.dir / "timing.json").write_text(json.dumps(timings, indent=1))
            log_histories(cfg, stage.dir)
    shutil.rmtree(work, ignore_errors=True)  # the samples and labels are in the published stage now
    return paths.stage("reward")


def log_histories(cfg: StudyConfig, stage_dir: Path) -> None:
    """Each train_history_<mode>.csv of the stage (per epoch for the cached methods, per step for lora) as curves
    `reward/<mode>/<column>` on the study's dashboard."""
    with open_tracker(cfg, "reward", stage_dir / "tensorboard") as tracker:
        for path in sorted(stage_dir.glob("train_history_*.csv")):
            history = pd.read_csv(path)
            step = "epoch" if "epoch" in history else "step"
            tracker.log_history(history.drop(columns=["mode"], errors="ignore"), step,
                                prefix=f"reward/{path.stem.removeprefix('train_history_')}")
