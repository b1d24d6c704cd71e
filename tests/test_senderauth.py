"""senderauth evaluators against a loopback DNS server, and the pure parsers fuzzed."""
from __future__ import annotations

import asyncio
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailstack.dns import Resolver
from mailstack.senderauth import authresults, dkim, dkimpy_speedups, dmarc, spf
from mailstack.senderauth.srs import SRS, SRSError
from tests.dnsserver import DNSServer
from tests.senderauth_fixtures import ed25519_key, message, rsa_key, sign


@pytest.fixture(scope="module")
def zone():
    server = DNSServer().start()
    pem, rec = rsa_key()
    _, ed_rec = ed25519_key()
    weak_pem, weak_rec = rsa_key(768)
    server.add("rsa._domainkey.signer.test", "TXT", rec)
    server.add("ed._domainkey.signer.test", "TXT", ed_rec)
    server.add("weak._domainkey.signer.test", "TXT", weak_rec)
    server.add("_dmarc.signer.test", "TXT", "v=DMARC1; p=reject; sp=quarantine; adkim=r; aspf=s")
    server.add("_dmarc.pct.test", "TXT", "v=DMARC1; p=reject; pct=0")
    server.add("_dmarc.broken.test", "TXT", "v=DMARC1; p=bogus")
    server.add("_dmarc.reportonly.test", "TXT", "v=DMARC1; p=bogus; rua=mailto:r@reportonly.test")
    server.servfail.add("_dmarc.dnsfail.test")
    server.servfail.add("tmp._domainkey.signer.test")
    yield server
    server.stop()


def resolver(zone) -> Resolver:
    return Resolver([(zone.host, zone.port)], timeout=1.0)


def run(coro):
    return asyncio.run(coro)


# --- DKIM -----------------------------------------------------------------------------
def test_rsa_and_ed25519_signatures_pass(zone):
    pem, _ = rsa_key()
    ed, _ = ed25519_key()
    msg = message("bob@signer.test")
    signed = sign(sign(msg, "signer.test", "rsa", pem), "signer.test", "ed", ed, b"ed25519-sha256")
    results, arc = run(dkim.verify(signed, resolver(zone)))
    assert sorted((r.result, r.algorithm) for r in results) == [("pass", "ed25519-sha256"), ("pass", "rsa-sha256")]
    assert arc.result == "none"


def test_altered_body_and_header_fail(zone):
    pem, _ = rsa_key()
    signed = sign(message("bob@signer.test"), "signer.test", "rsa", pem)
    body_changed = signed.replace(b"the report", b"the invoice")
    header_changed = signed.replace(b"Subject: Hello", b"Subject: Hellp")
    (r1,), _ = run(dkim.verify(body_changed, resolver(zone)))
    (r2,), _ = run(dkim.verify(header_changed, resolver(zone)))
    assert (r1.result, r2.result) == ("fail", "fail")
    assert "body hash" in r1.reason


def test_weak_key_sha1_missing_key_and_dns_failure(zone):
    weak_pem, _ = rsa_key(768)
    pem, _ = rsa_key()
    msg = message("bob@signer.test")
    cases = {
        "weak": sign(msg, "signer.test", "weak", weak_pem),
        "sha1": sign(msg, "signer.test", "rsa", pem, b"rsa-sha1"),
        "nokey": sign(msg, "signer.test", "absent", pem),
        "tmp": sign(msg, "signer.test", "tmp", pem),
    }
    got = {k: run(dkim.verify(v, resolver(zone)))[0][0] for k, v in cases.items()}
    assert {k: r.result for k, r in got.items()} == {"weak": "permerror", "sha1": "permerror",
                                                      "nokey": "permerror", "tmp": "temperror"}


