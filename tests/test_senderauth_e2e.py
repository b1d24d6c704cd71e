"""Sender authentication through the real server process on port 25: real signed mail
(dkimpy RSA and Ed25519, Debian's OpenDKIM, mailstack's own signer), DMARC policies ending
refused / Junk / INBOX, forged Authentication-Results, ARC from a trusted forwarder, SRS
forwarding and its bounce, with every DNS answer from a loopback DNS server."""
from __future__ import annotations

import re
import shutil
import smtplib
import subprocess

import dkim as dkimpy
import pytest

from tests.dnsserver import DNSServer
from tests.harness import HOSTNAME, MailServer, maildir_path, wait_for
from tests.senderauth_fixtures import ed25519_key, message, rsa_key, sign
from tests.smtpsink import Sink, free_port_on

MX = "127.0.0.2"
ALICE = "alice@example.test"
SPF_LOCALHOST = "v=spf1 ip4:127.0.0.1 -all"


def _zone_for_world() -> DNSServer:
    _, rsa_rec = rsa_key()
    _, ed_rec = ed25519_key()
    _, list_rec = rsa_key(2048, seed=1)
    z = DNSServer({
        "remote.test": {"MX": [(10, "mx.remote.test")]},
        "spfok.test": {"MX": [(10, "mx.remote.test")], "TXT": [SPF_LOCALHOST]},
        "mx.remote.test": {"A": [MX]},
        "signer.test": {"TXT": ["v=spf1 -all"]},  # SPF never passes here: DMARC rests on DKIM
        "rsa._domainkey.signer.test": {"TXT": [rsa_rec]},
        "ed._domainkey.signer.test": {"TXT": [ed_rec]},
        "_dmarc.signer.test": {"TXT": ["v=DMARC1; p=reject"]},
        "_dmarc.spfok.test": {"TXT": ["v=DMARC1; p=reject"]},
        "quar.test": {"TXT": ["v=spf1 -all"]},
        "_dmarc.quar.test": {"TXT": ["v=DMARC1; p=quarantine"]},
        "none.test": {"TXT": ["v=spf1 -all"]},
        "_dmarc.none.test": {"TXT": ["v=DMARC1; p=none; rua=mailto:d@none.test"]},
        "reject.test": {"TXT": ["v=spf1 -all"]},
        "_dmarc.reject.test": {"TXT": ["v=DMARC1; p=reject"]},
        "list.test": {"TXT": [SPF_LOCALHOST]},
        "arc._domainkey.list.test": {"TXT": [list_rec]},
        "untrusted.test": {"TXT": [SPF_LOCALHOST]},
        "arc._domainkey.untrusted.test": {"TXT": [list_rec]},
    })
    return z


def _publish(dns: DNSServer, zone_text: str) -> None:
    """Put the records `mailstack dns` printed into the DNS server, as an operator would."""
    for line in zone_text.splitlines():
        if not line or line.startswith(";"):
            continue
        name, _ttl, _in, rtype, value = line.split("\t", 4)
        if rtype == "TXT":
            value = "".join(re.findall(r'"([^"]*)"', value))
        elif rtype == "MX":
            pref, host = value.split()
            value = (int(pref), host)
        dns.add(name, rtype, value)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("senderauth-e2e")
    dns = _zone_for_world().start()
    port = free_port_on(MX)
    sink = Sink(MX, port).start()
    srv = MailServer(tmp_path, overrides={
        "dns": {"nameservers": [dns.address], "timeout": 2.0},
        "delivery": {"port": port, "connect_timeout": 3.0, "command_timeout": 10.0, "tls_security_level": "none"},
        "queue": {"retry_min": 0.3, "retry_max": 1.0},
        "senderauth": {"arc_trusted": ["list.test"], "dns_timeout": 3.0},
    }, listeners=("smtp", "submission"))
    srv.add_domain("example.test")
    srv.add_user(ALICE, "alice-pw")
    srv.cli("alias", "add", "fwd@example.test", "friend@remote.test")
    srv.cli("dkim", "keygen", "example.test")
    # The records the operator is told to publish, with this host's address.
    _publish(dns, srv.cli("dns", "example.test", "--ip", "127.0.0.1").stdout)
    srv.start()
    yield srv, dns, sink
    srv.stop()
    sink.stop()
    dns.stop()


