"""Shared fixtures. The model cache is shared across tests (converting SmolLM2 costs ~25 s once)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def micro_tokenizer():
    from rlhf_lib import models

    return models.load_tokenizer("micro")


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
