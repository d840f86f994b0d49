"""``python -m trio_imappool``: the ``trio-imappool`` command (see :mod:`trio_imappool.cli`)."""

import sys

# main: the name the scripts of earlier installations import from here.
from trio_imappool.cli import console_main, main

__all__ = ["console_main", "main"]

if __name__ == "__main__":
    sys.exit(console_main())
