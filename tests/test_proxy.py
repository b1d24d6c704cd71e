"""PROXY protocol v1/v2: the parser over bytes, then the real server behind a proxy.

Headers are built here by an encoder written from HAProxy's spec (not by the code under
test), sent over real sockets to a real `mailstack serve`, and finally sent by HAProxy
itself (`send-proxy`, `send-proxy-v2`) in front of the server.
"""
from __future__ import annotations

import imaplib
import ipaddress
import poplib
import shutil
import smtplib
import socket
import ssl
import struct
import subprocess
import time

import pytest
from hypothesis import given, settings, strategies as st

from mailstack import proxy
from mailstack.proxy import ProxyError, parse

from harness import HOSTNAME, MailServer, free_port, wait_for

SIG = b"\r\n\r\n\x00\r\nQUIT\n"


# --- an encoder from the spec, independent of the parser ------------------------------------
def encode_v1(src: tuple[str, int] | None, dst: tuple[str, int] | None = ("127.0.0.1", 25)) -> bytes:
    if src is None:
        return b"PROXY UNKNOWN\r\n"
    fam = "TCP6" if ":" in src[0] else "TCP4"
    return f"PROXY {fam} {src[0]} {dst[0]} {src[1]} {dst[1]}\r\n".encode()


def encode_v2(src: tuple[str, int] | None, dst: tuple[str, int] = ("127.0.0.1", 25), *,
              local: bool = False, tlvs: bytes = b"", family: int | None = None, transport: int = 1,
              version: int = 2) -> bytes:
    command = 0 if local else 1
    if src is None:
        body, fam = b"", 0
    else:
        a, b = ipaddress.ip_address(src[0]), ipaddress.ip_address(dst[0])
        body = a.packed + b.packed + struct.pack("!HH", src[1], dst[1])
        fam = 1 if a.version == 4 else 2
    if family is not None:
        fam = family
    body += tlvs
    return SIG + bytes([(version << 4) | command, (fam << 4) | transport]) + struct.pack("!H", len(body)) + body


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


# --- the parser -------------------------------------------------------------------------------
def test_v1_tcp4_and_tcp6_give_the_client_and_the_exact_length():
    raw = encode_v1(("192.0.2.10", 51234), ("198.51.100.1", 25))
    h = parse(raw + b"EHLO client\r\n")
    assert (h.version, h.length, h.source, h.destination) == (1, len(raw), ("192.0.2.10", 51234),
                                                              ("198.51.100.1", 25))
    raw6 = encode_v1(("2001:db8::7", 65535), ("2001:db8::1", 993))
    h6 = parse(raw6)
    assert h6.source == ("2001:db8::7", 65535) and h6.length == len(raw6)
    longest = b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n"
    assert len(longest) == 104 and parse(longest).length == 104


def test_v1_unknown_carries_no_client():
    assert parse(b"PROXY UNKNOWN\r\n").source is None
    h = parse(b"PROXY UNKNOWN ffff:f::1 ffff:f::2 1 2\r\nQUIT\r\n")
    assert h.source is None and h.length == len(b"PROXY UNKNOWN ffff:f::1 ffff:f::2 1 2\r\n")


def test_v2_proxy_gives_the_client_and_skips_tlvs():
    raw = encode_v2(("203.0.113.9", 40000), ("127.0.0.1", 993),
                    tlvs=tlv(0x01, b"imap") + tlv(0x05, b"unique-id-1"))
    h = parse(raw + b"\x16\x03\x01")  # a TLS record follows at once
    assert (h.version, h.length, h.source, h.destination) == (2, len(raw), ("203.0.113.9", 40000),
                                                              ("127.0.0.1", 993))
    h6 = parse(encode_v2(("2001:db8::9", 1), ("2001:db8::1", 2)))
    assert h6.source == ("2001:db8::9", 1)


@pytest.mark.parametrize("raw", [
    encode_v2(("192.0.2.1", 1), local=True),  # health check: addresses present but ignored
    encode_v2(None, local=True),
    encode_v2(None),  # PROXY with AF_UNSPEC
    SIG + b"\x21\x31" + struct.pack("!H", 216) + b"/tmp/a".ljust(108, b"\0") + b"/tmp/b".ljust(108, b"\0"),
], ids=["local-with-addresses", "local", "unspec", "unix"])
def test_v2_without_an_ip_client(raw):
    h = parse(raw)
    assert h.source is None and h.length == len(raw)


