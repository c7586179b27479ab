"""CI runs the whole study at `micro`: all five notebooks under papermill, through run_all.py."""

import json

import nbformat
import pytest

import run_all

pytestmark = [pytest.mark.notebooks, pytest.mark.slow]


def test_all_notebooks_execute_at_micro(tmp_path, capsys):
    runs, out = tmp_path / "runs", tmp_path / "results"
    args = ["--sizes", "micro", "--runs-dir", str(runs), "--output", str(out)]
    assert run_all.main(args) == 0, capsys.readouterr().out
    for stage, name in run_all.NOTEBOOKS.items():
        executed = nbformat.read(out / "micro" / name, as_version=4)
        errors = [o for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
        assert not errors, f"{name}: {errors[0]['ename']}: {errors[0]['evalue']}"
        assert (out / "micro" / name).with_suffix(".html").exists()
        done = json.loads(next((runs / "micro").glob(f"{stage}-*/DONE.json")).read_text())
        assert done["preset"] == "micro" and done["seed"] == 0
    assert list((out / "micro").glob("*.png")), "no figure was saved"

    # A second run with nothing changed executes nothing.
    capsys.readouterr()
    assert run_all.main(args) == 0
    printed = capsys.readouterr().out
    assert printed.count("skip (finished, rendered)") == len(run_all.NOTEBOOKS)
