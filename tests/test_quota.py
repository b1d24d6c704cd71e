"""Quota end to end (RFC 9208; Maildir++ maildirsize): the real server process, limits set
with `mailstack user quota`, mail sent with smtplib, read and filed with imapclient and raw
IMAP commands, the queue seen with `mailstack queue list --json`."""
from __future__ import annotations

import json
import os
import smtplib
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from imapclient import IMAPClient
from imapclient.imapclient import Quota

from harness import MailServer, wait_for
from mailstack.directory import Directory
from mailstack.quotas import parse_quota_args
from mailstack.sieve.scripts import ScriptStore

PW = "quota-test-pw"
USERS = ("full", "tight", "roomy", "imap", "warned", "behind", "sender", "cli", "fwd", "multi", "folders")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = MailServer(tmp_path_factory.mktemp("quota"), loop="uvloop",
                     overrides={"quota": {"default_storage": "0", "warn_percent": 80}})
    directory = Directory(srv.data_dir)  # in-process: one CLI start per account would cost ~2 s each
    directory.add_domain("example.test")
    for user in USERS:
        directory.add_user(f"{user}@example.test", PW)
    directory.add_alias("group@example.test", ["full@example.test", "roomy@example.test"])
    directory.save()
    srv.start()
    yield srv
    assert srv.stop() == 0


