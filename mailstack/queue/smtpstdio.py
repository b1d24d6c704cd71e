"""`sendmail -bs`: an SMTP session on stdin/stdout (RFC 5321 subset: HELO, EHLO, MAIL, RCPT, DATA,
RSET, NOOP, VRFY, QUIT), as programs that talk SMTP to a local pipe expect.  Every message is
queued the way `sendmail` queues it (maildrop, or the server's public socket), with the
sender rule of `sendmail -f`: only root, the server's user and sendmail.trusted_users may
choose their own.  Blocking; one process per session."""
from __future__ import annotations

import os
import pwd
import re

from .maildrop import SendmailError, check_address, submit

MAX_LINE = 4096
_PATH = re.compile(r"^(FROM|TO):\s*<([^<>]*)>(?:\s+(.*))?$", re.I)


def serve_stdio(cfg, stdin, stdout) -> int:
    from .pickup import may_set_sender, server_uid
    hostname = cfg.server.hostname
    try:
        user = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        user = str(os.getuid())
    own = f"{user}@{hostname}"

    def reply(line: str) -> None:
        stdout.write(line.encode() + b"\r\n")
        stdout.flush()

    reply(f"220 {hostname} ESMTP mailstack (sendmail -bs)")
    sender: str | None = None
    rcpts: list[str] = []
    while True:
        raw = stdin.readline(MAX_LINE + 1)
        if not raw:
            return 0
        if len(raw) > MAX_LINE:
            reply("500 5.5.2 Line too long")
            continue
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        verb, _, arg = line.partition(" ")
        verb = verb.upper()
        if verb == "QUIT":
            reply("221 2.0.0 Bye")
            return 0
        if verb in ("HELO", "EHLO"):
            sender, rcpts = None, []
            reply(f"250-{hostname}\r\n250-8BITMIME\r\n250 PIPELINING" if verb == "EHLO" else f"250 {hostname}")
        elif verb == "NOOP":
            reply("250 2.0.0 Ok")
        elif verb == "RSET":
            sender, rcpts = None, []
            reply("250 2.0.0 Ok")
        elif verb == "VRFY":
            reply("252 2.0.0 Send some mail, I'll try my best")
        elif verb == "MAIL":
            m = _PATH.match(arg)
            if sender is not None:
                reply("503 5.5.1 Error: nested MAIL command")
            elif not m or m.group(1).upper() != "FROM":
                reply("501 5.5.4 Syntax: MAIL FROM:<address>")
            else:
                try:
                    addr = "" if not m.group(2) else check_address(m.group(2), hostname)
                except SendmailError as e:
                    reply(f"501 5.1.7 {e}")
                    continue
                if addr.lower() != own.lower() and not may_set_sender(cfg, os.getuid(), server_uid(cfg)):
                    reply(f"553 5.7.1 <{addr}>: only root and trusted users may choose the sender; use <{own}>")
                    continue
                sender = addr
                reply("250 2.1.0 Ok")
        elif verb == "RCPT":
            m = _PATH.match(arg)
            if sender is None:
                reply("503 5.5.1 Error: need MAIL command")
            elif not m or m.group(1).upper() != "TO" or not m.group(2):
                reply("501 5.5.4 Syntax: RCPT TO:<address>")
            elif len(rcpts) >= cfg.smtp.max_recipients:
                reply("452 4.5.3 Too many recipients")
            else:
                try:
                    rcpts.append(check_address(m.group(2), hostname))
                    reply("250 2.1.5 Ok")
                except SendmailError as e:
                    reply(f"501 5.1.3 {e}")
        elif verb == "DATA":
            if sender is None:
                reply("503 5.5.1 Error: need MAIL command")
                continue
            if not rcpts:
                reply("554 5.5.1 Error: no valid recipients")
                continue
            reply("354 End data with <CR><LF>.<CR><LF>")
            data, size, too_big = [], 0, False
            while True:
                chunk = stdin.readline(1024 * 1024)
                if not chunk:
                    return 1  # input ended in the middle of DATA: nothing was accepted
                if chunk.rstrip(b"\r\n") == b"." and chunk.endswith(b"\n"):
                    break
                if chunk.startswith(b"."):
                    chunk = chunk[1:]
                size += len(chunk)
                if size > cfg.smtp.max_message_size:
                    too_big = True
                    data = []
                elif not too_big:
                    data.append(chunk.rstrip(b"\r\n") + b"\r\n")
            if too_big:
                reply("552 5.3.4 Message size exceeds fixed limit")
            else:
                try:
                    qid = submit(cfg, sender if sender.lower() != own.lower() else None, rcpts, b"".join(data))
                    reply(f"250 2.0.0 Ok: queued as {qid}")
                except SendmailError as e:
                    reply(f"451 4.3.0 {e}")
            sender, rcpts = None, []
        else:
            reply("502 5.5.2 Error: command not recognized")
