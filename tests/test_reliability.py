"""Runs that nothing can corrupt: the runs-folder lock, partial stage directories, torn records, CLI checks."""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import run_all
from rlhf_lib.config import load_preset
from rlhf_lib.io import atomic_write_text, read_json
from rlhf_lib.locking import HOLDER_ENV, LockBusy, hold_lock, read_holder
from rlhf_lib.pipeline import DONE, OWNER, RunPaths, cached_stage, read_done

REPO = Path(__file__).resolve().parent.parent
HOLDER = """
import sys
from rlhf_lib.locking import hold_lock
with hold_lock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.readline()  # until the test closes stdin
"""


@contextmanager
def held_elsewhere(folder: Path) -> Iterator[subprocess.Popen]:
    """Another process holding `folder`'s lock until the block ends."""
    env = {k: v for k, v in os.environ.items() if k != HOLDER_ENV}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, cwd=REPO, env=env)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        if proc.stdin and not proc.stdin.closed:
            proc.stdin.close()
        proc.wait(timeout=30)


def test_no_wait_exits_2_naming_the_holder(tmp_path, capsys):
    runs = tmp_path / "runs"
    with held_elsewhere(runs / "micro") as proc:
        holder = read_holder(runs / "micro")
        assert holder["pid"] == proc.pid and holder["host"] == socket.gethostname() and holder["since_utc"]
        assert run_all.main(["--sizes", "micro", "--runs-dir", str(runs), "--output", str(tmp_path / "out"),
                             "--no-wait", "--no-html"]) == 2
        err = capsys.readouterr().err
        assert f"pid {proc.pid} on host {socket.gethostname()}" in err and "in use" in err
        from rlhf_lib import stages

        assert stages.main(["data", "--preset", "micro", "--runs-dir", str(runs / "micro"), "--no-wait"]) == 2
        assert f"pid {proc.pid}" in capsys.readouterr().err
    assert read_holder(runs / "micro") is None  # the holder's sidecar goes with its lock


def test_a_waiting_run_says_who_holds_the_lock_then_takes_it(tmp_path):
    folder = tmp_path / "runs" / "micro"
    printed = io.StringIO()
    with held_elsewhere(folder) as proc:
        threading.Timer(1.0, proc.stdin.close).start()  # the other run finishes a second from now
        started = time.time()
        with hold_lock(folder, wait=True, poll_s=0.1, out=printed):
            assert time.time() - started >= 0.9
            assert read_holder(folder)["pid"] == os.getpid()
    assert f"Waiting for {folder.resolve()}: in use by pid {proc.pid}" in printed.getvalue()
    assert read_holder(folder) is None


def test_a_process_started_by_the_holder_works_under_its_lock(tmp_path, monkeypatch):
    folder = tmp_path / "runs"
    with held_elsewhere(folder) as proc:
        monkeypatch.setenv(HOLDER_ENV, str(proc.pid))  # as in a kernel or launched stage of that run
        with hold_lock(folder, wait=False):
            pass
        monkeypatch.setenv(HOLDER_ENV, str(os.getppid()))  # not the holder: must not pass
        with pytest.raises(LockBusy, match=f"pid {proc.pid}"), hold_lock(folder, wait=False):
            pass


def test_run_all_holds_the_runs_and_output_locks_while_it_executes(tmp_path, monkeypatch):
    runs, out = tmp_path / "runs", tmp_path / "out"
    seen = {}

    def fake_execute(step, args, log=None):  # a user's second command, started while a notebook runs
        env = {k: v for k, v in os.environ.items() if k != HOLDER_ENV}
        seen["env"] = os.environ.get(HOLDER_ENV)
        second = subprocess.run([sys.executable, "-m", "rlhf_lib.stages", "data", "--preset", "micro", "--runs-dir",
                                 step["runs_dir"], "--no-wait"], cwd=REPO, env=env, capture_output=True, text=True)
        seen["rc"], seen["err"] = second.returncode, second.stderr
        seen["output_holder"] = read_holder(out)
        with cached_stage(RunPaths.for_config(load_preset("micro"), step["runs_dir"]), "data") as handle:
            (handle.dir / "artifact.txt").write_text("data")
        return 0.0

    monkeypatch.setattr(run_all, "execute", fake_execute)
    monkeypatch.setattr(run_all, "ensure_kernel", lambda: None)
    assert run_all.main(["--sizes", "micro", "--only", "data", "--runs-dir", str(runs), "--output", str(out)]) == 0
    assert seen["rc"] == 2 and f"pid {os.getpid()}" in seen["err"], seen["err"]
    assert seen["env"] == str(os.getpid()) and seen["output_holder"]["pid"] == os.getpid()
    assert HOLDER_ENV not in os.environ and read_holder(runs / "micro") is None


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