def test_length_tag_with_appended_content_is_policy(zone):
    pem, _ = rsa_key()
    signed = sign(message("bob@signer.test"), "signer.test", "rsa", pem, length=True)
    (exact,), _ = run(dkim.verify(signed, resolver(zone)))
    (appended,), _ = run(dkim.verify(signed + b"Click here: http://evil.example/\r\n", resolver(zone)))
    assert exact.result == "pass"
    assert appended.result == "policy"


def test_key_lookups_run_concurrently_and_once(zone):
    pem, _ = rsa_key()
    ed, _ = ed25519_key()
    signed = sign(sign(message("bob@signer.test"), "signer.test", "rsa", pem), "signer.test", "ed", ed,
                  b"ed25519-sha256")
    zone.queries.clear()
    run(dkim.verify(signed, resolver(zone)))
    names = [q[0] for q in zone.queries if q[1] == "TXT"]
    assert sorted(names) == ["ed._domainkey.signer.test", "rsa._domainkey.signer.test"]


# --- DMARC -------------------------------------------------------------------------------
class _D:
    def __init__(self, result, domain):
        self.result, self.domain = result, domain


def test_dmarc_alignment_policy_and_subdomain(zone):
    r = resolver(zone)
    # relaxed DKIM: a subdomain signature aligns; strict SPF: the org domain's SPF does not
    v = run(dmarc.evaluate(r, "signer.test", "signer.test", "fail", [_D("pass", "mail.signer.test")]))
    assert (v.result, v.dkim_aligned, v.spf_aligned) == ("pass", True, False)
    v = run(dmarc.evaluate(r, "signer.test", "bounce.signer.test", "pass", []))
    assert (v.result, v.disposition) == ("fail", "reject")
    # sp= for a subdomain without its own record
    v = run(dmarc.evaluate(r, "news.signer.test", "x.test", "fail", []))
    assert (v.result, v.policy, v.record_domain) == ("fail", "quarantine", "signer.test")


def test_dmarc_pct_missing_broken_and_dns_failure(zone):
    r = resolver(zone)
    v = run(dmarc.evaluate(r, "pct.test", "pct.test", "fail", [], rng=random.Random(1)))
    assert (v.policy, v.disposition) == ("reject", "quarantine")  # not sampled: one step milder
    assert run(dmarc.evaluate(r, "nothing.test", "x", "fail", [])).result == "none"
    assert run(dmarc.evaluate(r, "broken.test", "x", "fail", [])).result == "none"
    v = run(dmarc.evaluate(r, "reportonly.test", "x", "fail", []))
    assert (v.result, v.policy) == ("fail", "none")  # bad p= with a valid rua= is p=none
    assert run(dmarc.evaluate(r, "dnsfail.test", "x", "fail", [])).result == "temperror"


def test_org_domain_from_the_public_suffix_list():
    assert dmarc.org_domain("a.b.example.co.uk") == "example.co.uk"
    assert dmarc.org_domain("mail.example.com") == "example.com"
    assert dmarc.org_domain("co.uk") == "co.uk"
    assert dmarc.aligned("bounces.example.co.uk", "example.co.uk", "r")
    assert not dmarc.aligned("example.co.uk", "other.co.uk", "r")


# --- Authentication-Results --------------------------------------------------------------
def test_strip_only_our_authentication_results():
    msg = (b"Authentication-Results: mail.example.test; dkim=pass header.d=bank.test\r\n"
           b"Authentication-Results: (comment) MAIL.EXAMPLE.TEST.;\r\n\tspf=pass\r\n"
           b"Authentication-Results: mx.other.test; spf=pass\r\n"
           b"Subject: x\r\n\r\nAuthentication-Results: mail.example.test; body stays\r\n")
    out = authresults.strip_ours(msg, "mail.example.test")
    assert out == (b"Authentication-Results: mx.other.test; spf=pass\r\nSubject: x\r\n\r\n"
                   b"Authentication-Results: mail.example.test; body stays\r\n")
    assert authresults.strip_ours(b"Subject: x\r\n\r\nbody", "mail.example.test") is None


