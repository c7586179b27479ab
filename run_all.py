"""Reproduce the whole study: execute notebooks 01-05 with papermill, in order, for each size.

    python run_all.py                         # the embedded default: the offline `tiny` preset
    python run_all.py --sizes micro,tiny      # several sizes, one after the other
    python run_all.py --only sft              # one stage (its upstream must be finished)
    python run_all.py --from reward           # a stage and everything after it
    python run_all.py --quantize              # force 4-bit nf4 bases (QLoRA); needs bitsandbytes
    python run_all.py --output results/       # where executed notebooks, HTML and figures go
    python run_all.py --sizes medium --launcher "torchrun --nproc_per_node 4"   # several GPUs

With --launcher, each unfinished distributed stage (SFT, PPO) first runs as
`<launcher> -m rlhf_lib.stages <stage> ...` (see rlhf_lib/stages.py); its notebook then only renders
the finished stage. The other stages run in the notebook's single process, as without it.

Stages cache their artifacts under runs/<size>/<stage>-<fingerprint>/ (see rlhf_lib.pipeline), so a
rerun skips finished stages and an interrupted run resumes at the first unfinished one. A notebook
that fails stops the run, naming the cell and the error; its partial output is kept.

One run at a time per folder: the run holds the lock of each size's runs folder and of the output
folder (rlhf_lib.locking); a second run waits, saying who holds them, or with --no-wait exits with
status 2. Relative --runs-dir and --output are resolved against the current directory once, here.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

# The stage table (rlhf_lib.pipeline.STAGE_TABLE): pipeline imports no torch, so this script still starts at once.
from rlhf_lib.pipeline import DISTRIBUTED_STAGES, NOTEBOOKS

REPO = Path(__file__).resolve().parent
DEFAULT_SIZE = "tiny"
# Rough minutes per stage on a 2-core CPU, used only for the plan's estimate until a run has been timed.
ROUGH_MINUTES = {
    "micro": {"data": 1, "sft": 0.5, "reward": 1, "ppo": 1, "analysis": 2},
    # tiny, the run of 2026-12-04 (results/tiny/RUN.md; later speed-ups are not in it): data 5 s, SFT 7.9 (4.9 on a
    # quiet machine), RM 9.5 from scratch, analysis 25.8. Its PPO (29.2) stopped early; at 27 s an iteration
    # (bench/results/ppo_bench_2026-12-06.md, a slow hour) the preset's 2 x 40 iterations take ~36.
    "tiny": {"data": 1, "sft": 8, "reward": 10, "ppo": 36, "analysis": 26},
    "small": {"data": 1, "sft": 10, "reward": 20, "ppo": 25, "analysis": 25},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=DEFAULT_SIZE, help=f"comma-separated presets (default: {DEFAULT_SIZE})")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--only", choices=list(NOTEBOOKS), help="run just this stage")
    group.add_argument("--from", dest="start", choices=list(NOTEBOOKS), help="run this stage and the ones after it")
    parser.add_argument("--seed", type=int, default=None, help="override the preset's seed")
    parser.add_argument("--quantize", action="store_true", help="force 4-bit nf4 bases (model.quantize_4bit = true)")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                        help="change one knob of the preset, e.g. --set ppo.iterations=10 (repeatable). VALUE is read "
                        "as TOML (10, 3e-4, true, [0.7, 1.0], \"text\"); a bare word is a string. Validated like the "
                        "preset; part of the stage fingerprints and the run record")
    parser.add_argument("--output", default=str(REPO / "results"), help="folder for rendered notebooks and figures")
    parser.add_argument("--runs-dir", default="", help="folder for stage artifacts (default: runs/)")
    parser.add_argument("--no-html", action="store_true", help="skip the HTML export")
    parser.add_argument("--launcher", default="", help='run SFT and PPO under this launcher, e.g. "torchrun --nproc_per_node 4" '
                        'or "accelerate launch --num_processes 4"')
    parser.add_argument("--force", action="store_true", help="re-execute notebooks even when outputs are current")
    parser.add_argument("--no-wait", action="store_true", help="exit (status 2) instead of waiting when another run "
                        "holds the runs or output folder")
    parser.add_argument("--notebooks", default=str(REPO / "notebooks"), help=argparse.SUPPRESS)  # tests use fixtures
    args = parser.parse_args(argv)
    args.sizes = ",".join(checked_sizes(parser, args.sizes))
    args.overrides = parsed_settings(parser, args.settings)
    checked_overrides(parser, args)
    # Absolute from here on: papermill runs the notebooks in notebooks/, run records are read back from here.
    for name in ("output", "runs_dir", "notebooks"):
        if getattr(args, name):
            setattr(args, name, str(Path(getattr(args, name)).expanduser().resolve()))
    return args


def available_presets() -> list[str]:
    from rlhf_lib.config import CONFIG_DIR

    return sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))


def checked_sizes(parser: argparse.ArgumentParser, sizes: str) -> list[str]:
    """The --sizes list without blanks or repeats; an empty list or an unknown preset exits with status 2."""
    names = list(dict.fromkeys(s.strip() for s in sizes.split(",") if s.strip()))
    available = available_presets()
    if not names:
        parser.error(f"--sizes is empty; available presets (configs/*.toml): {', '.join(available)}")
    unknown = [name for name in names if name not in available]
    if unknown:
        parser.error(f"--sizes: unknown preset(s) {', '.join(unknown)}; available presets (configs/*.toml): "
                     f"{', '.join(available)}")
    return names


def parsed_settings(parser: argparse.ArgumentParser, settings: list[str]) -> dict:
    """--set KEY=VALUE pairs as dotted overrides; VALUE is a TOML value, or a plain string when it is not one."""
    import tomllib

    overrides: dict = {}
    for setting in settings:
        key, sep, text = setting.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            parser.error(f"--set {setting!r}: expected KEY=VALUE with a dotted knob name, e.g. --set ppo.iterations=10")
        try:
            overrides[key] = tomllib.loads(f"value = {text.strip()}")["value"]
        except tomllib.TOMLDecodeError:
            overrides[key] = text.strip()
    return overrides


def checked_overrides(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every size's preset with the command line's overrides must validate, before anything runs (exit 2)."""
    from rlhf_lib.config import ConfigError, load_preset

    for size in run_sizes(args):
        try:
            load_preset(size, overrides_for(args))
        except ConfigError as err:
            parser.error(f"--set / --seed for preset {size}: {err}")


