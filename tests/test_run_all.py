"""run_all.py: resume after a failure without redoing finished stages, report the failing cell, skip when current."""

import json
from pathlib import Path

import nbformat
import pytest

import run_all

pytestmark = pytest.mark.notebooks


PARAMETERS = 'preset = "micro"\nruns_dir = ""\noverrides_json = "{}"\nresults_dir = ""'


def _write_notebooks(folder: Path, fail_stage: str | None, parameters: str = PARAMETERS) -> None:
    """Fixture notebooks: each finishes its stage through rlhf_lib.pipeline and counts its executions."""
    folder.mkdir(parents=True, exist_ok=True)
    for stage, name in run_all.NOTEBOOKS.items():
        nb = nbformat.v4.new_notebook()
        params = nbformat.v4.new_code_cell(parameters)
        params.metadata["tags"] = ["parameters"]
        body = (
            "from pathlib import Path\n"
            "from rlhf_lib.pipeline import open_study, cached_stage\n"
            "study = open_study(preset, overrides_json, runs_dir, results_dir)\n"
            f"counter = Path(study.paths.root) / 'executions-{stage}.txt'\n"
            f"print('the {stage} notebook ran')\n"
            "counter.parent.mkdir(parents=True, exist_ok=True)\n"
            "counter.write_text(str(int(counter.read_text()) + 1 if counter.exists() else 1))\n"
            f"with cached_stage(study.paths, '{stage}') as handle:\n"
            "    if not handle.done:\n"
            f"        (handle.dir / 'artifact.txt').write_text('{stage}')\n"
        )
        cells = [params, nbformat.v4.new_code_cell(body)]
        if stage == fail_stage:
            cells.append(nbformat.v4.new_code_cell("raise RuntimeError('injected failure')"))
        nb.cells = cells
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(nb, folder / name)


def _executions(runs: Path, stage: str) -> int:
    path = runs / f"executions-{stage}.txt"
    return int(path.read_text()) if path.exists() else 0


def test_failure_names_cell_then_resume_skips_finished(tmp_path, capsys):
    runs, out, nbs = tmp_path / "runs", tmp_path / "results", tmp_path / "nbs"
    common = ["--sizes", "micro", "--runs-dir", str(runs), "--output", str(out), "--notebooks", str(nbs), "--no-html"]
    _write_notebooks(nbs, fail_stage="reward")
    assert run_all.main(common) == 1
    printed = capsys.readouterr().out
    assert "FAILED: micro/reward" in printed and "injected failure" in printed and "cell" in printed
    assert "    raise RuntimeError('injected failure')" in printed and "Traceback:" in printed  # the cell, the trace
    assert "\x1b[" not in printed and str(out / "micro" / "03_reward_model.ipynb") in printed
    assert (out / "micro" / "03_reward_model.ipynb").exists()  # partial output kept
    log = (out / "micro" / "run_all.log").read_text()
    assert "==> micro/data" in log and "the data notebook ran" in log and "the reward notebook ran" in log
    assert "FAILED: micro/reward" in log and "    raise RuntimeError('injected failure')" in log
    micro_runs = runs / "micro"
    done_before = {s: (micro_runs.glob(f"{s}-*/DONE.json")) for s in ("data", "sft")}
    stamps = {s: next(g).stat().st_mtime for s, g in done_before.items()}

    _write_notebooks(nbs, fail_stage=None)  # the "fix"
    assert run_all.main(common) == 0
    printed = capsys.readouterr().out
    assert "skip (finished, rendered)" in printed
    for stage in ("data", "sft"):
        assert _executions(micro_runs, stage) == 1, f"{stage} re-executed"
        assert next(micro_runs.glob(f"{stage}-*/DONE.json")).stat().st_mtime == stamps[stage]
    for stage in ("reward", "ppo", "analysis"):
        assert next(micro_runs.glob(f"{stage}-*/DONE.json")).exists()

    log = (out / "micro" / "run_all.log").read_text()
    assert log.count("the reward notebook ran") == 2 and "Summary:" in log  # runs append, nothing is lost
    # A second run with nothing changed executes nothing.
    assert run_all.main(common) == 0
    assert all(_executions(micro_runs, s) == (2 if s == "reward" else 1) for s in run_all.NOTEBOOKS)


def _stage_dirs(runs: Path) -> set[str]:
    return {p.name for p in (runs / "micro").iterdir() if p.is_dir()}


def _ran_once(tmp_path: Path) -> tuple[Path, Path, list[str], set[str]]:
    """A study of fake notebooks run once at micro: (runs, results, its arguments, the stage folders it made)."""
    runs, out, nbs = tmp_path / "runs", tmp_path / "results", tmp_path / "nbs"
    _write_notebooks(nbs, fail_stage=None)
    common = ["--sizes", "micro", "--runs-dir", str(runs), "--output", str(out), "--notebooks", str(nbs), "--no-html"]
    assert run_all.main(common) == 0
    return runs, out, common, _stage_dirs(runs)