def test_a_stage_is_published_only_after_every_artifact_is_fsynced(tmp_path, monkeypatch):
    """A power cut after the rename must not leave the published name pointing at data still in the page cache."""
    from rlhf_lib import io

    synced: list[str] = []
    real_fsync, real_replace = io.os.fsync, io.os.replace

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    published_after: list[set[str]] = []

    def recording_replace(source, target):
        if ".partial-" in Path(source).name:  # the stage directory, not a temporary file
            published_after.append(set(synced))
        return real_replace(source, target)

    monkeypatch.setattr(io.os, "fsync", recording_fsync)
    monkeypatch.setattr("rlhf_lib.pipeline.os.replace", recording_replace)
    paths = RunPaths.for_config(load_preset("micro"), tmp_path / "runs")
    with cached_stage(paths, "data") as handle:
        (handle.dir / "nested").mkdir()
        (handle.dir / "nested" / "weights.bin").write_bytes(b"\0" * 1024)
        (handle.dir / "artifact.txt").write_text("data")
    assert len(published_after) == 1, "the stage was not published by one rename"
    for name in ("nested/weights.bin", "artifact.txt", "DONE.json"):
        assert any(path.endswith(name) for path in published_after[0]), f"{name} was not fsynced before publishing"


@pytest.mark.filterwarnings("ignore:.*unreadable")
@pytest.mark.parametrize("torn", ['{"stages": {"data": {"noteb', "[]", '{"stages": 3}'])
def test_a_torn_run_record_is_rebuilt(tmp_path, capsys, torn):
    paths = RunPaths.for_config(load_preset("micro"), tmp_path / "runs")
    with cached_stage(paths, "data") as handle:
        (handle.dir / "artifact.txt").write_text("data")
    output = tmp_path / "results" / "micro" / "01_data.ipynb"
    record = output.parent / "run_record.json"
    record.parent.mkdir(parents=True)
    record.write_text(torn)
    step = {"size": "micro", "stage": "data", "notebook": "01_data.ipynb", "output": output,
            "runs_dir": str(paths.root), "stage_dir": paths.stage("data").name}
    run_all.write_run_records([(step, 1.0, "ran")], ["--sizes", "micro"])
    rebuilt = json.loads(record.read_text())
    assert list(rebuilt["stages"]) == ["data"] and rebuilt["stages"]["data"]["seed"] == 0
    assert "not a valid run record" in capsys.readouterr().err