@pytest.mark.parametrize("raw", [
    encode_v1(("192.0.2.10", 51234)),
    encode_v1(None),
    encode_v2(("203.0.113.9", 40000), tlvs=tlv(0x02, b"mail.example.test")),
    encode_v2(None, local=True),
])
def test_every_prefix_of_a_header_needs_more(raw):
    for i in range(len(raw)):
        assert parse(raw[:i]) is None, raw[:i]
    assert parse(raw).length == len(raw)


@pytest.mark.parametrize("raw, reason", [
    (b"EHLO client\r\n", "not a PROXY"),
    (b"PROXZ TCP4", "not a PROXY"),
    (b"\r\n\r\n\x00\r\nQUIx", "not a PROXY"),
    (b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\n", "CRLF"),
    (b"PROXY TCP4 " + b"1" * 100, "longer than 107"),
    (b"PROXY TCP4 192.0.2.1 192.0.2.2 1\r\n", "TCP4|TCP6"),
    (b"PROXY TCP5 192.0.2.1 192.0.2.2 1 2\r\n", "TCP4|TCP6"),
    (b"PROXY TCP4 2001:db8::1 192.0.2.2 1 2\r\n", "not TCP4"),
    (b"PROXY TCP6 192.0.2.1 2001:db8::2 1 2\r\n", "not TCP6"),
    (b"PROXY TCP4 192.0.2.01 192.0.2.2 1 2\r\n", "not TCP4"),
    (b"PROXY TCP4 192.0.2.1 192.0.2.2 65536 2\r\n", "port"),
    (b"PROXY TCP4 192.0.2.1 192.0.2.2 -1 2\r\n", "port"),
    (b"PROXY TCP4 192.0.2.1 192.0.2.2 01 2\r\n", "port"),
    (b"PROXY TCP4  192.0.2.1 192.0.2.2 1 2\r\n", "TCP4|TCP6"),
    (encode_v2(("192.0.2.1", 1), version=1), "version 1"),
    (SIG + b"\x22\x11\x00\x0c" + bytes(12), "unknown command"),
    (SIG + b"\x21\x11" + struct.pack("!H", 5000), "at most"),
    (encode_v2(("192.0.2.1", 1), transport=2), "datagram"),
    (SIG + b"\x21\x11\x00\x04" + bytes(4), "too short"),
    (SIG + b"\x21\x51\x00\x00", "unknown address family"),
])
def test_bad_headers_are_refused_with_a_reason(raw, reason):
    with pytest.raises(ProxyError, match=reason):
        parse(raw)


@settings(max_examples=400, deadline=None)
@given(st.one_of(
    st.binary(max_size=300),
    st.builds(lambda b, cut: b[:cut], st.sampled_from([encode_v1(("192.0.2.1", 2)), encode_v2(("192.0.2.1", 2))]),
              st.integers(0, 40)).flatmap(lambda p: st.binary(max_size=80).map(lambda tail: p + tail)),
    st.binary(max_size=200).map(lambda b: SIG + b),
    st.binary(max_size=120).map(lambda b: b"PROXY " + b),
))
def test_parser_fuzz(data):
    """Any bytes: a header, "need more" or ProxyError; never another exception, never more
    bytes than given or than the bound, and the same answer from exactly the header's bytes."""
    try:
        h = parse(data)
    except ProxyError:
        return
    if h is None:
        assert len(data) < proxy.MAX_HEADER
        return
    assert 0 < h.length <= min(len(data), proxy.MAX_HEADER)
    assert parse(data[:h.length]) == h


# --- the real server behind a proxy -------------------------------------------------------------
PROXY_IP = "127.0.0.1"  # trusted; connections from 127.0.0.2 are someone else
ELSEWHERE = "127.0.0.2"


@pytest.fixture(scope="module", params=["uvloop", "asyncio"])
def server(request, tmp_path_factory):
    srv = MailServer(tmp_path_factory.mktemp(f"proxy-{request.param}"), loop=request.param, overrides={
        "proxy": {"trusted": [f"{PROXY_IP}/32"], "timeout": 1.0},
        # The proxy's own address may relay: a client behind it must still not.
        "smtp": {"trusted_networks": ["192.0.2.0/24", f"{PROXY_IP}/32"], "max_connections_per_ip": 2},
        "delivery": {"outbound": False},
    })
    srv.add_domain("example.test")
    srv.add_user("alice@example.test", "secret")
    srv.start()
    yield srv
    assert srv.stop() == 0


def connect(port: int, header: bytes = b"", source: str = PROXY_IP, timeout: float = 10) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0))
    if header:
        sock.sendall(header)
    return sock