def test_header_value_quotes_odd_values():
    value = authresults.header_value("mx.test", [authresults.method("spf", "pass", "ok (fine)",
                                                                    smtp_mailfrom="a b@c.test")])
    assert value == 'mx.test;\r\n\tspf=pass (ok  fine) smtp.mailfrom="a b@c.test"'


def test_our_header_parses_with_authres():
    """Our field must be readable by others (dkimpy's ARC sealing reads it with authres)."""
    import authres

    value = authresults.header_value("mx.test", [
        authresults.method("spf", "pass", "mx.test: domain of a@b.test designates 192.0.2.1", smtp_mailfrom="a@b.test"),
        authresults.method("dkim", "pass", header_d="b.test", header_s="sel", header_i="@b.test", header_b="ab/+cd=="),
        authresults.method("arc", "none"), authresults.method("dmarc", "pass", "p=REJECT dis=NONE", header_from="b.test")])
    parsed = authres.AuthenticationResultsHeader.parse("Authentication-Results: " + value.replace("\r\n", ""))
    assert parsed.authserv_id == "mx.test"
    assert [r.method for r in parsed.results] == ["spf", "dkim", "arc", "dmarc"]
    assert 'header.b="ab/+cd=="' in value


# --- SRS ---------------------------------------------------------------------------------
def test_srs_round_trip_forged_and_expired():
    srs = SRS([b"new", b"old"], "fwd.example.test", max_age=21)
    now = 1_800_000_000
    addr = srs.forward("Jane.Doe@sender.test", now)
    assert addr.startswith("SRS0=") and addr.endswith("@fwd.example.test")
    assert srs.reverse(addr, now + 86400 * 20) == "Jane.Doe@sender.test"
    assert srs.reverse(addr.lower(), now) == "jane.doe@sender.test"  # some MTAs lower-case
    with pytest.raises(SRSError, match="expired"):
        srs.reverse(addr, now + 86400 * 23)
    forged = addr.replace("SRS0=", "SRS0=x", 1)
    with pytest.raises(SRSError):
        srs.reverse(forged, now)
    with pytest.raises(SRSError, match="forged"):
        srs.reverse("SRS0=AAAA=" + addr.split("=", 2)[2], now)
    old_key = SRS([b"old"], "fwd.example.test").forward("x@y.test", now)
    assert srs.reverse(old_key, now) == "x@y.test"  # a rotated key still reverses
    # SRS1: forwarding an SRS0 of another forwarder, and back
    other = SRS([b"k2"], "second.test")
    srs1 = other.forward(addr, now)
    assert srs1.startswith("SRS1=") and srs1.endswith("@second.test")
    assert other.reverse(srs1, now) == addr


# --- fuzzing the pure parsers ----------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec="ascii"), max_size=120))
def test_fuzz_spf_record_parser(tail):
    try:
        record = spf.parse_record("v=spf1 " + tail)
    except spf.PermError:
        return
    assert all(m.name in spf._MECHANISMS for m in record.mechanisms)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from("%{}slodiphcrtvSLODIPHCRTV0123456789r.-+,/_=ab"), max_size=40))
def test_fuzz_spf_macro_expansion(text):
    ctx = spf.MacroContext("user@example.com", "example.com", spf.client_ip("192.0.2.1"), "helo.test")
    try:
        spf._check_macro_string(text)
        spf.expand(text, ctx)
    except spf.PermError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=120))
def test_fuzz_dmarc_record_parser(text):
    for candidate in (text, "v=DMARC1; " + text):
        try:
            rec = dmarc.parse_record(candidate)
        except ValueError:
            continue
        assert rec.p in ("none", "quarantine", "reject") and 0 <= rec.pct <= 100


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.text(max_size=40))
def test_fuzz_authentication_results_stripping(head, value):
    msg = head + b"\r\nAuthentication-Results: " + value.encode() + b"\r\n\r\nbody"
    out = authresults.strip_ours(msg, "mail.example.test")
    if out is not None:
        assert out.endswith(b"\r\n\r\nbody") and len(out) < len(msg)
    authresults.authserv_id(value)


