"""Shared fixtures. The model cache is shared across tests (converting SmolLM2 costs ~25 s once)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def micro_tokenizer():
    from rlhf_lib import models

    return models.load_tokenizer("micro")


@pytest.fixture()
def micro_lora():
    """micro in float32 with the micro preset's LoRA, its B matrices drawn (std 0.02): a trained-looking adapter,
    whose gradients are not those of B = 0."""
    from rlhf_lib import models
    from rlhf_lib.config import load_preset

    torch.manual_seed(0)
    model = models.lora_from_config(models.load_causal_lm("micro", dtype="float32"), load_preset("micro").model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02)
    return model


@pytest.fixture()
def micro_model():
    from rlhf_lib import models

    torch.manual_seed(0)
    return models.load_causal_lm("micro")


@pytest.fixture()
def isolated_cache(tmp_path: Path, monkeypatch) -> Path:
    """A private RLHF_CACHE_DIR, for tests that corrupt or rebuild the cache."""
    monkeypatch.setenv("RLHF_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def bigbench_tasks(tmp_path_factory) -> Iterator[Path]:
    """The BIG-bench tasks a whole-study test reads: the real ones when they can be had (cached, downloadable,
    or a checkout in $RLHF_BIGBENCH_TASKS), else a fixture tree in the real formats, named by the same variable
    so that notebook kernels inherit it. The PyPI sdist was delisted in 2026-12, so a fresh machine gets the
    fixture tree: the study's code paths run, on fixture text."""
    import warnings

    from bigbench_fixture import write_bigbench_tree

    from rlhf_lib.data import bigbench
    from rlhf_lib.data.schema import DataError

    try:
        yield bigbench.ensure_bigbench_tasks()
        return
    except DataError as err:
        warnings.warn(f"real BIG-bench unavailable, whole-study tests read a fixture tree: {str(err).splitlines()[0]}",
                      stacklevel=1)
    root = write_bigbench_tree(tmp_path_factory.mktemp("bigbench") / "benchmark_tasks", n=24)
    patch = pytest.MonkeyPatch()
    patch.setenv(bigbench.TASKS_DIR_ENV, str(root))
    yield root
    patch.undo()
