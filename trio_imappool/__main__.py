"""``python -m trio_imappool``: the ``trio-imappool`` command (see :mod:`trio_imappool.cli`)."""

import sys

from trio_imappool.cli import console_main

if __name__ == "__main__":
    sys.exit(console_main())
