"""`python -m mae_torch ...` is the `mae` command (and what `torchrun -m mae_torch` launches)."""

import sys

from .cli import main

sys.exit(main())
