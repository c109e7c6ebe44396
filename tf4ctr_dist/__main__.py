"""``python -m tf4ctr_dist COMMAND ...`` is ``tf4ctr COMMAND ...`` (see tf4ctr_dist.cli)."""

import sys

from tf4ctr_dist.cli import main

if __name__ == "__main__":
    sys.exit(main())