def run_sizes(args: argparse.Namespace) -> list[str]:
    return args.sizes.split(",")  # checked and normalised by parse_args


def selected_stages(args: argparse.Namespace) -> list[str]:
    stages = list(NOTEBOOKS)
    if args.only:
        return [args.only]
    if args.start:
        return stages[stages.index(args.start) :]
    return stages


def overrides_for(args: argparse.Namespace) -> dict:
    """The preset overrides of this command line: --set ones, then --seed and --quantize."""
    overrides: dict = dict(getattr(args, "overrides", {}))
    if args.seed is not None:
        overrides["seed"] = args.seed
    if args.quantize:
        overrides["model.quantize_4bit"] = True
    return overrides


def notebook_current(output: Path, stage_done: bool, stage_dir: Path) -> bool:
    """An executed notebook is current when its stage is finished and it was rendered after that."""
    done_file = stage_dir / "DONE.json"
    failed = output.with_suffix(".failed").exists()  # a partial notebook from a failed run is never current
    return stage_done and not failed and output.exists() and output.stat().st_mtime >= done_file.stat().st_mtime


def study_for(args: argparse.Namespace, size: str) -> tuple:
    """The validated preset (with the command line's overrides) and the run paths of one size."""
    from rlhf_lib.config import load_preset
    from rlhf_lib.pipeline import RunPaths

    cfg = load_preset(size, overrides_for(args))
    return cfg, RunPaths.for_config(cfg, Path(args.runs_dir) / size if args.runs_dir else None)


