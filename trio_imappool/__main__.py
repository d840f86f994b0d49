"""``python -m trio_imappool``: the ``trio-imappool`` command (see :mod:`trio_imappool.cli`)."""

import sys

from trio_imappool.cli import main

if __name__ == "__main__":
    sys.exit(main())
