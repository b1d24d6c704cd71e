"""The operator's CLI: accounts validated before anything is written, weak passwords refused,
a cut or non-UTF-8 accounts file keeps the last good directory, an open-relay network refused
at start, `config check KEY` / `-n` like postconf, --help everywhere, one-line errors."""
from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import MailServer, wait_for
from mailstack import cli as cli_mod
from mailstack import config as config_mod
from mailstack import dnsrecords
from mailstack.directory import Directory, DirectoryError


def mailstack(tmp_path, *args, input=None, config=None):
    cfg = tmp_path / "c.toml"
    if not cfg.exists():
        cfg.write_text(config or f'[server]\ndata_dir = "{tmp_path / "data"}"\nhostname = "mx.example.test"\n')
    return subprocess.run([sys.executable, "-m", "mailstack", *args, "--config", str(cfg)],
                          input=input, capture_output=True, text=True, timeout=60)


def one_line_error(r):
    assert r.returncode != 0, r.stdout
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
    return r.stderr


def test_bad_local_parts_refused_before_anything_is_written(tmp_path):
    assert mailstack(tmp_path, "domain", "add", "example.test").returncode == 0
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for address in ("../evil@example.test", "ev/il@example.test", ".hidden@example.test", "a..b@example.test",
                    "tab\tx@example.test", "x%y@example.test"):
        err = one_line_error(mailstack(tmp_path, "user", "add", address, "--password-stdin",
                                       input="a long enough password\n"))
        assert "not a valid address for an account" in err, address
        assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before, address
    assert not (tmp_path / "evil").exists() and not (tmp_path / "data" / "evil").exists()


def test_weak_passwords_refused_unless_allow_weak(tmp_path):
    assert mailstack(tmp_path, "domain", "add", "example.test").returncode == 0
    for weak in ("x", "short-pw", "password1234", "123456789012", "aaaaaaaaaaaaaaaa"):
        err = one_line_error(mailstack(tmp_path, "user", "add", "a@example.test", "--password-stdin",
                                       input=weak + "\n"))
        assert "password" in err and "--allow-weak" in err
    assert not (tmp_path / "data" / "accounts").exists() or "a@example.test" not in (
        tmp_path / "data" / "accounts").read_text()
    r = mailstack(tmp_path, "user", "add", "a@example.test", "--password-stdin", "--allow-weak", input="x\n")
    assert r.returncode == 0, r.stderr
    one_line_error(mailstack(tmp_path, "user", "passwd", "a@example.test", input="x\n"))
    assert mailstack(tmp_path, "user", "passwd", "a@example.test", input="a much better passphrase\n").returncode == 0
    # the key sets the minimum
    (tmp_path / "c.toml").write_text((tmp_path / "c.toml").read_text() + "[accounts]\nmin_password_length = 30\n")
    one_line_error(mailstack(tmp_path, "user", "passwd", "a@example.test", input="a much better passphrase\n"))


def _directory_with(tmp_path, n):
    d = Directory(tmp_path)
    d.add_domain("example.test")
    for i in range(n):
        d.add_user(f"user{i}@example.test", f"password number {i}")
    d.save()
    return Directory(tmp_path)