def send25(srv: MailServer, sender: str, rcpt: str, data: bytes) -> tuple[int, str]:
    """One transaction on port 25 from 127.0.0.1; (code, text) of the reply to the data."""
    with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], local_hostname="client.spfok.test", timeout=20) as s:
        try:
            s.sendmail(sender, [rcpt], data)
        except smtplib.SMTPDataError as e:
            return e.smtp_code, e.smtp_error.decode()
        except smtplib.SMTPRecipientsRefused as e:
            code, text = e.recipients[rcpt]
            return code, text.decode()
        return 250, "ok"


def delivered(srv: MailServer, marker: str, folder: str = "INBOX") -> bytes:
    base = maildir_path(srv.data_dir, ALICE)
    box = base if folder == "INBOX" else base / f".{folder}"

    def find():
        for sub in ("new", "cur"):
            d = box / sub
            if d.is_dir():
                for p in d.iterdir():
                    data = p.read_bytes()
                    if marker.encode() in data:
                        return data
        return None

    return wait_for(find, 15, what=f"{marker} in {folder}")


def auth_results(data: bytes) -> str:
    m = re.search(rb"^Authentication-Results: " + re.escape(HOSTNAME.encode()) + rb";(.*?)\r\n(?=\S)", data,
                  re.M | re.S)
    assert m, data[:2000]
    return m.group(1).decode()


def test_dkimpy_rsa_and_ed25519_signatures_pass(world):
    srv, _, _ = world
    pem, _ = rsa_key()
    ed, _ = ed25519_key()
    msg = message("bob@signer.test", subject="rsa-ed-1")
    signed = sign(sign(msg, "signer.test", "rsa", pem), "signer.test", "ed", ed, b"ed25519-sha256")
    assert send25(srv, "bob@signer.test", ALICE, signed)[0] == 250
    ar = auth_results(delivered(srv, "rsa-ed-1"))
    assert "spf=fail" in ar and ar.count("dkim=pass") == 2
    assert "header.d=signer.test header.s=rsa" in ar and "header.s=ed" in ar
    assert "dmarc=pass" in ar and "header.from=signer.test" in ar


def test_altered_body_or_header_fails_and_dmarc_reject_refuses(world):
    srv, _, _ = world
    pem, _ = rsa_key()
    signed = sign(message("bob@signer.test", subject="altered-1"), "signer.test", "rsa", pem)
    for altered in (signed.replace(b"the report", b"the invoice"),
                    signed.replace(b"Subject: altered-1", b"Subject: altered-2")):
        code, text = send25(srv, "bob@signer.test", ALICE, altered)
        assert code == 550 and text.startswith("5.7.1") and "DMARC" in text
    srv.wait_log("dkim=fail:signer.test", "dmarc=fail(reject)")


def test_opendkim_signed_mail_passes(world, tmp_path):
    """Signed by OpenDKIM itself: `opendkim -t` runs the milter's signing code on a file
    (rsa-sha256, relaxed/relaxed), and opendkim-testmsg (which can only sign rsa-sha1)."""
    srv, dns, _ = world
    pem, record = rsa_key(2048, seed=2)
    key = tmp_path / "od.private"
    key.write_bytes(pem)
    dns.add("od._domainkey.signer.test", "TXT", record)
    conf = tmp_path / "opendkim.conf"
    conf.write_text(f"Domain signer.test\nKeyFile {key}\nSelector od\nMode s\nSyslog no\n"
                    "SignatureAlgorithm rsa-sha256\nCanonicalization relaxed/relaxed\nRequireSafeKeys no\n")
    msg = message("carol@signer.test", subject="opendkim-1")
    (tmp_path / "msg.eml").write_bytes(msg)
    out = subprocess.run(["/usr/sbin/opendkim", "-x", str(conf), "-t", str(tmp_path / "msg.eml")],
                         capture_output=True, check=True, timeout=20).stdout.decode()
    value = out.split("DKIM-Signature:", 1)[1].rstrip().replace("\r\n", "\n").replace("\n", "\r\n")
    signed = b"DKIM-Signature:" + value.encode() + b"\r\n" + msg
    assert send25(srv, "carol@signer.test", ALICE, signed)[0] == 250
    ar = auth_results(delivered(srv, "opendkim-1"))
    assert "dkim=pass" in ar and "header.s=od" in ar and "dmarc=pass" in ar
    # opendkim-testmsg signs rsa-sha1, which RFC 8301 says must not count as valid.
    tool = shutil.which("opendkim-testmsg", path="/usr/sbin:/usr/bin")
    sha1 = subprocess.run([tool, "-C", "-d", "signer.test", "-k", str(key), "-s", "od"],
                          input=message("carol@signer.test", subject="opendkim-2"),
                          capture_output=True, check=True, timeout=20).stdout
    assert b"a=rsa-sha1;" in sha1
    code, text = send25(srv, "carol@signer.test", ALICE, sha1)
    assert code == 550 and "DMARC" in text
    srv.wait_log("dkim=permerror:signer.test")


