"""Step 1 of InstructGPT: supervised fine-tuning on human-written demonstrations (see .train)."""

from rlhf_lib.sft.train import *  # noqa: F403
from rlhf_lib.sft.train import CHECKPOINT_COMPLETE, META, base_weights, load_policy  # noqa: F401