class ProxiedSMTP(smtplib.SMTP):
    def __init__(self, port: int, header: bytes, source: str = PROXY_IP):
        self.proxy_header, self.source = header, source
        super().__init__("127.0.0.1", port, timeout=10, local_hostname="client.example")

    def _get_socket(self, host, port, timeout):
        return connect(port, self.proxy_header, self.source, timeout)


class ProxiedSMTP_SSL(smtplib.SMTP_SSL):
    def __init__(self, port: int, header: bytes, context: ssl.SSLContext):
        self.proxy_header = header
        super().__init__("127.0.0.1", port, timeout=10, context=context)

    def _get_socket(self, host, port, timeout):
        return self.context.wrap_socket(connect(port, self.proxy_header, PROXY_IP, timeout))


class ProxiedIMAP4_SSL(imaplib.IMAP4_SSL):
    def __init__(self, port: int, header: bytes, context: ssl.SSLContext, source: str = PROXY_IP):
        self.proxy_header, self.source = header, source
        super().__init__("127.0.0.1", port, ssl_context=context, timeout=10)

    def _create_socket(self, timeout):
        return self.ssl_context.wrap_socket(connect(self.port, self.proxy_header, self.source))


class ProxiedPOP3_SSL(poplib.POP3_SSL):
    def __init__(self, port: int, header: bytes, context: ssl.SSLContext):
        self.proxy_header = header
        super().__init__("127.0.0.1", port, context=context, timeout=10)

    def _create_socket(self, timeout):
        return self.context.wrap_socket(connect(self.port, self.proxy_header, PROXY_IP))


def rcpt_reply(port: int, header: bytes, rcpt: str = "someone@remote.example") -> tuple[int, bytes]:
    with ProxiedSMTP(port, header) as smtp:
        smtp.ehlo("client.example")
        assert smtp.mail("sender@remote.example")[0] == 250
        return smtp.rcpt(rcpt)


def wait_log(srv: MailServer, text: str, client: str | None = None, timeout: float = 10) -> str:
    """The first log line with `text` (and, if given, naming `client` as the client)."""
    tag = f"[{client}] " if client else ""
    return wait_for(lambda: next((line for line in srv.log().splitlines() if text in line and tag in line), None),
                    timeout, what=f"log line with {tag}{text!r}")


@pytest.mark.parametrize("encode", [encode_v1, encode_v2], ids=["v1", "v2"])
def test_relay_decision_uses_the_client_behind_the_proxy(server, encode):
    port = server.ports["smtp"]
    assert rcpt_reply(port, encode(("192.0.2.10", 40001)))[0] == 250  # a trusted network behind the proxy
    code, text = rcpt_reply(port, encode(("198.51.100.7", 40002)))
    assert code == 554 and b"Relay access denied" in text  # the proxy's own trust is not lent out
    line = wait_log(server, "reject: RCPT from=<sender@remote.example> to=<someone@remote.example>", "198.51.100.7")
    assert PROXY_IP not in line


def test_v2_local_and_v1_unknown_mean_the_proxy_itself(server):
    port = server.ports["smtp"]
    assert rcpt_reply(port, encode_v2(("198.51.100.7", 1), local=True))[0] == 250  # 127.0.0.1 may relay
    assert rcpt_reply(port, encode_v1(None))[0] == 250


def test_received_header_names_the_real_client(server):
    with ProxiedSMTP(server.ports["smtp"], encode_v2(("203.0.113.77", 45000), tlvs=tlv(0x05, b"id-1"))) as smtp:
        smtp.sendmail("sender@remote.example", ["alice@example.test"],
                      b"Subject: via proxy\r\nMessage-ID: <proxy-received@test>\r\n\r\nhello\r\n")
    msg = wait_for(lambda: next((m for m in server.inbox_messages("alice@example.test")
                                 if b"<proxy-received@test>" in m), None), what="delivery")
    received = msg.split(b"\r\n\r\n", 1)[0].split(b"Received:")[1]
    assert b"[203.0.113.77]" in received and PROXY_IP.encode() not in received


def test_connection_limit_per_ip_counts_the_real_client(server):
    port = server.ports["smtp"]
    first = ProxiedSMTP(port, encode_v1(("203.0.113.5", 1)))
    second = ProxiedSMTP(port, encode_v2(("203.0.113.5", 2)))
    try:
        with pytest.raises(smtplib.SMTPConnectError) as refused:
            ProxiedSMTP(port, encode_v1(("203.0.113.5", 3)))
        assert refused.value.smtp_code == 421
        with ProxiedSMTP(port, encode_v1(("203.0.113.6", 4))) as other:  # same proxy, other client
            assert other.noop()[0] == 250
    finally:
        first.quit()
        second.quit()


