"""`mailstack import imap|maildir` and `mailstack export` against a real Dovecot (started here on
loopback), against mailstack itself, and read back by Dovecot and mutt."""
from __future__ import annotations

import imaplib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dovecot_fixture import Dovecot, fill_account
from harness import MailServer, wait_for

SRC = "u@example.test"
SRC_PW = "pw-u"
DST = "alice@example.test"
BIG = 2 * 1024 * 1024


# -- fixtures -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dovecot():
    dc = Dovecot()
    dc.add_user(SRC, SRC_PW)
    dc.start()
    dc.made = fill_account("127.0.0.1", dc.imaps_port, dc.client_tls(), SRC, SRC_PW, BIG)
    yield dc
    dc.cleanup()


def _server(tmp_path: Path, *users: tuple[str, str]) -> MailServer:
    """A configured (not started) mailstack with the destination account.  Accounts are
    written in-process (what `mailstack user add` does) to spare two interpreter starts."""
    import asyncio

    from mailstack.directory import Directory
    from mailstack.events import EventBus
    from mailstack.store.maildir import MaildirStore
    srv = MailServer(tmp_path, overrides={"imap": {"idle_refresh": 300.0}})
    srv.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    d = Directory(srv.data_dir)
    d.add_domain("example.test")
    for address, password in ((DST, "secret"), *users):
        d.add_user(address, password)
    d.save()
    store = MaildirStore(srv.data_dir / "mail", EventBus())
    for address, _ in ((DST, "secret"), *users):
        asyncio.run(store.ensure_account(address))
    return srv


class _Result:
    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def _cli(srv: MailServer, *args: str, input: str = "", check: bool = True, timeout: float = 0) -> _Result:
    """`mailstack ARGS --config …` run in this process (an interpreter start costs more than
    most of these imports); the tests that need a real process (kill -9) use Popen."""
    import contextlib
    import io

    from mailstack import cli
    out, err = io.StringIO(), io.StringIO()
    saved = sys.stdin
    sys.stdin = io.StringIO(input)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main([*args, "--config", str(srv.config_path)])
    finally:
        sys.stdin = saved
    result = _Result(code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"mailstack {' '.join(args)} failed ({code}):\n{result.stdout}\n{result.stderr}")
    return result


def _import_imap(srv: MailServer, dc: Dovecot, *extra: str, login=SRC, password=SRC_PW, check=True):
    return _cli(srv, "import", "imap", DST, "--from", f"imaps://127.0.0.1:{dc.imaps_port}", "--login", login,
                   "--password-stdin", "--ca-file", str(dc.dir / "cert.pem"), *extra,
                   input=password + "\n", check=check, timeout=120)


def _snapshot(data_dir: Path, account: str) -> dict:
    """{mailbox: sorted [(bytes, flags, internaldate)]} read through mailstack's store."""
    import asyncio

    from mailstack.events import EventBus
    from mailstack.store.maildir import MaildirStore

    async def run():
        store = MaildirStore(data_dir / "mail", EventBus())
        out = {}
        for box in await store.list_mailboxes(account):
            mb = await store.open(account, box.name, read_only=True)
            msgs = []
            for m in mb.messages:
                msgs.append((await mb.read(m.uid), frozenset(m.flags), int(m.internaldate), m.uid))
            out[box.name] = msgs
            out[box.name + "#"] = (mb.uidvalidity, mb.uidnext)
            await mb.close()
        out["#subs"] = set(await store.subscriptions(account))
        return out
    return asyncio.run(run())


