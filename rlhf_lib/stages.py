"""Run one stage of the study outside the notebooks; the training stages can run on several GPUs.

    python -m rlhf_lib.stages sft --preset tiny                       # one process, as a notebook would
    torchrun --nproc_per_node 4 -m rlhf_lib.stages sft --preset medium
    accelerate launch --num_processes 4 -m rlhf_lib.stages ppo --preset medium

The result is the same cached stage directory the notebooks use (runs/<preset>/<stage>-<fp>/), so a
notebook run afterwards only renders it. `run_all.py --launcher "torchrun --nproc_per_node 4"` does
exactly this for every unfinished distributed stage before executing its notebook.

Distributed: `sft` (TRL's Trainer, DDP) and `ppo` (our accelerate loop, DDP). Every process trains on
its share of each batch; the preset's batch sizes stay global (SFT divides gradient accumulation by the
number of processes, PPO divides the rollout and minibatch). The main process alone writes files and
samples. The other stages are single-process; launched on several processes they refuse to run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from rlhf_lib.config import StudyConfig, load_preset
from rlhf_lib.pipeline import STAGES, RunPaths, is_main_process, wait_for_all_processes

DISTRIBUTED_STAGES = ("sft", "ppo")


def stage_runner(stage: str) -> Callable[[StudyConfig, RunPaths, bool], object]:
    """The function that builds one stage's cached directory (what its notebook calls)."""
    if stage == "data":
        from rlhf_lib.data.study import build_data_stage

        return lambda cfg, paths, progress: build_data_stage(cfg, paths)
    if stage == "sft":
        from rlhf_lib.sft import run_sft_stage

        return run_sft_stage
    if stage == "reward":
        from rlhf_lib.reward import run_reward_stage

        return run_reward_stage
    if stage == "ppo":
        from rlhf_lib.ppo import run_ppo_stage

        return run_ppo_stage
    if stage == "analysis":
        from rlhf_lib.analysis import run_analysis_stage

        return run_analysis_stage
    raise KeyError(f"Unknown stage '{stage}'; stages are {STAGES}.")


def stage_command(stage: str, preset: str, runs_dir: str, overrides: dict, launcher: list[str]) -> list[str]:
    """The command line that runs `stage` under `launcher` (e.g. ["torchrun", "--nproc_per_node", "4"])."""
    launcher = launcher or [sys.executable]
    return [*launcher, "-m", "rlhf_lib.stages", stage, "--preset", preset, "--runs-dir", runs_dir,
            "--overrides-json", json.dumps(overrides)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--preset", default="tiny", help="a preset in configs/ (default: tiny)")
    parser.add_argument("--runs-dir", default="", help="stage artifacts folder (default: runs/<preset>/)")
    parser.add_argument("--overrides-json", default="{}", help='dotted overrides, e.g. \'{"seed": 1}\'')
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if processes > 1:
        if args.stage not in DISTRIBUTED_STAGES:
            print(f"Stage '{args.stage}' runs in one process; launch it without torchrun/accelerate. "
                  f"Distributed stages: {', '.join(DISTRIBUTED_STAGES)}.", file=sys.stderr)
            return 2
        import torch
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available())  # joins the process group the launcher set up
    cfg = load_preset(args.preset, json.loads(args.overrides_json))
    paths = RunPaths.for_config(cfg, args.runs_dir or None)
    main_process = is_main_process()
    if main_process and args.stage != "data":
        from rlhf_lib.models import REGISTRY, materialize

        # Convert offline weights once, before several processes would race to build the same cache.
        for name in {cfg.model.name, cfg.model.reward_model_name or cfg.model.name}:
            if name in REGISTRY:
                materialize(name)
    wait_for_all_processes()
    stage_runner(args.stage)(cfg, paths, main_process and not args.no_progress)
    if main_process:
        print(f"{args.stage}: {Path(paths.stage(args.stage)).resolve()} ({processes} process(es))")
    return 0

if __name__ == "__main__":
    sys.exit(main())
