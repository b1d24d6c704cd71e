"""Content filters through the real server process and real filter daemons on loopback:
rspamd (HTTP and as a milter), SpamAssassin's spamd, ClamAV's clamd, OpenDKIM and a
purepythonmilter test milter.  Each daemon starts once for the module (rspamd takes ~15 s).
"""
from __future__ import annotations

import email
import imaplib
import shutil
import smtplib
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from filter_daemons import EICAR, GTUBE, ClamavMilter, Clamd, OpenDKIM, Rspamd, Spamd, MilterForTests
from harness import MailServer, free_port, inbox_messages, wait_for

BOB, CAROL, PASSWORD = "bob@example.test", "carol@example.test", "pw of bob"
CLEAN = (b"From: Sender <sender@example.org>\r\nTo: bob@example.test\r\nSubject: lunch\r\n"
         b"Message-ID: <clean.1@example.org>\r\nDate: Mon, 30 Nov 2026 10:00:00 +0000\r\n\r\n"
         b"Shall we meet for lunch on Friday at the usual place?\r\n")


def spam_message(subject: str = "offer") -> bytes:
    return (f"From: sender@example.org\r\nTo: bob@example.test\r\nSubject: {subject}\r\n"
            "Message-ID: <gtube.1@example.org>\r\n\r\n").encode() + GTUBE + b"\r\n"


def folder(srv: MailServer, address: str, name: str | None) -> list[bytes]:
    return inbox_messages(srv.data_dir, address, name)


