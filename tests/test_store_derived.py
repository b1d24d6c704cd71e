"""The derived data of delivered messages (metadata index, full-text rows) written in
batches after the "250" (store/derived.py), and the quota charge written after the reply
(quota.charge_soon): batched, exact, and repaired after a kill -9 that hit between the
Maildir file and the batch."""
from __future__ import annotations

import asyncio
import base64
import imaplib
import os
import smtplib
import subprocess
import sys

import pytest

from harness import MailServer, wait_for
from mailstack.events import EventBus
from mailstack.store import fts
from mailstack.store import index as idxmod
from mailstack.store.maildir import MaildirStore
from mailstack.store.quota import Limits, Quota, QuotaExceeded

ALICE = "alice@example.test"
ACCT = ALICE


def message(n: int, body: bytes = b"", extra_headers: bytes = b"") -> bytes:
    return (b"From: bob@example.org\r\nTo: alice@example.test\r\nSubject: derived %d\r\n"
            b"Message-ID: <d%d@example.org>\r\n%s\r\n%s\r\n" % (n, n, extra_headers, body or b"plain word%d" % n))


def test_concurrent_deliveries_share_batches_and_every_message_gets_its_rows(tmp_path):
    async def main():
        store = MaildirStore(tmp_path / "mail", EventBus())
        await store.ensure_account(ACCT)
        ok = await asyncio.gather(*(store.deliver(ACCT, message(n), f"id{n}") for n in range(60)))
        assert all(ok)
        derived = store.group_writer.derived
        assert derived.written == 0  # nothing parsed on the delivery path: it waits for its batch
        await store.group_writer.settled()
        assert derived.written == 60 and derived.batches < 10, (derived.written, derived.batches)
        box = tmp_path / "mail" / "example.test" / "alice"
        bases = {name for name in os.listdir(box / "new")}
        in_fts, _ = fts.indexed(box / fts.NAME)
        assert in_fts == bases
        lines = (box / idxmod.NAME).read_bytes().splitlines()
        assert {line[1:].split(b" ")[0].decode() for line in lines[1:]} == bases
        # and an IMAP search answers from them, like a scan
        mbox = await store.open(ACCT, "INBOX")
        found = await mbox.fulltext_search([("word17", True)])
        assert found is not None and len(found[0]) == 1
        await mbox.close()
    asyncio.run(main())


def test_settled_leaves_no_task_pending_and_later_deliveries_still_get_their_rows(tmp_path):
    # At shutdown the loop closes right after settled(): a lingering task still asleep there
    # was "Task was destroyed but it is pending!" on stderr.
    async def main():
        store = MaildirStore(tmp_path / "mail", EventBus())
        await store.ensure_account(ACCT)
        derived = store.group_writer.derived
        assert await store.deliver(ACCT, message(1), "id1")
        await store.group_writer.settled()
        assert derived.written == 1
        assert derived._task is None or derived._task.done()
        assert await store.deliver(ACCT, message(2), "id2")  # a new burst: its own task
        await store.group_writer.settled()
        assert derived.written == 2
        assert derived._task is None or derived._task.done()
    asyncio.run(main())


def test_quota_charged_after_the_reply_is_counted_at_once(tmp_path):
    async def main():
        store = MaildirStore(tmp_path / "mail", EventBus())
        store.quota = Quota(lambda a: tmp_path / "mail" / "example.test" / "alice", lambda a: Limits(0, 3))
        await store.ensure_account(ACCT)
        for n in range(3):
            await store.deliver(ACCT, message(n), f"id{n}")
        # the three lines may not be written yet: the check counts them all the same
        with pytest.raises(QuotaExceeded):
            await store.quota.check(ACCT, 100)
        await asyncio.gather(*store.quota._tasks)
        usage, _ = await store.quota.usage(ACCT, fresh=True)
        assert usage.messages == 3
        with pytest.raises(QuotaExceeded):
            await store.quota.check(ACCT, 100)
    asyncio.run(main())


_SERVE_LINGERING = """
import sys
import mailstack.store.derived as derived
derived.LINGER = 3600.0  # the batch never comes: the kill hits between the files and it
from mailstack.cli import main
sys.exit(main(["serve", "--config", sys.argv[1]]))
"""


