"""Domains, accounts, aliases: resolution rules and the CLI that edits them."""
import os
import stat
import subprocess
import sys

import pytest

from mailstack.directory import Directory, DirectoryError, hash_password


@pytest.fixture
def d(tmp_path):
    d = Directory(tmp_path)
    d.add_domain("example.test")
    d.add_domain("other.test")
    d.accounts["alice@example.test"] = hash_password("pw-a")
    d.accounts["bob@example.test"] = hash_password("pw-b")
    d.add_alias("sales@example.test", ["alice@example.test", "bob@example.test", "ext@remote.test"])
    d.add_alias("loop1@example.test", ["loop2@example.test"])
    d.add_alias("loop2@example.test", ["loop1@example.test", "alice@example.test"])
    d.add_alias("@other.test", ["bob@example.test"])
    d.save()
    return Directory(tmp_path)  # re-read from disk


def test_resolve(d):
    assert d.resolve("alice@example.test").kind == "local"
    assert d.resolve("ALICE@Example.TEST").account == "alice@example.test"
    assert d.resolve("alice+news@example.test").account == "alice@example.test"
    assert d.resolve("nobody@example.test").kind == "unknown"
    assert d.resolve("someone@remote.test").kind == "remote"
    assert d.resolve("anything@other.test").kind == "alias"  # catch-all


@pytest.mark.parametrize("trick", [
    "user%remote.test@example.test", '"user@remote.test"@example.test', "remote.test!user@example.test",
    "alice%remote.test@example.test",
])
def test_address_tricks_are_unknown_local_users_not_routes(d, trick):
    assert d.resolve(trick).kind == "unknown"


def test_expand(d):
    local, remote = d.expand("sales@example.test")
    assert local == ["alice@example.test", "bob@example.test"] and remote == ["ext@remote.test"]
    assert d.expand("loop1@example.test") == (["alice@example.test"], [])
    assert d.expand("x@other.test") == (["bob@example.test"], [])
    assert d.expand("nobody@example.test") == ([], [])


def test_owns_address(d):
    assert d.owns_address("alice@example.test", "alice@example.test")
    assert d.owns_address("alice@example.test", "Alice+tag@example.test")
    assert d.owns_address("alice@example.test", "sales@example.test")
    assert not d.owns_address("alice@example.test", "bob@example.test")
    assert not d.owns_address("alice@example.test", "ceo@remote.test")


def test_passwords(d):
    assert d.check_password("alice@example.test", "pw-a") == "alice@example.test"
    assert d.check_password("alice@example.test", "pw-a") == "alice@example.test"  # cached path
    assert d.check_password("alice@example.test", "pw-b") is None
    assert d.check_password("nobody@example.test", "pw-a") is None
    assert d.accounts["alice@example.test"].startswith("$argon2id$")


def test_edit_errors(d):
    with pytest.raises(DirectoryError, match="not a local domain"):
        d.add_user("x@nowhere.test", "pw")
    with pytest.raises(DirectoryError, match="exists already"):
        d.add_user("alice@example.test", "pw")
    with pytest.raises(DirectoryError, match="still has accounts"):
        d.del_domain("example.test")