def send(port: int, rcpts, message: bytes, sender: str = "sender@example.org", helo: str = "client.example.org"):
    """(code, text) of the end of DATA (or of the first refusal)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=60, local_hostname=helo) as s:
        try:
            s.sendmail(sender, rcpts, message)
        except smtplib.SMTPDataError as e:
            return e.smtp_code, e.smtp_error.decode()
        except smtplib.SMTPRecipientsRefused as e:
            code, text = next(iter(e.recipients.values()))
            return code, text.decode()
        except smtplib.SMTPSenderRefused as e:
            return e.smtp_code, e.smtp_error.decode()
        return 250, "ok"


def start_server(tmp: Path, filters: dict, **extra) -> MailServer:
    srv = MailServer(tmp, overrides={"filters": filters, **extra}, listeners=("smtp", "submission", "imap"))
    srv.add_domain("example.test")
    srv.add_user(BOB, PASSWORD)
    srv.add_user(CAROL, PASSWORD)
    return srv.start()


@pytest.fixture(scope="module")
def daemons():
    # Our own directory, not pytest's: pytest runs of other checkouts prune old basetemps,
    # and these daemons live for the whole module.
    tmp = Path(tempfile.mkdtemp(prefix="mailstack-filter-daemons-"))
    tmp.chmod(0o755)  # spamd and rspamd drop to their own users and read their config here
    started = []
    try:
        # rspamd is the slow one: start it first, the others come up while it loads.
        rspamd = Rspamd(tmp)
        milter_headers = rspamd.dir / "local.d"
        milter_headers.mkdir(parents=True, exist_ok=True)
        (milter_headers / "milter_headers.conf").write_text(
            "extended_spam_headers = true;\nskip_local = false;\nskip_authenticated = false;\n")
        # rspamd signs mail of example.test (from local addresses) with its own key.
        subprocess.run(["opendkim-genkey", "-b", "1024", "-D", str(milter_headers), "-d", "example.test",
                        "-s", "rspamd"], check=True, capture_output=True)
        (milter_headers / "rspamd.private").rename(milter_headers / "example.test.rspamd.key")
        (milter_headers / "dkim_signing.conf").write_text(
            f'enabled = true;\nsign_local = true;\nsign_authenticated = true;\nuse_domain = "header";\n'
            f'allow_username_mismatch = true;\nselector = "rspamd";\n'
            f'path = "{milter_headers}/$domain.$selector.key";\n')
        for d in (rspamd, Spamd(tmp), Clamd(tmp), OpenDKIM(tmp), MilterForTests(tmp)):
            d.launch()  # all load at once; then wait for each
            started.append(d)
        for d in started:
            d.wait()
        by_name = {d.name: d for d in started}
        started.append(ClamavMilter(tmp, by_name["clamd"]).start())  # needs clamd answering
        yield {d.name: d for d in started}
    finally:
        for d in started:
            d.terminate()  # all at once, then wait for each
        for d in started:
            d.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def test_rspamd_and_clamd_chain(tmp_path, daemons):
    rspamd, clamd = daemons["rspamd"], daemons["clamd"]
    metrics_port = free_port()
    with start_server(tmp_path, {"rspamd_url": rspamd.url, "clamd_address": clamd.address,
                                 "rspamd_controller": rspamd.controller_url},
                      metrics={"listen": f"127.0.0.1:{metrics_port}"}) as srv:
        port = srv.ports["smtp"]
        # GTUBE: rspamd says reject -> refused at the end of DATA, nothing accepted.
        code, text = send(port, [BOB], spam_message())
        assert code == 554 and text.startswith("5.7.1"), (code, text)
        # EICAR: clamd (first in the default order) finds it, with the name from our database.
        virus = b"Subject: attachment\r\nFrom: sender@example.org\r\n\r\n" + EICAR + b"\r\n"
        code, text = send(port, [BOB], virus)
        assert (code, text) == (554, "5.7.0 Message rejected: virus found (Mailstack.Test.EICAR.UNOFFICIAL)")
        # Clean: delivered, with what both filters said.
        assert send(port, [BOB], CLEAN)[0] == 250
        [msg] = wait_for(lambda: folder(srv, BOB, None), 15, what="delivery")
        head = msg.split(b"\r\n\r\n")[0]
        assert b"X-Spamd-Result: default: False [" in head
        assert b"X-Rspamd-Action: no action" in head and b"X-Spam-Status: No, score=" in head
        assert b"X-Virus-Scanned: clamd (mailstack)" in head
        assert folder(srv, BOB, "Junk") == []
        # rspamd's DKIM signature (its dkim_signing module) is added to mail of example.test.
        own = CLEAN.replace(b"sender@example.org", b"carol@example.test").replace(b"clean.1@", b"own.1@")
        assert send(port, [CAROL], own, sender=CAROL)[0] == 250
        [signed] = wait_for(lambda: folder(srv, CAROL, None), 15, what="delivery to carol")
        signature = email.message_from_bytes(signed)["DKIM-Signature"]
        assert signature and "d=example.test" in signature and "s=rspamd" in signature, signed[:1500]
        wait_for(lambda: "clamd=Mailstack.Test.EICAR.UNOFFICIAL" in srv.log(), 10, what="the log line")
        # Moving it into Junk sends it to rspamd's controller (/learnspam).  This rspamd has no
        # Bayes backend (redis), so it answers that it will not learn: the request is seen there.
        imap = imaplib.IMAP4("127.0.0.1", srv.ports["imap"])
        imap.starttls(ssl_context=srv.client_tls())
        imap.login(BOB, PASSWORD)
        imap.select("INBOX")
        assert imap.uid("MOVE", "1", "Junk")[0] == "OK"
        imap.logout()
        wait_for(lambda: "spam from bob@example.test (uid 1) not learned by rspamd: rspamd /learnspam answered HTTP 204"
                 in srv.log(), 20, what="the learn request's answer")
        assert "<clean.1@example.org>" in rspamd.log() and "learn" in rspamd.log()
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        assert "mailstack_filter_scanned_total 4" in text
        assert "mailstack_filter_virus_total 1" in text and "mailstack_filter_spam_total 1" in text
        assert 'mailstack_filter_latency_seconds_count{filter="rspamd"} 3' in text
        assert 'mailstack_filter_latency_seconds_count{filter="clamd"} 4' in text
        assert 'mailstack_filter_learned_total{kind="spam",result="refused"} 1' in text


def test_rspamd_down_gets_the_default_action_size_and_listener_skip(tmp_path, daemons):
    dead = f"http://127.0.0.1:{free_port()}"
    with start_server(tmp_path, {"rspamd_url": dead, "max_size": 4096}) as srv:
        code, text = send(srv.ports["smtp"], [BOB], CLEAN)
        assert (code, text) == (451, "4.7.1 Service unavailable - try again later")
        wait_for(lambda: "rspamd: no verdict" in srv.log() and "default action tempfail" in srv.log(), 10,
                 what="the log line")
        assert folder(srv, BOB, None) == []
        # Above filters.max_size: not scanned at all (so rspamd being down does not matter).
        big = CLEAN + (b"x" * 70 + b"\r\n") * 80
        assert send(srv.ports["smtp"], [BOB], big)[0] == 250
        wait_for(lambda: "filters=skipped" in srv.log(), 10, what="the skip in the log")
        # Submission is not in filters.listeners (default: inbound only): not scanned either.
        with smtplib.SMTP("127.0.0.1", srv.ports["submission"], timeout=30) as s:
            s.starttls(context=srv.client_tls())
            s.login(BOB, PASSWORD)
            s.sendmail(BOB, [CAROL], CLEAN.replace(b"sender@example.org", BOB.encode()))
        wait_for(lambda: folder(srv, CAROL, None), 15, what="the submitted message")
        assert len(wait_for(lambda: folder(srv, BOB, None), 15, what="the big message")) == 1
        # A reload with rspamd's default set to accept reaches new sessions.
        text = srv.config_path.read_text().replace('rspamd_url = "', 'rspamd_default_action = "accept"\nrspamd_url = "')
        srv.config_path.write_text(text)
        srv.hup()
        wait_for(lambda: "reload" in srv.log().lower(), 10, what="the reload")

        def accepted():
            return send(srv.ports["smtp"], [BOB], CLEAN)[0] == 250
        wait_for(accepted, 15, interval=0.2, what="the new default action")
        assert len(wait_for(lambda: folder(srv, BOB, None)[1:], 15, what="the delivery")) == 1


def test_spamd_sends_spam_to_junk_and_learns_from_moves(tmp_path, daemons):
    spamd = daemons["spamd"]
    with start_server(tmp_path, {"spamd_address": spamd.address}) as srv:
        port = srv.ports["smtp"]
        assert send(port, [BOB], spam_message())[0] == 250, srv.log()[-3000:] + spamd.log()
        [junk] = wait_for(lambda: folder(srv, BOB, "Junk"), 15, what="delivery into Junk")
        head = junk.split(b"\r\n\r\n")[0].decode()
        assert "X-Spam-Flag: YES" in head and "X-Spam-Status: Yes, score=100" in head
        assert "X-Spam-Report: Content analysis details" in head and "GTUBE" in head
        assert folder(srv, BOB, None) == []
        # A forged verdict from the sender does not survive.
        forged = CLEAN.replace(b"Subject: lunch", b"Subject: lunch\r\nX-Spam-Status: No, forged")
        assert send(port, [BOB], forged)[0] == 250
        [inbox] = wait_for(lambda: folder(srv, BOB, None), 15, what="clean delivery")
        assert b"forged" not in inbox and b"X-Spam-Status: No, score=" in inbox

        # Carol keeps her spam in INBOX.
        out = srv.cli("user", "prefs", CAROL, "--spam-folder", "inbox").stdout
        assert "spam_folder = inbox" in out
        assert send(port, [CAROL], spam_message())[0] == 250
        [mine] = wait_for(lambda: folder(srv, CAROL, None), 15, what="Carol's spam in INBOX")
        assert b"X-Spam-Flag: YES" in mine and folder(srv, CAROL, "Junk") == []

        # IMAP: moving into Junk teaches spam, out of Junk (not to Trash) teaches ham.
        before = {"nspam": 0, "nham": 0}  # this module's spamd starts with an empty Bayes database
        imap = imaplib.IMAP4("127.0.0.1", srv.ports["imap"])
        imap.starttls(ssl_context=srv.client_tls())
        imap.login(BOB, PASSWORD)
        imap.select("INBOX")
        started = time.monotonic()
        typ, _ = imap.uid("MOVE", "1", "Junk")
        move_time = time.monotonic() - started
        assert typ == "OK"
        wait_for(lambda: "learned spam from bob@example.test" in srv.log(), 30, interval=0.1,
                 what="the spam report to spamd")
        imap.select("Junk")
        typ, data = imap.uid("SEARCH", "ALL")
        first_junk = data[0].split()[0].decode()
        typ, _ = imap.uid("MOVE", first_junk, "INBOX")
        assert typ == "OK"
        wait_for(lambda: "learned ham from bob@example.test" in srv.log(), 30, interval=0.1,
                 what="the ham report to spamd")
        imap.select("Junk")
        typ, data = imap.uid("SEARCH", "ALL")
        for uid in data[0].split():
            assert imap.uid("MOVE", uid.decode(), "Trash")[0] == "OK"  # to Trash: nothing learnt
        imap.logout()
        wait_for(lambda: "from Junk to Trash: nothing to learn" in srv.log(), 30, what="the Trash move handled")
        after = spamd.learned()  # in spamd's own Bayes database: one spam, one ham, nothing for Trash
        assert after == {"nspam": before["nspam"] + 1, "nham": before["nham"] + 1}, after
        assert move_time < 1.0, move_time  # the IMAP command did not wait for spamd
        print(f"\nIMAP MOVE into Junk answered in {move_time * 1000:.1f} ms")


def test_clamd_hangs_session_tempfails_in_time_and_loop_keeps_serving(tmp_path, daemons):
    # A "clamd" that accepts and never answers; rspamd is down but set to accept.
    hang = socket.socket()
    hang.bind(("127.0.0.1", 0))
    hang.listen(16)
    held = []
    stop = threading.Event()

    def accept_forever():
        hang.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(hang.accept()[0])
            except OSError:
                pass
    threading.Thread(target=accept_forever, daemon=True).start()
    filters = {"order": ["rspamd", "clamd"], "rspamd_url": f"http://127.0.0.1:{free_port()}",
               "rspamd_default_action": "accept", "clamd_address": f"127.0.0.1:{hang.getsockname()[1]}",
               "clamd_timeout": 2.0}
    try:
        with start_server(tmp_path, filters) as srv:
            port = srv.ports["smtp"]
            result = {}

            def hung_session():
                started = time.monotonic()
                result["reply"] = send(port, [BOB], CLEAN)
                result["seconds"] = time.monotonic() - started

            t = threading.Thread(target=hung_session)
            t.start()
            wait_for(lambda: held, 10, what="the filter connection")
            # Meanwhile other sessions are served: NOOP round trips stay fast.
            worst, rounds = 0.0, 0
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
                s.ehlo("other.example.org")
                while t.is_alive() and rounds < 100000:
                    started = time.monotonic()
                    assert s.noop()[0] == 250
                    worst = max(worst, time.monotonic() - started)
                    rounds += 1
            t.join(30)
            assert result["reply"] == (451, "4.7.1 Service unavailable - try again later")
            assert 1.9 < result["seconds"] < 6.0, result
            assert rounds >= 5 and worst < 0.5, (rounds, worst)
            wait_for(lambda: "clamd: no verdict" in srv.log(), 10, what="the log line")
            log = srv.log()
            assert "rspamd: no verdict" in log and "default action accept" in log
            print(f"\nhung filter: 451 after {result['seconds']:.2f}s (clamd_timeout 2s); "
                  f"{rounds} NOOPs meanwhile, slowest {worst * 1000:.1f} ms")
    finally:
        stop.set()
        for s in held:
            s.close()
        hang.close()


def test_milter_chain_every_action(tmp_path, daemons):
    rspamd, dkim, tm = daemons["rspamd"], daemons["opendkim"], daemons["testmilter"]
    milters = [f"inet:127.0.0.1:{rspamd.proxy}", daemons["clamav-milter"].milter, dkim.milter, tm.milter]
    with start_server(tmp_path, {"milters": milters, "listeners": ["smtp", "submission"]}) as srv:
        port = srv.ports["smtp"]
        message = (b"From: Bob <bob@example.test>\r\nTo: bob@example.test\r\nSubject: all-actions\r\n"
                   b"X-Delete-Me: please\r\nMessage-ID: <milter.1@example.test>\r\n"
                   b"Date: Mon, 30 Nov 2026 10:00:00 +0000\r\n\r\noriginal body\r\n")
        assert send(port, [BOB], message, sender="bob@example.test")[0] == 250
        # bob removed, carol added, sender changed, headers and body edited.
        try:
            [msg] = wait_for(lambda: folder(srv, CAROL, None), 15, what="delivery to carol")
        except AssertionError:
            raise AssertionError(srv.log()[-5000:]) from None
        assert folder(srv, BOB, None) == []
        parsed = email.message_from_bytes(msg)
        assert parsed["Subject"] == "changed by milter"
        assert parsed["X-Test-Added"] == "appended" and parsed["X-Test-Inserted"] == "at the top"
        assert "X-Delete-Me" not in parsed
        assert msg.endswith(b"\r\n\r\nreplaced body\r\n")
        assert parsed["DKIM-Signature"] and "d=example.test" in parsed["DKIM-Signature"]
        assert parsed["X-Spamd-Result"] and parsed["X-Rspamd-Queue-Id"], msg[:3000]
        assert parsed["X-Virus-Status"] == "Clean" and "mailstack-test" in parsed["X-Virus-Scanned"]
        # The queue's log line names the envelope sender the milter set (the log is written
        # from its own thread: it may follow the delivery by a moment).
        wait_for(lambda: "from=<changed@example.test>" in srv.log(), 10, what="the changed sender in the log")

        # Verdicts, each on its own message.
        code, text = send(port, [BOB], spam_message("replycode").replace(GTUBE, b"hello"))
        assert (code, text) == (553, "5.7.0 custom refusal from milter")
        code, text = send(port, [BOB], CLEAN.replace(b"Subject: lunch", b"Subject: tempfail"))
        assert (code, text) == (451, "4.7.1 test milter says later")
        code, text = send(port, [BOB], CLEAN.replace(b"Subject: lunch", b"Subject: reject"))
        assert (code, text) == (550, "5.7.1 Command rejected")
        assert send(port, [BOB], CLEAN.replace(b"Subject: lunch", b"Subject: discard"))[0] == 250
        assert send(port, [BOB], CLEAN.replace(b"Subject: lunch", b"Subject: quarantine"))[0] == 250, srv.log()[-1500:]
        held = srv.cli("queue", "list").stdout
        assert "held by test milter" in held or "hold" in held.lower(), held
        assert send(port, [BOB], CLEAN.replace(b"Subject: lunch", b"Subject: accept"))[0] == 250
        srv.cli("alias", "add", "rcpt-reject@example.test", BOB)  # a real address: the milter refuses it
        assert send(port, ["rcpt-reject@example.test"], CLEAN) == (550, "5.7.1 recipient refused by test milter")
        # GTUBE through rspamd's proxy: refused by rspamd's milter answer.
        assert send(port, [BOB], spam_message("gtube")) == (554, "5.7.1 Gtube pattern")
        # EICAR through clamav-milter (behind rspamd's proxy, which lets it pass).
        # clamav-milter answers a plain reject (Postfix says the same text).
        assert send(port, [BOB], CLEAN + EICAR + b"\r\n") == (550, "5.7.1 Command rejected")
        cm_log = daemons["clamav-milter"].dir / "clamav-milter.log"
        wait_for(lambda: "Mailstack.Test.EICAR" in cm_log.read_text(), 10, what="clamav-milter's verdict")
        wait_for(lambda: len(folder(srv, BOB, None)) == 1, 15, what="the accepted message")
        time.sleep(0.5)
        assert len(folder(srv, BOB, None)) == 1  # discard and quarantine delivered nothing
        # Macros as Postfix sends them.
        seen = tm.seen()
        connects = [e["macros"] for e in seen if e["stage"] == "connect"]
        assert all(m.get("j") == "mail.example.test" and m.get("{client_addr}") == "127.0.0.1" for m in connects)
        assert {m.get("{daemon_name}") for m in connects} == {"smtp", "submission"}  # the listener's name
        assert {e["hostname"] for e in seen if e["stage"] == "connect"} == {"[127.0.0.1]"}
        assert any(e["stage"] == "helo" and e["helo"] == "client.example.org" for e in seen)
        assert any(e["stage"] == "rcpt" and e["macros"].get("{rcpt_addr}") == "bob@example.test" for e in seen)
        mail = next(e for e in seen if e["stage"] == "mail")
        assert mail["macros"].get("{mail_addr}") == "bob@example.test"
        eom = next(e for e in seen if e["stage"] == "eom")
        assert eom["macros"].get("i")