def message(subject: str, size: int = 0) -> bytes:
    head = f"From: <sender@example.test>\r\nTo: <x@example.test>\r\nSubject: {subject}\r\n\r\n".encode()
    room = max(size - len(head), 2)
    body = b"".join(b"%074d\r\n" % i for i in range(room // 76))
    rest = room - len(body)
    body += b"x" * (rest - 2) + b"\r\n" if rest >= 2 else b""
    return head + body if size else head + b"x\r\n"


def smtp(srv) -> smtplib.SMTP:
    s = smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=20)
    s.ehlo("client.example.test")
    return s


def without_size(s: smtplib.SMTP, rcpts: list[str], msg: bytes) -> tuple[int, bytes]:
    """MAIL without SIZE= (smtplib's sendmail adds it), RCPTs that must pass, DATA's reply."""
    assert s.mail("sender@example.test")[0] == 250
    for rcpt in rcpts:
        assert s.rcpt(rcpt)[0] == 250
    return s.data(msg)


def imap(srv, user: str) -> IMAPClient:
    c = IMAPClient("127.0.0.1", port=srv.ports["imaps"], ssl=True, ssl_context=srv.client_tls(), timeout=20)
    c.login(f"{user}@example.test", PW)
    return c


def maildirsize(srv, user: str) -> bytes:
    return (srv.maildir(f"{user}@example.test") / "maildirsize").read_bytes()


def usage_of(srv, user: str) -> tuple[int, int]:
    """(bytes, messages) summed from maildirsize, as any Maildir++ reader does ((0, 0)
    before its first line: a delivery's line is written just after its reply)."""
    if not (srv.maildir(f"{user}@example.test") / "maildirsize").exists():
        return 0, 0
    lines = maildirsize(srv, user).decode().splitlines()[1:]
    return sum(int(x.split()[0]) for x in lines), sum(int(x.split()[1]) for x in lines)


def fill(srv, user: str, n: int, size: int) -> None:
    with imap(srv, user) as c:
        for i in range(n):
            c.append("INBOX", message(f"fill {i}", size))


# ------------------------------------------------------------------------------------ CLI

def test_cli_sets_shows_and_removes_a_quota(server):
    out = server.cli("user", "quota", "cli@example.test", "2M", "--messages", "100").stdout
    assert "quota of cli@example.test set: 0B of 2M (0%), 0 of 100 messages (0%)" in out
    assert "cli@example.test: storage=2M messages=100" in (server.data_dir / "quotas").read_text()
    listed = server.cli("user", "list").stdout.splitlines()
    row = next(line for line in listed if line.startswith("cli@example.test"))
    assert "of 2M" in row and "of 100 messages" in row and "[default]" not in row
    assert "[default]" in next(line for line in listed if line.startswith("roomy@example.test"))
    shown = server.cli("user", "quota", "cli@example.test").stdout
    assert shown.startswith("cli@example.test: 0B of 2M") and "own limits" in shown
    out = server.cli("user", "quota", "cli@example.test", "none").stdout
    assert "removed" in out and "(no limit)" in out
    assert "cli@example.test" not in (server.data_dir / "quotas").read_text()
    for args, error in ((("cli@example.test", "12X"), "is not a size"),
                        (("nobody@example.test", "1M"), "no account nobody@example.test")):
        r = server.cli("user", "quota", *args, check=False)
        assert r.returncode != 0 and r.stdout == ""
        assert r.stderr.count("\n") == 1 and error in r.stderr and "Traceback" not in r.stderr
    for size, messages, error in (("1M", "many", "--messages 'many'"), ("none", "3", "removes both limits")):
        with pytest.raises(ValueError, match=error):  # the same one-line errors, without a CLI start each
            parse_quota_args(size, messages)
    assert parse_quota_args("2G", "0") == (2 << 30, 0) and parse_quota_args("none", None) == (None, None)


# ------------------------------------------------------------------------------------ SMTP

def test_smtp_rcpt_over_quota_is_452_and_too_big_is_552(server):
    server.cli("user", "quota", "full@example.test", "4K")
    fill(server, "full", 1, 4096)
    with smtp(server) as s:
        s.mail("sender@example.test")
        code, text = s.rcpt("full@example.test")
        assert (code, text[:5]) == (452, b"4.2.2") and b"Mailbox full" in text
        assert s.rcpt("roomy@example.test")[0] == 250
        s.rset()
        # SIZE= larger than the whole limit: it can never fit
        s.mail("sender@example.test", ["SIZE=5000"])
        code, text = s.rcpt("full@example.test")
        assert (code, text[:5]) == (552, b"5.2.2")
    server.cli("user", "quota", "tight@example.test", "8K")
    with smtp(server) as s:
        s.mail("sender@example.test", ["SIZE=9000"])
        code, text = s.rcpt("tight@example.test")
        assert (code, text[:5]) == (552, b"5.2.2")
        s.rset()
        s.mail("sender@example.test", ["SIZE=3000"])  # fits: accepted
        assert s.rcpt("tight@example.test")[0] == 250
        s.rset()
        # No SIZE=: the size is known at the end of DATA
        code, text = without_size(s, ["tight@example.test"], message("huge", 9000))
        assert (code, text[:5]) == (552, b"5.2.2")
        assert without_size(s, ["tight@example.test"], message("fits", 3000))[0] == 250
    wait_for(lambda: usage_of(server, "tight")[1] == 1, 20, what="the message that fits")
    # 3000 + 6000 > 8K: full for it now (not forever) at the end of DATA
    with smtp(server) as s:
        code, text = without_size(s, ["tight@example.test"], message("too much now", 6000))
        assert (code, text[:5]) == (452, b"4.2.2")
        # With a recipient that has room: 250, the other's copy bounces (it can never fit)
        code, _ = without_size(s, ["tight@example.test", "roomy@example.test"], message("one fits", 9000))
        assert code == 250
    bounce = wait_for(lambda: [m for m in server.inbox_messages("sender@example.test") if b"5.2.2" in m], 30,
                      what="the bounce for the recipient it can never fit")
    assert b"tight@example.test" in bounce[0]


def test_multi_recipient_data_is_250_and_the_queue_defers_the_full_one(server):
    server.cli("user", "quota", "full@example.test", "4K")
    if not (server.maildir("full@example.test") / "maildirsize").exists() or usage_of(server, "full")[0] < 4096:
        fill(server, "full", 1, 4096)  # when this test runs alone
    before_roomy = len(server.inbox_messages("roomy@example.test"))
    with smtp(server) as s:  # the alias expands to full@ (over quota) and roomy@
        refused = s.sendmail("sender@example.test", ["group@example.test"], message("to the group", 1000))
    assert refused == {}
    wait_for(lambda: len(server.inbox_messages("roomy@example.test")) == before_roomy + 1, 20,
             what="delivery to the account with room")

    def deferred():
        listed = json.loads(server.cli("queue", "list", "--json").stdout)
        return [m for m in listed if "4.2.2" in json.dumps(m["recipients"])]
    queued = wait_for(deferred, 20, what="the message deferred for the full account")
    assert "full@example.test" in json.dumps(queued)
    # Room again (the limit goes): the next try delivers it
    n = len(server.inbox_messages("full@example.test"))
    server.cli("user", "quota", "full@example.test", "1M")
    server.cli("queue", "flush")
    wait_for(lambda: len(server.inbox_messages("full@example.test")) == n + 1, 30, what="the deferred delivery")
    wait_for(lambda: not deferred(), 20, what="the queue to empty")


def test_sieve_redirect_of_a_full_account_is_not_held_back(server):
    """Nothing is stored for a Sieve redirect: a full account's forward still goes out."""
    server.cli("user", "quota", "fwd@example.test", "2K")
    fill(server, "fwd", 1, 2048)
    scripts = ScriptStore(server.data_dir)  # as `mailstack sieve put/activate` does, without two CLI starts
    scripts.put("fwd@example.test", "away", 'redirect "roomy@example.test";\n')
    scripts.set_active("fwd@example.test", "away")
    wait_for(lambda: usage_of(server, "fwd")[1] == 2, 10, what="the warning mail (100% now)")
    before = usage_of(server, "fwd")
    n = len(server.inbox_messages("roomy@example.test"))
    # Through the queue (sendmail), as SMTP would refuse the full account at RCPT
    server.cli("sendmail", "-f", "sender@example.test", "fwd@example.test",
               input=message("forward me").decode())
    wait_for(lambda: len(server.inbox_messages("roomy@example.test")) == n + 1, 20, what="the redirect")
    assert usage_of(server, "fwd") == before
    assert json.loads(server.cli("queue", "list", "--json").stdout) == []


# ------------------------------------------------------------------------------------ IMAP

def test_imap_capabilities_getquotaroot_getquota_and_setquota(server):
    server.cli("user", "quota", "imap@example.test", "100K", "--messages", "5")
    with imap(server, "imap") as c:
        caps = c.capabilities()
        assert {b"QUOTA", b"QUOTA=RES-STORAGE", b"QUOTA=RES-MESSAGE"} <= set(caps)
        c.append("INBOX", message("one", 2000))
        roots, quotas = c.get_quota_root("INBOX")
        assert roots.mailbox == "INBOX" and roots.quota_roots == [""]
        got = {q.resource: (q.usage, q.limit) for q in quotas}
        size = usage_of(server, "imap")[0]
        assert got == {"STORAGE": (-(-size // 1024), 100), "MESSAGE": (1, 5)}
        assert [(q.resource, q.usage) for q in c.get_quota("Sent")] == [("STORAGE", -(-size // 1024)),
                                                                          ("MESSAGE", 1)]
        typ, data = c._imap._simple_command("GETQUOTA", '""'), c._imap.untagged_responses.pop("QUOTA", None)
        assert typ[0] == "OK" and data == [b'"" (STORAGE 2 100 MESSAGE 1 5)']
        typ, _ = c._imap._simple_command("GETQUOTA", '"other"')
        assert typ == "NO"
        with pytest.raises(IMAPClient.Error) as e:
            c.set_quota([Quota("", "STORAGE", 0, 1000000)])
        assert "NOPERM" in str(e.value)
        typ, data = c._imap._simple_command("GETQUOTAROOT", "NoSuchBox")
        assert typ == "NO"
        server.wait_log("IMAP QUOTA used")  # for the real-client matrix
        # STATUS DELETED / DELETED-STORAGE (RFC 9208 3.2, 3.3): what an EXPUNGE would free
        c.select_folder("INBOX")
        c.append("INBOX", message("two", 1500))
        c.add_flags(c.search("ALL"), [b"\\Deleted"])
        assert c.folder_status("INBOX", ["DELETED", "DELETED-STORAGE", "MESSAGES"]) == \
            {b"DELETED": 2, b"DELETED-STORAGE": 4, b"MESSAGES": 2}


def test_imap_append_copy_over_quota_is_overquota_and_move_is_free(server):
    server.cli("user", "quota", "imap@example.test", "100K", "--messages", "5")
    with imap(server, "imap") as c:
        c.select_folder("INBOX")
        for uid in c.search("ALL"):
            c.delete_messages([uid])
        c.expunge()
        for i in range(3):
            c.append("INBOX", message(f"m{i}", 2000))
        c.select_folder("INBOX")
        uids = c.search("ALL")
        assert len(uids) == 3
        with pytest.raises(IMAPClient.Error) as e:  # 3 + 3 > 5 messages
            c.copy(uids, "Archive")
        assert "OVERQUOTA" in str(e.value)
        c.move(uids[:2], "Archive")  # within the account: nothing changes, allowed when nearly full
        assert usage_of(server, "imap")[1] == 3
        c.append("INBOX", message("four", 2000))  # 4 of 5 = 80%: the warning mail makes it 5
        wait_for(lambda: usage_of(server, "imap")[1] == 5, 10, what="the warning mail (exempt from the quota)")
        with pytest.raises(IMAPClient.Error) as e:
            c.append("INBOX", message("five", 2000))
        assert "OVERQUOTA" in str(e.value)
        # Usage goes down with an expunge, and the APPEND fits again
        before = usage_of(server, "imap")
        c.select_folder("Archive")
        c.delete_messages(c.search("ALL")[:1])
        c.expunge()
        after = usage_of(server, "imap")
        assert after[1] == before[1] - 1 and 1900 < before[0] - after[0] < 2200
        assert c.get_quota()[1].usage == after[1]
        c.append("INBOX", message("five again", 2000))


def test_multiappend_fits_whole_or_not_at_all(server):
    """MULTIAPPEND (RFC 3502) is all or nothing, also for the quota: 10 messages into room
    for 9 store none, 3 store all three, and usage counts them (4 of 10: below the warning)."""
    server.cli("user", "quota", "multi@example.test", "1M", "--messages", "10")
    with imap(server, "multi") as c:
        c.append("INBOX", message("one", 1000))
        typ, data = c.multiappend("INBOX", [message(f"m{i}", 1000) for i in range(10)])  # NO is returned
        assert typ == "NO" and b"[OVERQUOTA]" in data[0]
        assert c.select_folder("INBOX")[b"EXISTS"] == 1
        c.multiappend("INBOX", [message(f"n{i}", 1000) for i in range(3)])
        assert c.select_folder("INBOX")[b"EXISTS"] == 4
    assert usage_of(server, "multi")[1] == 4


def test_maildirsize_is_counted_again_after_changes_behind_the_servers_back(server):
    server.cli("user", "quota", "behind@example.test", "1M", "--messages", "50")
    fill(server, "behind", 2, 1500)
    assert usage_of(server, "behind")[1] == 2
    maildir = server.maildir("behind@example.test")
    # Another program moves a message out of INBOX and drops one (without ,S=) into Archive
    victim = next((maildir / "cur").iterdir())
    os.rename(victim, server.dir / "moved-away")
    (maildir / ".Archive" / "cur" / "1700000000.behind.host:2,S").write_bytes(b"Subject: x\r\n\r\n" + b"y" * 985)
    with imap(server, "behind") as c:  # maildirsize is still fresh: the old numbers
        assert [q.usage for q in c.get_quota() if q.resource == "MESSAGE"] == [2]
        old = time.time() - 16 * 60
        os.utime(maildir / "maildirsize", (old, old))  # 15 minutes old: counted again
        got = {q.resource: q.usage for q in c.get_quota()}
    size = sum(len(p.read_bytes()) for d in (maildir / "cur", maildir / "new", maildir / ".Archive" / "cur")
               for p in d.iterdir())
    assert got == {"MESSAGE": 2, "STORAGE": -(-size // 1024)}
    assert maildirsize(server, "behind") == f"1048576S,50C\n{size} 2\n".encode()


def test_deleting_a_folder_takes_its_messages_off_the_usage_once(server):
    """DELETE of a folder removes its messages from the usage (as Dovecot's count would), and
    deliveries and APPENDs after it are counted once on top of the recount."""
    server.cli("user", "quota", "folders@example.test", "1M", "--messages", "50")
    with imap(server, "folders") as c:
        c.create_folder("Old")
        for i in range(3):
            c.append("Old", message(f"old {i}", 1500))
        c.append("INBOX", message("kept", 1500))
        assert {q.resource: q.usage for q in c.get_quota()}["MESSAGE"] == 4
        c.delete_folder("Old")
        assert {q.resource: q.usage for q in c.get_quota()}["MESSAGE"] == 1
        c.append("INBOX", message("after", 1500))
        with smtp(server) as s:
            s.sendmail("sender@example.test", ["folders@example.test"], message("delivered after", 1500))
        wait_for(lambda: usage_of(server, "folders")[1] >= 3, 10, what="the delivery's maildirsize line")
        assert {q.resource: q.usage for q in c.get_quota()}["MESSAGE"] == 3
    maildir = server.maildir("folders@example.test")
    size = sum(len(p.read_bytes()) for d in (maildir / "cur", maildir / "new") for p in d.iterdir())
    assert usage_of(server, "folders") == (size, 3)


def test_warning_mail_once_per_crossing(server):
    server.cli("user", "quota", "warned@example.test", "20K")

    def warnings():
        return [m for m in server.inbox_messages("warned@example.test") if b"Subject: Your mailbox is" in m]
    with smtp(server) as s:
        for i in range(3):  # 3 x ~5K = 75%: below 80%
            s.sendmail("sender@example.test", ["warned@example.test"], message(f"w{i}", 4800))
        wait_for(lambda: usage_of(server, "warned")[1] == 3, 20, what="three deliveries")
        assert warnings() == []
        s.sendmail("sender@example.test", ["warned@example.test"], message("w3", 1500))  # crosses 80%
        found = wait_for(warnings, 20, what="the warning mail")
        s.sendmail("sender@example.test", ["warned@example.test"], message("w4", 500))  # still above: no more
        wait_for(lambda: usage_of(server, "warned")[1] == 6, 20, what="the fifth delivery and the warning")
    time.sleep(0.3)  # a second warning would be written at once after the delivery
    assert len(warnings()) == 1
    w = found[0]
    assert b"From: Postmaster <postmaster@example.test>" in w and b"Auto-Submitted: auto-generated" in w
    assert b"of 20K" in w
    server.wait_log("warned@example.test", "warning delivered")


def test_dovecot_counts_the_same_maildir_the_same(server):
    """Dovecot's own Maildir++ quota (quota = maildir) on a copy of an account: its count and
    its GETQUOTAROOT agree with ours."""
    import shutil
    from dovecot_fixture import Dovecot
    if shutil.which("dovecot") is None:
        pytest.fail("dovecot is not installed (tests/run.sh DEBS has dovecot-imapd)")
    server.cli("user", "quota", "behind@example.test", "1M", "--messages", "50")
    fill(server, "behind", 3, 1234)
    with imap(server, "behind") as c:
        c.select_folder("INBOX")
        c.copy(c.search("ALL")[:2], "Archive")
        c.add_flags(c.search("ALL")[:1], [b"\\Deleted"])  # not expunged: still counted
        ours = {q.resource: (q.usage, q.limit) for q in c.get_quota()}
    dc = Dovecot(extra="mail_plugins = $mail_plugins quota\n"
                       "protocol imap {\n  mail_plugins = $mail_plugins imap_quota\n}\n"
                       "plugin {\n  quota = maildir:User quota\n  quota_rule = *:storage=1M:messages=50\n}\n")
    try:
        dc.add_user("behind@example.test", "pw")
        target = dc.maildir("behind@example.test")
        shutil.copytree(server.maildir("behind@example.test"), target)
        (target / "maildirsize").unlink()  # Dovecot counts for itself
        for root, dirs, files in os.walk(target.parent):
            for name in dirs + files:
                os.chown(os.path.join(root, name), dc.uid, dc.gid)
        dc.start()
        with IMAPClient("127.0.0.1", port=dc.imaps_port, ssl=True, ssl_context=dc.client_tls(), timeout=20) as d:
            d.login("behind@example.test", "pw")
            theirs = {q.resource: (q.usage, q.limit) for q in d.get_quota()}
        assert theirs == ours
        header, *counted = (target / "maildirsize").read_text().splitlines()
        assert header == maildirsize(server, "behind").decode().splitlines()[0] == "1048576S,50C"
        assert counted == ["%d %d" % usage_of(server, "behind")]
    finally:
        dc.cleanup()


# ------------------------------------------------------------------------------------ pure parts

def test_maildirsize_format_and_parse():
    from mailstack.store.quota import Limits, Usage, parse_maildirsize
    assert [Limits(0, 0).header(), Limits(1024, 0).header(), Limits(0, 7).header(), Limits(5, 7).header()] == \
        ["0S", "1024S", "7C", "5S,7C"]  # as Dovecot writes them
    assert parse_maildirsize(b"1000S,10C\n300 2\n-100 -1\n50 1\n") == (Limits(1000, 10), Usage(250, 2), 3)
    for broken in (b"", b"1000S\n", b"1000S\n10 1", b"1000X\n1 1\n", b"1000S\n-5 0\n", b"1000S\n1 1 1\n",
                   b"1000S\n1\x001\n", b"S\n1 1\n"):
        assert parse_maildirsize(broken) is None, broken


def test_sizes():
    from mailstack.store.quota import format_size, parse_size
    assert [parse_size(s) for s in ("0", "1024", "1k", "500M", "2G", "1T", "10 KiB", "3MB")] == \
        [0, 1024, 1024, 500 << 20, 2 << 30, 1 << 40, 10 << 10, 3 << 20]
    assert [format_size(n) for n in (0, 1000, 1024, 1536, 10 << 30)] == ["0B", "1000B", "1K", "1.5K", "10G"]
    for bad in ("", "-1", "1.5G", "12X", "G", "1 G B"):
        with pytest.raises(ValueError):
            parse_size(bad)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_maildirsize_parser_takes_any_bytes(data):
    from mailstack.store.quota import parse_maildirsize
    got = parse_maildirsize(data)
    assert got is None or (got[1].storage >= 0 and got[1].messages >= 0)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([b"GETQUOTA ", b"GETQUOTAROOT ", b"SETQUOTA "]), st.binary(max_size=60))
def test_quota_commands_parse_or_refuse_cleanly(verb, rest):
    from mailstack.imap.parser import ParseError, parse_command
    try:
        cmd = parse_command([b"t1 " + verb + rest])
    except ParseError:
        return
    assert cmd.name == verb.strip().decode()


def test_quota_command_grammar():
    from mailstack.imap.parser import ParseError, parse_command
    assert parse_command([b'a GETQUOTA ""']).args == {"root": ""}
    assert parse_command([b"a GETQUOTAROOT inbox"]).args == {"mailbox": "INBOX"}
    assert parse_command([b'a SETQUOTA "" (STORAGE 512 MESSAGE 10)']).args == \
        {"root": "", "resources": [("STORAGE", 512), ("MESSAGE", 10)]}
    assert parse_command([b'a SETQUOTA "" ()']).args["resources"] == []
    for bad in (b"a GETQUOTA", b'a SETQUOTA "" (STORAGE)', b'a SETQUOTA "" (STORAGE -1)',
                b'a SETQUOTA "" (STORAGE 99999999999999999999)', b"a GETQUOTAROOT"):
        with pytest.raises(ParseError):
            parse_command([bad])


def test_concurrent_deliveries_and_expunges_are_counted_once(tmp_path):
    """Hundreds of deliveries at once (the file passes 5120 bytes, so it wants a recount while
    changes are under way), then an expunge of half: the numbers match a walk exactly."""
    import asyncio
    from mailstack.events import EventBus
    from mailstack.store.maildir import MaildirStore
    from mailstack.store.quota import Limits, Quota, count, load

    async def main():
        store = MaildirStore(tmp_path / "mail", EventBus())
        # exactly room for the 600 (+1 late): a change counted twice would refuse one of them
        store.quota = Quota(store.account_dir, lambda a: Limits(1 << 30, 601))
        account = "a@example.test"
        await store.ensure_account(account)
        await asyncio.gather(*(store.deliver(account, message(f"m{i}", 1000 + i), f"id{i}") for i in range(600)))
        box = await store.open(account, "INBOX")
        uids = [m.uid for m in box.messages]
        await box.store_flags(uids[::2], ["\\Deleted"], "+")
        await asyncio.gather(box.expunge(uids[:100]), box.expunge(uids[100:]),
                             store.deliver(account, message("late", 1000), "late"))
        await box.close()
        path = store.account_dir(account)
        walked, settled = count(path)
        assert settled and walked.messages == 301
        assert load(path, Limits(1 << 30, 601), write=False, quiet=False)[0] == walked
        assert (await store.quota.usage(account))[0] == walked
    asyncio.run(main())


def test_a_folder_deleted_while_delivery_charges_wait_to_be_written_counts_them_once(tmp_path):
    """A delivery's charge is written up to WRITE_AFTER seconds after its reply; a DELETE of a
    folder in that time makes the next look count the account again, which already sees the
    delivered files: their waiting charges must not be added on top, in memory or in the file."""
    import asyncio
    from mailstack.events import EventBus
    from mailstack.store.maildir import MaildirStore
    from mailstack.store.quota import Limits, Quota, count, load

    async def main():
        store = MaildirStore(tmp_path / "mail", EventBus())
        store.quota = Quota(store.account_dir, lambda a: Limits(1 << 30, 1000))
        store.quota.WRITE_AFTER = 30.0  # the waiting charges stay waiting during the test
        account = "a@example.test"
        await store.ensure_account(account)
        await store.create_mailbox(account, "Old")
        await store.deliver(account, message("old", 1000), "old", mailbox="Old")
        for i in range(3):  # the first is written at once, the next two wait
            await store.deliver(account, message(f"m{i}", 1000 + i), f"id{i}")
        await store.delete_mailbox(account, "Old")
        path = store.account_dir(account)
        walked, settled = count(path)
        assert settled and walked.messages == 3
        assert (await store.quota.usage(account, fresh=True))[0] == walked
        await store.quota.settled()
        assert load(path, Limits(1 << 30, 1000), write=False)[0] == walked
        assert (await store.quota.usage(account, fresh=True))[0] == walked
        # A change under way (checked, its file in place, not yet charged) when the account
        # is counted again with no maildirsize: that count is not written, or the charge's
        # line would be added on top of it.
        quota = store.quota
        await quota.check(account, 500)
        (path / "cur" / "1700000000.x.host:2,S").write_bytes(b"x" * 500)
        await quota.forget(account)  # as a DELETE of a folder does
        assert (await quota.usage(account, fresh=True))[0].messages == 4
        await quota.charge(account, 500, 1)
        walked, _ = count(path)
        assert walked.messages == 4
        assert load(path, Limits(1 << 30, 1000), write=False)[0] == walked
        assert (await quota.usage(account, fresh=True))[0] == walked
    asyncio.run(main())


def test_queue_bounces_for_a_full_account_after_the_queue_lifetime(tmp_path):
    srv = MailServer(tmp_path, overrides={"queue": {"max_lifetime": 3.0, "retry_min": 0.5, "retry_max": 1.0},
                                          "quota": {"default_storage": "1K", "warn_percent": 0}},
                     listeners=("smtp",))
    directory = Directory(srv.data_dir)
    directory.add_domain("example.test")
    for user in ("full", "sender"):
        directory.add_user(f"{user}@example.test", PW)
    directory.set_quota("sender@example.test", 0, None)
    directory.save()
    with srv:
        srv.start()
        srv.cli("sendmail", "-f", "sender@example.test", "full@example.test", input=message("small", 600).decode())
        wait_for(lambda: len(srv.inbox_messages("full@example.test")) == 1, 20, what="the first message")
        srv.cli("sendmail", "-f", "sender@example.test", "full@example.test", input=message("no room", 600).decode())
        bounce = wait_for(lambda: srv.inbox_messages("sender@example.test"), 30, what="the bounce")
        assert b"452 4.2.2" in bounce[0] and b"full@example.test" in bounce[0]
        assert len(srv.inbox_messages("full@example.test")) == 1
        assert srv.stop() == 0


def test_bad_quota_settings_are_one_line_errors(tmp_path):
    from mailstack import config
    from mailstack.directory import DirectoryError
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[server]\ndata_dir = "{tmp_path}"\n[quota]\ndefault_storage = "lots"\n')
    with pytest.raises(config.ConfigError, match=r"^quota.default_storage: 'lots' is not a size"):
        config.load(cfg)
    (tmp_path / "quotas").write_text("a@example.test: storage=1G\nb@example.test: storage=big\n")
    with pytest.raises(DirectoryError, match=r"quotas: line 2: expected user@domain: storage=SIZE"):
        Directory(tmp_path)
    (tmp_path / "quotas").write_text("a@example.test: storage=1G messages=7\n")
    assert Directory(tmp_path).quotas == {"a@example.test": {"storage": 1 << 30, "messages": 7}}


def test_limits_for_follows_the_defaults_and_each_accounts_own_limits():
    # Session 4: the `[quota]` defaults' Limits are made once and made again when the
    # defaults change (a reload); an account's own limits are read every time.
    from types import SimpleNamespace

    from mailstack import quotas as quota_mod
    from mailstack.store.quota import Limits as L

    directory = SimpleNamespace(quotas={})
    cfg = SimpleNamespace(quota=SimpleNamespace(default_storage="1G", default_messages=0))
    assert quota_mod.limits_for(directory, cfg, "a@example.test") == L(1 << 30, 0)
    cfg.quota = SimpleNamespace(default_storage="10M", default_messages=5)  # a reload
    assert quota_mod.limits_for(directory, cfg, "A@example.test") == L(10 << 20, 5)
    directory.quotas["a@example.test"] = {"storage": 1000}
    assert quota_mod.limits_for(directory, cfg, "A@Example.test") == L(1000, 5)
    directory.quotas["a@example.test"] = {"messages": 7}
    assert quota_mod.limits_for(directory, cfg, "a@example.test") == L(10 << 20, 7)
    directory.quotas["a@example.test"] = {"storage": 0, "messages": 0}
    assert quota_mod.limits_for(directory, cfg, "a@example.test").unlimited
    del directory.quotas["a@example.test"]
    assert quota_mod.limits_for(directory, cfg, "a@example.test") == L(10 << 20, 5)
    cfg.quota = SimpleNamespace(default_storage="0", default_messages=0)
    assert quota_mod.limits_for(directory, cfg, "b@example.test").unlimited
