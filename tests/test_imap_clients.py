"""Real IMAP clients against the real server process, and what each of them used.

Every logged-in session ends with one "IMAP session summary" line naming the commands the
client sent and the extensions it enabled (imap/session.py).  Each test here drives one
client the way its users do, checks that the client got its job done, and checks from
that line that it took the extensions it is known to use when the server offers them.
docs/imap-clients.md is the table of these lines: run this module with
MAILSTACK_CLIENT_MATRIX=docs/imap-clients.md to write it again.
"""
from __future__ import annotations

import os
import re
import smtplib
import ssl
import subprocess
from pathlib import Path

import pytest

import sync_clients
from harness import MailServer, wait_for

DOMAIN = "example.test"
CLIENTS = {  # account local part -> how the client is driven (the matrix's second column)
    "mutt": "mutt 2.2 in a pty (`script`), header cache on, opened twice",
    "mbsync": "mbsync (isync 1.4), `-a`, two-way sync run twice",
    "offlineimap": "offlineimap3, one-shot sync of INBOX",
    "imaptools": "imap_tools 1.x: sorted fetch, search, flag, move",
    "imapclient": "imapclient 3.x: select, fetch, sort, thread, CONDSTORE, quota, idle",
    "curl": "curl: list, fetch by UID, custom SEARCH",
}
SUMMARY = re.compile(r"IMAP session summary: account=(\S+) client=(.*?) commands=(.*?) enabled=(\S+)$", re.M)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = MailServer(tmp_path_factory.mktemp("imap-clients"), loop="uvloop")
    srv.add_domain(DOMAIN)
    for name in CLIENTS:
        srv.add_user(f"{name}@{DOMAIN}", f"{name}-pw")
    srv.start()
    yield srv
    assert srv.stop() == 0
    out = os.environ.get("MAILSTACK_CLIENT_MATRIX")
    if out:
        Path(out).write_text(matrix(srv.log()))


def account(name: str) -> tuple[str, str]:
    return f"{name}@{DOMAIN}", f"{name}-pw"


def seed(srv: MailServer, name: str, count: int = 3) -> None:
    user, _ = account(name)
    with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=10) as s:
        for i in range(count):
            thread = f"<t{i // 2}@remote.example>"
            refs = f"In-Reply-To: {thread}\r\nReferences: {thread}\r\n" if i % 2 else ""
            s.sendmail("sender@remote.example", [user],
                       (f"From: Sender {i} <sender{i}@remote.example>\r\nTo: {user}\r\n"
                        f"Subject: {'Re: ' if i % 2 else ''}{name} message {i // 2}\r\n"
                        f"Message-ID: <{name}{i}@remote.example>\r\n{refs}"
                        f"Date: Tue, 1 Dec 2026 0{i % 10}:00:00 +0000\r\n\r\nbody {i}\r\n").encode())
    wait_for(lambda: len(srv.inbox_messages(user)) == count, what=f"delivery to {user}")


def summaries(srv: MailServer, name: str) -> list[tuple[str, set[str], set[str]]]:
    """(client ID, commands, enabled) of every finished session of this client's account."""
    user, _ = account(name)
    out = []
    for m in SUMMARY.finditer(srv.log()):
        if m.group(1) == user:
            cmds = set() if m.group(3) == "-" else set(m.group(3).split(","))
            enabled = set() if m.group(4) == "-" else set(m.group(4).split(","))
            out.append((m.group(2), cmds, enabled))
    return out


def used(srv: MailServer, name: str, at_least: int = 1) -> tuple[set[str], set[str]]:
    """Union of the commands and enabled extensions over the client's sessions, once they
    have all ended (the line is written when the session closes)."""
    wait_for(lambda: len(summaries(srv, name)) >= at_least, timeout=15, what=f"{name}'s session summary")
    cmds: set[str] = set()
    enabled: set[str] = set()
    for _, c, e in summaries(srv, name):
        cmds |= c
        enabled |= e
    return cmds, enabled


