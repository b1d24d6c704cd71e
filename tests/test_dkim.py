"""DKIM keys, signing, and the `dkim keygen` / `dns` commands."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import dkim as dkimpy
import pytest

from mailstack import dkim as msdkim
from mailstack import dnsrecords
from mailstack.config import from_dict
from tests.dnsserver import DNSServer

MSG = (b"From: Alice <alice@local.test>\r\nTo: bob@remote.test\r\nSubject: hi\r\n"
       b"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\nMessage-ID: <k@local.test>\r\n\r\nbody\r\n")


def txt_lookup(server: DNSServer):
    import dns.nameserver
    import dns.resolver
    r = dns.resolver.Resolver(configure=False)
    host, port = server.address.rsplit(":", 1)
    r.nameservers = [dns.nameserver.Do53Nameserver(host, int(port))]
    r.lifetime = 3

    def get_txt(name: bytes, timeout: float = 5):
        try:
            return b"".join(b"".join(rr.strings) for rr in r.resolve(name.decode().rstrip("."), "TXT"))
        except dns.exception.DNSException:
            return None
    return get_txt


def test_keygen_writes_a_private_key_and_refuses_to_overwrite(tmp_path):
    path = msdkim.generate_key(tmp_path, "Local.Test", "mail", bits=1024)
    assert path == tmp_path / "dkim" / "local.test.mail.key"
    assert (path.stat().st_mode & 0o777) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    with pytest.raises(FileExistsError):
        msdkim.generate_key(tmp_path, "local.test", "mail")
    before = path.read_bytes()
    msdkim.generate_key(tmp_path, "local.test", "mail", bits=1024, force=True)
    assert path.read_bytes() != before
    rec = msdkim.public_record(path.read_bytes())
    assert re.fullmatch(r"v=DKIM1; k=rsa; p=[A-Za-z0-9+/=]+", rec)


def test_signature_verifies_via_loopback_dns(tmp_path):
    msdkim.generate_key(tmp_path, "local.test", "s1", bits=1024)
    signer = msdkim.DKIMSigner(tmp_path, "s1")
    sig = signer.sign(MSG)
    assert sig.startswith(b"DKIM-Signature: ") and sig.endswith(b"\r\n")
    with DNSServer({"s1._domainkey.local.test": {"TXT": [msdkim.public_record(signer.key_for("local.test")[1])]}}) as dns:
        get_txt = txt_lookup(dns)
        assert dkimpy.verify(sig + MSG, dnsfunc=get_txt)
        assert not dkimpy.verify(sig + MSG.replace(b"Subject: hi", b"Subject: changed"), dnsfunc=get_txt)
    # From is oversigned: a second From added later breaks the signature.
    tags = re.sub(rb"\s+", b"", sig.split(b":", 1)[1]).decode()
    signed = dict(t.split("=", 1) for t in tags.split(";") if t)["h"].lower().split(":")
    assert signed.count("from") == 2 and "subject" in signed and "message-id" in signed


def test_selector_choice(tmp_path):
    msdkim.generate_key(tmp_path, "local.test", "old", bits=1024)
    signer = msdkim.DKIMSigner(tmp_path, "mail")
    assert signer.key_for("local.test")[0] == "old"  # the only key
    time.sleep(0.01)  # distinct mtimes for "newest key" below; not a wait for a condition
    msdkim.generate_key(tmp_path, "local.test", "new", bits=1024)
    os.utime(tmp_path / "dkim", None)
    assert signer.key_for("local.test")[0] == "new"  # newest wins while the configured one is absent
    msdkim.generate_key(tmp_path, "local.test", "mail", bits=1024)
    os.utime(tmp_path / "dkim" / "local.test.mail.key", (1, 1))  # older, but configured: preferred
    assert signer.key_for("local.test")[0] == "mail"
    assert b"s=mail" in signer.sign(MSG)


def test_what_is_not_signed(tmp_path):
    msdkim.generate_key(tmp_path, "local.test", "mail", bits=1024)
    signer = msdkim.DKIMSigner(tmp_path, "mail", is_local_domain=lambda d: d == "local.test")
    assert signer.sign(MSG)
    assert signer.sign(MSG.replace(b"alice@local.test", b"alice@other.test")) == b""  # no key, not local
    assert msdkim.DKIMSigner(tmp_path, "mail", is_local_domain=lambda d: False).sign(MSG) == b""
    two_froms = b"From: a@local.test\r\n" + MSG
    assert signer.sign(two_froms) == b""
    assert signer.sign(b"Subject: no from\r\n\r\nx\r\n") == b""
    assert msdkim.from_domain(b"From: =?utf-8?q?J=C3=B6rg?= <j@B\xc3\xbccher.test>\r\n") == "xn--bcher-kva.test"


def test_dns_records(tmp_path):
    cfg = from_dict({"server": {"hostname": "mx.local.test", "data_dir": str(tmp_path)},
                     "delivery": {"relayhost": "[192.0.2.7]:587"}}, base=tmp_path)
    recs, notes = dnsrecords.records(cfg, "local.test", ["198.51.100.4"])
    by_type = {(r.name, r.type): r.value for r in recs}
    assert by_type[("local.test.", "MX")] == "10 mx.local.test."
    assert by_type[("mx.local.test.", "A")] == "198.51.100.4"
    assert by_type[("local.test.", "TXT")] == '"v=spf1 mx ip4:192.0.2.7 -all"'
    assert by_type[("_dmarc.local.test.", "TXT")] == '"v=DMARC1; p=none; rua=mailto:postmaster@local.test"'
    assert by_type[("4.100.51.198.in-addr.arpa.", "PTR")] == "mx.local.test."
    assert any("dkim keygen" in n for n in notes)
    msdkim.generate_key(tmp_path, "local.test", "mail", bits=2048)
    recs, _ = dnsrecords.records(cfg, "local.test")
    dkim_value = {(r.name, r.type): r.value for r in recs}[("mail._domainkey.local.test.", "TXT")]
    strings = re.findall(r'"([^"]*)"', dkim_value)
    assert all(len(s) <= 255 for s in strings) and len(strings) > 1
    assert "".join(strings) == msdkim.public_record((tmp_path / "dkim" / "local.test.mail.key").read_bytes())


def run_cli(config, *args):
    return subprocess.run([sys.executable, "-m", "mailstack", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=60)


def run_main(capsys, config, *args):
    """The same CLI, in-process (a subprocess per call costs a second of imports)."""
    from mailstack.cli import main
    try:
        code = main([*args, "--config", str(config)])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def test_cli_keygen_and_dns(tmp_path, capsys):
    config = tmp_path / "config.toml"
    config.write_text(f'[server]\nhostname = "mx.local.test"\ndata_dir = "{tmp_path / "data"}"\n'
                      f'[dkim]\nselector = "sel1"\n')
    r = run_cli(config, "dkim", "keygen", "local.test")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "data" / "dkim" / "local.test.sel1.key").exists()
    assert "sel1._domainkey.local.test." in r.stdout
    assert "not a local domain" in r.stderr
    again = run_main(capsys, config, "dkim", "keygen", "local.test")
    assert again.returncode == 1 and "exists" in again.stderr
    r = run_main(capsys, config, "dkim", "keygen", "local.test", "--selector", "bad.sel")
    assert r.returncode == 2
    d = run_main(capsys, config, "dns", "local.test", "--ip", "192.0.2.1")
    assert d.returncode == 0, d.stderr
    assert "local.test.\t3600\tIN\tMX\t10 mx.local.test." in d.stdout
    assert "sel1._domainkey.local.test." in d.stdout and "v=DKIM1; k=rsa; p=" in d.stdout
    assert "_dmarc.local.test." in d.stdout and "1.2.0.192.in-addr.arpa." in d.stdout
    # The record printed by keygen is the one that verifies signatures made with the key.
    value = "".join(re.findall(r'"([^"]*)"', [l for l in d.stdout.splitlines() if "_domainkey" in l][0]))
    signer = msdkim.DKIMSigner(tmp_path / "data", "sel1")
    with DNSServer({"sel1._domainkey.local.test": {"TXT": [value]}}) as dns:
        assert dkimpy.verify(signer.sign(MSG) + MSG, dnsfunc=txt_lookup(dns))
    assert run_main(capsys, config, "dns", "local.test", "--ip", "nope").returncode == 2
