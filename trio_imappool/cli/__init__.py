"""The ``trio-imappool`` command (also ``python -m trio_imappool``): an application built on the
pool's public API and on :mod:`trio_imappool.exporter`.

Its commands, settings and exit statuses are described in ``trio-imappool --help`` (the text is
the docstring of :mod:`trio_imappool.cli._parser`). The modules: ``_settings`` (flags, then
``TRIO_IMAPPOOL_*`` variables, then the TOML file, then the defaults), ``_parser``, ``_errors``
(one line and one exit status per error), ``_output``, ``_commands`` (export, folders, dry run),
``_accounts`` (``--budget`` and ``--accounts``), ``_demo`` (the only user of
:mod:`trio_imappool.testing`, loaded when the demo runs) and ``_main``.
"""

from ._errors import classify
from ._main import console_main, main
from ._settings import EXIT_CODES, Settings, UsageError

__all__ = ["EXIT_CODES", "Settings", "UsageError", "classify", "console_main", "main"]
