"""The queue through the real server process: crash safety under load, CLI and sendmail."""
from __future__ import annotations

import email
import email.policy
import json
import os
import smtplib
import stat
import threading

from harness import MailServer, wait_for

ALICE, BOB = "alice@example.test", "bob@example.test"


def _queue_empty(srv: MailServer) -> bool:
    q = srv.data_dir / "queue"
    return all(not [n for n in os.listdir(q / s) if not n.startswith(".")]
               for s in ("incoming", "active", "deferred", "maildrop") if (q / s).is_dir())


def _inbox_ids(srv: MailServer, address: str) -> list[str]:
    """Message-IDs of the inbox; asserts every file is a whole message."""
    ids = []
    for raw in srv.inbox_messages(address):
        msg = email.message_from_bytes(raw, policy=email.policy.compat32)
        mid = msg["Message-ID"]
        assert mid, raw[:200]
        assert raw.endswith(f"END {mid}\r\n".encode()), f"partial message {mid}"
        ids.append(mid)
    return ids


def test_kill_9_under_load_loses_no_accepted_message_and_duplicates_none(tmp_path):
    srv = MailServer(tmp_path, listeners=("smtp",))
    srv.add_domain("example.test")
    srv.add_user(ALICE, "pw-a")
    srv.add_user(BOB, "pw-b")
    srv.start()
    accepted: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()
    filler = ("x" * 76 + "\r\n") * 52  # ~4 KiB

    def sender(n: int) -> None:
        i = 0
        try:
            with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=20) as s:
                s.ehlo("load.test")
                while not stop.is_set():
                    mid = f"<load-{n}-{i}@client.test>"
                    body = (f"From: load@client.test\r\nTo: {ALICE}, {BOB}\r\nSubject: load {n} {i}\r\n"
                            f"Message-ID: {mid}\r\n\r\n{filler}END {mid}\r\n")
                    s.sendmail("load@client.test", [ALICE, BOB], body.encode())
                    with lock:  # sendmail returned: the server said 250
                        accepted.append(mid)
                    i += 1
        except (smtplib.SMTPException, OSError):
            pass  # the server died under us: this message was not acknowledged

    threads = [threading.Thread(target=sender, args=(n,), daemon=True) for n in range(12)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(accepted) >= 150, 60, what="150 accepted messages")
        srv.kill()  # SIGKILL in the middle of the load
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    got_250 = set(accepted)
    assert len(got_250) >= 150
    q = srv.data_dir / "queue"
    print("left in queue at kill:", {s: len(os.listdir(q / s)) for s in ("incoming", "active")},
          "accepted:", len(got_250))

    srv.start()
    try:
        wait_for(lambda: _queue_empty(srv) and got_250 <= set(_inbox_ids(srv, ALICE))
                 and got_250 <= set(_inbox_ids(srv, BOB)), 60, what="every accepted message delivered")
        for who in (ALICE, BOB):
            ids = _inbox_ids(srv, who)
            assert len(ids) == len(set(ids)), "a message was delivered twice"
            assert got_250 <= set(ids)
    finally:
        assert srv.stop() == 0


def test_queue_cli_and_sendmail_against_running_server(tmp_path):
    srv = MailServer(tmp_path, overrides={"delivery": {"outbound": False}}, listeners=("smtp",))
    srv.add_domain("example.test")
    srv.add_user(ALICE, "pw-a")
    srv.start()
    try:
        sock = srv.data_dir / "control.sock"
        wait_for(lambda: sock.exists(), 10, what="control socket")
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600

        # sendmail to a local user: picked up at once and delivered
        srv.cli("sendmail", "-t", input="To: alice@example.test\nSubject: via sendmail\n\nhello\n")
        [raw] = wait_for(lambda: srv.inbox_messages(ALICE), 10, what="sendmail delivery")
        assert b"Subject: via sendmail" in raw

        # a remote recipient with outbound delivery off stays deferred, visibly
        srv.cli("sendmail", "-f", ALICE, "dave@remote.test", input="Subject: far away\n\nhi\n")
        deferred = srv.data_dir / "queue" / "deferred"
        [qid] = wait_for(lambda: os.listdir(deferred), 10, what="deferred message")
        out = srv.cli("mailq").stdout
        assert qid in out and "deferred" in out and "outbound delivery not configured" in out
        listed = json.loads(srv.cli("queue", "list", "--json").stdout)
        assert [m["qid"] for m in listed] == [qid]
        show = srv.cli("queue", "show", qid).stdout
        assert "<dave@remote.test>: deferred, attempts=" in show

        srv.cli("queue", "hold", qid)
        assert (srv.data_dir / "queue" / "hold" / qid).exists()
        srv.cli("queue", "release", qid)
        wait_for(lambda: (deferred / qid).exists(), 10, what="released and tried again")
        assert "flushed" in srv.cli("queue", "flush").stdout
        srv.cli("queue", "delete", qid)
        wait_for(lambda: srv.cli("mailq").stdout == "Mail queue is empty\n", 10, what="deleted")
        assert srv.inbox_messages(ALICE) == [raw]  # no bounce for a deleted message
        srv.wait_log("removed", f"{qid}:")
    finally:
        assert srv.stop() == 0
    # without a server: list still works, flush says so
    assert srv.cli("mailq").stdout == "Mail queue is empty\n"
    r = srv.cli("queue", "flush", check=False)
    assert r.returncode == 1 and "not running" in r.stderr
