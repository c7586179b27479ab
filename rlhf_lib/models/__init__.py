"""Model registry: a name -> a loadable checkpoint, offline-first, safe by default.

Moved whole to `rlhf_lib.models.offline` (the next commit splits it into registry, offline, loading and heads);
every public name is importable from `rlhf_lib.models` as before.
"""

from rlhf_lib.models.offline import *  # noqa: F403
