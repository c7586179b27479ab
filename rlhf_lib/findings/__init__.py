"""results/<size>/findings.json: the one machine-readable record of this study's findings (see .build)."""

from rlhf_lib.findings.build import *  # noqa: F403
from rlhf_lib.findings.build import FINDINGS_FILE, FIXED_BY_DESIGN, SPECS  # noqa: F401
