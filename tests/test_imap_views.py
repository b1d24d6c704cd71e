"""Every session's view stays right while other sessions change the mailbox (issue 10).

Six (or more) real IMAP sessions over real sockets do random APPEND / STORE / EXPUNGE /
MOVE / COPY / NOOP / IDLE / FETCH / UID FETCH on one mailbox; tests/viewcheck.py keeps each
session's view from the untagged responses it received and checks it after every
response.  Run under asyncio and under uvloop, and once with a POP3 client deleting
messages (DELE + QUIT) while the IMAP sessions are selected.
"""
from __future__ import annotations

import asyncio

import pytest

from imap_fixtures import InProcessIMAP
from viewcheck import run_mix

USER, PASSWORD = "alice@example.test", "secret"
SECONDS = 4.0
PLAIN = {"allow_plaintext_auth": True}  # loopback only; spares the 2 cores the TLS work


def _report(shared) -> str:
    return (f"{len(shared.errors)} view errors {shared.kinds()}, ops {shared.ops}:\n"
            + "\n".join(shared.errors[:5]))


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_six_sessions_keep_right_views(tmp_path, loop):
    srv = InProcessIMAP(tmp_path, PLAIN, loop=loop)
    try:
        srv.call(srv.services.store.create_mailbox(USER, "Other"))
        shared = asyncio.run(run_mix("127.0.0.1", srv.ports["imap"], USER, PASSWORD,
                                     sessions=6, seconds=SECONDS))
    finally:
        srv.close()
    assert not shared.errors, _report(shared)
    # the run did enough of each kind of work to mean something
    for what in ("append", "store", "expunge", "move", "copy", "idle", "fetch", "uid_fetch"):
        assert shared.ops.get(what, 0) >= 5, _report(shared)


def test_pop3_and_imap_sessions_together(tmp_path):
    srv = InProcessIMAP(tmp_path, PLAIN, loop="uvloop", pop3=True, pop3_overrides=PLAIN)
    try:
        srv.call(srv.services.store.create_mailbox(USER, "Other"))
        shared = asyncio.run(run_mix("127.0.0.1", srv.ports["imap"], USER, PASSWORD,
                                     sessions=6, seconds=SECONDS, pop3_port=srv.ports["pop3"]))
    finally:
        srv.close()
    assert not shared.errors, _report(shared)
    assert shared.ops.get("pop3-sessions", 0) >= 5, _report(shared)
