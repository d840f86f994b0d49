"""The exporter's flag pass on the wire: kept at this path; it lives in the imaplib layer,
:mod:`trio_imappool._imap._sync`."""

from ._imap._sync import FlagAnswer, FlagStep, fetch_flags, parse_flag_responses, parse_uid_set

__all__ = ["FlagAnswer", "FlagStep", "fetch_flags", "parse_flag_responses", "parse_uid_set"]
