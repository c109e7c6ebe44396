"""`python -m data_tools ...` (see data_tools.cli)."""

import os
import sys

# Arrow's jemalloc pool returns freed memory to the OS sooner than its default (mimalloc): the
# counting pass frees large tables over and over, and its peak RSS was 5-15% lower with it
# (BENCHMARKS.md). Read when Arrow first allocates, so set before anything runs; an explicit
# ARROW_DEFAULT_MEMORY_POOL still wins.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "jemalloc")

from .cli import main  # noqa: E402

sys.exit(main())