def matrix(log: str) -> str:
    rows = {}
    for m in SUMMARY.finditer(log):
        name = m.group(1).split("@")[0]
        if name not in CLIENTS:
            continue
        row = rows.setdefault(name, [set(), set(), set()])
        if m.group(2) != "-":
            row[0].add(m.group(2))
        row[1] |= set() if m.group(3) == "-" else set(m.group(3).split(","))
        row[2] |= set() if m.group(4) == "-" else set(m.group(4).split(","))
    lines = ["# IMAP clients seen against mailstack", "",
             "Written by `MAILSTACK_CLIENT_MATRIX=docs/imap-clients.md pytest tests/test_imap_clients.py`",
             "from the server's own \"IMAP session summary\" log lines: each client was driven as",
             "described, and the last two columns are what it sent and what it ENABLEd.", "",
             "| client | driven how | ID sent | commands used | enabled |", "|---|---|---|---|---|"]
    for name, how in CLIENTS.items():
        ids, cmds, enabled = rows.get(name, [set(), set(), set()])
        lines.append(f"| {name} | {how} | {', '.join(sorted(ids)) or '-'} | "
                     f"{' '.join(sorted(cmds)) or '(no session)'} | {' '.join(sorted(enabled)) or '-'} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the clients

def test_mutt_opens_inbox_twice(server, tmp_path):
    seed(server, "mutt")
    user, pw = account("mutt")
    (tmp_path / "certs").write_text(server.cert_path.read_text())
    rc = tmp_path / "muttrc"
    rc.write_text(f"""
set folder="imaps://{user.replace('@', '%40')}@127.0.0.1:{server.ports['imaps']}/"
set spoolfile="+INBOX"
set imap_pass="{pw}"
set certificate_file="{tmp_path}/certs"
set ssl_verify_host=no
set header_cache="{tmp_path}/hcache"
set imap_condstore=yes
set imap_qresync=yes
set imap_deflate=yes
set sort=threads
""")
    env = dict(os.environ, TERM="xterm", HOME=str(tmp_path), LC_ALL="C.UTF-8")
    for run in range(2):
        r = subprocess.run(["script", "-qec", f"mutt -n -F {rc} -e 'push <quit>'", "/dev/null"],
                           capture_output=True, timeout=60, env=env, stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r.stdout[-2000:]
        assert b"Msgs:3" in r.stdout, r.stdout[-2000:]  # mutt's status bar: it saw the mailbox
    cmds, enabled = used(server, "mutt", at_least=2)
    assert {"SELECT", "FETCH"} <= cmds or {"SELECT", "UID FETCH"} <= cmds
    # mutt 2.2 takes QRESYNC (with its header cache), COMPRESS=DEFLATE and UTF8=ACCEPT when offered
    assert {"QRESYNC", "CONDSTORE", "UTF8=ACCEPT"} <= enabled and "COMPRESS" in cmds


def test_mbsync_two_way(server, tmp_path):
    seed(server, "mbsync")
    user, pw = account("mbsync")
    local, mbsync = sync_clients.mbsync(tmp_path, port=server.ports["imaps"], user=user, password=pw,
                                        cert=server.cert_path)
    for _ in range(2):
        mbsync()
        if not list((local / "INBOX" / "cur").iterdir()) and not list((local / "INBOX" / "new").iterdir()):
            continue
        (local / "INBOX" / "new").joinpath("1.local").write_bytes(b"From: me@x.test\nSubject: up\n\nup\n")
    assert any(b"Subject: up" in m for m in server.inbox_messages(user)) or \
        "Sent" in "".join(p.name for p in local.iterdir())
    cmds, _ = used(server, "mbsync", at_least=2)
    assert "UID FETCH" in cmds and "APPEND" in cmds and "COMPRESS" in cmds  # isync 1.4 compresses


def test_offlineimap_sync(server, tmp_path):
    seed(server, "offlineimap")
    user, pw = account("offlineimap")
    local = sync_clients.offlineimap(tmp_path, port=server.ports["imaps"], user=user, password=pw,
                                     cert=server.cert_path)
    got = [p for sub in ("new", "cur") for p in (local / "INBOX" / sub).iterdir()]
    assert len(got) == 3
    cmds, _ = used(server, "offlineimap")
    assert "UID FETCH" in cmds


def _tls() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the client's job here is protocol, not trust
    return ctx


def test_imap_tools_session(server):
    from imap_tools import AND, MailBox
    seed(server, "imaptools", count=4)
    user, pw = account("imaptools")
    with MailBox("127.0.0.1", server.ports["imaps"], ssl_context=_tls()).login(user, pw) as mb:
        subjects = [m.subject for m in mb.fetch(AND(all=True), mark_seen=False, sort="SUBJECT")]
        assert subjects == sorted(subjects, key=lambda s: s.removeprefix("Re: ")) and len(subjects) == 4
        uids = mb.uids(AND(subject="message 1"))
        assert len(uids) == 2
        mb.flag(uids, "\\Flagged", True)
        mb.folder.create("Kept")
        mb.move(uids[:1], "Kept")
        assert len(mb.uids(AND(all=True))) == 3
    cmds, _ = used(server, "imaptools")
    assert {"UID SORT", "UID SEARCH", "UID FETCH", "UID STORE"} <= cmds


def test_imapclient_session(server):
    from imapclient import IMAPClient
    seed(server, "imapclient", count=4)
    user, pw = account("imapclient")
    with IMAPClient("127.0.0.1", port=server.ports["imaps"], ssl=True, ssl_context=_tls(), timeout=10) as c:
        c.login(user, pw)
        c.id_({"name": "imapclient-test", "version": "1"})
        c.enable("CONDSTORE")  # imapclient allows ENABLE before SELECT only (RFC 5161)
        info = c.select_folder("INBOX")
        assert info[b"EXISTS"] == 4
        fetched = c.fetch(c.search(), ["ENVELOPE", "FLAGS", "RFC822.SIZE"])
        assert len(fetched) == 4
        assert c.sort(["REVERSE", "DATE"]) == sorted(fetched, reverse=True)  # Date: hours 0..3
        assert sorted(len(t) for t in c.thread()) == [2, 2]  # a message and its "Re:" each (RFC 5256 subject grouping)
        modseq = c.folder_status("INBOX", ["HIGHESTMODSEQ"])[b"HIGHESTMODSEQ"]
        c.add_flags(fetched_uids := sorted(fetched)[:1], [b"\\Flagged"])
        changed = c.fetch(fetched_uids[0], ["FLAGS"], modifiers=[f"CHANGEDSINCE {modseq}"])
        assert list(changed) == fetched_uids
        assert c.get_quota_root("INBOX")[0].quota_roots == [""]
        c.idle()
        c.idle_done()
    cmds, _ = used(server, "imapclient")
    assert {"SELECT", "UID SEARCH", "UID FETCH", "IDLE", "ID", "UID SORT", "UID THREAD", "ENABLE",
            "GETQUOTAROOT"} <= cmds
    assert summaries(server, "imapclient")[0][0] == "imapclient-test 1"


def test_curl_session(server):
    seed(server, "curl", count=1)
    user, pw = account("curl")
    port = server.ports["imaps"]
    base = ["curl", "-sS", "-k", "-u", f"{user}:{pw}", "--max-time", "20"]
    r = subprocess.run(base + [f"imaps://127.0.0.1:{port}/INBOX;UID=1"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "body 0" in r.stdout, r.stderr
    cmds, _ = used(server, "curl")
    assert "FETCH" in cmds or "UID FETCH" in cmds
