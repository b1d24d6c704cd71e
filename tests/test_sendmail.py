"""`mailstack sendmail`: the sendmail(8) interface, with and without a running server."""
from __future__ import annotations

import asyncio
import email
import email.policy
import getpass
import os
import stat
import subprocess
import sys
import time

from queue_fixture import HOSTNAME, QueueEnv, until

from mailstack.queue.spool import Spool, read_envelope


def sendmail(env: QueueEnv, *args: str, input: bytes) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mailstack", "sendmail", *args, "--config", str(env.config_path)],
                          input=input, capture_output=True, timeout=60)


def deliver_maildrop(env: QueueEnv) -> None:
    async def main():
        async with env.running():
            await until(lambda: env.queue_files() == [], what="maildrop delivered")
    asyncio.run(main())


def test_sendmail_t_takes_recipients_from_headers_and_drops_bcc(tmp_path):
    env = QueueEnv(tmp_path)
    msg = (b"To: Alice <alice@example.test>\n"
           b"Cc: bob@example.test\n"
           b"Bcc: carol@example.test\n"
           b"Return-Path: <forged@evil.test>\n"
           b"Subject: by sendmail -t\n"
           b"\n"
           b"line one\n"
           b"line two\n")
    r = sendmail(env, "-t", "-i", input=msg)
    assert r.returncode == 0, r.stderr
    files = env.queue_files()
    assert len(files) == 1 and files[0].startswith("maildrop/")  # no server: waits in the maildrop
    path = env.cfg.queue_dir / files[0]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    queued = read_envelope(path)
    assert queued.recipients == ["alice@example.test", "bob@example.test", "carol@example.test"]
    assert queued.sender == f"{getpass.getuser()}@{HOSTNAME}"

    deliver_maildrop(env)
    for who in ("alice", "bob", "carol"):
        inbox = env.inbox(f"{who}@example.test")
        assert len(inbox) == 1, who
    raw = env.inbox("carol@example.test")[0]
    final = f"Return-Path: <{queued.sender}>\r\nDelivered-To: carol@example.test\r\n".encode()
    assert raw.startswith(final)  # the final delivery's lines; the Bcc recipient nowhere else
    assert b"Bcc:" not in raw and b"evil.test" not in raw and b"carol@example.test" not in raw[len(final):].split(b"\r\n\r\n")[0]
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert parsed["Subject"] == "by sendmail -t"
    assert parsed["Message-ID"] and parsed["Date"] and parsed["From"]
    assert raw.endswith(b"line one\r\nline two\r\n")  # LF turned into CRLF
    assert b"\r\n\r\n" in raw


def test_dot_line_ends_input_unless_i(tmp_path):
    env = QueueEnv(tmp_path)
    body = b"Subject: dots\n\nbefore\n.\nafter\n"
    assert sendmail(env, "alice@example.test", input=body).returncode == 0
    assert sendmail(env, "-i", "bob@example.test", input=body).returncode == 0
    assert sendmail(env, "-oi", "carol@example.test", input=body).returncode == 0
    deliver_maildrop(env)
    alice = env.inbox("alice@example.test")[0]
    assert alice.endswith(b"before\r\n") and b"after" not in alice
    for who in ("bob", "carol"):
        raw = env.inbox(f"{who}@example.test")[0]
        assert raw.endswith(b"before\r\n.\r\nafter\r\n"), raw


def test_f_sets_envelope_sender_and_F_the_from_name(tmp_path):
    env = QueueEnv(tmp_path)
    r = sendmail(env, "-f", "carol@example.test", "-F", "Carol Q. Sender", "alice@example.test", "bob",
                 input=b"Subject: with -f\n\nhello\n")
    assert r.returncode == 0, r.stderr
    files = env.queue_files()
    queued = read_envelope(env.cfg.queue_dir / files[0])
    assert queued.sender == "carol@example.test"
    assert queued.recipients == ["alice@example.test", f"bob@{HOSTNAME}"]  # bare names get our hostname
    assert queued.meta["listener"] == "sendmail" and queued.meta["uid"] == os.getuid()
    head = Spool.read_headers(queued.source)
    assert b'From: "Carol Q. Sender" <carol@example.test>\r\n' in head
    assert head.startswith(b"Received: by mail.example.test (mailstack, from userid")

    r = sendmail(env, "-f", "<>", "alice@example.test", input=b"Subject: null\n\nx\n")
    assert r.returncode == 0, r.stderr
    nulls = [read_envelope(env.cfg.queue_dir / f) for f in env.queue_files()]
    assert sorted(m.sender for m in nulls) == ["", "carol@example.test"]


def test_errors_are_clear_and_queue_nothing(tmp_path):
    env = QueueEnv(tmp_path)
    r = sendmail(env, "-t", input=b"Subject: nobody\n\nx\n")
    assert r.returncode == 64 and b"no recipients" in r.stderr
    r = sendmail(env, "alice@example.test", "-bz", input=b"x\n")
    assert r.returncode == 64
    r = sendmail(env, "bad address@example.test", input=b"x\n")
    assert r.returncode != 0 and b"bad address" in r.stderr
    (env.dir / "config.toml").write_text(env.config_path.read_text() + "\n[smtp]\nmax_message_size = 2048\n")
    r = sendmail(env, "alice@example.test", input=b"Subject: big\n\n" + b"x" * 5000 + b"\n")
    assert r.returncode == 65 and b"too large" in r.stderr
    assert env.queue_files() == []


def test_running_server_picks_up_at_once(tmp_path):
    env = QueueEnv(tmp_path)

    async def main():
        async with env.running(control=True):
            # let the start-up maildrop scan pass, so that only the pickup request can be fast
            await asyncio.sleep(0)
            t0 = time.monotonic()
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "mailstack", "sendmail", "-t", "--config", str(env.config_path),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await proc.communicate(b"To: alice@example.test\nSubject: quick\n\nhi\n")
            assert proc.returncode == 0, err
            sent = time.monotonic()
            await until(lambda: env.inbox("alice@example.test"), timeout=10)
            # picked up on request, not by the periodic scan (every 5 s)
            assert time.monotonic() - sent < 2.5, time.monotonic() - sent
            await until(lambda: env.queue_files() == [])
            return t0

    asyncio.run(main())
    assert b"Subject: quick" in env.inbox("alice@example.test")[0]


def test_bp_lists_the_queue(tmp_path):
    env = QueueEnv(tmp_path)
    assert sendmail(env, "alice@example.test", input=b"Subject: q\n\nx\n").returncode == 0
    r = sendmail(env, "-bp", input=b"")
    assert r.returncode == 0 and b"maildrop" in r.stdout and b"alice@example.test" in r.stdout
