"""``python -m tf4ctr_dist <command>``: see tf4ctr_dist.cli (e.g. ``python -m tf4ctr_dist plan --help``)."""

import sys

from tf4ctr_dist.cli import main

if __name__ == "__main__":
    sys.exit(main())
