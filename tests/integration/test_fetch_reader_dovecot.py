"""The purpose-built FETCH reader against Dovecot's answers (tests/unit/test_fetch_reader.py has
the byte-level cases)."""

from __future__ import annotations

from typing import Any

from imapclient import IMAPClient

from trio_imappool import open_pool
from trio_imappool._imap import FetchReader
from trio_imappool.testing import DovecotServer
from trio_imappool.testing import seed_folders as _seed


def without_uid(fetched: dict[int, dict[bytes, Any]]) -> dict[int, dict[bytes, Any]]:
    return {uid: {k: v for k, v in data.items() if k != b"UID"} for uid, data in fetched.items()}


async def test_dovecot_answers_take_the_fast_path_and_match_imapclient(
    dovecot: DovecotServer, account: dict[str, Any]
) -> None:
    uids = _seed(account, {"A": 30}, size=900, flags=lambda _, i: [r"\Seen"] if i % 3 else [])["A"]
    plain = IMAPClient(account["host"], account["port"], ssl=False)
    plain.login(account["username"], account["password"])
    plain.select_folder("A", readonly=True)
    fields = ["BODY.PEEK[]", "FLAGS", "RFC822.SIZE"]
    expected = plain.fetch(uids, fields)
    with_date = plain.fetch(uids[:5], ["INTERNALDATE", "BODY.PEEK[]"])
    plain.logout()
    async with open_pool(**account, max_size=1) as pool, pool.connection() as conn:
        await conn.select_folder("A", readonly=True)
        # The pool's fetch also keeps b"UID" in each message (imapclient drops it).
        assert without_uid(await conn.fetch(uids, fields)) == expected
        assert without_uid(await conn.fetch(uids[:5], ["INTERNALDATE", "BODY.PEEK[]"])) == (
            with_date
        )

        def reader_of_one_fetch(client: IMAPClient) -> FetchReader:
            imap = client._imap
            tag = imap._command("UID", "FETCH", b"%d:%d" % (uids[0], uids[-1]), "(BODY.PEEK[])")
            with FetchReader(imap) as reader:
                imap._command_complete("FETCH", tag)
            return reader

        reader = await conn.run_sync(reader_of_one_fetch)
        assert reader.unparsed == [] and len(reader.messages) == 30
