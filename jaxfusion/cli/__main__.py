"""`python -m jaxfusion.cli`: the `jaxfusion` command."""

import sys

from jaxfusion.cli import main

sys.exit(main())