@pytest.mark.parametrize("sizes", [",", "", " , ", "huge", "micro,huge"])
def test_empty_or_unknown_sizes_exit_2_listing_the_presets(sizes, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_all.parse_args(["--sizes", sizes])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "available presets (configs/*.toml): large, medium, micro, small, tiny" in err
    assert ("unknown preset(s) huge" in err) if "huge" in sizes else ("--sizes is empty" in err)


def test_sizes_are_normalised_and_paths_resolved_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = run_all.parse_args(["--sizes", " tiny, micro,tiny ", "--runs-dir", "r", "--output", "o", "--notebooks", "n"])
    assert args.sizes == "tiny,micro"
    assert (args.runs_dir, args.output, args.notebooks) == tuple(str(tmp_path / name) for name in ("r", "o", "n"))
    assert run_all.parse_args([]).runs_dir == ""  # the default runs root stays the pipeline's (absolute) default


def test_summary_keeps_every_size_that_has_findings(tmp_path):
    for size, metrics in (("tiny", "{}"), ("small", '{"mod'), ("large", None)):
        (tmp_path / size).mkdir()
        (tmp_path / size / "findings.json").write_text("{}")
        if metrics is not None:
            (tmp_path / size / "metrics.json").write_text(metrics)
    (tmp_path / "medium").mkdir()  # no findings: not a size with results
    with pytest.warns(UserWarning, match="small"):
        assert run_all.summary_sizes(tmp_path, ["micro"]) == ["micro", "tiny", "large"]


def test_the_real_notebooks_define_every_parameter_run_all_passes(monkeypatch):
    args = run_all.parse_args(["--sizes", "micro"])
    steps = [{"skip": False, "size": "micro", "notebook": name, "runs_dir": "/r", "output": Path("/o/micro") / name}
             for name in run_all.NOTEBOOKS.values()]
    run_all.check_notebook_parameters(steps, args)
    real = run_all.notebook_parameters
    monkeypatch.setattr(run_all, "notebook_parameters", lambda step, args: {**real(step, args), "extra": "1"})
    with pytest.raises(run_all.NotebookParameterError, match="does not define extra"):
        run_all.check_notebook_parameters(steps[:1], args)


# --------------------------------------------------------------------------------------------
# Metrics, findings and SUMMARY.md: written atomically, a torn metrics.json warned about, never a crash
# --------------------------------------------------------------------------------------------

TORN_METRICS = '{"preset": "tiny", "seed": 0, "methods": {"ppo": {"win_rate_vs_s'


def _committed_results(tmp_path: Path, size: str, names: tuple[str, ...]) -> Path:
    """A copy of some of results/tiny's files under tmp_path/<size> (skips when results/tiny is not rendered)."""
    import shutil

    source = REPO / "results" / "tiny"
    if not all((source / name).exists() for name in names):
        pytest.skip("results/tiny is not rendered in this checkout")
    target = tmp_path / size
    target.mkdir(parents=True)
    for name in names:
        shutil.copy2(source / name, target / name)
    return target


def test_a_torn_metrics_json_leaves_its_size_out_of_the_summary(tmp_path):
    from rlhf_lib.report import SUMMARY_FILE, write_summary

    _committed_results(tmp_path, "tiny", ("metrics.json",))
    (tmp_path / "micro").mkdir()
    (tmp_path / "micro" / "metrics.json").write_text(TORN_METRICS)
    with pytest.warns(UserWarning, match="metrics.json is unreadable"):
        summary = write_summary(tmp_path, ["micro", "tiny"])
    text = summary.read_text()
    assert summary == tmp_path / SUMMARY_FILE and "## tiny: headline numbers per method" in text
    assert "| micro | no results" in text and "## micro: headline" not in text
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == [SUMMARY_FILE]  # no temporary file left


def test_findings_from_a_torn_metrics_json_are_written_with_a_warning(tmp_path):
    from rlhf_lib.findings import load_findings, write_findings

    results = _committed_results(tmp_path, "tiny", ("metrics.json", "analysis_win_rate.csv", "run_record.json"))
    (results / "metrics.json").write_text(TORN_METRICS)
    (results / "run_record.json").write_text('{"stages": {"reward": {"stage_sec')
    with pytest.warns(UserWarning, match="unreadable"):
        record = load_findings(write_findings(results, n_resamples=100).parent)
    assert "reward_stage_minutes" in record["missing"], "a torn run record must not give a reward-stage time"
    assert record["about"]["preset"] is None  # metrics.json was ignored, not half-read


def test_load_metrics_of_a_torn_file_says_what_to_do(tmp_path):
    from rlhf_lib.analysis import load_metrics

    (tmp_path / "metrics.json").write_text(TORN_METRICS)
    with pytest.warns(UserWarning, match="unreadable"), pytest.raises(FileNotFoundError, match="--only analysis --force"):
        load_metrics(tmp_path)


def test_a_finished_analysis_with_a_torn_metrics_json_is_recomputed(tmp_path, monkeypatch):
    from rlhf_lib import analysis

    paths = RunPaths.for_config(load_preset("micro"), tmp_path / "runs")
    upstream = {"sft": "finished once"}
    runs = []

    def fake_run(cfg, paths, out, current, progress):  # the real one generates and judges: minutes, not needed here
        runs.append(out)
        atomic_write_text(out / "metrics.json", json.dumps({"preset": "micro", "run": len(runs)}))
        atomic_write_text(out / "upstream.json", json.dumps(current))

    monkeypatch.setattr(analysis.stage, "upstream_state", lambda paths: upstream)  # where run_analysis_stage looks
    monkeypatch.setattr(analysis.stage, "_run", fake_run)
    stage = analysis.run_analysis_stage(paths.cfg, paths, progress=False)
    assert analysis.load_metrics(stage)["run"] == 1 and len(runs) == 1
    analysis.run_analysis_stage(paths.cfg, paths, progress=False)
    assert len(runs) == 1, "a finished analysis with intact records was recomputed"
    (stage / "metrics.json").write_text(TORN_METRICS)
    with pytest.warns(UserWarning, match="metrics.json is unreadable"):
        analysis.run_analysis_stage(paths.cfg, paths, progress=False)
    assert len(runs) == 2 and analysis.load_metrics(stage)["run"] == 2


def test_an_interrupted_export_keeps_the_previous_metrics_whole(tmp_path, monkeypatch):
    from rlhf_lib import io
    from rlhf_lib.analysis import export_results

    stage, results = tmp_path / "stage", tmp_path / "results"
    atomic_write_text(stage / "metrics.json", json.dumps({"run": "new", "numbers": list(range(1000))}))
    atomic_write_text(results / "metrics.json", json.dumps({"run": "previous"}))

    def interrupted(*args):
        raise KeyboardInterrupt("killed before the rename")

    monkeypatch.setattr(io.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_results(stage, results)
    assert read_json(results / "metrics.json") == {"run": "previous"}
    assert [p.name for p in results.iterdir()] == ["metrics.json"], "a temporary copy was left behind"


# --------------------------------------------------------------------------------------------
# PPO killed with SIGKILL at random moments: the published stage is the uninterrupted one
# --------------------------------------------------------------------------------------------

TIMING_COLUMNS = ("time_s", "episodes_per_s")  # wall clock: the only things a resumed run may change


def _stage_command(stage: str, runs: Path) -> list[str]:
    return [sys.executable, "-m", "rlhf_lib.stages", stage, "--preset", "micro", "--runs-dir", str(runs), "--no-progress"]


def _user_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != HOLDER_ENV}  # its own lock, as a user's command takes it


def _run_stage(stage: str, runs: Path) -> tuple[subprocess.CompletedProcess, float]:
    """Run a stage to its end in its own process; (the process, its wall-clock seconds)."""
    started = time.monotonic()
    done = subprocess.run(_stage_command(stage, runs), cwd=REPO, capture_output=True, text=True, env=_user_env())
    return done, time.monotonic() - started


def _checkpoints(runs: Path, stage: str) -> set[str]:
    """The checkpoints a stage's work folder holds (PPO's and SFT's Trainer's both name them checkpoint-*)."""
    return {str(p.relative_to(runs)) for p in runs.glob(f"work-{stage}-*/*/checkpoint-*")}


def _kill_loop(stage: str, runs: Path, kills: int, seed: int, duration: float) -> list[str]:
    """Start `python -m rlhf_lib.stages <stage>` and SIGKILL it, `kills` times (the first just after a checkpoint,
    the others at a random share of `duration`, an uninterrupted run's seconds, or after one); what happened."""
    rng, seen, story = random.Random(seed), set(), []
    for round_ in range(kills):
        proc = subprocess.Popen(_stage_command(stage, runs), cwd=REPO, env=_user_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        after_checkpoint = round_ == 0 or rng.random() < 0.5
        delay = rng.uniform(0.0, 0.25) if after_checkpoint else rng.uniform(0.05, 0.8) * duration
        story.append(_kill_at(proc, lambda: _checkpoints(runs, stage), after_checkpoint, delay, seen))
        if story[-1].startswith("finished"):
            break  # the stage is published: later rounds would only find it done
    assert seen, f"no kill came after a checkpoint, so nothing was resumed: {story}"
    return story


def _kill_at(proc: subprocess.Popen, checkpoints, after_checkpoint: bool, delay: float, seen: set[str]) -> str:
    """SIGKILL `proc` `delay` seconds after its start, or after it saves a checkpoint not seen before (so the resume
    path is taken whatever the machine's speed). Returns what happened, for the failure message."""
    import signal

    deadline = time.monotonic() + 120
    while after_checkpoint and proc.poll() is None and time.monotonic() < deadline:
        if checkpoints() - seen:
            break
        time.sleep(0.05)
    time.sleep(delay)
    seen |= checkpoints()
    if proc.poll() is not None:
        return f"finished before its kill (rc {proc.returncode})"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    return f"killed {'after a checkpoint' if after_checkpoint else 'at a random time'} (+{delay:.2f} s)"


def _published_ppo(stage: Path) -> dict[str, object]:
    """What a published PPO stage holds, less wall-clock columns: weights, metrics, samples, validation."""
    import pandas as pd
    from safetensors.torch import load_file

    out: dict[str, object] = {}
    for run in ("ppo", "ppo_ptx"):
        for weights in sorted((stage / run).rglob("*.safetensors")):
            out[str(weights.relative_to(stage))] = {k: v.tolist() for k, v in load_file(str(weights)).items()}
        metrics = pd.read_csv(stage / run / "metrics.csv").drop(columns=list(TIMING_COLUMNS), errors="ignore")
        out[f"{run}/metrics.csv"] = metrics.astype(object).where(metrics.notna(), None).to_dict(orient="list")  # NaN != NaN
        for name in ("samples.jsonl", "validation.csv", "validation_state.json", "result.json"):
            if (stage / run / name).exists():
                out[f"{run}/{name}"] = (stage / run / name).read_text()
    return out


@pytest.mark.slow
def test_ppo_stage_killed_at_random_moments_publishes_what_an_uninterrupted_run_does(tmp_path, bigbench_tasks):
    """kill -9 `python -m rlhf_lib.stages ppo` a few times (seeded moments), rerun after each: the run completes,
    leaves no partial or work folder, and publishes the same weights, metrics and samples as an uninterrupted run."""
    import shutil

    import pandas as pd

    from rlhf_lib.data.study import build_data_stage
    from rlhf_lib.reward.stage import run_reward_stage
    from rlhf_lib.sft import run_sft_stage

    cfg = load_preset("micro")
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    paths = RunPaths.for_config(cfg, reference)
    build_data_stage(cfg, paths)
    run_sft_stage(cfg, paths, progress=False)
    run_reward_stage(cfg, paths, progress=False)
    killed.mkdir()
    for stage in ("data", "sft", "reward"):
        shutil.copytree(paths.stage(stage), killed / paths.stage(stage).name)
    uninterrupted, seconds = _run_stage("ppo", reference)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]

    story = _kill_loop("ppo", killed, kills=4, seed=20, duration=seconds)
    final, _ = _run_stage("ppo", killed)
    assert final.returncode == 0, f"{story}\n{final.stderr[-3000:]}"

    published = RunPaths.for_config(cfg, killed).stage("ppo")
    assert read_done(published) is not None
    assert not list(killed.glob(".*.partial-*")) and not list(killed.glob("work-ppo-*")), f"left behind: {story}"
    expected, actual = _published_ppo(paths.stage("ppo")), _published_ppo(published)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert actual[name] == expected[name], f"{name} differs after {story}"
    assert len(pd.read_csv(published / "ppo" / "metrics.csv")) == cfg.ppo.iterations


def _published_sft(stage: Path) -> dict[str, object]:
    """What a published SFT stage holds, less wall-clock columns: both adapters, their logs, the samples."""
    import pandas as pd
    from safetensors.torch import load_file

    out: dict[str, object] = {}
    for product in ("policy", "ppo_init"):
        for weights in sorted((stage / product).rglob("*.safetensors")):
            out[str(weights.relative_to(stage))] = {k: v.tolist() for k, v in load_file(str(weights)).items()}
        out[f"{product}/meta.json"] = read_json(stage / product / "meta.json")
        log = pd.read_csv(stage / f"log_history_{product}.csv")
        log = log.drop(columns=[c for c in log.columns if c.endswith(("_runtime", "_per_second"))])  # wall clock
        # train_loss: the mean of the step losses, summed in another order after a resume (float rounding only).
        log["train_loss"] = log["train_loss"].round(6)
        out[f"log_history_{product}.csv"] = log.astype(object).where(log.notna(), None).to_dict(orient="list")
    out["samples.csv"] = (stage / "samples.csv").read_text()
    return out


@pytest.mark.slow
def test_sft_stage_killed_at_random_moments_publishes_what_an_uninterrupted_run_does(tmp_path, bigbench_tasks):
    """kill -9 `python -m rlhf_lib.stages sft` a few times (seeded moments, some just after a Trainer checkpoint),
    rerun: it resumes from its work folder and publishes the same adapters, logs and samples as an uninterrupted run."""
    import shutil

    from rlhf_lib.data.study import build_data_stage

    cfg = load_preset("micro")
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    paths = RunPaths.for_config(cfg, reference)
    build_data_stage(cfg, paths)
    killed.mkdir()
    shutil.copytree(paths.stage("data"), killed / paths.stage("data").name)
    uninterrupted, seconds = _run_stage("sft", reference)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]

    story = _kill_loop("sft", killed, kills=4, seed=3, duration=seconds)
    final, _ = _run_stage("sft", killed)
    assert final.returncode == 0, f"{story}\n{final.stderr[-3000:]}"
    published = RunPaths.for_config(cfg, killed).stage("sft")
    assert read_done(published) is not None
    assert not list(killed.glob(".*.partial-*")) and not list(killed.glob("work-sft-*")), f"left behind: {story}"
    expected, actual = _published_sft(paths.stage("sft")), _published_sft(published)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert actual[name] == expected[name], f"{name} differs after {story}"


