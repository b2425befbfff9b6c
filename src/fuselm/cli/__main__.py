"""`python -m fuselm.cli ARGS`: the `fuselm` command."""

import sys

from . import main

sys.exit(main())
