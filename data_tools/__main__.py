"""`python -m data_tools ...` (see data_tools.cli)."""

import sys

from .cli import main

sys.exit(main())