_WSP_TEXT = st.lists(st.sampled_from([b" ", b"\t", b"\r", b"\n", b"\r\n", b"a", b"b "]), max_size=60).map(b"".join)


@settings(max_examples=500, deadline=None)
@given(_WSP_TEXT)
def test_dkimpy_speedups_give_dkimpy_results(content):
    """The replacements of dkimpy's canonicalisation helpers (senderauth/dkim.py) agree with
    the originals on any mix of blanks, tabs and line ends."""
    assert dkimpy_speedups._compress_whitespace(content) == dkimpy_speedups._dkimpy_compress(content)
    assert dkimpy_speedups._strip_trailing_whitespace(content) == dkimpy_speedups._dkimpy_strip_trailing(content)
    assert dkimpy_speedups._unfold_header_value(content) == dkimpy_speedups._dkimpy_unfold(content)


@settings(max_examples=1500, deadline=None)
@given(st.lists(st.sampled_from([b"A: b", b" c", b"\tx", b"", b"From x", b"body", b"\r", b" ", b"A b: c",
                                 b":x", b"B:", b"\x7f:y", b"C\xc3\xa9: d", b"D:e\n f", b"E::"]),
                max_size=12).map(lambda parts: b"\r\n".join(parts)))
def test_dkimpy_message_parse_speedup_gives_dkimpy_results(message):
    try:
        want = dkimpy_speedups._dkimpy_rfc822_parse(message)
    except Exception as e:
        with pytest.raises(type(e)):
            dkimpy_speedups._rfc822_parse(message)
        return
    assert dkimpy_speedups._rfc822_parse(message) == want


_SIG_TEXT = st.lists(st.sampled_from([b";", b" ", b"\t", b"\r\n", b"\n", b"\r", b"b", b"=", b"a", b"Z", b"9",
                                      b"+/", b"bh", b"; b=", b" b =", b"\r\n b=", b"-", b"x="]),
                     max_size=40).map(b"".join)


@settings(max_examples=3000, deadline=None)
@given(_SIG_TEXT)
def test_signature_b_tag_blanking_gives_dkimpy_results(value):
    """The b= blanking pattern (dkimpy_speedups._RE_BTAG) rewrites every signature value as
    dkimpy's own pattern does, folded, unfolded, with several b= or none."""
    for text in (value, value + b"\r\n", b"v=1; " + value):
        assert dkimpy_speedups._RE_BTAG.sub(b"\\1", text) == dkimpy_speedups._dkimpy_re_btag.sub(b"\\1", text)


def test_signature_b_tag_blanking_of_a_real_signature():
    pem, _ = rsa_key()
    signed = sign(message("a@signer.test"), "signer.test", "rsa", pem)
    value = signed.split(b":", 1)[1].split(b"\r\nFrom:")[0] + b"\r\n"
    blanked = dkimpy_speedups._RE_BTAG.sub(b"\\1", value)
    assert blanked == dkimpy_speedups._dkimpy_re_btag.sub(b"\\1", value)
    assert blanked.rstrip().endswith(b"b=") and len(blanked) < len(value) - 300


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.sampled_from([b";", b"=", b" ", b"\t", b"\r\n", b"a", b"Z", b"1", b"_", b"-", b"\xc3\xa9", b"v=1",
                                 b"b=x y", b"; ;"]), max_size=20).map(b"".join))
