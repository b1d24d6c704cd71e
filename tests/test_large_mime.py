"""MIME parts and BODYSTRUCTURE of a big message without reading it whole (issue 16): the
server parses the file through a read-only map and streams BODY[n] as a byte range.

Against the real server process: four clients at once ask a 6 MB multipart message for its
BODYSTRUCTURE and parts; every answer equals what fetch.py gives on the whole bytes, and
the server's peak RSS grows by less than the copies of the message the clients would cost
(before: 43 MiB for a 5.4 MB message; now 8-10 MiB)."""
from __future__ import annotations

import base64
import random
import re

import pytest

from mailstack.directory import Directory
from mailstack.imap import fetch
from tests.harness import MailServer
from tests.test_large_messages import Peak, Raw, in_threads, sha

USER, PASSWORD = "mime@example.test", "mime-pw"
CLIENTS = 4


def big_multipart() -> bytes:
    rnd = random.Random(16)
    attachment = base64.encodebytes(rnd.randbytes(3_000_000)).replace(b"\n", b"\r\n")
    text = b"".join(b"%d  spaced\tline .\r\n" % i for i in range(60_000))  # ~1.2 MB of text lines
    inner = (b"From: Inner <in@example.test>\r\nSubject: inner\r\nContent-Type: multipart/alternative;"
             b' boundary="in"\r\n\r\n--in\r\nContent-Type: text/plain\r\n\r\n' + text[:200_000] +
             b"--in\r\nContent-Type: text/html\r\n\r\n<p>x</p>\r\n--in--\r\n")
    return (b"From: Big <big@example.test>\r\nTo: mime@example.test\r\nSubject: parts\r\n"
            b"Message-ID: <mime@example.test>\r\nMIME-Version: 1.0\r\n"
            b'Content-Type: multipart/mixed; boundary="outer"\r\n\r\npreamble\r\n'
            b"--outer\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + text +
            b'--outer\r\nContent-Type: application/octet-stream; name="a.bin"\r\n'
            b"Content-Transfer-Encoding: base64\r\nContent-Disposition: attachment\r\n\r\n" + attachment +
            b"--outer\r\nContent-Type: message/rfc822\r\nContent-Description: fwd\r\n\r\n" + inner +
            b"--outer--\r\nepilogue\r\n")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mime")
    srv = MailServer(tmp, overrides={"senderauth": {"enabled": False}, "imap": {"allow_plaintext_auth": True}},
                     listeners=("imap",))
    srv.data_dir.mkdir(parents=True, exist_ok=True)
    directory = Directory(srv.data_dir)
    directory.add_domain("example.test")
    directory.add_user(USER, PASSWORD)
    directory.save()
    message = big_multipart()
    cur = srv.maildir(USER) / "cur"
    cur.mkdir(parents=True, exist_ok=True)
    (cur / "1700000000.M1P1.mime:2,").write_bytes(message)
    srv.start()
    fetch_raw(srv.ports["imap"], "UID")  # the first login's password check is not measured
    yield srv, message
    srv.stop()


def fetch_raw(port: int, items: str) -> tuple[bytes, dict[str, str]]:
    """(the FETCH response with each literal replaced by its size, {label: sha256 of literal})."""
    c = Raw(port)
    try:
        c.line()
        c.sock.sendall(f'a LOGIN "{USER}" "{PASSWORD}"\r\nb EXAMINE INBOX\r\nc FETCH 1 ({items})\r\n'.encode())
        text, got = b"", {}
        while True:
            line = c.line()
            while (m := re.search(rb"(\S+) \{(\d+)\}\r\n$", line)):
                text += line
                got[m.group(1).lstrip(b"(").decode()] = c.literal(int(m.group(2)))
                line = c.line()
            if line.startswith(b"c "):
                assert line.startswith(b"c OK"), line
                return text, got
            assert not line.startswith((b"a NO", b"a BAD", b"b NO", b"b BAD")), line
            text += line
    finally:
        c.close()


class Section:
    """The section grammar's shape that fetch.section_bytes reads."""

    def __init__(self, part: tuple[int, ...], text: str = "", fields: tuple[str, ...] = ()) -> None:
        self.part, self.text, self.fields = part, text, fields


def test_parts_and_structure_of_a_big_message_by_four_clients(world):
    srv, message = world
    root = fetch.parse(message)
    entry = fetch.cache_entry(message)
    items = ("BODYSTRUCTURE BODY.PEEK[1] BODY.PEEK[2] BODY.PEEK[2.MIME] BODY.PEEK[3] BODY.PEEK[3.HEADER] "
             "BODY.PEEK[3.1.1] BODY.PEEK[3.TEXT]<10.1000> BODY.PEEK[9] BODY.PEEK[2]<100.50000>")
    with Peak(srv.proc.pid) as peak:
        got = in_threads(CLIENTS, lambda: fetch_raw(srv.ports["imap"], items))
    want = {f"BODY[{spec}]": sha(fetch.section_bytes(message, root, Section(part, text)))
            for spec, part, text in [("1", (1,), ""), ("2", (2,), ""), ("2.MIME", (2,), "MIME"), ("3", (3,), ""),
                                     ("3.HEADER", (3,), "HEADER"), ("3.1.1", (3, 1, 1), ""), ("9", (9,), "")]}
    want["BODY[3.TEXT]<10>"] = sha(fetch.section_bytes(message, root, Section((3,), "TEXT"))[10:1010])
    want["BODY[2]<100>"] = sha(fetch.section_bytes(message, root, Section((2,), ""))[100:50100])
    for text, literals in got:
        assert literals == want
        assert b"BODYSTRUCTURE " + entry["bs"].encode("latin-1") in text
    assert peak.growth_mib < 3 * len(message) / 2**20, f"server RSS grew {peak.growth_mib:.1f} MiB"
