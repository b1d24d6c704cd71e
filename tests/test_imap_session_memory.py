"""Memory of idle IMAP sessions (issue 16: <= 10 KiB per logged-in session in IDLE).

The per-session attributes are slots of IMAPSession.  Were one of them an instance-dict
entry instead, enough distinct names across the class make CPython give every session a
dict of its own (~1.3-1.6 KiB each, +15 % per idle session); the test below fails as soon
as a session logged in, SELECTed and IDLE holds anything in its instance dict."""
from __future__ import annotations

import socket

import pytest

from harness import wait_for
from imap_fixtures import InProcessIMAP
from mailstack.imap.session import IMAPSession
from mailstack.imap.states import EMPTY


@pytest.fixture(params=["asyncio", "uvloop"])
def srv(request, tmp_path):
    s = InProcessIMAP(tmp_path, {"allow_plaintext_auth": True}, store="maildir", loop=request.param)
    yield s
    s.close()


def _until(f, prefix: bytes) -> bytes:
    while True:
        line = f.readline()
        assert line, "connection closed"
        if line.startswith(prefix):
            return line


def _until_lines(f, prefix: bytes) -> list[bytes]:
    lines = []
    while not lines or not lines[-1].startswith(prefix):
        line = f.readline()
        assert line, "connection closed"
        lines.append(line)
    return lines


def test_a_session_in_idle_keeps_every_attribute_in_a_slot(srv):
    srv.deliver("alice@example.test", b"Subject: hi\r\n\r\nbody\r\n")
    first = socket.create_connection(("127.0.0.1", srv.ports["imap"]), timeout=10)  # takes \\Recent
    f = first.makefile("rb")
    f.readline()
    first.sendall(b"a LOGIN alice@example.test secret\r\nb SELECT INBOX\r\nc LOGOUT\r\n")
    assert b"* 1 RECENT" in b"".join(_until_lines(f, b"c "))
    first.close()
    wait_for(lambda: srv.session_count() == 0, 10, what="the first session to end")
    socks = []
    try:
        for _ in range(3):  # a few, so that no first-session path is all that is seen
            s = socket.create_connection(("127.0.0.1", srv.ports["imap"]), timeout=10)
            socks.append(s)
            f = s.makefile("rb")
            f.readline()
            s.sendall(b"a ID (\"name\" \"test\")\r\nb LOGIN alice@example.test secret\r\nc SELECT INBOX\r\n")
            assert _until(f, b"c ").startswith(b"c OK")
            s.sendall(b"d IDLE\r\n")
            _until(f, b"+")
        wait_for(lambda: srv.session_count() == 3, 10, what="three sessions")
        sessions = [x for x in srv.services.sessions.sessions if isinstance(x, IMAPSession)]
        assert len(sessions) == 3
        for session in sessions:
            assert session.state is not None and session.wake is not None  # in IDLE, selected
            assert vars(session) == {}, f"not slots: {sorted(vars(session))}"
            # nothing recent, no keywords, nothing ENABLEd or saved: the one shared empty set
            # each (a frozenset() of its own is 216 bytes on 3.11), not one per session
            for name in ("recent", "keywords", "enabled", "search_result"):
                assert getattr(session, name) is EMPTY, name
    finally:
        for s in socks:
            s.close()


def test_slots_hide_no_mixin_default_left_unset():
    # A slot hides a mixin's class-level default: reading it before __init__ set it would
    # raise AttributeError.  Every slot must therefore be assigned in __init__.
    import inspect
    src = inspect.getsource(IMAPSession.__init__)
    missing = [name for name in IMAPSession.__slots__ if f"self.{name}" not in src]
    assert missing == []


class _Counting:
    """A subscriber that counts how often it is compared with another."""
    compared = 0

    def __init__(self, seen: list) -> None:
        self.seen = seen

    def __call__(self, event) -> None:
        self.seen.append(self)

    def __eq__(self, other) -> bool:
        _Counting.compared += 1
        return self is other

    __hash__ = object.__hash__


def test_an_ending_session_unsubscribes_without_a_scan_of_the_others():
    # Every IDLE session subscribes to its mailbox; a list of subscribers made each
    # unsubscribe compare against the others: O(sessions^2) when 10,000 of them drop.
    from mailstack.events import EventBus, MailboxEvent
    bus = EventBus()
    seen: list = []
    subs = [_Counting(seen) for _ in range(1000)]
    unsubscribe = [bus.subscribe("A@x", "INBOX", s) for s in subs]
    account_unsub = bus.subscribe_account("a@x", subs[0])
    _Counting.compared = 0
    for u in unsubscribe[:500]:
        u()
    unsubscribe[0]()  # twice: no harm
    assert _Counting.compared == 0
    assert bus.subscribers("a@x", "INBOX") == 500
    bus.publish(MailboxEvent("a@x", "INBOX", "new"))
    assert seen == subs[500:] + [subs[0]]  # subscription order, then the account's
    for u in unsubscribe[500:]:
        u()
    account_unsub()
    assert bus._subs == {} and bus._account_subs == {}


def test_a_callback_may_unsubscribe_another_while_an_event_is_published():
    from mailstack.events import EventBus, MailboxEvent
    bus = EventBus()
    calls = []
    later = None

    def first(ev):
        calls.append("first")
        later()

    bus.subscribe("a@x", "INBOX", first)
    later = bus.subscribe("a@x", "INBOX", lambda ev: calls.append("second"))
    bus.publish(MailboxEvent("a@x", "INBOX", "new"))  # second was taken with the list: still runs
    bus.publish(MailboxEvent("a@x", "INBOX", "new"))
    assert calls == ["first", "second", "first"]