def lock_folders(args: argparse.Namespace) -> list[Path]:
    """What a run writes: each size's runs folder and the output folder (rendered notebooks, .failed markers)."""
    return [Path(args.output), *(study_for(args, size)[1].root for size in run_sizes(args))]


def plan(args: argparse.Namespace) -> list[dict]:
    from rlhf_lib.pipeline import read_done

    steps = []
    for size in run_sizes(args):
        cfg, paths = study_for(args, size)
        for stage in selected_stages(args):
            out = Path(args.output) / size / NOTEBOOKS[stage]
            done = paths.is_done(stage)
            current = notebook_current(out, done, paths.stage(stage)) and not args.force
            if done:
                seconds = (read_done(paths.stage(stage)) or {}).get("seconds", 0)
            else:
                seconds = 60 * ROUGH_MINUTES.get(size, {}).get(stage, 30)
            steps.append(
                {"size": size, "stage": stage, "notebook": NOTEBOOKS[stage], "output": out, "stage_done": done,
                 "skip": current, "estimate_s": 0 if current else seconds, "runs_dir": str(paths.root),
                 "stage_dir": paths.stage(stage).name, "overrides": overrides_for(args),
                 "launch": bool(args.launcher) and stage in DISTRIBUTED_STAGES and not done}
            )
    return steps


def print_plan(steps: list[dict]) -> None:
    print("Plan:")
    for s in steps:
        if s["skip"]:
            state = "skip (finished, rendered)"
        elif s["stage_done"]:
            state = "render only (stage cached)"
        else:
            state = f"run (~{s['estimate_s'] / 60:.0f} min)" + (" under the launcher" if s.get("launch") else "")
        print(f"  {s['size']:>6}  {s['stage']:<9} {s['notebook']:<24} {state}")
    total = sum(s["estimate_s"] for s in steps)
    print(f"Estimated time: ~{total / 60:.0f} min (2-core CPU figures; a GPU is faster).\n", flush=True)


def notebook_parameters(step: dict, args: argparse.Namespace) -> dict[str, str]:
    """The papermill parameters of one step (absolute paths: the kernel's working directory is notebooks/)."""
    return {
        "preset": step["size"],
        "runs_dir": step["runs_dir"],
        "overrides_json": json.dumps(overrides_for(args)),
        "results_dir": str(Path(step["output"]).parent),
    }


class NotebookParameterError(ValueError):
    """run_all would pass a parameter that the notebook's `parameters` cell does not define."""


def check_notebook_parameters(steps: list[dict], args: argparse.Namespace) -> None:
    """Before anything runs: every parameter run_all passes is defined in the notebook's `parameters` cell.

    Papermill injects an unknown name as an unused variable without a word, so a notebook whose parameter was
    renamed would silently run on its default.
    """
    import papermill

    for step in steps:
        if step["skip"]:
            continue
        notebook = Path(args.notebooks) / step["notebook"]
        defined = papermill.inspect_notebook(str(notebook))
        unknown = sorted(set(notebook_parameters(step, args)) - set(defined))
        if unknown:
            raise NotebookParameterError(
                f"{notebook}: its `parameters` cell does not define {', '.join(unknown)} "
                f"(it defines: {', '.join(defined) or 'nothing; is the cell tagged `parameters`?'}). "
                "Add them to that cell, or keep the notebook in step with run_all.notebook_parameters."
            )


LOG_FILE = "run_all.log"  # results/<size>/run_all.log: every run's console output and the notebooks' cell output


class FinishedLines:
    """A text sink that keeps only finished lines, each as it ended: a progress bar's in-place updates
    ("\r...") collapse to the bar's last state, so a log holds what was said rather than every redraw."""

    def __init__(self, sink: TextIO):
        self.sink, self.partial = sink, ""

    def write(self, text: str) -> int:
        *lines, self.partial = (self.partial + text).split("\n")
        for line in lines:
            self.sink.write(line.rsplit("\r", 1)[-1] + "\n")
        self.sink.flush()
        return len(text)

    def flush(self) -> None:
        self.sink.flush()