def test_tag_list_parse_gives_dkimpy_results(value):
    """dkimpy's parse_tag_value as replaced (each value parsed once, no regex) returns what the
    original returns, or raises the same exception with the same argument."""
    try:
        want = dkimpy_speedups._dkimpy_parse_tag_value(value)
    except Exception as e:
        for parse in (dkimpy_speedups._parse_tag_value, dkimpy_speedups._parse_tag_value):  # again: not cached
            with pytest.raises(type(e)) as got:
                parse(value)
            assert got.value.args == e.args
        assert dkim.signature_tags(value) is None
        return
    assert dkimpy_speedups._parse_tag_value(value) == want
    got = dkimpy_speedups._parse_tag_value(value)  # a cached parse, handed out as a fresh copy
    assert got == want
    got[b"mutated"] = b"1"
    assert dkimpy_speedups._parse_tag_value(value) == want
    assert dkim.signature_tags(value) == want


def test_openssl_rsa_verify_agrees_with_dkimpy():
    import hashlib

    import dkim as dkimpy
    from dkim.crypto import parse_pem_private_key

    pem, _ = rsa_key()
    private = parse_pem_private_key(pem)
    public = {"modulus": private["modulus"], "publicExponent": private["publicExponent"]}
    h = dkimpy.HashThrough(hashlib.sha256())
    h.update(b"message")
    signature = dkimpy.RSASSA_PKCS1_v1_5_sign(h, private)
    for sig in (signature, signature[:-1] + bytes([signature[-1] ^ 1])):
        assert dkimpy_speedups._openssl_rsa_verify(h, sig, public) == dkimpy_speedups._dkimpy_rsa_verify(h, sig, public)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_dkim_tag_parser(value):
    tags = dkim.signature_tags(value)
    assert tags is None or isinstance(tags, dict)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_fuzz_srs_reverse(local):
    srs = SRS([b"k"], "fwd.test")
    try:
        srs.reverse(f"SRS0={local}@fwd.test")
        srs.reverse(f"SRS1={local}@fwd.test")
    except SRSError:
        pass


@pytest.mark.parametrize("raw,key", [
    ({"allow": ["not a domain"]}, "senderauth.allow"),
    ({"arc_trusted": ["lists@x.test"]}, "senderauth.arc_trusted"),
    ({"dmarc_policy": "drop"}, "senderauth.dmarc_policy"),
    ({"dns_timeout": 0}, "senderauth.dns_timeout"),
])
def test_bad_senderauth_config_names_the_key(tmp_path, raw, key):
    from mailstack.config import ConfigError, from_dict
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        from_dict({"senderauth": raw}, base=tmp_path)


def test_concurrent_identical_lookups_share_one_query(zone):
    """A burst of sessions asking the same name at once costs the DNS server one query."""
    zone.queries.clear()
    r = resolver(zone)

    async def burst():
        return await asyncio.gather(*(r.records("_dmarc.signer.test", "TXT") for _ in range(20)))

    answers = run(burst())
    assert all(a == answers[0] and a for a in answers)
    assert [q[0] for q in zone.queries].count("_dmarc.signer.test") == 1


@settings(max_examples=300, deadline=None)
@given(st.from_regex(r"\A[A-Za-z ]{0,12}<?[a-z0-9.+_\-]{1,10}@[a-z0-9\-]{1,8}\.[a-z]{2,4}>?\Z"))
def test_from_domain_fast_path_agrees_with_the_email_parser(value):
    """The From: shortcut for plain forms finds the domain the full parser finds."""
    from email.utils import getaddresses

    from mailstack.senderauth.stage import _PLAIN_FROM, _from_domain
    if not _PLAIN_FROM.match(value):
        return
    parsed = [a for _, a in getaddresses([value]) if "@" in a]
    assert len(parsed) == 1
    assert _from_domain([(b"From", b" " + value.encode())]) == parsed[0].rpartition("@")[2].lower()


