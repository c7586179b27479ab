"""The one stage table (rlhf_lib.pipeline.STAGE_TABLE) and everything that reads it agree."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

from rlhf_lib.config import StudyConfig
from rlhf_lib.pipeline import DISTRIBUTED_STAGES, NOTEBOOKS, STAGE_TABLE, STAGES, stage_entry

REPO = Path(__file__).resolve().parent.parent


def test_every_stage_has_its_notebook_and_a_runner_that_exists():
    """Checked from the source, without importing the stage modules (they import torch)."""
    for stage in STAGE_TABLE:
        assert (REPO / "notebooks" / stage.notebook).is_file(), stage
        module, _, function = stage.runner.partition(":")
        spec = importlib.util.find_spec(module)
        assert spec is not None and spec.origin, stage
        tree = ast.parse(Path(spec.origin).read_text())
        defined = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
        imported = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                    for alias in node.names}
        assert function in defined | imported, stage


def test_table_order_and_the_names_derived_from_it():
    assert STAGES == ("data", "sft", "reward", "ppo", "analysis")
    assert list(NOTEBOOKS) == list(STAGES) and DISTRIBUTED_STAGES == ("sft", "ppo")
    assert sorted(NOTEBOOKS.values()) == sorted(p.name for p in (REPO / "notebooks").glob("0*.ipynb"))
    assert list(StudyConfig.STAGE_SECTIONS) == list(STAGES)  # every stage has a fingerprint
    assert stage_entry("ppo").distributed and not stage_entry("reward").distributed


def test_run_all_and_stages_read_the_table_and_run_all_imports_no_torch():
    code = ("import sys, run_all, rlhf_lib.pipeline as p; "
            "assert run_all.NOTEBOOKS is p.NOTEBOOKS and run_all.DISTRIBUTED_STAGES is p.DISTRIBUTED_STAGES; "
            "assert 'torch' not in sys.modules, 'run_all imported torch'; "
            "import rlhf_lib.stages as s; assert s.DISTRIBUTED_STAGES is p.DISTRIBUTED_STAGES")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_stage_runner_resolves_the_tables_runner():
    from rlhf_lib.data.study import run_data_stage
    from rlhf_lib.stages import stage_runner

    assert stage_runner("data") is run_data_stage
