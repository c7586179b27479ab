"""`python -m rlhf_lib.export ...`: the export command (rlhf_lib.export.command.main)."""

import sys

from rlhf_lib.export.command import main

sys.exit(main())
