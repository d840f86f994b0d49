"""The purpose-built FETCH reader: kept at this path; it lives in the imaplib layer,
:mod:`trio_imappool._imap._fetch_reader`."""

from ._imap._fetch_reader import FetchReader, parse_simple_fetch

__all__ = ["FetchReader", "parse_simple_fetch"]