@pytest.mark.parametrize("listener, expect", [
    ("smtp", b"500 5.5.1"), ("submission", b"500 5.5.1"), ("imap", b"PROXY BAD"), ("pop3", b"-ERR"),
])
def test_a_proxy_header_from_anyone_else_is_a_protocol_error(server, listener, expect):
    with connect(server.ports[listener], source=ELSEWHERE) as sock:
        f = sock.makefile("rb")
        greeting = f.readline()
        assert greeting[:3] in (b"220", b"* O", b"+OK"), greeting
        sock.sendall(encode_v1(("192.0.2.10", 40001)))
        assert f.readline().startswith(expect)


def test_implicit_tls_from_anyone_else_is_plain_tls(server):
    with ProxiedIMAP4_SSL(server.ports["imaps"], b"", server.client_tls(), source=ELSEWHERE) as imap:
        assert imap.login("alice@example.test", "secret")[0] == "OK"
    wait_log(server, "IMAP login alice@example.test", ELSEWHERE)
    # ... and a PROXY header in front of their TLS is junk to the TLS layer.
    with connect(server.ports["imaps"], encode_v2(("192.0.2.10", 1)), source=ELSEWHERE) as sock:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            server.client_tls().wrap_socket(sock).recv(100)


@pytest.mark.parametrize("listener", ["smtp", "imaps"])
def test_a_trusted_proxy_must_send_a_header(server, listener):
    with connect(server.ports[listener]) as sock:
        sock.sendall(b"EHLO client.example\r\n" if listener == "smtp" else b"\x16\x03\x01\x00\xa0\x01")
        assert _read_until_closed(sock) == b""  # not one byte of banner or TLS
    wait_log(server, f"closing connection from trusted proxy on {listener}: not a PROXY protocol header")


def test_a_trusted_proxy_that_stays_silent_is_cut_off(server):
    started = time.monotonic()
    with connect(server.ports["pop3"]) as sock:
        assert _read_until_closed(sock) == b""
    assert time.monotonic() - started < 5  # proxy.timeout = 1
    wait_log(server, "closing connection from trusted proxy on pop3: no PROXY header within 1s")


def _read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def test_submissions_behind_the_proxy(server):
    with ProxiedSMTP_SSL(server.ports["submissions"], encode_v1(("198.51.100.20", 5000)),
                         server.client_tls()) as smtp:
        with pytest.raises(smtplib.SMTPAuthenticationError):
            smtp.login("alice@example.test", "wrong")
        assert smtp.login("alice@example.test", "secret")[0] == 235
    # The failure (and the throttling that follows it) is the client's, not the proxy's.
    wait_log(server, "AUTH PLAIN failed for 'alice@example.test'", "198.51.100.20")
    wait_log(server, "AUTH PLAIN: alice@example.test", "198.51.100.20")


def test_imaps_behind_the_proxy(server):
    header = encode_v2(("2001:db8::42", 6000), ("::1", 993), tlvs=tlv(0x01, b"imap"))
    with ProxiedIMAP4_SSL(server.ports["imaps"], header, server.client_tls()) as imap:
        with pytest.raises(imaplib.IMAP4.error):
            imap.login("alice@example.test", "wrong")
        assert imap.login("alice@example.test", "secret")[0] == "OK"
        assert imap.select("INBOX")[0] == "OK"
    wait_log(server, "login failed: protocol=imap user=<alice@example.test>", "2001:db8::42")
    wait_log(server, "IMAP login alice@example.test", "2001:db8::42")


def test_pop3s_behind_the_proxy(server):
    pop = ProxiedPOP3_SSL(server.ports["pop3s"], encode_v1(("192.0.2.99", 7000)), server.client_tls())
    try:
        pop.user("alice@example.test")
        with pytest.raises(poplib.error_proto):
            pop.pass_("wrong")
    finally:
        pop.close()
    wait_log(server, "login failed: protocol=pop3 user=<alice@example.test>", "192.0.2.99")


