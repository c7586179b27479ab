"""The stages of the study and their cached directories: each stage's artifacts live under a key of the
settings they depend on. `STAGE_TABLE` lists the stages in order (name, notebook, runner, distributed or not).

    runs/<preset>/<stage>-<fingerprint>/      e.g. runs/tiny/sft-4fc7688af505/
        ...artifacts...                        written into a temporary sibling, then renamed
        DONE.json                              last: what produced it, when, how long it took

A rerun with the same preset and seed finds DONE.json and skips the stage; a changed knob changes the
fingerprint of its stage and of every stage downstream (config.StudyConfig.STAGE_SECTIONS), so exactly
those rerun. An interrupted stage leaves only a `.partial-*` directory; its `.owner.json` names the
process building it, and a later run removes it only once that process is gone (same host, pid not
alive), never while it is still working. A torn DONE.json counts as unfinished: the stage is rebuilt.

    from rlhf_lib.pipeline import RunPaths, cached_stage
    paths = RunPaths.for_config(cfg)               # root from $RLHF_RUNS_DIR or ./runs
    with cached_stage(paths, "sft") as stage:      # stage.done: already finished?
        if not stage.done:
            train_into(stage.dir)                  # stage.dir is the temporary directory
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from rlhf_lib.config import StudyConfig
from rlhf_lib.io import atomic_write_text, fsync_tree, read_json

DONE = "DONE.json"
OWNER = ".owner.json"  # inside a partial directory: the process building it (removed before publishing)
ORPHAN_AGE_S = 600  # a partial directory without an owner record (older code, or a crash before the record) this old


@dataclass(frozen=True)
class Stage:
    """One stage of the study: the notebook that shows it, the function that builds it, and whether that
    function can train across several processes (`torchrun` / `accelerate launch`, rlhf_lib.stages)."""

    name: str
    notebook: str  # in notebooks/; run_all renders it into results/<size>/
    runner: str  # "module:function", called as function(cfg, paths, progress); imported only when it runs
    distributed: bool = False


# The one list of stages, in order; run_all.py, rlhf_lib.stages and the tests read it. Runners are dotted
# strings so that importing this table (run_all.py does, before anything heavy) imports no torch.
STAGE_TABLE = (
    Stage("data", "01_data.ipynb", "rlhf_lib.data.study:run_data_stage"),
    Stage("sft", "02_sft.ipynb", "rlhf_lib.sft:run_sft_stage", distributed=True),
    Stage("reward", "03_reward_model.ipynb", "rlhf_lib.reward.stage:run_reward_stage"),
    Stage("ppo", "04_ppo.ipynb", "rlhf_lib.ppo:run_ppo_stage", distributed=True),
    Stage("analysis", "05_analysis.ipynb", "rlhf_lib.analysis:run_analysis_stage"),
)
STAGES = tuple(stage.name for stage in STAGE_TABLE)
NOTEBOOKS = {stage.name: stage.notebook for stage in STAGE_TABLE}
DISTRIBUTED_STAGES = tuple(stage.name for stage in STAGE_TABLE if stage.distributed)


def stage_entry(name: str) -> Stage:
    """The table's row of stage `name`."""
    for stage in STAGE_TABLE:
        if stage.name == name:
            return stage
    raise KeyError(f"Unknown stage '{name}'; stages are {STAGES}.")


# --------------------------------------------------------------------------------------------
# Several processes (torchrun / accelerate launch): one of them publishes, all of them train
# --------------------------------------------------------------------------------------------


def process_rank_and_count() -> tuple[int, int]:
    """(rank, number of processes) of an initialised torch.distributed group; (0, 1) otherwise."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    return process_rank_and_count()[0] == 0


def wait_for_all_processes() -> None:
    """A barrier when several processes run a stage together; nothing otherwise."""
    import torch.distributed as dist

    if process_rank_and_count()[1] > 1:
        dist.barrier()


def default_runs_root() -> Path:
    # Absolute: notebooks run with notebooks/ as their working directory, run_all from anywhere.
    return Path(os.environ.get("RLHF_RUNS_DIR", Path(__file__).resolve().parent.parent / "runs")).expanduser().resolve()


def read_done(stage_dir: Path) -> dict | None:
    """A stage directory's DONE.json, or None when the stage has not finished or its record is torn (warned)."""
    record = read_json(Path(stage_dir) / DONE)
    return record if isinstance(record, dict) else None


@dataclass
class RunPaths:
    """Where each stage of one preset's study keeps its artifacts."""

    root: Path
    cfg: StudyConfig

    @classmethod
    def for_config(cls, cfg: StudyConfig, root: str | Path | None = None) -> RunPaths:
        return cls(Path(root) if root else default_runs_root() / cfg.preset, cfg)

    def stage(self, name: str) -> Path:
        if name not in STAGES:
            raise KeyError(f"Unknown stage '{name}'; stages are {STAGES}.")
        return self.root / f"{name}-{self.cfg.fingerprint(name)}"

    def is_done(self, name: str) -> bool:
        return read_done(self.stage(name)) is not None

    def require(self, name: str) -> Path:
        """The finished directory of an upstream stage, or a clear error saying what to run."""
        path = self.stage(name)
        if not self.is_done(name):
            index = STAGES.index(name) + 1
            raise FileNotFoundError(
                f"Stage '{name}' has not finished for preset '{self.cfg.preset}' ({path}). "
                f"Run notebook 0{index} first, or `python run_all.py --sizes {self.cfg.preset} --only {name}`."
            )
        return path

    @property
    def data(self) -> Path:
        return self.stage("data")

    @property
    def sft(self) -> Path:
        return self.stage("sft")

    @property
    def reward(self) -> Path:
        return self.stage("reward")

    @property
    def ppo(self) -> Path:
        return self.stage("ppo")

    @property
    def analysis(self) -> Path:
        return self.stage("analysis")


