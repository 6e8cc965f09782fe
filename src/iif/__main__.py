"""``python -m iif``: the command line (also what ``torchrun -m iif`` starts)."""

import sys

from iif.runs.cli import main

sys.exit(main())
