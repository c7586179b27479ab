"""The reward stage (notebook 03): comparisons, labels, the reward model by `reward.method`, every prediction.

    from rlhf_lib.reward.stage import run_reward_stage
    rm_dir = run_reward_stage(cfg, paths)      # runs/<preset>/reward-<fingerprint>/ (cached per fingerprint)

Comparisons are collected here (sampled, labeler noise calibrated, ranked); the methods live beside it: lora.py (end to
end on a GPU), cached_head.py (a head on the frozen SFT model's cached features), blocks.py (the top blocks too).
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from rlhf_lib.config import StudyConfig
from rlhf_lib.reward.blocks import train_cached_blocks_rms
from rlhf_lib.reward.cached_head import train_cached_head_rms
from rlhf_lib.reward.lora import train_lora_rms
from rlhf_lib.tracking import open_tracker

if TYPE_CHECKING:
    from rlhf_lib.pipeline import RunPaths

# reward.method -> (cfg, paths, comparison tables, stage dir, progress) -> (timings, predictions)
METHODS = {"lora": train_lora_rms, "cached_head": train_cached_head_rms, "cached_blocks": train_cached_blocks_rms}


def collect_comparisons(cfg: StudyConfig, paths: RunPaths, work: Path, out_dir: Path, progress: bool = True) -> dict[str, list[dict]]:
    """Sample K completions per RM prompt, calibrate the labelers on them, and rank them.

    Training prompts are ranked by training labelers; held-out prompts (never trained on) by training AND by
    held-out labelers; `labelers.labelers_per_prompt` of each population rank every prompt. Writes
    agreement.csv and the three comparison files into `out_dir`; returns {file name: rows}.
    """
    from rlhf_lib import labelers as lab
    from rlhf_lib.comparisons import sample_k_completions
    from rlhf_lib.data.study import StudyData

    data = StudyData.load(paths.require("data") / "study")
    rows = [dict(r) for r in data.split("rm")]
    samples = sample_k_completions(cfg, paths.require("sft") / "policy", rows, work / "completions.json", progress)
    completions = samples.completions

    # Labelers: calibrate the shared noise on these real samples, then measure agreement.
    train_pop = lab.make_population(cfg.labelers, "train", seed=cfg.seed)
    heldout_pop = lab.make_population(cfg.labelers, "heldout", seed=cfg.seed)
    sigma, _ = lab.calibrate_noise(train_pop, rows, completions, target=cfg.labelers.target_agreement, seed=cfg.seed)
    train_pop, heldout_pop = lab.with_noise(train_pop, sigma), lab.with_noise(heldout_pop, sigma)
    report = lab.agreement(train_pop + heldout_pop, rows, completions, seed=cfg.seed + 1)
    pd.DataFrame(report.to_rows()).assign(noise_scale=sigma).to_csv(out_dir / "agreement.csv", index=False)

    order = list(range(len(rows)))
    random.Random(cfg.seed).shuffle(order)
    n_held = max(1, round(len(rows) * cfg.reward.heldout_fraction))
    held, trained = sorted(order[:n_held]), sorted(order[n_held:])

    def label(indices: list[int], population: list, name: str) -> list[dict]:
        pick = lambda values: [values[i] for i in indices]  # noqa: E731
        return list(lab.label_comparisons(
            pick(rows), pick(completions), pick(samples.sources), population, seed=cfg.seed,
            out_path=work / f"{name}.jsonl", labelers_per_prompt=cfg.labelers.labelers_per_prompt,
            temperatures_per_prompt=pick(samples.temperatures), ended_per_prompt=pick(samples.ended), progress=progress,
        ))

    tables = {
        "comparisons_train.jsonl": label(trained, train_pop, "train_prompts_train_labelers"),
        "comparisons_heldout_trainlabelers.jsonl": label(held, train_pop, "heldout_prompts_train_labelers"),
        "comparisons_heldout_heldoutlabelers.jsonl": label(held, heldout_pop, "heldout_prompts_heldout_labelers"),
    }
    for name, table in tables.items():
        pd.DataFrame(table).to_json(out_dir / name, orient="records", lines=True)
    return tables


def run_reward_stage(cfg: StudyConfig, paths: RunPaths, progress: bool = True) -> Path:
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
