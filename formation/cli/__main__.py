"""`python -m formation.cli ...`: the same as the `form` console script."""

import sys

from formation.cli import main

sys.exit(main())
