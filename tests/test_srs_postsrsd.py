"""SRS next to the real thing: Debian's postsrsd (the SRS daemon Postfix sites use) on
loopback with the same secret.  Its addresses and ours must be the same strings, and each
side must reverse the other's."""
from __future__ import annotations

import socket
import subprocess
import time

import pytest

from mailstack.senderauth.srs import SRS
from tests.harness import free_port, wait_for

DOMAIN = "fwd.example.test"
SECRET = b"a shared secret of the test"


@pytest.fixture(scope="module")
def postsrsd(tmp_path_factory):
    secret = tmp_path_factory.mktemp("postsrsd") / "secret"
    secret.write_bytes(SECRET + b"\n")
    fwd, rev = free_port(), free_port()
    proc = subprocess.Popen(["/usr/sbin/postsrsd", "-s", str(secret), "-d", DOMAIN, "-f", str(fwd),
                             "-r", str(rev), "-l", "127.0.0.1", "-4"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def up():
        try:
            socket.create_connection(("127.0.0.1", rev), timeout=1).close()
            return True
        except OSError:
            return False

    wait_for(up, 10, what="postsrsd")
    yield fwd, rev
    proc.terminate()
    proc.wait(10)


def lookup(port: int, address: str) -> str:
    """Postfix tcp_table: "get ADDRESS" -> "200 RESULT" (or 4xx/5xx)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"get {address}\n".encode())
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = s.recv(1000)
            if not chunk:
                break
            reply += chunk
    return reply.decode().strip()


def test_same_addresses_as_postsrsd_both_ways(postsrsd):
    fwd, rev = postsrsd
    ours = SRS([SECRET], DOMAIN)
    cases = {  # sender -> where a bounce to the SRS address goes
        "jane@spfok.test": "jane@spfok.test",
        "Mixed.Case+tag@Example.ORG": "Mixed.Case+tag@Example.ORG",
        # another forwarder's SRS0 becomes SRS1; a bounce goes back to that forwarder
        "SRS0=abcd=TT=orig.test=u@other.test": "SRS0=abcd=TT=orig.test=u@other.test",
        # an SRS1 keeps its first hop, and the bounce skips the middle one
        "SRS1=wxyz=first.test==abcd=TT=orig.test=u@other.test": "SRS0=abcd=TT=orig.test=u@first.test",
    }
    for sender, back in cases.items():
        before = time.time()
        theirs = lookup(fwd, sender)
        assert theirs.startswith("200 "), theirs
        theirs = theirs[4:]
        if int(before // 86400) == int(time.time() // 86400):  # not across midnight
            assert ours.forward(sender) == theirs
        assert ours.reverse(theirs) == back
        assert lookup(rev, ours.forward(sender)) == f"200 {back}"


def test_postsrsd_refuses_what_we_refuse(postsrsd):
    _, rev = postsrsd
    ours = SRS([SECRET], DOMAIN)
    good = ours.forward("jane@spfok.test")
    forged = "SRS0=" + ("AAAA" if good[5:9] != "AAAA" else "BBBB") + good[9:]
    assert lookup(rev, forged).startswith("5")
    with pytest.raises(Exception):
        ours.reverse(forged)
    old = ours.forward("jane@spfok.test", now=time.time() - 40 * 86400)
    assert lookup(rev, old).startswith("5")
    with pytest.raises(Exception, match="expired"):
        ours.reverse(old)
