"""`python -m nanoseek` (and `torchrun -m nanoseek`): the nanoseek command."""

import sys

from .cli import main

sys.exit(main())
