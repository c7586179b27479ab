"""Step 05, the analysis stage: every method on held-out prompts, judged by held-out labelers and metrics.

The code lives in `rlhf_lib.analysis.stage`; this package re-exports it, so `rlhf_lib.analysis.<name>` keeps working.
A test that monkeypatches a function another one calls must patch `rlhf_lib.analysis.stage`, where it is looked up.
"""

from rlhf_lib.analysis.stage import *  # noqa: F403
from rlhf_lib.analysis.stage import _answer, _run  # noqa: F401
