"""``python -m normkit``: the ``normkit`` command line (see :mod:`normkit.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
