"""Simulated labelers (see `rlhf_lib.labelers.criteria` until the module is split)."""

from rlhf_lib.labelers.criteria import *  # noqa: F403
