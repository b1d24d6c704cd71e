"""The defence's pure parts with a fake clock: DNS list site syntax (fuzzed), greylist
timing and auto allow-list, the SQLite state surviving kill -9, rates, outbound pacing,
the login guard's windows, and configuration errors naming the key."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from mailstack.senderauth.spf import Result as _SPFResult

from mailstack import config as config_mod
from mailstack.config import ConfigError
from mailstack.defense import dnsbl
from mailstack.defense.greylist import Greylist, Settings, client_network, normalize_sender
from mailstack.defense.guard import LoginGuard, address_key
from mailstack.defense.ratelimit import Pacer, RateCounter
from mailstack.defense.stage import helo_problem
from mailstack.defense.state import MemoryState, SQLiteState


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


# --- DNS list sites -----------------------------------------------------------------------

def test_site_syntax():
    s = dnsbl.parse_site("zen.spamhaus.org*3")
    assert (s.domain, s.filter, s.weight) == ("zen.spamhaus.org", None, 3)
    s = dnsbl.parse_site("bl.example=127.0.0.[2..11]*2")
    assert s.matches("127.0.0.2") and s.matches("127.0.0.11") and not s.matches("127.0.0.12")
    s = dnsbl.parse_site("list.dnswl.org=127.0.[0..255].[1;3]*-2")
    assert s.weight == -2 and s.matches("127.0.9.3") and not s.matches("127.0.9.2")
    for bad in ("", "nodot", "bl.example*0", "bl.example=127.0.0*2", "bl.example=127.0.0.[9..2]",
                "bl.example=127.0.0.300", "bl example"):
        with pytest.raises(ValueError):
            dnsbl.parse_site(bad)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="abz.019*=-[];. ", max_size=40))
def test_site_parser_never_fails_otherwise(text):
    try:
        site = dnsbl.parse_site(text)
    except ValueError:
        return
    assert "." in site.domain and site.weight != 0


def test_query_names():
    assert dnsbl.query_name("192.0.2.1", "bl.example") == "1.2.0.192.bl.example"
    assert dnsbl.query_name("2001:db8::1", "bl.example").startswith("1.0.0.0.0.0.0.0")
    assert dnsbl.query_name("2001:db8::1", "bl.example").endswith("8.b.d.0.1.0.0.2.bl.example")
    assert dnsbl.query_name("::ffff:192.0.2.1", "bl.example") == "1.2.0.192.bl.example"


def test_bad_site_stops_the_start_naming_the_key():
    with pytest.raises(ConfigError, match=r"^defense\.dnsbl_sites: 'bl\.example\*0': weight must be"):
        config_mod.from_dict({"defense": {"dnsbl_sites": ["bl.example*0"]}}, Path("."))
    with pytest.raises(ConfigError, match=r"^defense\.helo_check: must be one of off, log, reject"):
        config_mod.from_dict({"defense": {"helo_check": "maybe"}}, Path("."))


def test_helo_problems():
    assert helo_problem("mx.example.org", "mail.example.test") is None
    assert helo_problem("[192.0.2.1]", "mail.example.test") is None
    assert helo_problem("[IPv6:2001:db8::1]", "mail.example.test") is None
    assert helo_problem("localhost", "x.test") == "need fully-qualified hostname"
    assert helo_problem("[999.1.1.1]", "x.test") == "invalid address literal"
    assert helo_problem("MAIL.example.test", "mail.example.test") == "that is my own name"


# --- greylisting ----------------------------------------------------------------------------

def test_greylist_timing_and_auto_allow():
    clock = Clock()
    g = Greylist(MemoryState(clock), Settings(delay=300, max_age=86400, pass_ttl=35 * 86400, auto_allow=2), clock)
    run = asyncio.run
    assert run(g.check("192.0.2.10", "a@x.org", "u@y.test")) == (False, "new")
    clock.t += 299
    assert run(g.check("192.0.2.10", "a@x.org", "u@y.test")) == (False, "early")
    clock.t += 2
    assert run(g.check("192.0.2.99", "a+1234@x.org", "U@y.test")) == (True, "passed")  # same /24, folded
    assert run(g.check("192.0.2.10", "a@x.org", "u@y.test")) == (True, "known")
    # a retry after max_age starts over
    assert run(g.check("192.0.2.10", "b@x.org", "u@y.test")) == (False, "new")
    clock.t += 86401
    assert run(g.check("192.0.2.10", "b@x.org", "u@y.test")) == (False, "new")
    clock.t += 301
    assert run(g.check("192.0.2.10", "b@x.org", "u@y.test")) == (True, "passed")
    # two passed triplets: the network is allowed without greylisting
    assert run(g.check("192.0.2.10", "c@other.org", "v@y.test")) == (True, "allowed")
    assert run(g.check("198.51.100.1", "c@other.org", "v@y.test")) == (False, "new")


def test_triplet_parts():
    assert client_network("192.0.2.77") == "192.0.2.0/24"
    assert client_network("2001:db8:1:2:3:4:5:6") == "2001:db8:1:2::/64"
    assert normalize_sender("") == "<>"
    assert normalize_sender("Bounce-12345-X@Lists.Example.org") == "bounce-#-x@lists.example.org"
    assert normalize_sender("me+tag@x.org") == "me@x.org"


def test_sqlite_state_survives_kill_9(tmp_path):
    path = tmp_path / "state.sqlite"
    code = textwrap.dedent(f"""
        import asyncio, os, signal
        from mailstack.defense.state import SQLiteState
        async def main():
            s = SQLiteState({str(path)!r})
            await s.put("gl:net|a|b", "123.000:passed", 3600)
            assert await s.incr("gl-client:net", 3600) == 1
            assert await s.incr("gl-client:net", 3600) == 2
            print("written", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        asyncio.run(main())
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    assert r.returncode == -signal.SIGKILL and r.stdout == "written\n", r.stderr

    async def read():
        s = SQLiteState(path)
        try:
            return await s.get("gl:net|a|b"), await s.get("gl-client:net"), await s.get("missing")
        finally:
            await s.close()

    assert asyncio.run(read()) == ("123.000:passed", "2", None)


def test_sqlite_state_expiry():
    clock = Clock()

    async def go(path):
        s = SQLiteState(path, clock)
        await s.put("k", "v", 10)
        assert await s.get("k") == "v"
        clock.t += 11
        assert await s.get("k") is None
        assert await s.incr("n", 10) == 1  # an expired counter starts again
        await s.delete("n")
        assert await s.get("n") is None
        await s.close()

    import tempfile
    with tempfile.TemporaryDirectory() as d:
        asyncio.run(go(Path(d) / "s.sqlite"))


# --- rates and pacing ----------------------------------------------------------------------------

def test_rate_counter_slides():
    clock = Clock(600.0)
    r = RateCounter(60.0, clock)
    for _ in range(10):
        r.hit("a")
    assert r.rate("a") == 10 and r.over("a", 10) and not r.over("a", 11) and not r.over("a", 0)
    clock.t += 90  # the previous window half overlaps the sliding minute
    assert r.rate("a") == pytest.approx(5.0)
    clock.t += 60
    assert r.rate("a") == 0


def test_pacer_allows_a_burst_then_spaces_then_defers():
    clock = Clock(0.0)
    p = Pacer(clock)
    waits = [p.reserve("mx.example", 60, max_wait=5) for _ in range(10)]
    assert waits[:10] == [0.0] * 10  # ten seconds' worth at 60/min
    assert p.reserve("mx.example", 60, max_wait=5) == pytest.approx(1.0)
    assert p.reserve("mx.example", 60, max_wait=5) == pytest.approx(2.0)
    for _ in range(3):
        p.reserve("mx.example", 60, max_wait=5)
    assert p.reserve("mx.example", 60, max_wait=5) is None  # would wait more than max_wait
    assert p.reserve("other.example", 60) == 0.0
    assert p.reserve("mx.example", 0) == 0.0  # 0 = no limit


# --- login guard -----------------------------------------------------------------------------------

def test_guard_blocks_for_a_window_per_address_and_ipv6_network():
    clock = Clock()
    g = LoginGuard(base_delay=0, max_delay=0, window=900, max_parallel=2, block_after=3, block_time=60, clock=clock)

    async def fail(ip, user="bob@example.test"):
        a = await g.attempt("imap", ip, user)
        if a.refused:
            return a.refused
        a.failed()
        return "failed"

    async def scenario():
        assert [await fail("2001:db8::1"), await fail("2001:db8::2"), await fail("2001:db8::3")] == ["failed"] * 3
        assert await fail("2001:db8::ffff") == "blocked"  # the same /64
        assert await fail("2001:db8:0:1::1") == "failed"  # another /64
        clock.t += 61
        assert await fail("2001:db8::1") == "failed"  # the block window is over
        # over the cap a login waits for a slot; slots are handed on at every outcome
        a1 = await g.attempt("pop3", "192.0.2.1", "x")
        a2 = await g.attempt("pop3", "192.0.2.1", "x")
        third = asyncio.ensure_future(g.attempt("smtp", "192.0.2.1", "x"))
        await asyncio.sleep(0.05)
        assert not third.done()
        a1.abandoned()
        a3 = await asyncio.wait_for(third, 5)
        assert a3.refused is None
        a2.succeeded("x")
        a3.failed()
        assert g._inflight == {} and g._waiters == {}

    asyncio.run(scenario())
    assert address_key("2001:db8::1") == "2001:db8::/64" and address_key("::ffff:192.0.2.1") == "192.0.2.1"


def test_guard_refuses_when_no_slot_frees_in_time():
    class QuickGuard(LoginGuard):
        parallel_wait = 0.1

    g = QuickGuard(base_delay=0, max_delay=0, max_parallel=1)

    async def scenario():
        held = await g.attempt("imap", "192.0.2.9", "x")
        waiting = asyncio.ensure_future(g.attempt("imap", "192.0.2.9", "y"))
        late = await g.attempt("pop3", "192.0.2.9", "z")
        assert late.refused == "parallel" and (await waiting).refused == "parallel"
        assert (await g.attempt("pop3", "192.0.2.10", "z")).refused is None  # other addresses unaffected
        held.failed()
        assert g._inflight == {"192.0.2.10": 1} and g._waiters == {}

    asyncio.run(scenario())


def test_guard_account_delay_spares_known_addresses():
    clock = Clock()
    g = LoginGuard(base_delay=1, max_delay=30, window=900, clock=clock)
    g.success("192.0.2.1", "bob@example.test")  # the owner's usual address
    for n in range(5):
        g.failure(f"198.51.100.{n}", "bob@example.test")  # guesses from five addresses
    assert g.delay_for("192.0.2.1", "bob@example.test") == 0.0
    assert g.delay_for("203.0.113.9", "bob@example.test") == 16.0  # a stranger for bob
    assert g.delay_for("198.51.100.1", "alice@example.test") == 1.0  # the guessing address itself
    clock.t += 901
    assert g.delay_for("203.0.113.9", "bob@example.test") == 0.0


# --- the stage's greylisting exemptions ----------------------------------------------------------

def test_greylisting_exemptions(tmp_path):
    from mailstack.services import Services, SessionRegistry
    from mailstack.smtp import hooks
    from mailstack.defense.stage import DefenseStage

    cfg = config_mod.from_dict({"server": {"data_dir": str(tmp_path)}, "defense": {
        "greylist": True, "greylist_exempt_networks": ["198.51.100.0/24"],
        "greylist_spf_domains": ["big.example"], "helo_check": "off"}}, tmp_path)

    async def scenario():
        services = Services(config=cfg, directory=None, events=None, tls=None, throttle=None,
                            sessions=SessionRegistry())
        stage = DefenseStage(services)
        stage.greylist.state = MemoryState()

        def spf_result(result, domain):
            return _SPFResult(result, domain=domain)

        async def rcpt(ip, sender="x@other.example", auth=None, trusted=False, spf=None, dnswl=False):
            conn = hooks.Connection(ip=ip, listener="smtp", hostname="mx.test", helo="h.example",
                                    trusted=trusted, auth_user=auth)
            assert await stage.connect(conn) is None
            if dnswl:
                conn.state["defense"]["dnsbl_result"] = dnsbl.Result(score=-2, allowed_by=("wl.example",))
            txn = hooks.Transaction(mail_from=sender)
            if spf:  # what the senderauth stage records at MAIL
                txn.state["senderauth"] = {"mailfrom": spf_result(*spf)}
            return await stage.rcpt(conn, txn, "u@mx.test")

        assert await rcpt("192.0.2.1") == "451 4.7.1 Greylisted, please try again later"
        assert await rcpt("192.0.2.2", auth="bob@mx.test") is None
        assert await rcpt("192.0.2.3", trusted=True) is None
        assert await rcpt("127.0.0.1") is None  # defense.exempt_networks
        assert await rcpt("198.51.100.7") is None  # greylist_exempt_networks
        assert await rcpt("192.0.2.4", dnswl=True) is None
        assert await rcpt("192.0.2.5", sender="a@big.example", spf=("pass", "big.example")) is None
        assert await rcpt("192.0.2.6", sender="a@big.example", spf=("softfail", "big.example")) is not None
        assert await rcpt("192.0.2.7", sender="a@big.example", spf=("pass", "")) is None
        assert await rcpt("203.0.113.1", sender="a@small.example", spf=("pass", "small.example")) is not None

    asyncio.run(scenario())