@dataclass
class StageHandle:
    name: str
    dir: Path  # write here (a temporary directory while the stage runs; the final one when done)
    done: bool


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (a reused pid reads as alive: we then keep, never lose)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OSError:
        return False
    return True


def _write_owner(partial: Path) -> None:
    atomic_write_text(partial / OWNER, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                   "started_utc": datetime.now(UTC).isoformat(timespec="seconds")}))


def partial_is_orphaned(partial: Path, now: float | None = None) -> bool:
    """A partial stage directory whose builder is gone: same host and its pid not alive; without an owner record,
    older than ORPHAN_AGE_S. Another host's partial directory is never touched (its pid means nothing here)."""
    owner = read_json(partial / OWNER, quiet=True)
    if not isinstance(owner, dict) or not isinstance(owner.get("pid"), int):
        try:
            age = (now or time.time()) - partial.stat().st_mtime
        except FileNotFoundError:
            return False  # its owner just published or removed it
        return age > ORPHAN_AGE_S
    return owner.get("host") == socket.gethostname() and not pid_alive(owner["pid"])


def remove_orphaned_partials(final: Path) -> list[Path]:
    """Delete the partial directories of `final` left by dead processes; a live process's are kept."""
    removed = []
    for partial in final.parent.glob(f".{final.name}.partial-*"):
        if partial.is_dir() and partial_is_orphaned(partial):
            shutil.rmtree(partial, ignore_errors=True)
            removed.append(partial)
    return removed


@contextmanager
def cached_stage(paths: RunPaths, name: str) -> Iterator[StageHandle]:
    """Run a stage at most once per fingerprint; publish its directory atomically on success."""
    final = paths.stage(name)
    if read_done(final) is not None:
        yield StageHandle(name, final, True)
        return
    _, processes = process_rank_and_count()
    main = is_main_process()
    if main:
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_orphaned_partials(final)
    if processes > 1:
        # Every process must write into the same directory: a fixed name, created by the main one.
        tmp = final.parent / f".{final.name}.partial-distributed"
        if main:
            try:
                tmp.mkdir()
            except FileExistsError:
                owner = read_json(tmp / OWNER, quiet=True) or {}
                raise RuntimeError(f"{tmp} is being built by a live process (pid {owner.get('pid', '?')} on "
                                   f"{owner.get('host', '?')}); wait for it, or remove the directory if it is gone.") from None
            _write_owner(tmp)
        wait_for_all_processes()
    else:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
        _write_owner(tmp)
    started = time.time()
    try:
        yield StageHandle(name, tmp, False)
        wait_for_all_processes()
        if main:
            record = {
                "stage": name,
                "preset": paths.cfg.preset,
                "seed": paths.cfg.seed,
                "processes": processes,
                "fingerprint": paths.cfg.fingerprint(name),
                "finished_utc": datetime.now(UTC).isoformat(timespec="seconds"),
                "seconds": round(time.time() - started, 1),
                "commit": code_commit(),
                "config": paths.cfg.to_dict(),
            }
            atomic_write_text(tmp / DONE, json.dumps(record, indent=1))
            (tmp / OWNER).unlink(missing_ok=True)  # bookkeeping of the build, not an artifact
            fsync_tree(tmp)  # every artifact on disk before the rename publishes them
            if final.exists():
                shutil.rmtree(final)  # an earlier copy whose DONE.json was torn
            os.replace(tmp, final)
    finally:
        if main and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    wait_for_all_processes()  # nobody reads the stage before it is published


def code_commit(repo: Path | None = None) -> str:
    """The repository's commit, `+dirty` when tracked code differs from it; `unknown` outside git.

    results/ is left out of the comparison: a study run rewrites its own rendered outputs there.
    """
    import subprocess

    repo = repo or Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results"],
                               cwd=repo, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty.strip() else "")


def stage_record(paths: RunPaths, name: str) -> dict:
    return read_done(paths.require(name)) or {}


@dataclass
class Study:
    """What a notebook needs: the validated preset, its stage paths, and where figures go."""

    cfg: StudyConfig
    paths: RunPaths
    results_dir: Path


def open_study(preset: str = "micro", overrides_json: str = "{}", runs_dir: str = "", results_dir: str = "") -> Study:
    """The first call of every notebook: papermill parameters -> config, run paths, results folder."""
    from rlhf_lib.config import load_preset

    cfg = load_preset(preset, json.loads(overrides_json or "{}"))
    paths = RunPaths.for_config(cfg, runs_dir or None)
    results = Path(results_dir) if results_dir else Path(__file__).resolve().parent.parent / "results" / preset
    results.mkdir(parents=True, exist_ok=True)
    return Study(cfg, paths, results)