# --------------------------------------------------------------------------------------------
# A launcher killed with SIGKILL takes its workers with it
# --------------------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:
            continue
        if int(fields.get("PPid", "0").strip()) == pid:
            found.append(int(status.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text().split("State:\t", 1)[1][0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_parent_death_signal_kills_the_child_with_its_parent(tmp_path):
    """A parent that launches a long child with the request, then is SIGKILLed: the child dies too."""
    import signal

    script = tmp_path / "parent.py"
    script.write_text(
        "import subprocess, sys, time\n"
        "from rlhf_lib.locking import parent_death_signal\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], "
        "preexec_fn=parent_death_signal())\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(120)\n")
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    assert _alive(child)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 10
    while _alive(child) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(child), "the child outlived its SIGKILLed parent"


@pytest.mark.slow
def test_killing_torchrun_leaves_no_worker_behind(tmp_path, bigbench_tasks):
    """torchrun cannot forward SIGKILL, and once training its workers no longer need it (gloo connects them
    directly): killed mid-PPO, its workers must die with it (rlhf_lib.stages asks the kernel for that), not train
    on and publish a stage that nobody is waiting for."""
    import shutil
    import signal

    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    if not Path(torchrun).exists():
        pytest.skip("torchrun is not installed beside this interpreter")
    runs = tmp_path / "runs"
    for stage in ("data", "sft", "reward"):
        done, _ = _run_stage(stage, runs)
        assert done.returncode == 0, done.stderr[-2000:]
    command = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "rlhf_lib.stages", "ppo", "--preset", "micro",
               "--runs-dir", str(runs), "--no-progress", "--overrides-json", json.dumps({"ppo.iterations": 60})]
    launcher = subprocess.Popen(command, cwd=REPO, env=_user_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    workers = []
    try:
        deadline = time.time() + 180
        while not _checkpoints(runs, "ppo") and time.time() < deadline and launcher.poll() is None:
            time.sleep(0.2)
        workers = _children(launcher.pid)
        assert _checkpoints(runs, "ppo") and len(workers) == 2, "PPO did not get to its first checkpoint on 2 workers"
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        deadline = time.time() + 5
        while any(_alive(w) for w in workers) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(_alive(w) for w in workers), "workers kept training after torchrun was killed"
        assert not list(runs.glob("micro/ppo-*/DONE.json")), "orphaned workers published the stage"
    finally:
        for pid in [launcher.pid, *workers]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