def test_dmarc_quarantine_none_and_reject_end_where_they_must(world):
    srv, _, _ = world
    assert send25(srv, "x@quar.test", ALICE, message("x@quar.test", subject="quar-1"))[0] == 250
    ar = auth_results(delivered(srv, "quar-1", folder="Junk"))
    assert "dmarc=fail" in ar and "dis=QUARANTINE" in ar
    assert send25(srv, "x@none.test", ALICE, message("x@none.test", subject="none-1"))[0] == 250
    assert "dmarc=fail" in auth_results(delivered(srv, "none-1"))
    code, text = send25(srv, "x@reject.test", ALICE, message("x@reject.test", subject="reject-1"))
    assert (code, text) == (550, "5.7.1 Email rejected per DMARC policy for reject.test")
    # SPF alone, aligned, is enough
    assert send25(srv, "y@spfok.test", ALICE, message("y@spfok.test", subject="spfok-1"))[0] == 250
    ar = auth_results(delivered(srv, "spfok-1"))
    assert "spf=pass" in ar and "smtp.mailfrom=y@spfok.test" in ar and "dmarc=pass" in ar


def test_forged_authentication_results_are_removed(world):
    srv, _, _ = world
    forged = (f"Authentication-Results: {HOSTNAME}; dkim=pass header.d=bank.test; dmarc=pass\r\n"
              "Authentication-Results: mx.elsewhere.test; spf=pass\r\n").encode() \
        + message("x@none.test", subject="forged-ar-1")
    assert send25(srv, "x@none.test", ALICE, forged)[0] == 250
    data = delivered(srv, "forged-ar-1")
    assert b"bank.test" not in data
    assert data.count(f"Authentication-Results: {HOSTNAME};".encode()) == 1
    assert b"Authentication-Results: mx.elsewhere.test; spf=pass" in data


def _seal_as(domain: str, msg: bytes) -> bytes:
    """What a mailing list does: change the subject (breaking DKIM), record its own
    Authentication-Results and ARC-seal."""
    pem, _ = rsa_key(2048, seed=1)
    msg = msg.replace(b"Subject: ", b"Subject: [list] ", 1)
    msg = (f"Authentication-Results: {domain}; dkim=pass header.d=signer.test; dmarc=pass; "
           f"arc=none\r\n").encode() + msg
    headers = dkimpy.arc_sign(msg, b"arc", domain.encode(), pem, domain.encode())
    return b"".join(headers) + msg


def test_trusted_arc_overrides_dmarc_failure(world):
    srv, _, _ = world
    pem, _ = rsa_key()
    for sealer, marker in (("list.test", "arc-trusted-1"), ("untrusted.test", "arc-untrusted-1")):
        signed = sign(message("bob@signer.test", subject=marker), "signer.test", "rsa", pem)
        code, text = send25(srv, f"list-bounces@{sealer}", ALICE, _seal_as(sealer, signed))
        if sealer == "list.test":
            assert code == 250, text
            ar = auth_results(delivered(srv, marker))
            assert "arc=pass" in ar and "dmarc=fail" in ar and "trusted ARC seal of list.test" in ar
        else:
            assert code == 550, text
    # A trusted sealer's chain that was altered after sealing does not count.
    signed = sign(message("bob@signer.test", subject="arc-broken-1"), "signer.test", "rsa", pem)
    broken = _seal_as("list.test", signed).replace(b"the report", b"the invoice")
    assert send25(srv, "list-bounces@list.test", ALICE, broken)[0] == 550
    srv.wait_log("arc=fail")