class Tee:
    """Writes to the console and to a log."""

    def __init__(self, console: TextIO, log: FinishedLines):
        self.console, self.log = console, log

    def write(self, text: str) -> int:
        self.console.write(text)
        self.log.write(text)
        return len(text)

    def flush(self) -> None:
        self.console.flush()
        self.log.flush()


@contextmanager
def console_log(path: Path, argv: list[str]) -> Iterator[FinishedLines]:
    """Append what this step prints (and, through the returned sink, its notebook's cell output) to `path`."""
    import shlex

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        log = FinishedLines(handle)
        log.write(f"\n### {datetime.now(UTC).isoformat(timespec='seconds')}  python run_all.py {shlex.join(argv)}\n")
        console, sys.stdout = sys.stdout, Tee(sys.stdout, log)
        try:
            yield log
        finally:
            sys.stdout = console
            if log.partial:
                log.write("\n")


def execute(step: dict, args: argparse.Namespace, log: FinishedLines | None = None) -> float:
    import papermill

    output: Path = step["output"]
    output.parent.mkdir(parents=True, exist_ok=True)
    parameters = notebook_parameters(step, args)
    started = time.time()
    failed_marker = output.with_suffix(".failed")
    failed_marker.write_text("this notebook's last execution failed or was interrupted\n")
    if step.get("launch"):
        launch_stage(step, args)
    papermill.execute_notebook(
        str(Path(args.notebooks) / step["notebook"]),
        str(output),
        parameters=parameters,
        kernel_name="python3",
        cwd=str(args.notebooks),
        progress_bar={"desc": f"{step['size']}/{step['stage']}", "unit": "cell"},
        request_save_on_cell_execute=True,
        stdout_file=log,  # the cells' printed output goes to the run's log as it comes
        stderr_file=log,
    )
    failed_marker.unlink()
    if not args.no_html:
        export_html(output)
    return time.time() - started


class LaunchError(RuntimeError):
    """A stage run under --launcher exited with an error."""


def launch_stage(step: dict, args: argparse.Namespace) -> None:
    """Train a distributed stage under the user's launcher; the notebook then finds it cached."""
    import shlex
    import subprocess

    from rlhf_lib.locking import parent_death_signal
    from rlhf_lib.stages import stage_command

    command = stage_command(step["stage"], step["size"], step["runs_dir"], overrides_for(args), shlex.split(args.launcher))
    print("    " + shlex.join(command), flush=True)
    # If run_all itself is killed, the launcher dies with it (and the launcher's workers with the launcher).
    done = subprocess.run(command, cwd=REPO, preexec_fn=parent_death_signal())
    if done.returncode != 0:
        raise LaunchError(f"`{shlex.join(command)}` exited with status {done.returncode} (its output is above)")


def export_html(notebook: Path) -> Path:
    import nbformat
    from nbconvert import HTMLExporter

    from rlhf_lib.io import atomic_write_text

    body, _ = HTMLExporter().from_notebook_node(nbformat.read(notebook, as_version=4))
    return atomic_write_text(notebook.with_suffix(".html"), body)


def describe_failure(err: Exception, step: dict) -> str:
    if isinstance(err, LaunchError):
        return (f"\nFAILED: {step['size']}/{step['stage']} under the launcher: {err}.\n"
                "Finished stages are kept; rerun the same command to resume from this stage.")
    cell = getattr(err, "exec_count", None) or getattr(err, "cell_index", None)
    ename, evalue = getattr(err, "ename", type(err).__name__), getattr(err, "evalue", str(err))
    lines = [f"\nFAILED: {step['size']}/{step['stage']} ({step['notebook']}), cell {cell}: {ename}: {evalue}"]
    source = getattr(err, "source", None)
    if source:  # papermill's error carries the failing cell and the kernel's traceback
        lines += ["", "The cell:", *("    " + line for line in source.splitlines())]
    traceback = getattr(err, "traceback", None)
    if traceback:
        lines += ["", "Traceback:", *(ANSI_CODES.sub("", entry) for entry in traceback)]
    lines += ["", f"The partial notebook, with every output up to the failure: {step['output']}",
              "Finished stages are kept; rerun the same command to resume from this stage."]
    return "\n".join(lines)


