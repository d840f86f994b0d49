"""The ``dovecot`` and ``dovecot_factory`` pytest fixtures.

pytest loads them by itself wherever trio-imappool is installed: the ``trio_imappool`` entry
point names the top-level module ``_trio_imappool_pytest_plugin``, which defines them and imports
nothing of the library until a test asks for one (a plugin inside this package would import the
whole library into every pytest run of the environment). This module re-exports them, for
``pytest -p trio_imappool.testing.pytest_plugin`` and for reading:

``dovecot`` (session scope)
    One :class:`~trio_imappool.testing.DovecotServer` shared by the whole session, with users
    ``alice``/``alice-pw`` and ``bob``/``bob-pw`` and ``max_userip_connections=200``.

``dovecot_factory`` (function scope)
    A callable taking the keyword arguments of
    :func:`~trio_imappool.testing.start_dovecot` and returning a started server; every server it
    started is stopped and removed when the test ends.

If Dovecot, its IMAP server (``dovecot-imapd``) or trustme (the ``testing`` extra) is missing,
both fixtures fail the test with what to install; they never skip.
"""

from __future__ import annotations

from _trio_imappool_pytest_plugin import (
    cyrus,
    cyrus_factory,
    dovecot,
    dovecot_factory,
    imap_server,
    redis_server,
)

__all__ = ["cyrus", "cyrus_factory", "dovecot", "dovecot_factory", "imap_server", "redis_server"]