def test_changed_knob_reruns_only_downstream(tmp_path):
    runs, out, common, stages_before = _ran_once(tmp_path)
    assert run_all.main([*common, "--quantize"]) == 0  # model.* changes: every stage's fingerprint changes
    assert len(_stage_dirs(runs) - stages_before) == 5
    record = json.loads(next((runs / "micro").glob("data-*/DONE.json")).read_text())
    assert record["preset"] == "micro"
    rendered = json.loads((out / "micro" / "run_record.json").read_text())["stages"]
    assert list(rendered) == list(run_all.NOTEBOOKS)
    assert all(r["seed"] == 0 and r["preset"] == "micro" and "--quantize" in r["command"] and r["commit"] and r["stage_commit"] != "not recorded" for r in rendered.values())


def test_launcher_runs_the_distributed_stages_before_their_notebooks(tmp_path, monkeypatch):
    import subprocess

    runs, out, nbs = tmp_path / "runs", tmp_path / "results", tmp_path / "nbs"
    _write_notebooks(nbs, fail_stage=None)
    launched = []
    real_run = subprocess.run

    def fake_run(command, **kwargs):  # records a stage command, then does what the stage would: finish it
        if "rlhf_lib.stages" not in command:
            return real_run(command, **kwargs)  # git, for the run record
        launched.append(command)
        stage = command[command.index("rlhf_lib.stages") + 1]
        from rlhf_lib.config import load_preset
        from rlhf_lib.pipeline import RunPaths, cached_stage

        with cached_stage(RunPaths.for_config(load_preset("micro"), runs / "micro"), stage) as handle:
            (handle.dir / "artifact.txt").write_text(stage)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    common = ["--sizes", "micro", "--runs-dir", str(runs), "--output", str(out), "--notebooks", str(nbs), "--no-html"]
    assert run_all.main([*common, "--launcher", "torchrun --nproc_per_node 4"]) == 0
    assert [c[:3] for c in launched] == [["torchrun", "--nproc_per_node", "4"]] * 2
    assert [c[c.index("rlhf_lib.stages") + 1] for c in launched] == ["sft", "ppo"]
    assert all(c[c.index("--preset") + 1] == "micro" and c[c.index("--runs-dir") + 1] == str(runs / "micro") for c in launched)
    # The notebooks found those stages finished, so they did not train them a second time.
    assert (next((runs / "micro").glob("sft-*")) / "artifact.txt").read_text() == "sft"

    # A launcher that fails stops the run, names the stage, and keeps what finished.
    monkeypatch.setattr(subprocess, "run", lambda command, **kw: subprocess.CompletedProcess(command, 3, "", ""))
    assert run_all.main([*common, "--launcher", "torchrun", "--force", "--quantize"]) == 1


def test_relative_paths_land_under_the_working_directory_and_other_sizes_keep_their_rows(tmp_path, monkeypatch):
    import shutil

    nbs = tmp_path / "nbs"
    _write_notebooks(nbs, fail_stage=None)
    (tmp_path / "results" / "tiny").mkdir(parents=True)  # tiny's results from an earlier run
    for name in ("metrics.json", "findings.json"):
        shutil.copy(run_all.REPO / "results" / "tiny" / name, tmp_path / "results" / "tiny" / name)
    monkeypatch.chdir(tmp_path)
    assert run_all.main(["--sizes", "micro", "--only", "data", "--runs-dir", "runs", "--output", "results",
                         "--notebooks", "nbs", "--no-html"]) == 0
    assert next((tmp_path / "runs" / "micro").glob("data-*/DONE.json")).exists()
    assert _executions(tmp_path / "runs" / "micro", "data") == 1
    assert sorted(p.name for p in nbs.iterdir()) == sorted(run_all.NOTEBOOKS.values())  # nothing written in there
    record = json.loads((tmp_path / "results" / "micro" / "run_record.json").read_text())
    assert record["stages"]["data"]["preset"] == "micro"
    summary = (tmp_path / "results" / "SUMMARY.md").read_text()
    assert "| tiny |" in summary and "## tiny: findings" in summary  # a micro-only run keeps tiny's rows


def test_an_unknown_notebook_parameter_stops_the_run_before_anything_executes(tmp_path, capsys):
    runs, out, nbs = tmp_path / "runs", tmp_path / "results", tmp_path / "nbs"
    _write_notebooks(nbs, fail_stage=None, parameters=PARAMETERS.replace('\nresults_dir = ""', ""))
    common = ["--sizes", "micro", "--runs-dir", str(runs), "--output", str(out), "--notebooks", str(nbs), "--no-html"]
    assert run_all.main(common) == 2
    err = capsys.readouterr().err
    assert "01_data.ipynb: its `parameters` cell does not define results_dir" in err
    assert not (out / "micro").exists() and _executions(runs / "micro", "data") == 0


