"""The client side of .ci/container-smoke.sh: talks to the container from the host on its
mapped loopback ports with the standard library's own clients (smtplib, imaplib, ssl), as a
user's mail client would.  Each subcommand prints one line and exits non-zero on failure.

    banner PORT                                   wait for an SMTP greeting (server up)
    send-mx PORT RCPT SUBJECT                     deliver as a remote MTA would (port 25, no AUTH)
    send-submission PORT CAFILE HOST USER PW SUBJECT   implicit TLS (465) + AUTH, to USER
    imap-read PORT CAFILE HOST USER PW SUBJECT..  wait until every SUBJECT is in INBOX (993)
    hold-imap PORT CAFILE HOST USER PW            log in, IDLE; print how the server ends the session
    cert-sha256 PORT                              fingerprint of the certificate served on PORT
    pem-sha256 FILE                               fingerprint of a PEM certificate file
"""
from __future__ import annotations

import email
import email.utils
import hashlib
import imaplib
import smtplib
import socket
import ssl
import sys
import time
from email.message import EmailMessage

TIMEOUT = 30.0


def _until(what: str, attempt, timeout: float = TIMEOUT, interval: float = 0.3):
    """Retry `attempt()` until it returns a truthy value; raise its last error after `timeout`."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = attempt()
            if value:
                return value
        except (OSError, smtplib.SMTPException, imaplib.IMAP4.error) as e:
            last = e
        time.sleep(interval)
    raise SystemExit(f"timed out after {timeout:.0f}s waiting for {what}: {last!r}")


def _tls(cafile: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=cafile)  # verifies chain and host name
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _message(sender: str, rcpt: str, subject: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = sender, rcpt, subject
    msg["Message-ID"] = email.utils.make_msgid(domain="ci.invalid")
    msg.set_content(f"body of {subject}\n")
    return msg


def banner(port: str) -> None:
    def attempt():
        with socket.create_connection(("127.0.0.1", int(port)), timeout=5) as s:
            f = s.makefile("rb")
            line = f.readline()
            s.sendall(b"QUIT\r\n")
            f.readline()
        return line if line.startswith(b"220") else None
    print("banner:", _until("the SMTP greeting", attempt).decode().strip())


def send_mx(port: str, rcpt: str, subject: str) -> None:
    with smtplib.SMTP("127.0.0.1", int(port), local_hostname="mta.ci.invalid", timeout=TIMEOUT) as c:
        c.ehlo()
        reply = c.send_message(_message("someone@elsewhere.invalid", rcpt, subject))
    assert reply == {}, f"recipients refused: {reply}"
    print(f"sent over SMTP to {rcpt}: {subject!r}")


class _IMAPS(imaplib.IMAP4_SSL):
    """IMAPS to 127.0.0.1 that checks the certificate against the server's real name."""

    def __init__(self, port: int, ctx: ssl.SSLContext, server_name: str) -> None:
        self._server_name = server_name
        super().__init__("127.0.0.1", port, ssl_context=ctx, timeout=TIMEOUT)

    def _create_socket(self, timeout):
        sock = socket.create_connection((self.host, self.port), timeout)
        return self.ssl_context.wrap_socket(sock, server_hostname=self._server_name)


class _SMTPS(smtplib.SMTP_SSL):
    def __init__(self, port: int, ctx: ssl.SSLContext, server_name: str) -> None:
        self._server_name = server_name
        super().__init__("127.0.0.1", port, local_hostname="client.ci.invalid", context=ctx, timeout=TIMEOUT)

    def _get_socket(self, host, port, timeout):
        sock = socket.create_connection((host, port), timeout)
        return self.context.wrap_socket(sock, server_hostname=self._server_name)


def send_submission(port: str, cafile: str, host: str, user: str, password: str, subject: str) -> None:
    with _SMTPS(int(port), _tls(cafile), host) as c:
        c.login(user, password)
        reply = c.send_message(_message(user, user, subject))
    assert reply == {}, f"recipients refused: {reply}"
    print(f"submitted over TLS with AUTH as {user}: {subject!r}")


def imap_read(port: str, cafile: str, host: str, user: str, password: str, *subjects: str) -> None:
    ctx = _tls(cafile)

    def attempt():
        imap = _IMAPS(int(port), ctx, host)
        try:
            imap.login(user, password)
            typ, _ = imap.select("INBOX", readonly=True)
            assert typ == "OK", "SELECT INBOX failed"
            typ, data = imap.uid("FETCH", "1:*", "(BODY.PEEK[])")
            found = {}
            for item in data or []:
                if isinstance(item, tuple):
                    msg = email.message_from_bytes(item[1])
                    found[str(msg["Subject"])] = msg
            imap.logout()
        finally:
            try:
                imap.shutdown()
            except OSError:
                pass
        if not all(s in found for s in subjects):
            return None
        for s in subjects:
            body = found[s].get_payload(decode=True) or b""
            assert f"body of {s}".encode() in body, f"body of {s!r} not intact: {body[:200]!r}"
            assert found[s]["Received"], f"{s!r} has no Received: header"
        return found

    found = _until(f"{', '.join(subjects)} in {user}'s INBOX over IMAPS", attempt)
    print(f"read over IMAPS as {user}: {len(found)} message(s), {', '.join(repr(s) for s in subjects)} intact")


def hold_imap(port: str, cafile: str, host: str, user: str, password: str) -> None:
    """A mail client left open: logged in, in IDLE.  Prints "idling" once the server agreed,
    then waits until the server ends the session and prints how (a clean stop says BYE)."""
    imap = _IMAPS(int(port), _tls(cafile), host)
    imap.login(user, password)
    imap.select("INBOX")
    imap.send(b"i1 IDLE\r\n")
    line = imap.readline()
    assert line.startswith(b"+"), f"IDLE refused: {line!r}"
    print("idling", flush=True)
    imap.sock.settimeout(120)
    last = b""
    try:
        while True:
            line = imap.readline()
            if not line:
                break
            last = line
            if line.startswith(b"* BYE"):
                break
    except OSError as e:
        print(f"connection error: {e!r}")
    print(f"server ended the session: {last.decode(errors='replace').strip() or '(closed without a word)'}")


def cert_sha256(port: str) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # only reading which cert is served

    def attempt():
        with socket.create_connection(("127.0.0.1", int(port)), timeout=5) as s:
            with ctx.wrap_socket(s) as t:
                return t.getpeercert(binary_form=True)
    print(hashlib.sha256(_until("a TLS handshake", attempt)).hexdigest())


def pem_sha256(path: str) -> None:
    with open(path) as f:
        print(hashlib.sha256(ssl.PEM_cert_to_DER_cert(f.read())).hexdigest())


COMMANDS = {"banner": banner, "send-mx": send_mx, "send-submission": send_submission,
            "imap-read": imap_read, "hold-imap": hold_imap, "cert-sha256": cert_sha256, "pem-sha256": pem_sha256}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        raise SystemExit(__doc__)
    COMMANDS[sys.argv[1]](*sys.argv[2:])
