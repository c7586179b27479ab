"""One tracking knob for every stage: TensorBoard events where the stage lives, other backends by name, none."""

import math
import os

import pandas as pd
import pytest

from rlhf_lib import tracking
from rlhf_lib.config import load_preset


def _scalars(directory) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_tracker_logs_numbers_at_their_steps_and_skips_gaps(tmp_path):
    cfg = load_preset("micro")
    with tracking.open_tracker(cfg, "reward", tmp_path / "tb") as tracker:
        tracker.log({"loss": 0.5, "note": "text", "missing": math.nan}, step=1)
        tracker.log_history(pd.DataFrame({"epoch": [1, 2], "val_loss": [0.7, 0.6], "mode": ["kwise", "kwise"]}),
                            "epoch", prefix="reward/kwise")
    scalars = _scalars(tmp_path / "tb")
    assert scalars["loss"] == [(1, 0.5)] and "note" not in scalars and "missing" not in scalars
    assert [(step, round(value, 3)) for step, value in scalars["reward/kwise/val_loss"]] == [(1, 0.7), (2, 0.6)]


def test_none_writes_nothing(tmp_path):
    cfg = load_preset("micro", {"tracking.report_to": "none"})
    with tracking.open_tracker(cfg, "ppo", tmp_path / "tb") as tracker:
        tracker.log({"loss": 1.0}, step=1)
    assert not (tmp_path / "tb").exists()
    assert tracking.trainer_args(cfg, "sft-policy")["report_to"] == "none"


def test_trainers_get_the_backend_the_run_name_and_a_lasting_tensorboard_folder(tmp_path, monkeypatch):
    monkeypatch.delenv(tracking.TENSORBOARD_ENV, raising=False)
    cfg = load_preset("micro", {"seed": 3})
    assert tracking.trainer_args(cfg, "dpo") == {"report_to": ["tensorboard"], "run_name": "micro-seed3/dpo",
                                                 "project": "instructgpt-study"}
    with tracking.trainer_logging_dir(cfg, tmp_path / "stage" / "tensorboard"):
        assert os.environ[tracking.TENSORBOARD_ENV] == str(tmp_path / "stage" / "tensorboard")
    assert tracking.TENSORBOARD_ENV not in os.environ  # restored: the next trainer is not sent there


@pytest.mark.parametrize("backend", ["wandb", "mlflow", "trackio"])
def test_other_backends_start_accelerates_tracker_under_the_run_name(monkeypatch, tmp_path, backend):
    from accelerate import tracking as accelerate_tracking

    made = {}

    class FakeTracker:
        def __init__(self, *args, **kwargs):
            made.update(args=args, kwargs=kwargs, logged=[])

        def start(self):
            made["started"] = True

        def log(self, values, step):
            made["logged"].append((values, step))

        def finish(self):
            made["finished"] = True

    for name in ("WandBTracker", "MLflowTracker", "TrackioTracker"):
        monkeypatch.setattr(accelerate_tracking, name, FakeTracker)
    cfg = load_preset("micro", {"tracking.report_to": backend, "tracking.run_name": "trial"})
    with tracking.open_tracker(cfg, "ppo", tmp_path / "tb") as tracker:
        tracker.log({"ppo/kl": 0.25}, step=4)
    assert made["started"] and made["finished"] and made["logged"] == [({"ppo/kl": 0.25}, 4)]
    assert "trial/ppo" in [*made["args"], *made["kwargs"].values()]
    assert not (tmp_path / "tb").exists()


def test_the_tracking_knob_is_in_no_stage_fingerprint():
    plain, other = load_preset("micro"), load_preset("micro", {"tracking.report_to": "none", "tracking.run_name": "x"})
    assert all(plain.fingerprint(stage) == other.fingerprint(stage) for stage in plain.STAGE_SECTIONS)
