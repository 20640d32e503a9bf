"""`python -m flamingo_fast profile ...`: the same as the `flamingo-fast` console script."""

import sys

from .cli import main

sys.exit(main())