def _serve(tmp_path, script: str) -> MailServer:
    """A server (SMTP, IMAP; alice) run by `script`, which sets derived.py's timing first."""
    srv = MailServer(tmp_path, listeners=("smtp", "imap"), overrides={"imap": {"allow_plaintext_auth": True}})
    srv.add_domain("example.test")
    srv.add_user(ALICE, "pw-a")
    log = open(srv.log_path, "ab")
    srv.proc = subprocess.Popen([sys.executable, "-c", script, str(srv.config_path)],
                                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    srv._log = log
    try:
        wait_for(lambda: _accepting(srv.ports["smtp"]) and _accepting(srv.ports["imap"]), 30, what="the server")
    except BaseException:
        srv.stop()
        raise
    return srv


def test_kill_9_between_the_maildir_files_and_their_batch_is_repaired(tmp_path):
    srv = _serve(tmp_path, _SERVE_LINGERING)
    qp = b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n"
    b64 = b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n"
    bodies = [message(0), message(1, b"Gr=C3=BC=C3=9Fe aus K=C3=B6ln", qp),
              message(2, base64.b64encode("Прощай, старый мир".encode()), b64), message(3), message(4)]
    with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=20) as s:
        for body in bodies:
            s.sendmail("bob@example.org", [ALICE], body)
    box = srv.maildir(ALICE)
    assert len(os.listdir(box / "new")) == 5  # acknowledged: on disk
    assert not (box / fts.NAME).exists()  # ... and their derived data not yet written
    index_lines = (box / idxmod.NAME).read_bytes().count(b"\n=") if (box / idxmod.NAME).exists() else 0
    assert index_lines == 0
    srv.kill()
    srv.start()
    try:
        c = imaplib.IMAP4("127.0.0.1", srv.ports["imap"])
        c.login(ALICE, "pw-a")
        c.select("INBOX")
        typ, data = c.fetch("1:*", "(UID ENVELOPE)")
        assert typ == "OK"
        subjects = [x for x in data if isinstance(x, bytes)]
        assert len(subjects) == 5 and all(b'"derived %d"' % n in subjects[n] for n in range(5)), subjects
        assert c.uid("SEARCH", "SUBJECT", "derived")[1] == [b"1 2 3 4 5"]
        assert c.uid("SEARCH", "BODY", "word3")[1] == [b"4"]
        c.literal = "grüße".encode()
        assert c.uid("SEARCH", "CHARSET", "UTF-8", "BODY")[1] == [b"2"]  # quoted-printable, decoded
        c.literal = "старый".encode()
        assert c.uid("SEARCH", "CHARSET", "UTF-8", "TEXT")[1] == [b"3"]  # base64, decoded
        assert c.uid("SEARCH", "BODY", "nowhere-to-be-found")[1] == [b""]
        c.logout()
        # the search added what the lost batch never wrote
        in_fts, _ = fts.indexed(box / fts.NAME)
        assert in_fts == set(os.listdir(box / "cur")) | set(os.listdir(box / "new"))
    finally:
        srv.stop()


def _accepting(port: int) -> bool:
    import socket
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


_SERVE_BURSTY = """
import sys
import mailstack.store.derived as derived
derived.LINGER = 3.0  # a pause of 3 s ends the burst
derived.MAX_ITEMS = 4  # at most 4 messages wait for it
from mailstack.cli import main
sys.exit(main(["serve", "--config", sys.argv[1]]))
"""


def test_a_burst_waits_for_its_pause_and_what_it_leaves_is_made_when_looked_at(tmp_path):
    """While deliveries keep coming, no derived data is made (the parse would share the GIL
    with the loop accepting them): at most MAX_ITEMS wait for the pause, the rest of the
    burst is parsed by the first IMAP look; a reader during the burst sees exact data."""
    srv = _serve(tmp_path, _SERVE_BURSTY)
    box = srv.maildir(ALICE)
    try:
        c = imaplib.IMAP4("127.0.0.1", srv.ports["imap"])
        c.login(ALICE, "pw-a")
        with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=20) as s:
            for n in range(6):
                s.sendmail("bob@example.org", [ALICE], message(n))
            c.select("INBOX")  # a reader in the middle of the burst: parsed from the files
            typ, data = c.fetch("1:*", "(UID ENVELOPE)")
            got = [x for x in data if isinstance(x, bytes)]
            assert typ == "OK" and len(got) == 6 and all(b'"derived %d"' % n in got[n] for n in range(6)), got
            for n in range(6, 10):
                s.sendmail("bob@example.org", [ALICE], message(n))
        assert not (box / fts.NAME).exists()  # deliveries kept coming: nothing derived yet
        # the pause: the 4 that waited get their rows, in one batch
        wait_for(lambda: (box / fts.NAME).exists() and len(fts.indexed(box / fts.NAME)[0]) == 4, 30,
                 what="the batch after the burst")
        c.noop()
        typ, data = c.fetch("1:*", "(UID ENVELOPE)")
        got = [x for x in data if isinstance(x, bytes)]
        assert typ == "OK" and len(got) == 10 and all(b'"derived %d"' % n in got[n] for n in range(10)), got
        assert c.uid("SEARCH", "SUBJECT", "derived")[1] == [b"1 2 3 4 5 6 7 8 9 10"]
        assert c.uid("SEARCH", "BODY", "word9")[1] == [b"10"]  # left to the first search
        assert c.uid("SEARCH", "BODY", "word2")[1] == [b"3"]  # made in the batch
        c.logout()
        in_fts, _ = fts.indexed(box / fts.NAME)
        assert in_fts == set(os.listdir(box / "cur")) | set(os.listdir(box / "new"))
    finally:
        srv.stop()
