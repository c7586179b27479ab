"""One tracking knob for every stage: `[tracking] report_to` (tensorboard by default; wandb, mlflow, trackio, none).

    python run_all.py --set tracking.report_to=wandb           # every stage to one W&B project
    tensorboard --logdir runs/tiny                              # the default: every stage's curves in one view

TRL's trainers (SFT, DPO) get the backend through `trainer_args`; our own loops (the reward model's fits, PPO)
log through `open_tracker`, which wraps accelerate's trackers. Every stage logs under one run name
(`tracking.run_name`, default "<preset>-seed<seed>") as "<run name>/<part>" (for example "tiny-seed0/sft-policy"),
so one dashboard shows the whole study. TensorBoard's event files live inside each stage's folder (they travel
with the stage and go when it is rebuilt); `tensorboard --logdir runs/<preset>` finds them all.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd

from rlhf_lib.config import StudyConfig

TENSORBOARD_ENV = "TENSORBOARD_LOGGING_DIR"  # where transformers' TensorBoard callback writes, read when it is built


def run_name(cfg: StudyConfig) -> str:
    return cfg.tracking.run_name or f"{cfg.preset}-seed{cfg.seed}"


def trainer_args(cfg: StudyConfig, part: str) -> dict[str, Any]:
    """TrainingArguments fields for a TRL trainer (SFT, DPO): the backend and the run's name for this part."""
    backend = cfg.tracking.report_to
    return {"report_to": "none" if backend == "none" else [backend], "run_name": f"{run_name(cfg)}/{part}",
            "project": cfg.tracking.project}


@contextmanager
def trainer_logging_dir(cfg: StudyConfig, directory: Path) -> Iterator[None]:
    """A Trainer built inside this block writes its TensorBoard events to `directory` (the stage's folder) rather than
    under its checkpoint folder, which the study deletes; other backends need no folder."""
    if cfg.tracking.report_to != "tensorboard":
        yield
        return
    before = os.environ.get(TENSORBOARD_ENV)
    os.environ[TENSORBOARD_ENV] = str(directory)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(TENSORBOARD_ENV, None)
        else:
            os.environ[TENSORBOARD_ENV] = before


class Tracker:
    """`log(values, step)` to the configured backend; nothing for "none" or off the main process."""

    def __init__(self, backend: Any = None, writer: Any = None):
        self.backend, self.writer = backend, writer  # an accelerate GeneralTracker, or a TensorBoard SummaryWriter

    def log(self, values: Mapping[str, float], step: int) -> None:
        numbers = {key: float(value) for key, value in values.items() if _is_number(value)}
        if self.writer is not None:
            for key, value in numbers.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()
        elif self.backend is not None:
            self.backend.log(numbers, step=step)

    def log_history(self, history: pd.DataFrame, step_column: str, prefix: str) -> None:
        """Every row of a training history (one per epoch or step) as `<prefix>/<column>` at its step."""
        for _, row in history.iterrows():
            if _is_number(row.get(step_column)):
                self.log({f"{prefix}/{key}": value for key, value in row.items() if key != step_column},
                         step=int(row[step_column]))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        elif self.backend is not None:
            self.backend.finish()


def _is_number(value: Any) -> bool:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return False
    return number == number  # NaN: a row without this value


def new_tracker(cfg: StudyConfig, part: str, tensorboard_dir: Path, enabled: bool = True, purge_step: int | None = None
                ) -> Tracker:
    """A started tracker for one part of a stage. tensorboard: events in `tensorboard_dir` (with `purge_step`, a
    resumed run first drops the events after its checkpoint); wandb / mlflow / trackio: accelerate's tracker under
    the run's name, grouped in `tracking.project`."""
    backend = cfg.tracking.report_to
    if not enabled or backend == "none":
        return Tracker()
    if backend == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        return Tracker(writer=SummaryWriter(str(tensorboard_dir), purge_step=purge_step))
    from accelerate import tracking

    name, project = f"{run_name(cfg)}/{part}", cfg.tracking.project
    if backend == "wandb":
        tracker = tracking.WandBTracker(project, name=name, group=run_name(cfg))
    elif backend == "mlflow":
        tracker = tracking.MLflowTracker(experiment_name=project, run_name=name)
    else:
        tracker = tracking.TrackioTracker(project, name=name)
    tracker.start()
    return Tracker(backend=tracker)


@contextmanager
def open_tracker(cfg: StudyConfig, part: str, tensorboard_dir: Path, enabled: bool = True) -> Iterator[Tracker]:
    """`new_tracker`, closed at the end of the block."""
    tracker = new_tracker(cfg, part, tensorboard_dir, enabled)
    try:
        yield tracker
    finally:
        tracker.close()
