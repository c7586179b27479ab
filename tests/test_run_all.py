"""run_all.py: resume after a failure without redoing finished stages, report the failing cell, skip when current."""

import json
from pathlib import Path

import nbformat
import pytest

import run_all

pytestmark = pytest.mark.notebooks


def _write_notebooks(folder: Path, fail_stage: str | None) -> None:
    """Fixture notebooks: each finishes its stage through rlhf_lib.pipeline and counts its executions."""
    folder.mkdir(parents=True, exist_ok=True)
    for stage, name in run_all.NOTEBOOKS.items():
        nb = nbformat.v4.new_notebook()
        params = nbformat.v4.new_code_cell('preset = "micro"\nruns_dir = ""\noverrides_json = "{}"\nresults_dir = ""')
        params.metadata["tags"] = ["parameters"]
        body = (
            "from pathlib import Path\n"
            "from rlhf_lib.pipeline import open_study, cached_stage\n"
            "study = open_study(preset, overrides_json, runs_dir, results_dir)\n"
            f"counter = Path(study.paths.root) / 'executions-{stage}.txt'\n"
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
    assert (out / "micro" / "03_reward_model.ipynb").exists()  # partial output kept
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

    # A second run with nothing changed executes nothing.
    assert run_all.main(common) == 0
    assert all(_executions(micro_runs, s) == (2 if s == "reward" else 1) for s in run_all.NOTEBOOKS)


def test_changed_knob_reruns_only_downstream(tmp_path):
    runs, out, nbs = tmp_path / "runs", tmp_path / "results", tmp_path / "nbs"
    _write_notebooks(nbs, fail_stage=None)
    common = ["--sizes", "micro", "--runs-dir", str(runs), "--output", str(out), "--notebooks", str(nbs), "--no-html"]
    assert run_all.main(common) == 0
    stages_before = {p.name for p in (runs / "micro").iterdir() if p.is_dir()}
    assert run_all.main([*common, "--quantize"]) == 0  # model.* changes: every stage's fingerprint changes
    stages_after = {p.name for p in (runs / "micro").iterdir() if p.is_dir()}
    assert len(stages_after - stages_before) == 5
    record = json.loads(next((runs / "micro").glob("data-*/DONE.json")).read_text())
    assert record["preset"] == "micro"