def test_submission_gets_auth_pass_and_own_signed_mail_passes_at_port_25(world):
    srv, _, sink = world
    with smtplib.SMTP("127.0.0.1", srv.ports["submission"], timeout=10) as s:
        s._host = HOSTNAME
        s.starttls(context=srv.client_tls())
        s.login(ALICE, "alice-pw")
        s.sendmail(ALICE, ["dave@remote.test"], message(ALICE, to="dave@remote.test", subject="own-1"))
    got = wait_for(lambda: next((m for m in sink.messages if b"own-1" in m.content), None), 20, what="own-1 at sink")
    assert f"Authentication-Results: {HOSTNAME};\r\n\tauth=pass smtp.auth={ALICE}".encode() in got.content
    assert got.content.startswith(b"DKIM-Signature:")
    # The same bytes coming back in from the internet (from this host's address, which the
    # published SPF allows): the records `mailstack dns` printed make them pass everything.
    with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], local_hostname=HOSTNAME, timeout=20) as s:
        s.sendmail(ALICE, [ALICE], got.content)
    data = delivered(srv, "own-1")
    ar = auth_results(data)
    assert "spf=pass" in ar and "dkim=pass" in ar and "header.d=example.test" in ar and "dmarc=pass" in ar


def test_forwarding_rewrites_sender_with_srs_seals_arc_and_bounces_come_back(world):
    srv, dns, sink = world
    assert send25(srv, "jane@spfok.test", "fwd@example.test",
                  message("jane@spfok.test", to="fwd@example.test", subject="fwd-1"))[0] == 250
    got = wait_for(lambda: next((m for m in sink.messages if b"fwd-1" in m.content), None), 20, what="fwd-1")
    assert got.rcpt_tos == ["friend@remote.test"]
    assert re.fullmatch(r"SRS0=[^=]{4}=[A-Z2-7]{2}=spfok\.test=jane@mail\.example\.test", got.mail_from), got.mail_from
    # The ARC set verifies with the key `mailstack dns` published.
    assert got.content.startswith(b"ARC-Seal: i=1;")

    def lookup(name, timeout=5):
        name = name.decode() if isinstance(name, bytes) else name
        return next(iter(dns.records.get(name.lower().rstrip("."), {}).get("TXT", [])), "").encode() or None

    cv, _, reason = dkimpy.arc_verify(got.content, dnsfunc=lookup)
    assert cv == b"pass", reason
    # The next hop's SPF check of the SRS sender passes with our published records.
    import asyncio

    from mailstack.dns import Resolver
    from mailstack.senderauth import spf
    res = asyncio.run(spf.check_host(Resolver([(dns.host, dns.port)], timeout=2), "127.0.0.1",
                                     "mail.example.test", got.mail_from))
    assert res.result == "pass", res.reason
    # A bounce to the SRS address goes back to the original sender.
    code, _ = send25(srv, "", got.mail_from, b"From: MAILER-DAEMON@remote.test\r\nSubject: bounce-fwd-1\r\n\r\nx\r\n")
    assert code == 250
    bounce = wait_for(lambda: next((m for m in sink.messages if b"bounce-fwd-1" in m.content), None), 20,
                      what="bounce at the original sender")
    assert bounce.rcpt_tos == ["jane@spfok.test"] and bounce.mail_from in ("", "<>")
    # A forged one is refused at RCPT.
    forged = "SRS0=abcd" + got.mail_from[9:]
    code, text = send25(srv, "", forged, b"Subject: forged\r\n\r\nx\r\n")
    assert code == 550


def test_mail_forged_as_our_own_domain_is_flagged_then_junked_once_the_policy_tightens(world):
    """`mailstack dns` suggests DMARC p=none to start with (issue 11): forged mail is
    delivered but marked dmarc=fail; once the operator publishes p=quarantine it goes to Junk."""
    srv, dns, _ = world
    assert send25(srv, "someone@spfok.test", ALICE, message(ALICE, subject="forged-own-1"))[0] == 250
    ar = auth_results(delivered(srv, "forged-own-1"))
    assert "dmarc=fail" in ar and "header.from=example.test" in ar and "dis=NONE" in ar
    dns.remove("_dmarc.example.test", "TXT")
    dns.add("_dmarc.example.test", "TXT", "v=DMARC1; p=quarantine; rua=mailto:postmaster@example.test")
    try:
        assert send25(srv, "someone@spfok.test", ALICE, message(ALICE, subject="forged-own-2"))[0] == 250
        ar = auth_results(delivered(srv, "forged-own-2", folder="Junk"))
        assert "dmarc=fail" in ar and "dis=QUARANTINE" in ar
    finally:
        dns.remove("_dmarc.example.test", "TXT")
        dns.add("_dmarc.example.test", "TXT", "v=DMARC1; p=none; rua=mailto:postmaster@example.test")
