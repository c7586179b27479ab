"""Runs that nothing can corrupt: partial stage directories and torn records."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf_lib.config import load_preset
from rlhf_lib.io import atomic_write_text, read_json
from rlhf_lib.pipeline import DONE, OWNER, RunPaths, cached_stage, read_done


def _partial(final: Path, tag: str, owner: dict | None) -> Path:
    folder = final.parent / f".{final.name}.partial-{tag}"
    folder.mkdir(parents=True)
    if owner is not None:
        (folder / OWNER).write_text(json.dumps(owner))
    return folder


def test_only_a_dead_owners_partial_directories_are_removed(tmp_path):
    paths = RunPaths.for_config(load_preset("micro"), tmp_path / "runs")
    final = paths.stage("data")
    dead_pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                                  text=True, check=True).stdout)
    host = socket.gethostname()
    live = _partial(final, "live", {"pid": os.getpid(), "host": host})
    dead = _partial(final, "dead", {"pid": dead_pid, "host": host})
    remote = _partial(final, "remote", {"pid": dead_pid, "host": host + "-elsewhere"})
    fresh = _partial(final, "fresh", None)  # just created; its owner is about to write its record
    old = _partial(final, "old", None)
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    with cached_stage(paths, "data") as handle:
        assert not handle.done
        assert json.loads((handle.dir / OWNER).read_text())["pid"] == os.getpid()
        (handle.dir / "artifact.txt").write_text("data")
    assert live.exists() and remote.exists() and fresh.exists()
    assert not dead.exists() and not old.exists()
    assert sorted(p.name for p in final.iterdir()) == [DONE, "artifact.txt"]  # the owner record is not published


def test_a_torn_done_record_reruns_the_stage(tmp_path):
    paths = RunPaths.for_config(load_preset("micro"), tmp_path / "runs")
    final = paths.stage("data")
    final.mkdir(parents=True)
    (final / DONE).write_text('{"stage": "da')  # cut off mid-write
    with pytest.warns(UserWarning, match="unreadable"):
        assert not paths.is_done("data")
        with cached_stage(paths, "data") as handle:
            assert not handle.done
            (handle.dir / "artifact.txt").write_text("data")
    assert read_done(final)["stage"] == "data" and (final / "artifact.txt").exists()


def test_read_json_and_atomic_write(tmp_path):
    assert read_json(tmp_path / "missing.json") is None
    (tmp_path / "torn.json").write_text('{"a": ')
    with pytest.warns(UserWarning, match="torn.json is unreadable"):
        assert read_json(tmp_path / "torn.json") is None
    atomic_write_text(tmp_path / "sub" / "r.json", '{"a": 1}')
    assert read_json(tmp_path / "sub" / "r.json") == {"a": 1}
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["r.json"]  # no temporary file left behind