def test_warm_answers_from_the_resolvers_memory_give_the_same_verdicts(tmp_path):
    """The DATA stage takes keys and DMARC records the resolver still holds (TTL 300) from its
    memory, without a query, a task or a timer: every verdict, header, meta and log field is
    the one the first (cold, asked over the network) pass gave, for names that exist and
    names that do not; a DNS failure (not kept) still goes through the asynchronous look-ups."""
    from mailstack import config as config_mod
    from mailstack.senderauth.stage import SenderAuthStage
    from mailstack.smtp.hooks import Connection, Transaction
    from tests.dnsserver import DNSServer

    pem, rec = rsa_key()
    other_pem, _ = rsa_key(seed=1)
    server = DNSServer(ttl=300).start()
    server.add("rsa._domainkey.signer.test", "TXT", rec)
    server.add("_dmarc.signer.test", "TXT", "v=DMARC1; p=reject; sp=quarantine")
    server.servfail.add("_dmarc.broken.test")
    try:
        cfg = config_mod.from_dict({"server": {"hostname": "mx.example.test", "data_dir": str(tmp_path)}},
                                   base=tmp_path)
        stage = SenderAuthStage(cfg, Resolver([(server.host, server.port)], timeout=2.0))
        conn = Connection(ip="198.51.100.7", listener="smtp", hostname="mx.example.test", helo="out.signer.test")
        good = sign(message("bob@signer.test"), "signer.test", "rsa", pem)
        cases = {
            "pass": good,
            "subdomain": sign(message("bob@mail.signer.test"), "signer.test", "rsa", pem),
            "bad key": sign(message("bob@signer.test"), "signer.test", "rsa", other_pem),
            "altered": good.replace(b"the report", b"THE REPORT"),
            "unsigned, no record": message("eve@nowhere.test"),
            "two signatures": sign(good, "signer.test", "missing", pem),
            "DNS failure": message("eve@broken.test"),
        }

        async def judge(data: bytes):
            txn = Transaction(mail_from="bounces@signer.test")
            txn.state["senderauth"] = {"mailfrom": spf.Result("fail", domain="signer.test"),  # DKIM decides
                                       "helo": spf.Result("none", domain="out.signer.test")}
            v = await stage.data(conn, txn, data)
            return v.reply, v.headers, v.meta, v.log, v.message

        waited = []  # the asynchronous look-ups (tasks, timer), when the memory cannot answer
        lookups = stage._lookups

        async def counted(*args):
            waited.append(args)
            return await lookups(*args)
        stage._lookups = counted

        async def go():
            for name, data in cases.items():
                cold = await judge(data)
                asked, waits = len(server.queries), len(waited)
                warm = await judge(data)
                assert warm == cold, name
                if name == "DNS failure":  # a failure is not kept: asked again, as before
                    assert len(waited) == waits + 1, name
                else:  # names that exist and names that do not: from memory
                    assert len(server.queries) == asked and len(waited) == waits, f"{name}: asked again"
            return [await judge(d) for d in cases.values()]

        results = asyncio.run(go())
        logs = [r[3] for r in results]
        assert logs[0]["dkim"] == "pass:signer.test" and logs[0]["dmarc"] == "pass"
        assert logs[1]["dmarc"] == "pass"  # relaxed alignment, the organisation's record
        assert logs[2]["dkim"] == "fail:signer.test" and logs[2]["dmarc"] == "fail(reject)"
        assert results[2][0].startswith("550 5.7.1")
        assert logs[3]["dkim"].startswith("fail") and logs[4]["dmarc"] == "none"
        assert logs[5]["dkim"].count("signer.test") == 2
        assert logs[6]["dmarc"] == "temperror"
    finally:
        server.stop()


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.sampled_from([b" ", b"\t", b"\r\n ", b"\x1c", b"A", b"b", b"+", b"\xff", b" " * 40]),
                max_size=60).map(b"".join))
def test_b_prefix_is_the_start_of_b_without_white_space(value):
    import re
    assert dkim._b_prefix(value) == re.sub(r"\s+", "", value.decode("ascii", "replace"))[:8]
