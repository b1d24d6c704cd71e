"""mailstack and a real Dovecot side by side holding the same messages, for tests that
compare their answers command by command (SORT, THREAD, ESEARCH, SEARCHRES ...).

    pair = Pair(tmp_path_factory.mktemp("pair"))
    pair.load(MESSAGES, internaldates)        # APPENDed to both INBOXes, same dates
    ours, theirs = pair.both("SORT (SUBJECT) UTF-8 ALL")
    pair.close()
"""
from __future__ import annotations

import imaplib
import socket

from dovecot_fixture import Dovecot
from imap_fixtures import InProcessIMAP

USER, PASSWORD = "u@example.test", "pw"  # at Dovecot
ALICE, ALICE_PW = "alice@example.test", "secret"  # at mailstack


class Raw:
    """A line-level plaintext client (loopback only) that returns what the server said."""

    def __init__(self, port: int, user: str, password: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.file = self.sock.makefile("rb")
        self.file.readline()
        self.n = 0
        _, tagged = self.cmd(f"LOGIN {user} {password}")
        assert tagged.startswith(b"OK"), tagged

    def cmd(self, text: str) -> tuple[list[bytes], bytes]:
        """(untagged lines, tagged status and text without the tag)."""
        self.n += 1
        tag = b"T%d" % self.n
        self.sock.sendall(tag + b" " + text.encode() + b"\r\n")
        lines = []
        while True:
            line = self.file.readline()
            if not line:
                raise EOFError(text)
            line = line.rstrip(b"\r\n")
            if line.startswith(tag + b" "):
                return lines, line[len(tag) + 1:]
            lines.append(line)

    def close(self) -> None:
        try:
            self.cmd("LOGOUT")
        except (OSError, EOFError):
            pass
        self.sock.close()


def normalise(answer: tuple[list[bytes], bytes]) -> tuple[list[bytes], bytes]:
    """What must agree: the untagged data (not OK/FLAGS texts) and the tagged status word."""
    lines, tagged = answer
    data = [x.rstrip() for x in lines if not x.startswith((b"* OK", b"* FLAGS"))]
    return data, tagged.split(b" ", 1)[0]


class Pair:
    def __init__(self, tmp_path) -> None:
        self.dovecot = Dovecot().start()
        try:
            self.dovecot.add_user(USER, PASSWORD)
            self.ours = InProcessIMAP(tmp_path, imap_overrides={"allow_plaintext_auth": True})
        except BaseException:
            self.dovecot.cleanup()
            raise
        self.raws: list[Raw] = []

    def load(self, messages: list[bytes], dates: list[float], flags: list[str] | None = None) -> None:
        for port, user, pw in ((self.dovecot.imap_port, USER, PASSWORD), (self.ours.ports["imap"], ALICE, ALICE_PW)):
            c = imaplib.IMAP4("127.0.0.1", port)
            c.login(user, pw)
            for i, (msg, when) in enumerate(zip(messages, dates)):
                f = flags[i] if flags else ""
                typ, resp = c.append("INBOX", f"({f})", imaplib.Time2Internaldate(when), msg)
                assert typ == "OK", resp
            c.logout()

    def clients(self) -> tuple[Raw, Raw]:
        """(mailstack, Dovecot) raw sessions, logged in, nothing selected."""
        ours = Raw(self.ours.ports["imap"], ALICE, ALICE_PW)
        theirs = Raw(self.dovecot.imap_port, USER, PASSWORD)
        self.raws += [ours, theirs]
        return ours, theirs

    def close(self) -> None:
        for r in self.raws:
            r.close()
        self.ours.close()
        self.dovecot.cleanup()