def test_single_process_stages_refuse_a_launcher(monkeypatch, capsys):
    from rlhf_lib import stages

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert stages.main(["reward", "--preset", "micro"]) == 2
    assert "runs in one process" in capsys.readouterr().err


def test_several_sizes_get_the_cross_size_figure(tmp_path, monkeypatch, capsys):
    import pandas as pd

    import rlhf_lib.analysis as analysis

    seen = {}

    def fake_cross_size(studies, out_dir, progress=True):
        seen["sizes"] = [cfg.preset for cfg, _ in studies]
        seen["runs"] = [str(paths.root) for _, paths in studies]
        if out_dir.name == "none":
            return None
        return pd.DataFrame({"method": ["SFT", "PPO"], "size": ["tiny", "micro"], "metric": "win_rate", "value": [0.5, 0.4],
                             "ci_low": [0.5, 0.3], "ci_high": [0.5, 0.5], "n": 8, "baseline": "SFT@tiny"})

    monkeypatch.setattr(analysis, "cross_size_win_rates", fake_cross_size)
    args = run_all.parse_args(["--sizes", "micro,tiny", "--output", str(tmp_path / "out"), "--runs-dir", str(tmp_path / "runs")])
    run_all.write_cross_size(args, ["micro", "tiny"])
    assert seen["sizes"] == ["micro", "tiny"] and seen["runs"] == [str(tmp_path / "runs" / s) for s in ("micro", "tiny")]
    assert (tmp_path / "out" / "fig_win_rate_sizes.png").exists() and (tmp_path / "out" / "fig_win_rate_sizes.csv").exists()
    assert "baseline SFT@tiny" in capsys.readouterr().out
    run_all.write_cross_size(run_all.parse_args(["--sizes", "micro,tiny", "--output", str(tmp_path / "none")]), ["micro", "tiny"])
    assert "fewer than two sizes" in capsys.readouterr().out


def test_code_commit_ignores_the_runs_own_results(tmp_path):
    import subprocess

    from rlhf_lib.pipeline import code_commit

    def git(*args):
        return subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "results").mkdir()
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "results" / "table.csv").write_text("a\n1\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    head = git("rev-parse", "HEAD")
    (tmp_path / "results" / "table.csv").write_text("a\n2\n")  # a rendered output the run rewrote
    assert code_commit(tmp_path) == head
    (tmp_path / "code.py").write_text("x = 2\n")
    assert code_commit(tmp_path) == head + "+dirty"
    assert code_commit(tmp_path / "results" / "nowhere") == "unknown"


def test_set_overrides_a_knob_rerunning_only_the_stages_it_reaches(tmp_path):
    runs, out, common, before = _ran_once(tmp_path)
    assert run_all.main([*common, "--set", "ppo.iterations=3", "--set", "reward.temperatures=[0.5, 1.0]"]) == 0
    added = _stage_dirs(runs) - before
    assert {name.split("-")[0] for name in added} == {"reward", "ppo", "analysis"}  # data and sft reused
    record = json.loads((out / "micro" / "run_record.json").read_text())["stages"]
    assert record["ppo"]["overrides"] == {"ppo.iterations": 3, "reward.temperatures": [0.5, 1.0]}
    assert "--set ppo.iterations=3" in record["ppo"]["command"]


@pytest.mark.parametrize("setting, message", [
    ("ppo.iterations=abc", "bad value 'abc' for 'ppo.iterations'"),
    ("ppo.no_such_knob=1", "no_such_knob"),
    ("ppo.learning_rate=nan", "NaN and infinity are not allowed"),
    ("iterations", "expected KEY=VALUE"),
])
def test_a_bad_set_is_an_error_before_anything_runs(tmp_path, capsys, setting, message):
    with pytest.raises(SystemExit) as exit_info:
        run_all.parse_args(["--sizes", "micro", "--set", setting, "--runs-dir", str(tmp_path / "runs")])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_set_values_are_read_as_toml_and_a_bare_word_as_text():
    args = run_all.parse_args(["--sizes", "micro", "--set", "ppo.learning_rate=3e-4", "--set", "ppo.adaptive_kl=false",
                               "--set", "ppo.collapse_action=flag", "--seed", "5"])
    assert run_all.overrides_for(args) == {"ppo.learning_rate": 3e-4, "ppo.adaptive_kl": False,
                                           "ppo.collapse_action": "flag", "seed": 5}


def test_the_log_keeps_a_progress_bars_last_state_not_every_redraw(tmp_path):
    with (tmp_path / "log.txt").open("w") as handle:
        log = run_all.FinishedLines(handle)
        for chunk in ("start\n", "\r 10%|#", "\r 50%|#####", "\r100%|##########|\n", "done", "\n"):
            log.write(chunk)
    assert (tmp_path / "log.txt").read_text() == "start\n100%|##########|\ndone\n"
