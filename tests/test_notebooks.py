"""CI runs the whole study at `micro`: all five notebooks under papermill, through run_all.py."""

import json
import socket
import sys

import nbformat
import pytest

import run_all

pytestmark = [pytest.mark.notebooks, pytest.mark.slow, pytest.mark.usefixtures("bigbench_tasks")]


def test_all_notebooks_execute_at_micro(tmp_path, capsys):
    runs, out = tmp_path / "runs", tmp_path / "results"
    args = ["--sizes", "micro", "--runs-dir", str(runs), "--output", str(out)]
    assert run_all.main(args) == 0, capsys.readouterr().out
    for stage, name in run_all.NOTEBOOKS.items():
        executed = nbformat.read(out / "micro" / name, as_version=4)
        errors = [o for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
        assert not errors, f"{name}: {errors[0]['ename']}: {errors[0]['evalue']}"
        texts = [str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", ""))
                 for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", [])]
        assert not any("IProgress not found" in t for t in texts), f"{name}: progress bars fell back to text"
        assert (out / "micro" / name).with_suffix(".html").exists()
        done = json.loads(next((runs / "micro").glob(f"{stage}-*/DONE.json")).read_text())
        assert done["preset"] == "micro" and done["seed"] == 0
    assert list((out / "micro").glob("*.png")), "no figure was saved"

    # A second run with nothing changed executes nothing.
    capsys.readouterr()
    assert run_all.main(args) == 0
    printed = capsys.readouterr().out
    assert printed.count("skip (finished, rendered)") == len(run_all.NOTEBOOKS)


def test_launcher_trains_sft_and_ppo_on_two_processes(tmp_path, capsys):
    """--launcher: SFT and PPO train under torchrun (2 CPU processes, gloo); notebooks then render them."""
    runs, out = tmp_path / "runs", tmp_path / "results"
    launcher = f"{sys.executable} -m torch.distributed.run --nproc_per_node 2 --master_addr 127.0.0.1 --master_port {_free_port()}"
    args = ["--sizes", "micro", "--runs-dir", str(runs), "--output", str(out), "--no-html", "--launcher", launcher]
    assert run_all.main(args) == 0, capsys.readouterr().out
    printed = capsys.readouterr().out
    assert printed.count("under the launcher") == 2  # the plan names exactly the two distributed stages
    for stage in ("sft", "ppo"):
        assert json.loads(next((runs / "micro").glob(f"{stage}-*/DONE.json")).read_text())["processes"] == 2
    for stage in ("data", "reward", "analysis"):
        assert json.loads(next((runs / "micro").glob(f"{stage}-*/DONE.json")).read_text())["processes"] == 1
    sft = next((runs / "micro").glob("sft-*"))
    assert (sft / "policy" / "adapter_model.safetensors").exists() and (sft / "ppo_init" / "meta.json").exists()
    assert (sft / "samples.csv").exists()
    assert not list((runs / "micro").glob(".*partial*")), "a temporary stage directory was left behind"
    executed = nbformat.read(out / "micro" / "05_analysis.ipynb", as_version=4)
    assert not [o for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
