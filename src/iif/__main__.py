"""``python -m iif``: the command line (also what ``torchrun -m iif`` starts)."""

import sys

from iif.cli import main

sys.exit(main())