def test_bytes_right_after_the_header_reach_the_session(server):
    """The header, the client's first bytes and (for implicit TLS) its ClientHello arrive in
    one segment: not one byte past the header may be swallowed."""
    with connect(server.ports["smtp"]) as sock:
        sock.sendall(encode_v1(("192.0.2.10", 1)) + b"EHLO early.example\r\nNOOP\r\n")
        f = sock.makefile("rb")
        lines = [f.readline() for _ in range(3)]
        assert lines[0].startswith(b"220 ")
        assert lines[1].startswith(b"250-") and lines[2].startswith(b"250-")
    ctx = server.client_tls()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=HOSTNAME)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    with connect(server.ports["imaps"]) as sock:
        sock.sendall(encode_v2(("192.0.2.11", 2)) + outgoing.read())  # header + ClientHello at once
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if out := outgoing.read():
                    sock.sendall(out)
                data = sock.recv(65536)
                assert data, "server closed during the handshake"
                incoming.write(data)
        if out := outgoing.read():
            sock.sendall(out)
        greeting = b""
        while b"\r\n" not in greeting:
            try:
                greeting += tls.read(4096)
            except ssl.SSLWantReadError:
                incoming.write(sock.recv(65536))
        assert greeting.startswith(b"* OK")


# --- HAProxy in front of the server ------------------------------------------------------------
@pytest.fixture(scope="module")
def behind_haproxy(tmp_path_factory):
    haproxy = shutil.which("haproxy")
    assert haproxy, "haproxy is needed for this test: apt-get install -y haproxy"
    srv = MailServer(tmp_path_factory.mktemp("haproxy"), loop="uvloop", overrides={
        "proxy": {"trusted": ["127.0.0.1/32"]},
        "smtp": {"trusted_networks": ["127.0.0.1/32", "127.0.0.3/32"]},
        "delivery": {"outbound": False},
    })
    srv.add_domain("example.test")
    srv.add_user("alice@example.test", "secret")
    srv.start()
    front = {"smtp": free_port(), "imaps": free_port()}
    cfg = srv.dir / "haproxy.cfg"
    cfg.write_text(f"""
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend smtp_in
    bind 127.0.0.1:{front["smtp"]}
    default_backend smtp_out
backend smtp_out
    server mailstack 127.0.0.1:{srv.ports["smtp"]} send-proxy
frontend imaps_in
    bind 127.0.0.1:{front["imaps"]}
    default_backend imaps_out
backend imaps_out
    server mailstack 127.0.0.1:{srv.ports["imaps"]} send-proxy-v2
""")
    proc = subprocess.Popen([haproxy, "-db", "-f", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def listening():
        assert proc.poll() is None, proc.stdout.read().decode(errors="replace")
        try:
            for port in front.values():
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    try:
        wait_for(listening, 15, what="haproxy to listen")
        yield srv, front
    finally:
        proc.terminate()
        proc.wait(10)
        assert srv.stop() == 0


class SMTPFrom(smtplib.SMTP):
    """smtplib from a chosen loopback source address (the client as HAProxy sees it)."""

    def __init__(self, port: int, source: str):
        super().__init__("127.0.0.1", port, timeout=10, source_address=(source, 0))


def test_haproxy_send_proxy_smtp(behind_haproxy):
    srv, front = behind_haproxy
    with SMTPFrom(front["smtp"], "127.0.0.2") as smtp:
        smtp.ehlo("client.example")
        smtp.mail("sender@remote.example")
        # HAProxy (127.0.0.1) may relay; the client behind it (127.0.0.2) may not.
        assert smtp.rcpt("someone@remote.example")[0] == 554
        assert smtp.rcpt("alice@example.test")[0] == 250
        smtp.data(b"Subject: through haproxy\r\nMessage-ID: <haproxy@test>\r\n\r\nhi\r\n")
    with SMTPFrom(front["smtp"], "127.0.0.3") as smtp:  # a trusted network, behind HAProxy
        smtp.ehlo("client.example")
        smtp.mail("sender@remote.example")
        assert smtp.rcpt("someone@remote.example")[0] == 250
    msg = wait_for(lambda: next((m for m in srv.inbox_messages("alice@example.test") if b"<haproxy@test>" in m),
                                None), what="delivery through haproxy")
    assert b"[127.0.0.2]" in msg.split(b"\r\n\r\n", 1)[0]
    wait_log(srv, "reject: RCPT from=<sender@remote.example> to=<someone@remote.example>", "127.0.0.2")


def test_haproxy_send_proxy_v2_imaps(behind_haproxy):
    srv, front = behind_haproxy
    sock = socket.create_connection(("127.0.0.1", front["imaps"]), timeout=10, source_address=("127.0.0.2", 0))

    class FromSocket(imaplib.IMAP4_SSL):
        def _create_socket(self, timeout):
            return self.ssl_context.wrap_socket(sock)

    with FromSocket("127.0.0.1", front["imaps"], ssl_context=srv.client_tls(), timeout=10) as imap:
        assert imap.login("alice@example.test", "secret")[0] == "OK"
    wait_log(srv, "IMAP login alice@example.test", "127.0.0.2")
