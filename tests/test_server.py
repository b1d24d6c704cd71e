"""The process: start-up errors, self-signed certificate, SIGHUP reload, SIGTERM stop."""
import smtplib
import socket
import ssl
import subprocess
import sys
import time

import pytest

from harness import MailServer, wait_for


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_first_start_makes_self_signed_cert_and_says_so(tmp_path):
    with MailServer(tmp_path) as srv:
        srv.start()
        assert srv.cert_path.exists()
        srv.wait_log("self-signed")
        key = srv.data_dir / "tls" / "key.pem"
        assert key.stat().st_mode & 0o077 == 0
        # every implicit-TLS listener presents it, with TLS >= 1.2 only
        for name in ("submissions", "imaps", "pop3s"):
            with socket.create_connection(("127.0.0.1", srv.ports[name])) as raw:
                with srv.client_tls(check_hostname=True).wrap_socket(raw, server_hostname="mail.example.test") as tls:
                    assert tls.version() in ("TLSv1.2", "TLSv1.3")
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.check_hostname, old.verify_mode = False, ssl.CERT_NONE
        old.maximum_version = ssl.TLSVersion.TLSv1_1
        old.minimum_version = ssl.TLSVersion.TLSv1
        try:
            old.set_ciphers("ALL:@SECLEVEL=0")
        except ssl.SSLError:
            pass
        with socket.create_connection(("127.0.0.1", srv.ports["submissions"])) as raw:
            with pytest.raises((ssl.SSLError, ConnectionResetError)):
                old.wrap_socket(raw, server_hostname="mail.example.test")
        assert srv.stop() == 0


def test_port_in_use_stops_start_with_one_line(tmp_path):
    srv = MailServer(tmp_path)
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", srv.ports["imap"]))
    blocker.listen()
    try:
        r = subprocess.run([sys.executable, "-m", "mailstack", "serve", "--config", str(srv.config_path)],
                           capture_output=True, text=True, timeout=60)
    finally:
        blocker.close()
    assert r.returncode != 0
    errors = [l for l in r.stderr.splitlines() if "cannot start" in l]
    assert len(errors) == 1, r.stderr
    assert f"listen.imap: cannot listen on 127.0.0.1:{srv.ports['imap']}: address already in use" in errors[0]


def test_bad_config_at_start_exits_nonzero_naming_key(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[smtp]\nmax_recipients = -1\n')
    r = subprocess.run([sys.executable, "-m", "mailstack", "serve", "--config", str(p)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert r.stderr.strip().count("\n") == 0 and "smtp.max_recipients" in r.stderr


def _banner_and_cert(port, srv):
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port)) as raw:
        with ctx.wrap_socket(raw) as tls:
            return tls.getpeercert(binary_form=True)


def test_sighup_reloads_cert_and_refuses_bad_config(tmp_path):
    from mailstack.tls import make_self_signed
    with MailServer(tmp_path) as srv:
        srv.start()
        port = srv.ports["submissions"]
        # a session open across the reload keeps working
        s = smtplib.SMTP_SSL("127.0.0.1", port, context=srv.client_tls(), timeout=10)
        s.ehlo("client.test")
        first = _banner_and_cert(port, srv)
        make_self_signed(srv.cert_path, srv.data_dir / "tls" / "key.pem", "mail.example.test")
        srv.hup()
        wait_for(lambda: _banner_and_cert(port, srv) != first, what="new certificate served")
        assert s.noop()[0] == 250
        # a broken config is refused, the server keeps running with the old one
        good = srv.config_path.read_text()
        srv.config_path.write_text(good + "\n[smtp]\nmax_recipients = 0\n")
        srv.hup()
        wait_for(lambda: "reload refused" in srv.log(), what="reload refusal logged")
        assert "smtp.max_recipients" in [l for l in srv.log().splitlines() if "reload refused" in l][0]
        assert s.noop()[0] == 250
        s.quit()
        assert srv.stop() == 0


def test_sigterm_exits_zero_quickly(tmp_path):
    with MailServer(tmp_path) as srv:
        srv.start()
        t0 = time.monotonic()
        assert srv.stop() == 0
        assert time.monotonic() - t0 < 5


def test_running_server_picks_up_cli_changes_without_restart(tmp_path):
    with MailServer(tmp_path, listeners=("smtp",)) as srv:
        srv.add_domain("example.test")
        srv.start()

        def rcpt(addr):
            with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=10) as s:
                s.ehlo("client.test")
                s.mail("someone@remote.test")
                return s.rcpt(addr)[0]

        assert rcpt("carol@example.test") == 550
        assert rcpt("x@new.test") == 554  # not a local domain: relay denied
        srv.add_user("carol@example.test", "pw")
        srv.add_domain("new.test")
        srv.cli("alias", "add", "@new.test", "carol@example.test")
        wait_for(lambda: rcpt("carol@example.test") == 250, what="new account accepted")
        wait_for(lambda: rcpt("x@new.test") == 250, what="new domain's catch-all accepted")
        srv.cli("user", "del", "carol@example.test")
        wait_for(lambda: rcpt("carol@example.test") == 550, what="deleted account refused")
        assert srv.stop() == 0