def test_cut_or_non_utf8_accounts_file_keeps_last_good_directory(tmp_path):
    d = _directory_with(tmp_path, 4)
    accounts = tmp_path / "accounts"
    good = accounts.read_bytes()
    for bad in (good[:len(good) // 2], good[:good.index(b"$argon2", 200) + 30] + b"\n",
                good + b"\xff\xfe broken\n"):
        accounts.write_bytes(bad)
        os.utime(accounts, ns=(1, os.stat(accounts).st_mtime_ns + 1_000_000))
        with pytest.raises(DirectoryError):
            d.reload_if_changed()
        assert len(d.accounts) == 4 and d.resolve("user3@example.test").kind == "local"
        assert d.reload_if_changed() is False  # refused once; not re-read (nor logged) until it changes
    accounts.write_bytes(good)
    os.utime(accounts, ns=(1, os.stat(accounts).st_mtime_ns + 2_000_000))
    d.reload_if_changed()
    assert len(d.accounts) == 4


def test_running_server_keeps_users_when_accounts_file_is_cut(tmp_path):
    with MailServer(tmp_path, listeners=("smtp",)) as srv:
        srv.add_domain("example.test")
        for i in range(3):
            srv.add_user(f"u{i}@example.test", f"pw-{i}")
        srv.start()
        accounts = srv.data_dir / "accounts"
        good = accounts.read_bytes()
        accounts.write_bytes(good[:len(good) // 2])
        wait_for(lambda: "directory not reloaded" in srv.log(), what="refusal logged")
        accounts.write_bytes(b"\xff" + good)
        wait_for(lambda: "not UTF-8" in srv.log(), what="non-UTF-8 refusal logged")
        import smtplib
        with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=30) as s:
            s.ehlo("client.test")
            s.mail("x@elsewhere.test")
            assert s.rcpt("u2@example.test")[0] == 250  # not "550 user unknown"
        log = srv.log()
        assert log.count("not UTF-8") == 1 and "Traceback" not in log  # once, not every second
        assert srv.stop() == 0


@pytest.mark.parametrize("net", ["0.0.0.0/0", "::/0", "0.0.0.0/0.0.0.0"])
def test_trusted_networks_covering_everything_refused(tmp_path, net):
    with pytest.raises(config_mod.ConfigError) as e:
        config_mod.from_dict({"smtp": {"trusted_networks": ["127.0.0.0/8", net]}}, base=tmp_path)
    assert str(e.value).startswith("smtp.trusted_networks:") and "open relay" in str(e.value)
    srv = MailServer(tmp_path, overrides={"smtp": {"trusted_networks": [net]}}, listeners=("smtp",))
    r = srv.cli("serve", check=False, timeout=60)
    assert r.returncode != 0 and "smtp.trusted_networks" in r.stderr + r.stdout


def test_config_check_keys_and_non_defaults_like_postconf(tmp_path):
    cfg = f'[server]\ndata_dir = "data"\nhostname = "mx.example.test"\n[smtp]\nmax_errors = 5\n'
    r = mailstack(tmp_path, "config", "check", "server.hostname", "smtp.max_errors", "queue.retry_min",
                  config=cfg)
    assert r.returncode == 0, r.stderr
    assert r.stdout == 'server.hostname = "mx.example.test"\nsmtp.max_errors = 5\nqueue.retry_min = 300.0\n'
    r = mailstack(tmp_path, "config", "check", "-n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:4] == ["[server]", 'hostname = "mx.example.test"', "", "[smtp]"]
    assert "max_errors = 5" in r.stdout and "retry_min" not in r.stdout and "data_dir" not in r.stdout
    r = mailstack(tmp_path, "config", "check", "-n", "smtp.max_errors", "queue.retry_min")
    assert r.stdout == "smtp.max_errors = 5\n"
    assert "smtp.nope: unknown key" in one_line_error(mailstack(tmp_path, "config", "check", "smtp.nope"))


def _parsers(parser, path=()):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, path + (name,))


def test_every_command_help_lists_actions_options_and_config():
    parser = cli_mod.build_parser()
    seen = 0
    for path, p in _parsers(parser):
        if not path:
            continue
        seen += 1
        text = p.format_help()
        assert "--config" in text, path
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name in action.choices:
                    assert name in text, (path, name)
            elif action.dest != "help":
                assert action.help, f"mailstack {' '.join(path)}: {action.option_strings or action.dest} has no help"
    assert seen > 30


def test_cli_errors_are_one_line(tmp_path):
    assert "no such config file" in one_line_error(
        subprocess.run([sys.executable, "-m", "mailstack", "user", "list", "--config", str(tmp_path / "none.toml")],
                       capture_output=True, text=True, timeout=60))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "domains").mkdir()  # a directory where a file should be
    one_line_error(mailstack(tmp_path, "domain", "list"))


def test_hostname_never_localhost(tmp_path, monkeypatch):
    import socket
    monkeypatch.setattr(socket, "getfqdn", lambda *a: "localhost")
    monkeypatch.setattr(socket, "gethostname", lambda: "vm")
    cfg = config_mod.from_dict({"server": {"data_dir": str(tmp_path)}}, base=tmp_path)
    assert cfg.server.hostname == "vm" and "not a fully qualified domain name" in cfg.hostname_note
    recs, notes = dnsrecords.records(cfg, "example.test")
    text = dnsrecords.render(recs, notes)
    assert "localhost" not in text and "10 mail.example.test." in text
    assert sum("not a fully qualified" in n for n in notes) == 1
    monkeypatch.setattr(socket, "getfqdn", lambda *a: "host.example.net")
    cfg = config_mod.from_dict({"server": {"data_dir": str(tmp_path)}}, base=tmp_path)
    assert cfg.server.hostname == "host.example.net" and not cfg.hostname_note


def test_status_warns_without_postmaster_and_for_a_guessed_hostname():
    from mailstack.status import assess
    _, warnings = assess({"ok": True, "postmaster": None, "hostname_note": "server.hostname: 'vm' is not a FQDN"})
    assert any("no postmaster" in w for w in warnings) and any("not a FQDN" in w for w in warnings)
    _, warnings = assess({"ok": True, "postmaster": "a@example.test", "hostname_note": ""})
    assert warnings == []


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=70))
def test_any_accepted_local_part_is_a_safe_store_path(local):
    """Fuzz: what account validation accepts, the store can always use as a directory name."""
    from mailstack.directory import check_local_part
    from mailstack.store import names
    if check_local_part(local) is None:
        domain, part = names.account_parts(f"{local}@example.test")
        assert part == local.lower() and "/" not in part and not part.startswith(".")


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(["ALL", "all", "deferred", "hold", "bogus", "0123456789ABCD", "", "ABCDEFGH"]),
                min_size=1, max_size=4))
def test_queue_words_either_parse_cleanly_or_change_nothing(words):
    from mailstack.queue.admin import ALL_STATES, UsageError, parse_targets
    for action in ALL_STATES:
        try:
            ids, states = parse_targets(action, words)
        except UsageError:
            continue
        if ids is None:
            assert words[0] == "ALL" and set(states) <= set(ALL_STATES[action]) and set(words[1:]) <= set(states)
        else:
            assert "ALL" not in ids and all(w in ids for w in words)