def _dovecot_view(host, port, ctx, user, password) -> dict:
    """{folder (decoded): (uidvalidity, uidnext, {uid: (flags, bytes)})} as Dovecot serves it."""
    from mailstack.imap.mutf7 import decode
    c = imaplib.IMAP4_SSL(host, port, ssl_context=ctx)
    c.login(user, password)
    out = {}
    _, lines = c.list()
    for line in lines:
        m = re.match(rb'\(([^)]*)\) "(.)" (.*)$', line)
        if b"\\Noselect" in m.group(1):
            continue
        raw = m.group(3).strip(b'"').decode()
        typ, data = c.select('"' + raw + '"', readonly=True)
        uv = int(c.untagged_responses.get("UIDVALIDITY", [b"0"])[0])
        nx = int(c.untagged_responses.get("UIDNEXT", [b"0"])[0])
        msgs = {}
        typ, data = c.uid("FETCH", "1:*", "(UID FLAGS BODY.PEEK[])")
        for item in data:
            if isinstance(item, tuple):
                uid = int(re.search(rb"UID (\d+)", item[0]).group(1))
                flags = set(re.search(rb"FLAGS \(([^)]*)\)", item[0]).group(1).decode().split()) - {"\\Recent"}
                msgs[uid] = (flags, item[1])
        out[decode(raw).replace(m.group(2).decode(), "/")] = (uv, nx, msgs)
    c.logout()
    return out


# -- import over IMAP ---------------------------------------------------------------------------

def test_import_imap_from_dovecot_copies_everything_once(tmp_path, dovecot):
    srv = _server(tmp_path)
    r = _import_imap(srv, dovecot)
    assert "imported: 7 messages" in r.stderr, r.stderr
    snap = _snapshot(srv.data_dir, DST)
    for folder, msgs in dovecot.made.items():
        local = {"Sent": "Sent"}.get(folder, folder)
        got = sorted((b, set(f), d) for b, f, d, _ in snap[local])
        want = sorted((b, f, d) for b, f, d in msgs)
        assert got == want, folder  # byte for byte, flags and keywords, INTERNALDATE
    assert any(len(b) > BIG for b, *_ in snap["INBOX"])
    assert {"Archive/2023/Q1", "Entwürfe/Größe ☃", "Sent"} <= snap["#subs"]
    # run twice: nothing copied twice
    r = _import_imap(srv, dovecot)
    assert "imported: 0 messages" in r.stderr and "7 already there" in r.stderr, r.stderr
    again = _snapshot(srv.data_dir, DST)
    assert {k: len(v) for k, v in again.items() if not k.endswith("#") and k != "#subs"} == \
        {k: len(v) for k, v in snap.items() if not k.endswith("#") and k != "#subs"}
    # a lost journal: Message-ID + size still recognise every message
    shutil.rmtree(srv.data_dir / "migrate")
    r = _import_imap(srv, dovecot, "--folders", "INBOX")
    assert "imported: 0 messages" in r.stderr and "4 already there" in r.stderr, r.stderr


def test_import_imap_options_and_errors(tmp_path, dovecot):
    srv = _server(tmp_path)
    # a \All folder (Gmail's All Mail) is a view of the others: skipped unless named
    c = imaplib.IMAP4_SSL("127.0.0.1", dovecot.imaps_port, ssl_context=dovecot.client_tls())
    c.login(SRC, SRC_PW)
    c.create('"All Mail"')
    c.append('"All Mail"', "()", None, b"Subject: all\r\nMessage-ID: <all@x>\r\n\r\nall\r\n")
    c.logout()
    r = _import_imap(srv, dovecot, "--exclude", "INBOX", "Sent", "Entw*")
    assert "skipping All Mail: a virtual view" in r.stderr and "imported: 1 messages" in r.stderr, r.stderr
    assert set(_snapshot(srv.data_dir, DST)) >= {"Archive/2023/Q1"} and \
        not _snapshot(srv.data_dir, DST)["INBOX"]
    r = _import_imap(srv, dovecot, "--folders", "All Mail")
    assert "imported: 1 messages" in r.stderr, r.stderr
    assert len(_snapshot(srv.data_dir, DST)["All Mail"]) == 1
    r = _import_imap(srv, dovecot, password="wrong", check=False)
    assert r.returncode == 1 and "login as u@example.test refused" in r.stderr and "Traceback" not in r.stderr
    r = _cli(srv, "import", "imap", DST, "--from", "imap://192.0.2.1", "--login", "x", "--password-stdin",
                input="x\n", check=False)
    assert r.returncode == 1 and "no TLS to a remote host" in r.stderr
    from harness import free_port
    r = _cli(srv, "import", "imap", DST, "--from", f"imaps://127.0.0.1:{free_port()}", "--login", "x",
                "--password-stdin", input="x\n", check=False)
    assert r.returncode == 1 and "cannot connect to 127.0.0.1" in r.stderr and "Traceback" not in r.stderr
    r = _cli(srv, "import", "imap", DST, "--from", f"imaps://127.0.0.1:{dovecot.imaps_port}", "--login", "x",
                "--password-stdin", input="x\n", check=False)  # no --ca-file: self-signed refused
    assert r.returncode == 1 and "certificate not trusted" in r.stderr, r.stderr
    r = _cli(srv, "import", "imap", "nobody@example.test", "--from", "imaps://127.0.0.1", "--login", "x",
                "--password-stdin", input="x\n", check=False)
    assert r.returncode == 1 and "no such account" in r.stderr


