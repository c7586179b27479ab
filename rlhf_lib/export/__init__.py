"""Export a finished study for the RLHF ecosystem (see .command)."""

from rlhf_lib.export.command import *  # noqa: F403