ANSI_CODES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # the kernel colours its tracebacks


def write_run_records(summary: list[tuple[dict, float, str]], argv: list[str]) -> list[Path]:
    """results/<size>/run_record.json: what produced each rendered notebook (command, commit, seed, times).

    A stage that was skipped keeps the entry of the run that rendered it. A torn or invalid record (a crash
    mid-write by older code, a hand edit) is reported and rebuilt from this run's entries.
    """
    import platform
    import shlex

    import torch

    from rlhf_lib.io import atomic_write_text, read_json
    from rlhf_lib.pipeline import code_commit, read_done

    written = []
    for size in dict.fromkeys(step["size"] for step, _, _ in summary):
        path = Path(summary[0][0]["output"]).parent.parent / size / "run_record.json"
        record = read_json(path)
        if not (isinstance(record, dict) and isinstance(record.get("stages"), dict)):
            if path.exists():
                print(f"Warning: {path} is not a valid run record; rebuilding it from this run.", file=sys.stderr)
            record = {"stages": {}}
        for step, seconds, state in summary:
            if step["size"] != size or state != "ran":
                continue
            done = read_done(Path(step["runs_dir"]) / step["stage_dir"]) or {}
            record["stages"][step["stage"]] = {
                "notebook": step["notebook"],
                "command": shlex.join(["python", "run_all.py", *argv]),
                "commit": code_commit(),  # the code that rendered the notebook
                "stage_commit": done.get("commit", "not recorded"),  # the code that computed the stage
                "preset": size,
                "overrides": step.get("overrides", {}),  # --set / --seed / --quantize on top of the preset
                "seed": done.get("seed", "not recorded"),
                "fingerprint": done.get("fingerprint", step["stage_dir"].rsplit("-", 1)[-1]),
                "rendered_utc": datetime.now(UTC).isoformat(timespec="seconds"),
                "notebook_seconds": round(seconds, 1),
                "stage_seconds": done.get("seconds"),  # the stage's computation, whenever it ran (stage_finished_utc)
                "stage_finished_utc": done.get("finished_utc", "not recorded"),
                "processes": done.get("processes", 1),
                "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, "
                           f"{'CUDA ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}",
                "torch": torch.__version__,
            }
        written.append(atomic_write_text(path, json.dumps(record, indent=1) + "\n"))
    return written


