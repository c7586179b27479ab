"""Run one stage of the study outside the notebooks; the training stages can run on several GPUs.

    python -m rlhf_lib.stages sft --preset tiny                       # one process, as a notebook would
    torchrun --nproc_per_node 4 -m rlhf_lib.stages sft --preset medium
    accelerate launch --num_processes 4 -m rlhf_lib.stages ppo --preset medium

The result is the same cached stage directory the notebooks use (runs/<preset>/<stage>-<fp>/), so a
notebook run afterwards only renders it. `run_all.py --launcher "torchrun --nproc_per_node 4"` does
exactly this for every unfinished distributed stage before executing its notebook.

The main process holds the runs folder's lock (rlhf_lib.locking) while the stage writes: a second run
of the same folder waits, saying who holds it, or with --no-wait exits with status 2. Under run_all,
which already holds it, the stage works under run_all's lock.

Distributed: `sft` (TRL's Trainer, DDP) and `ppo` (our accelerate loop, DDP). Every process trains on
its share of each batch; the preset's batch sizes stay global (SFT divides gradient accumulation by the
number of processes, PPO divides the rollout and minibatch). The main process alone writes files and
samples. The other stages are single-process; launched on several processes they refuse to run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

from rlhf_lib.config import StudyConfig, load_preset
from rlhf_lib.locking import LockBusy, hold_lock, parent_death_signal
from rlhf_lib.pipeline import (
    DISTRIBUTED_STAGES,
    STAGES,
    RunPaths,
    is_main_process,
    stage_entry,
    wait_for_all_processes,
)


def stage_runner(stage: str) -> Callable[[StudyConfig, RunPaths, bool], object]:
    """The function that builds one stage's cached directory (what its notebook calls), from the stage table."""
    module, _, function = stage_entry(stage).runner.partition(":")
    return getattr(importlib.import_module(module), function)


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
    parser.add_argument("--no-wait", action="store_true", help="exit (status 2) when another run holds the runs folder")
    args = parser.parse_args(argv)
    args.runs_dir = str(Path(args.runs_dir).expanduser().resolve()) if args.runs_dir else ""  # once, here
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if processes > 1:
        parent_death_signal()()  # a launcher killed with SIGKILL takes its workers with it
        if args.stage not in DISTRIBUTED_STAGES:
            print(f"Stage '{args.stage}' runs in one process; launch it without torchrun/accelerate. "
                  f"Distributed stages: {', '.join(DISTRIBUTED_STAGES)}.", file=sys.stderr)
            return 2
        import torch
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available())  # joins the process group the launcher set up
    cfg = load_preset(args.preset, json.loads(args.overrides_json))
    paths = RunPaths.for_config(cfg, args.runs_dir or None)
    # The launcher's rank 0 takes the lock for all its processes (the others would wait on it forever).
    lock = hold_lock(paths.root, wait=not args.no_wait) if int(os.environ.get("RANK", "0")) == 0 else nullcontext()
    try:
        with lock:
            run_stage(args, cfg, paths, processes)
    except LockBusy as err:
        print(f"rlhf_lib.stages: {err}", file=sys.stderr)
        return 2
    return 0


def run_stage(args: argparse.Namespace, cfg: StudyConfig, paths: RunPaths, processes: int) -> None:
    """Build one stage's cached directory (every process of a launcher calls this)."""
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


if __name__ == "__main__":
    sys.exit(main())
