"""`python -m moetune.recipes ...` (and `accelerate launch -m moetune.recipes ...`) runs
`moetune ...`."""

import sys

from moetune.recipes.cli import main

sys.exit(main())
