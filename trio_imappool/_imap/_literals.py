"""LOGIN with UTF-8 literals: for user names and passwords imaplib's own ``login`` cannot send.

imaplib encodes every command argument as ASCII, so a non-ASCII password fails LOGIN with a
``UnicodeEncodeError`` whose text names the character and its position: a secret in an error
message. RFC 9051 (and RFC 3501 with 8-bit octets in literals, which servers accept) lets a
client send both arguments of LOGIN as literals, in UTF-8, and that is what this does. Used by
:func:`trio_imappool._login.authenticate` when the server offers no AUTHENTICATE PLAIN.
"""

from __future__ import annotations

import imaplib
from typing import Any

from imapclient import IMAPClient
from imapclient.exceptions import LoginError

__all__ = ["login_with_literals"]


def login_with_literals(client: IMAPClient, user: str, password: str) -> None:
    """LOGIN with the user name and the password as UTF-8 literals (imaplib's own ``login``
    can only send ASCII). Blocking."""
    imap = client._imap
    encoded = user.encode("utf-8")
    try:
        # imaplib sends the last argument as the literal it holds in ``literal``; the user
        # name goes as a literal of its own inside the command line.
        imap.literal = password.encode("utf-8")
        if encoded.isascii():
            typ, data = imap._simple_command("LOGIN", imap._quote(user))
        else:
            typ, data = _login_command_two_literals(imap, encoded, password.encode("utf-8"))
    except imaplib.IMAP4.error as exc:
        raise LoginError(str(exc)) from None
    if typ != "OK":
        text = data[-1].decode("utf-8", "replace") if data and isinstance(data[-1], bytes) else ""
        raise LoginError(f"login failed: {text or typ}")
    imap.state = "AUTH"


def _login_command_two_literals(imap: Any, user: bytes, password: bytes) -> tuple[str, list[Any]]:
    """``LOGIN {n}<user> {m}<password>`` by hand, waiting for each continuation."""
    tag = imap._new_tag()
    imap.send(tag + b" LOGIN {%d}\r\n" % len(user))
    _wait_continuation(imap, tag)
    imap.send(user + b" {%d}\r\n" % len(password))
    _wait_continuation(imap, tag)
    imap.send(password + b"\r\n")
    typ, data = imap._command_complete("LOGIN", tag)
    return str(typ), list(data)


def _wait_continuation(imap: Any, tag: bytes) -> None:
    while imap._get_response():
        if imap.tagged_commands[tag]:
            typ, data = imap.tagged_commands.pop(tag)
            text = data[-1].decode("utf-8", "replace") if data else ""
            raise LoginError(f"login failed: {text or typ}")
    imap.continuation_response = None
