"""Step 2 of InstructGPT: a reward model trained on K-wise rankings (see .cached_head)."""

from rlhf_lib.reward.cached_head import *  # noqa: F403
from rlhf_lib.reward.cached_head import RewardModel, _prediction_rows  # noqa: F401