def ensure_kernel() -> None:
    """Papermill needs a `python3` kernel that runs this interpreter (the project's venv)."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec("python3")
        if Path(spec.argv[0]).resolve() == Path(sys.executable).resolve():
            return
    except NoSuchKernel:
        pass
    from ipykernel.kernelspec import install

    install(user=False, prefix=sys.prefix, kernel_name="python3")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from rlhf_lib.config import ConfigError
    from rlhf_lib.locking import LockBusy, hold_locks

    try:
        with hold_locks(lock_folders(args), wait=not args.no_wait):
            return run(args, sys.argv[1:] if argv is None else argv)
    except (LockBusy, ConfigError, NotebookParameterError) as err:
        print(f"run_all.py: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # while waiting for the lock, or after the last notebook
        print("\nInterrupted. Finished stages are kept; rerun the same command to resume.")
        return 130


def run(args: argparse.Namespace, argv: list[str]) -> int:
    """Plan, execute and summarise, under the locks main holds."""
    steps = plan(args)
    print_plan(steps)
    check_notebook_parameters(steps, args)
    ensure_kernel()
    summary = []
    started = time.time()
    for step in steps:
        if step["skip"]:
            summary.append((step, 0.0, "skipped"))
            continue
        with console_log(Path(args.output) / step["size"] / LOG_FILE, argv) as log:
            print(f"==> {step['size']}/{step['stage']}: {step['notebook']}", flush=True)
            try:
                seconds = execute(step, args, log)
            except KeyboardInterrupt:
                print("\nInterrupted. Finished stages are kept; rerun the same command to resume.")
                return 130
            except Exception as err:  # noqa: BLE001 - report any notebook failure with its cell
                print(describe_failure(err, step))
                print(f"This run's log: {Path(args.output) / step['size'] / LOG_FILE}")
                return 1
        summary.append((step, seconds, "ran"))
        # Recorded as each notebook finishes, so a later failure loses nothing of what was rendered.
        write_run_records([(step, seconds, "ran")], argv)
    total = time.time() - started
    report = ["", "Summary:"]
    for step, seconds, state in summary:
        report.append(f"  {step['size']:>6}  {step['stage']:<9} {state:<8} {seconds / 60:6.1f} min  -> {step['output']}")
    report += [f"Total: {total / 60:.1f} min. Finished {datetime.now(UTC).isoformat(timespec='seconds')}.",
               f"Rendered results: {args.output} (each size's run_record.json says what made them)"]
    print("\n".join(report))
    sizes = run_sizes(args)
    for size in sizes:
        with (Path(args.output) / size / LOG_FILE).open("a", encoding="utf-8") as handle:
            handle.write("\n".join(report) + "\n")
    write_findings_files(args, sizes)
    if len(sizes) > 1:
        write_cross_size(args, sizes)
    from rlhf_lib.report import write_summary

    written = write_summary(Path(args.output), summary_sizes(Path(args.output), sizes))
    print(f"Summary table: {written}")
    from rlhf_lib.index_page import write_index

    print(f"Index page (links every size's notebooks, figures and records): {write_index(Path(args.output))}")
    return 0


def summary_sizes(output: Path, sizes: list[str]) -> list[str]:
    """The sizes SUMMARY.md shows: this run's and every other size with a findings.json under `output`, so a run of
    one size keeps the others' rows. A size whose metrics.json is torn is left out, with a warning (report reads it)."""
    from rlhf_lib.config import PRESETS
    from rlhf_lib.io import read_json

    found = [p.parent.name for p in Path(output).glob("*/findings.json")]
    every = list(dict.fromkeys([*sizes, *found]))
    every.sort(key=lambda s: (PRESETS.index(s) if s in PRESETS else len(PRESETS), s))
    return [s for s in every if not (Path(output) / s / "metrics.json").exists()
            or read_json(Path(output) / s / "metrics.json") is not None]


def write_findings_files(args: argparse.Namespace, sizes: list[str]) -> None:
    """results/<size>/findings.json (rlhf_lib.findings) for every size whose analysis was in this run's plan.

    Notebook 05 writes it too; this also covers a notebook skipped as current but rendered before findings
    existed, so SUMMARY.md always renders from an up-to-date findings record.
    """
    if "analysis" not in selected_stages(args):
        return
    from rlhf_lib.analysis import write_findings_and_figure
    from rlhf_lib.io import read_json

    for size in sizes:
        results = Path(args.output) / size
        if read_json(results / "metrics.json") is None:  # not analysed yet, or torn (warned): nothing to read
            continue
        _, paths = study_for(args, size)
        written = write_findings_and_figure(results, paths.stage("reward") if paths.is_done("reward") else None)
        print(f"Findings: {', '.join(map(str, written))}")


def write_cross_size(args: argparse.Namespace, sizes: list[str]) -> None:
    """Figure 1 across sizes (rlhf_lib.analysis.cross_size_win_rates) once two or more sizes are analysed."""
    from rlhf_lib import plots
    from rlhf_lib.analysis import cross_size_win_rates

    table = cross_size_win_rates([study_for(args, size) for size in sizes], Path(args.output))
    if table is None:
        print("Across sizes: fewer than two sizes have a finished analysis; no cross-size figure.")
        return
    figure = plots.plot_win_rates(table, Path(args.output) / "fig_win_rate_sizes.png")
    print(f"Across sizes (baseline {table['baseline'].iloc[0]}): {figure}")


if __name__ == "__main__":
    sys.exit(main())