def test_files_readable_and_private(d, tmp_path):
    text = (tmp_path / "aliases").read_text()
    assert "sales@example.test: alice@example.test, bob@example.test, ext@remote.test" in text
    for name in ("domains", "accounts", "aliases"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o600


def test_reload_if_changed(d, tmp_path):
    assert not d.reload_if_changed()
    with open(tmp_path / "domains", "a") as f:
        f.write("third.test\n")
    assert d.reload_if_changed()
    assert d.is_local_domain("third.test")


def run_cli(tmp_path, *args, input=None):
    cfg = tmp_path / "c.toml"
    if not cfg.exists():
        cfg.write_text(f'[server]\ndata_dir = "{tmp_path / "data"}"\n')
    return subprocess.run([sys.executable, "-m", "mailstack", *args, "--config", str(cfg)],
                          input=input, capture_output=True, text=True, timeout=60)


def test_cli_domain_user_alias(tmp_path):
    assert run_cli(tmp_path, "domain", "add", "example.test").returncode == 0
    r = run_cli(tmp_path, "user", "add", "carol@example.test", "--password-stdin", input="carol s3cret pass\n")
    assert r.returncode == 0, r.stderr
    r = run_cli(tmp_path, "user", "add", "dave@example.test", input="dave pw2 long pass\n")  # stdin not a tty
    assert r.returncode == 0, r.stderr
    listed = run_cli(tmp_path, "user", "list").stdout.splitlines()  # each with its quota usage and limits
    assert [line.split()[0] for line in listed] == ["carol@example.test", "dave@example.test"]
    assert "0B of 10G (0%), 0 messages [default]" in listed[0]
    # the password is never taken from argv
    r = run_cli(tmp_path, "user", "add", "eve@example.test", "secret-on-argv", input="")
    assert r.returncode != 0
    assert run_cli(tmp_path, "alias", "add", "team@example.test", "carol@example.test",
                   "dave@example.test").returncode == 0
    assert "team@example.test: carol@example.test, dave@example.test" in run_cli(tmp_path, "alias", "list").stdout
    r = run_cli(tmp_path, "user", "passwd", "carol@example.test", input="new long password\n")
    assert r.returncode == 0
    d = Directory(tmp_path / "data")
    assert d.check_password("carol@example.test", "new long password") and not d.check_password("carol@example.test", "carol s3cret pass")
    # the account's mailboxes exist from the start
    assert (tmp_path / "data" / "mail" / "example.test" / "carol" / "new").is_dir()
    r = run_cli(tmp_path, "user", "add", "x@unknown.test", input="x long password\n")
    assert r.returncode != 0 and "unknown.test is not a local domain" in r.stderr
    assert run_cli(tmp_path, "user", "del", "dave@example.test").returncode == 0
    assert run_cli(tmp_path, "alias", "del", "team@example.test").returncode == 0
    assert run_cli(tmp_path, "alias", "list").stdout == ""


def test_login_cache_single_flight_new_hash_and_ttl(d, monkeypatch):
    """Verified passwords: answered on the loop once verified, one argon2 run for a burst of
    identical logins, forgotten when the stored hash changes or the TTL runs out; a wrong
    password is never taken from the cache."""
    import asyncio

    from mailstack import directory as dirmod

    runs = []

    class Counting:  # the real argon2 hasher, counted
        def verify(self, stored, password):
            runs.append(1)
            return real.verify(stored, password)

        def hash(self, password):
            return real.hash(password)

    real = dirmod._hasher
    monkeypatch.setattr(dirmod, "_hasher", Counting())

    async def burst(n, password="pw-a"):
        return await asyncio.gather(*(d.authenticate("Alice@Example.test", password) for _ in range(n)))

    assert asyncio.run(burst(20)) == ["alice@example.test"] * 20
    assert len(runs) == 1  # one verification for the whole burst
    assert asyncio.run(burst(5)) == ["alice@example.test"] * 5 and len(runs) == 1  # from the cache
    assert asyncio.run(burst(3, "wrong")) == [None] * 3 and len(runs) == 2  # never from the cache
    d.accounts["alice@example.test"] = hash_password("new-pw")  # a new password (a reload)
    assert asyncio.run(burst(1)) == [None]
    assert asyncio.run(burst(1, "new-pw")) == ["alice@example.test"]
    n = len(runs)
    monkeypatch.setattr(d, "CACHE_TTL", -1.0)  # expired: verified again
    assert asyncio.run(burst(1, "new-pw")) == ["alice@example.test"] and len(runs) == n + 1


def test_remembered_lookups_follow_every_change_of_the_directory(tmp_path, monkeypatch):
    # Session 4: resolve() and expand() are remembered per address until the lookup state
    # changes.  After every kind of change (the CLI's edits, a reload from the files, the
    # server's reload assigning attributes, in-place edits, SRS) each answer must be the
    # one a plain computation gives now.
    d = Directory(tmp_path)
    d.add_domain("example.test")
    d.add_user("alice@example.test", "pw-alice-1")
    d.add_user("bob@example.test", "pw-bob-1")
    d.add_alias("team@example.test", ["alice@example.test", "bob@example.test", "far@remote.test"])
    d.save()
    probes = ["alice@example.test", "Alice@Example.TEST", "alice+tag@example.test", "bob@example.test",
              "team@example.test", "carol@example.test", "x@other.test", "root@localhost", "root",
              "postmaster@example.test", "srs0=abc@example.test", "dan@other.test", "anything@other.test",
              "root@mail.example.test", "alice-x@example.test"]

    def check(what):
        for p in probes:
            assert d.resolve(p) == d._resolve_now(p), (what, p)
            local, remote, _ = d._expand_now(p)
            assert d.expand(p) == (local, remote), (what, p)
            assert d.resolve(p) == d._resolve_now(p), (what, p)  # from the memo now

    check("start")
    d.add_domain("other.test"); check("add_domain")
    d.add_user("carol@example.test", "pw-carol-1"); check("add_user")
    d.add_user("dan@other.test", "pw-dan-1"); check("add_user other")
    d.add_alias("@other.test", ["alice@example.test"]); check("catch-all alias")
    d.del_alias("team@example.test", ["bob@example.test"]); check("del_alias one target")
    d.add_alias("team@example.test", ["carol@example.test"]); check("add_alias to existing")
    d.del_alias("@other.test"); check("del_alias")
    d.del_user("dan@other.test"); check("del_user")
    d.del_domain("other.test"); check("del_domain")
    d.plus_separator = "-"; check("plus separator")
    d.hostname = "mail.example.test"; check("hostname")
    d.system_users = frozenset({"root", "cron"}); check("system users")
    d.postmaster = "bob@example.test"; check("postmaster")
    d.domains.add("other.test"); check("in place: domains")
    d.accounts["anything@other.test"] = hash_password("x"); check("in place: accounts")
    d.aliases.update({"dan@other.test": ("far@remote.test",)}); check("in place: aliases update")
    d.aliases.pop("dan@other.test"); check("in place: aliases pop")
    d.domains -= {"other.test"}; check("in place: domains -=")
    # The files, changed behind its back (another process's CLI), then reloaded.
    other = Directory(tmp_path)
    other.add_user("erin@example.test", "pw-erin-1")
    other.del_alias("team@example.test")
    other.save()
    probes.append("erin@example.test")
    assert d.reload_if_changed()
    check("reload from the files")
    # The server's reload assigns a freshly read directory's containers.
    fresh = Directory(tmp_path)
    fresh.add_alias("team@example.test", ["erin@example.test"])
    d.domains, d.accounts, d.aliases = fresh.domains, fresh.accounts, fresh.aliases
    check("assigned")
    fresh.aliases["team@example.test"] = ("bob@example.test",)  # the new container, edited later
    check("assigned container edited")
    # SRS answers depend on the time: never remembered.
    answers = iter(["alice@example.test", "", "bob@example.test"])
    d.srs_reverse = lambda address: next(answers) if address.startswith("srs0") else None
    assert d.resolve("srs0=abc@example.test").targets == ("alice@example.test",)
    assert d.resolve("srs0=abc@example.test").kind == "unknown"
    assert d.expand("srs0=abc@example.test") == (["bob@example.test"], [])