def test_import_with_an_oauth2_token(tmp_path, dovecot):
    """SASL XOAUTH2 (what Gmail and Outlook want); Dovecot checks the token against its passdb."""
    dovecot.add_user("oauth@example.test", "ya29.token-xyz")
    c = imaplib.IMAP4_SSL("127.0.0.1", dovecot.imaps_port, ssl_context=dovecot.client_tls())
    c.login("oauth@example.test", "ya29.token-xyz")
    c.append("INBOX", "(\\Seen)", None, b"Subject: o\r\nMessage-ID: <o@x>\r\n\r\noauth\r\n")
    c.logout()
    srv = _server(tmp_path)
    r = _cli(srv, "import", "imap", DST, "--from", f"imaps://127.0.0.1:{dovecot.imaps_port}", "--login",
                "oauth@example.test", "--oauth2-token-stdin", "--ca-file", str(dovecot.dir / "cert.pem"),
                input="ya29.token-xyz\n", timeout=60)
    assert "imported: 1 messages" in r.stderr, r.stderr
    assert "user=<oauth@example.test>, method=XOAUTH2" in dovecot.log()


def test_import_backs_off_when_the_remote_limits_connections(tmp_path):
    """A Dovecot that allows one connection per user and address: while the test holds it, the
    importer is refused (NO [LIMIT]), backs off, and completes once the connection is released."""
    user, pw = "limited@example.test", "pw-l"
    dovecot = Dovecot(extra="protocol imap {\n  mail_max_userip_connections = 1\n}\n")
    dovecot.add_user(user, pw)
    dovecot.start()
    c = imaplib.IMAP4_SSL("127.0.0.1", dovecot.imaps_port, ssl_context=dovecot.client_tls())
    c.login(user, pw)
    c.append("INBOX", "(\\Seen)", None, b"Subject: limited\r\nMessage-ID: <l@x>\r\n\r\nhi\r\n")
    srv = _server(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "mailstack", "import", "imap", DST, "--from",
                             f"imaps://127.0.0.1:{dovecot.imaps_port}", "--login", user, "--password-stdin",
                             "--ca-file", str(dovecot.dir / "cert.pem"), "--config", str(srv.config_path)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdin.write(pw.encode() + b"\n")
    proc.stdin.close()
    try:
        wait_for(lambda: "Maximum number of connections" in dovecot.log() or proc.poll() is not None,
                 30, what="the remote to refuse the second connection")
        time.sleep(0.3)  # let the importer see the refusal (it then backs off for >= 1 s)
        c.logout()
        proc.wait(timeout=90)
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        dovecot.cleanup()
    err = err.decode()
    assert proc.returncode == 0, err
    assert "retrying in" in err, err
    assert "imported: 1 messages" in err, err


def _count_files(srv: MailServer, account: str) -> int:
    d = srv.maildir(account) / "cur"
    return len(os.listdir(d)) if d.is_dir() else 0


def test_reconnect_after_bye_and_resume_after_kill_9(tmp_path, dovecot):
    user, pw = "many@example.test", "pw-m"
    dovecot.add_user(user, pw)
    c = imaplib.IMAP4_SSL("127.0.0.1", dovecot.imaps_port, ssl_context=dovecot.client_tls())
    c.login(user, pw)
    n = 250
    for i in range(n):
        c.append("INBOX", "(\\Seen)" if i % 2 else "()", None,
                 f"Subject: m{i}\r\nMessage-ID: <k{i}@x>\r\n\r\n{'x' * 2000}\r\n".encode())
    c.logout()
    srv = _server(tmp_path)
    cmd = [sys.executable, "-m", "mailstack", "import", "imap", DST, "--from",
           f"imaps://127.0.0.1:{dovecot.imaps_port}", "--login", user, "--password-stdin",
           "--ca-file", str(dovecot.dir / "cert.pem"), "--config", str(srv.config_path)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc.stdin.write(pw.encode() + b"\n")
    proc.stdin.close()
    wait_for(lambda: _count_files(srv, DST) >= 40 or proc.poll() is not None, 60, what="import under way")
    # the remote drops the session (BYE): the importer reconnects, re-selects and goes on
    kick = subprocess.run(["doveadm", "-c", str(dovecot.conf), "kick", user], capture_output=True, text=True,
                          timeout=30)
    assert kick.returncode == 0 and user in kick.stdout, kick.stdout + kick.stderr
    after_kick = _count_files(srv, DST)
    wait_for(lambda: _count_files(srv, DST) >= after_kick + 40 or proc.poll() is not None, 60,
             what="import going on after the kick")
    assert proc.poll() is None, "the importer stopped after the remote's BYE"
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    partial = _count_files(srv, DST)
    assert 0 < partial < n, partial
    r = subprocess.run(cmd, input=pw + "\n", capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    snap = _snapshot(srv.data_dir, DST)
    ids = [re.search(rb"Message-ID: <(k\d+)@x>", b).group(1) for b, *_ in snap["INBOX"]]
    assert len(ids) == n and len(set(ids)) == n  # all there, none twice
    assert f"{partial}" and "already there" in r.stderr


# -- mailstack as the source, while the destination server runs ------------------------------

def test_import_from_mailstack_while_running_wakes_idle(tmp_path):
    srv = _server(tmp_path, ("old@example.test", "oldpw"))
    srv.start()
    try:
        ctx = srv.client_tls()
        c = imaplib.IMAP4_SSL("127.0.0.1", srv.ports["imaps"], ssl_context=ctx)
        c.login("old@example.test", "oldpw")
        c.create("Projects/2024")
        for i in range(3):
            c.append("INBOX", "(\\Flagged)" if i == 0 else "()", imaplib.Time2Internaldate(1600000000 + i),
                     f"Subject: s{i}\r\nMessage-ID: <s{i}@x>\r\n\r\nbody {i}\r\n".encode())
        c.append("Projects/2024", "(\\Seen Urgent)", None, b"Subject: p\r\n\r\nproject\r\n")
        c.logout()
        # an IDLE client of the destination account, on INBOX
        idle = ctx.wrap_socket(socket.create_connection(("127.0.0.1", srv.ports["imaps"]), timeout=20))
        f = idle.makefile("rb")
        f.readline()
        idle.sendall(b"a LOGIN alice@example.test secret\r\n")
        while not (line := f.readline()).startswith(b"a "):
            pass
        assert line.startswith(b"a OK"), line
        idle.sendall(b"b SELECT INBOX\r\nc IDLE\r\n")
        while not f.readline().startswith(b"+"):
            pass
        t0 = time.monotonic()
        r = _cli(srv, "import", "imap", DST, "--from", f"imaps://127.0.0.1:{srv.ports['imaps']}", "--login",
                    "old@example.test", "--password-stdin", "--ca-file", str(srv.cert_path),
                    input="oldpw\n", timeout=120)
        assert "the server is running" in r.stderr and "imported: 4 messages" in r.stderr, r.stderr
        line = f.readline()
        assert re.match(rb"\* \d+ EXISTS", line), line
        assert time.monotonic() - t0 < 60  # well before idle_refresh (300 s)
        idle.sendall(b"DONE\r\nz LOGOUT\r\n")
        idle.close()
        snap = _snapshot(srv.data_dir, DST)
        assert sorted(b for b, *_ in snap["INBOX"])[0].startswith(b"Subject: s0")
        assert [set(fl) for b, fl, d, u in snap["INBOX"] if b.startswith(b"Subject: s0")] == [{"\\Flagged"}]
        assert [int(d) for b, fl, d, u in sorted(snap["INBOX"])] == [1600000000, 1600000001, 1600000002]
        assert [set(fl) for b, *_ in snap["Projects/2024"] for fl in [_[0]]] == [{"\\Seen", "Urgent"}]
    finally:
        srv.stop()


# -- a Dovecot Maildir tree on disk ------------------------------------------------------------

@pytest.fixture(scope="module")
def dovecot_tree():
    """A tree made by a real Dovecot (APPENDs, flag changes, an expunge), then Dovecot stopped;
    with what Dovecot served over IMAP and POP3 just before."""
    dc = Dovecot()
    dc.add_user(SRC, SRC_PW)
    dc.start()
    try:
        made = fill_account("127.0.0.1", dc.imaps_port, dc.client_tls(), SRC, SRC_PW, 100_000)
        c = imaplib.IMAP4_SSL("127.0.0.1", dc.imaps_port, ssl_context=dc.client_tls())
        c.login(SRC, SRC_PW)
        c.create("Deleted Messages")
        c.select("INBOX")
        c.append("INBOX", "()", None, b"Subject: gone\r\n\r\nbye\r\n")
        c.uid("STORE", "5", "+FLAGS", "(\\Deleted)")
        c.expunge()  # a gap in the UIDs: 1..4, 6
        c.append("INBOX", "(\\Answered)", None, b"Subject: after\nMessage-ID: <after@x>\n\nLF only\n")
        c.uid("STORE", "3", "+FLAGS", "(Later)")
        c.logout()
        view = _dovecot_view("127.0.0.1", dc.imaps_port, dc.client_tls(), SRC, SRC_PW)
    finally:
        dc.stop()
    # what Dovecot's own POP3 says the UIDLs are (run standalone on the stopped tree)
    pop = subprocess.run(["setpriv", f"--reuid={dc.uid}", f"--regid={dc.gid}", "--clear-groups",
                          "/usr/lib/dovecot/pop3", "-o", f"mail_location=maildir:{dc.maildir(SRC)}",
                          "-o", "first_valid_uid=1"],
                         input=b"UIDL\r\nQUIT\r\n", capture_output=True, timeout=30,
                         env={"USER": SRC, "HOME": str(dc.dir / "home" / SRC), "PATH": os.environ["PATH"]})
    uidls = re.findall(rb"^(\d+) (\S+)\r$", pop.stdout, re.M)
    assert uidls, pop.stdout + pop.stderr
    dc.view, dc.made, dc.uidls = view, made, [u.decode() for _, u in uidls]
    yield dc
    dc.cleanup()


def test_import_dovecot_maildir_keeps_uids_flags_keywords_and_pop3_uidls(tmp_path, dovecot_tree):
    srv = _server(tmp_path)
    r = _cli(srv, "import", "maildir", DST, str(dovecot_tree.maildir(SRC)), timeout=120)
    assert "imported:" in r.stderr and " 0 failed" in r.stderr, r.stderr
    srv.start()
    try:
        got = _dovecot_view("127.0.0.1", srv.ports["imaps"], srv.client_tls(), DST, "secret")
        for folder, (uv, nx, msgs) in dovecot_tree.view.items():
            local = {"Deleted Messages": "Trash"}.get(folder, folder)
            g_uv, g_nx, g_msgs = got[local]
            assert (g_uv, g_nx) == (uv, nx), folder
            assert g_msgs == msgs, folder  # same UIDs, same flags and keywords, same bytes
        # POP3 UIDLs as Dovecot gave them
        p = socket.create_connection(("127.0.0.1", srv.ports["pop3"]), timeout=20)
        pf = p.makefile("rb")
        pf.readline()
        p.sendall(b"STLS\r\n")
        pf.readline()
        tls = srv.client_tls().wrap_socket(p)
        tf = tls.makefile("rb")
        tls.sendall(b"USER alice@example.test\r\nPASS secret\r\nUIDL\r\n")
        tf.readline(), tf.readline()
        assert tf.readline().startswith(b"+OK")
        ours = []
        while (line := tf.readline()) != b".\r\n":
            ours.append(line.split()[1].decode())
        assert ours == dovecot_tree.uidls
        tls.sendall(b"QUIT\r\n")
        tls.close()
    finally:
        srv.stop()
    # rerun: nothing copied twice
    r = _cli(srv, "import", "maildir", DST, str(dovecot_tree.maildir(SRC)), timeout=120)
    assert "imported: 0 messages" in r.stderr, r.stderr


def test_import_maildir_into_a_folder_with_mail_appends(tmp_path, dovecot_tree):
    srv = _server(tmp_path)
    import asyncio

    from mailstack.events import EventBus
    from mailstack.store.maildir import MaildirStore
    asyncio.run(MaildirStore(srv.data_dir / "mail", EventBus()).append(DST, "Sent", b"Subject: mine\r\n\r\nx\r\n"))
    r = _cli(srv, "import", "maildir", DST, str(dovecot_tree.maildir(SRC)), timeout=120)
    assert "Sent: holds other mail already" in r.stderr, r.stderr
    snap = _snapshot(srv.data_dir, DST)
    assert len(snap["Sent"]) == 2
    r = _cli(srv, "import", "maildir", DST, str(dovecot_tree.maildir(SRC)), timeout=120)
    assert "imported: 0 messages" in r.stderr, r.stderr
    assert len(_snapshot(srv.data_dir, DST)["Sent"]) == 2


# -- export ------------------------------------------------------------------------------------

def _mutt_status(path: Path, *extra: str) -> str:
    """mutt's index status line for a mailbox (mutt needs a terminal: run it under script)."""
    cmd = (f"mutt -n -F /dev/null -R -e 'set folder=\"{path.parent}\" spoolfile=\"{path}\" "
           "status_format=\"STATUS %M/%m unread=%u flag=%F\"' " + " ".join(extra) + f" -f '{path}' -e 'push <quit>'")
    r = subprocess.run(["script", "-qec", cmd, "/dev/null"], capture_output=True, timeout=30,
                       stdin=subprocess.DEVNULL,
                       env={**os.environ, "TERM": "vt100", "COLUMNS": "200", "LINES": "40", "HOME": str(path.parent)})
    text = re.sub(rb"\x1b\[[0-9;?]*[A-Za-z]", b" ", r.stdout).decode("utf-8", "replace")
    m = re.search(r"STATUS \d+/\d+ unread=\d+ flag=\d+", text)
    assert m, text[-2000:]
    return m.group(0)


def test_export_maildir_and_mbox_read_by_dovecot_and_mutt(tmp_path, dovecot_tree):
    srv = _server(tmp_path)
    _cli(srv, "import", "maildir", DST, str(dovecot_tree.maildir(SRC)), timeout=120)
    exp_user = "exp@example.test"
    dovecot_tree.add_user(exp_user, "pw-e")
    out = dovecot_tree.maildir(exp_user)
    r = _cli(srv, "export", DST, str(out), timeout=120)
    assert "exported:" in r.stderr, r.stderr
    subprocess.run(["chown", "-R", f"{dovecot_tree.uid}:{dovecot_tree.gid}", str(out)], check=True)
    # Dovecot serves the tree: same folders, UIDVALIDITY, UIDNEXT, UIDs, flags, keywords and bytes
    # as the source Dovecot served (modulo CRLF: Dovecot stores LF, mailstack keeps what IMAP gave)
    dovecot_tree.start()
    try:
        view = _dovecot_view("127.0.0.1", dovecot_tree.imaps_port, dovecot_tree.client_tls(), exp_user, "pw-e")
    finally:
        dovecot_tree.stop()
    for folder, (uv, nx, msgs) in dovecot_tree.view.items():
        local = {"Deleted Messages": "Trash"}.get(folder, folder)
        assert view[local] == (uv, nx, msgs), local
    # mutt reads the Maildir INBOX: 5 messages, 3 unread, 1 flagged
    assert _mutt_status(out) == "STATUS 5/5 unread=3 flag=1"
    # mbox
    mbox_out = tmp_path / "mbox"
    r = _cli(srv, "export", DST, str(mbox_out), "--mbox", timeout=120)
    assert "exported:" in r.stderr, r.stderr
    assert _mutt_status(mbox_out / "INBOX") == "STATUS 5/5 unread=3 flag=1"
    assert (mbox_out / "Archive" / "2023" / "Q1").is_file()
    text = (mbox_out / "INBOX").read_bytes()
    assert text.count(b"\nFrom MAILER-DAEMON ") + text.startswith(b"From MAILER-DAEMON ") == 5
    # refuse to write over something
    r = _cli(srv, "export", DST, str(mbox_out), check=False)
    assert r.returncode == 1 and "not an empty directory" in r.stderr


def test_import_maildir_into_a_running_server(tmp_path, dovecot_tree):
    """The server runs and a client has Sent selected: the import takes the empty folders over
    (Dovecot's UIDVALIDITY), the selected client is told to select again, a new one sees
    Dovecot's UIDs."""
    srv = _server(tmp_path)
    srv.start()
    try:
        c = imaplib.IMAP4_SSL("127.0.0.1", srv.ports["imaps"], ssl_context=srv.client_tls())
        c.login(DST, "secret")
        c.select("Sent")
        r = _cli(srv, "import", "maildir", DST, str(dovecot_tree.maildir(SRC)))
        assert "the server is running" in r.stderr and " 0 failed" in r.stderr, r.stderr
        with pytest.raises(imaplib.IMAP4.abort, match="UIDVALIDITY changed"):
            c.noop()  # the server says BYE: the client must resynchronise from scratch
        got = _dovecot_view("127.0.0.1", srv.ports["imaps"], srv.client_tls(), DST, "secret")
        for folder, want in dovecot_tree.view.items():
            assert got[{"Deleted Messages": "Trash"}.get(folder, folder)] == want, folder
    finally:
        srv.stop()


def test_import_from_a_server_whose_separator_is_a_dot(tmp_path):
    """Dovecot's default namespace separator for Maildir is "."; names map to "/" levels."""
    from mailstack.imap.mutf7 import encode
    dc = Dovecot(separator=".")
    dc.add_user(SRC, SRC_PW)
    dc.start()
    try:
        c = imaplib.IMAP4_SSL("127.0.0.1", dc.imaps_port, ssl_context=dc.client_tls())
        c.login(SRC, SRC_PW)
        for name in ("Archive.2023", "Entwürfe.Größe", "Sent"):
            c.create('"' + encode(name) + '"')
            c.append('"' + encode(name) + '"', "(\\Seen)", None, f"Subject: {name}\r\n\r\nx\r\n".encode())
        c.logout()
        srv = _server(tmp_path)
        r = _import_imap(srv, dc)
        assert "imported: 3 messages" in r.stderr, r.stderr
        snap = _snapshot(srv.data_dir, DST)
        assert [b for b, *_ in snap["Archive/2023"]] == [b"Subject: Archive.2023\r\n\r\nx\r\n"]
        assert len(snap["Entwürfe/Größe"]) == 1 and len(snap["Sent"]) == 1
    finally:
        dc.cleanup()
