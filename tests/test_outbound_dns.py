"""mailstack.dns against a real DNS server on loopback (tests/dnsserver.py)."""
from __future__ import annotations

import asyncio
import random
import time

import pytest

from mailstack.dns import DnsError, MXHost, NullMX, Resolver
from mailstack.nexthop import NextHop, parse_nameserver, parse_nexthop, to_alabel
from tests.dnsserver import DNSServer


@pytest.fixture
def dns_server():
    server = DNSServer({
        "example.test": {"MX": [(20, "mx2.example.test"), (10, "mx1.example.test")]},
        "mx1.example.test": {"A": ["127.0.0.2"]},
        "mx2.example.test": {"A": ["127.0.0.3"], "AAAA": ["::1"]},
        "equal.test": {"MX": [(10, f"m{i}.equal.test") for i in range(6)]},
        "noMX.test": {"A": ["127.0.0.4"]},
        "null.test": {"MX": [(0, ".")]},
        "alias.test": {"CNAME": ["hop.test"]},
        "hop.test": {"CNAME": ["example.test"]},
        "xn--bcher-kva.test": {"MX": [(5, "mx1.example.test")]},
        "long.test": {"TXT": ["v=DKIM1; p=" + "A" * 1500]},
        "broken.test": {"MX": [(10, "mx1.example.test")]},
    }).start()
    server.servfail.add("broken.test")
    server.silent.add("slow.test")
    yield server
    server.stop()


def resolver_for(server: DNSServer, timeout: float = 2.0, seed: int | None = None) -> Resolver:
    return Resolver([parse_nameserver(server.address)], timeout=timeout,
                    rng=random.Random(seed) if seed is not None else None)


def run(coro):
    return asyncio.run(coro)


def test_mx_sorted_by_preference(dns_server):
    hosts = run(resolver_for(dns_server).mx_hosts("example.test"))
    assert hosts == [MXHost("mx1.example.test", 10), MXHost("mx2.example.test", 20)]


def test_equal_preferences_are_shuffled(dns_server):
    orders = {tuple(h.name for h in run(resolver_for(dns_server, seed=s).mx_hosts("equal.test")))
              for s in range(8)}
    assert len(orders) > 1
    assert all(sorted(o) == [f"m{i}.equal.test" for i in range(6)] for o in orders)


def test_no_mx_falls_back_to_the_domain_itself(dns_server):
    r = resolver_for(dns_server)
    assert run(r.mx_hosts("nomx.test")) == [MXHost("nomx.test", 0, implicit=True)]
    assert run(r.addresses("nomx.test")) == ["127.0.0.4"]


def test_null_mx_is_permanent(dns_server):
    with pytest.raises(NullMX) as e:
        run(resolver_for(dns_server).mx_hosts("null.test"))
    assert not e.value.temporary and e.value.status == "5.1.10"
    assert "does not accept mail" in str(e.value)


def test_nxdomain_is_permanent(dns_server):
    with pytest.raises(DnsError) as e:
        run(resolver_for(dns_server).mx_hosts("nowhere.test"))
    assert not e.value.temporary
    assert "Host not found" in str(e.value)


def test_servfail_is_temporary(dns_server):
    with pytest.raises(DnsError) as e:
        run(resolver_for(dns_server).mx_hosts("broken.test"))
    assert e.value.temporary and "try again" in str(e.value)


def test_timeout_is_temporary(dns_server):
    start = time.monotonic()
    with pytest.raises(DnsError) as e:
        run(resolver_for(dns_server, timeout=0.5).mx_hosts("slow.test"))
    assert e.value.temporary and "timed out" in str(e.value)
    assert time.monotonic() - start < 3


def test_cname_chain_followed(dns_server):
    hosts = run(resolver_for(dns_server).mx_hosts("alias.test"))
    assert [h.name for h in hosts] == ["mx1.example.test", "mx2.example.test"]


def test_idn_looked_up_in_a_label_form(dns_server):
    hosts = run(resolver_for(dns_server).mx_hosts("Bücher.test"))
    assert hosts == [MXHost("mx1.example.test", 5)]
    assert ("xn--bcher-kva.test", "MX", "udp") in dns_server.queries


def test_addresses_ipv4_first_and_family_choice(dns_server):
    r = resolver_for(dns_server)
    assert run(r.addresses("mx2.example.test")) == ["127.0.0.3", "::1"]
    assert run(r.addresses("mx2.example.test", "ipv6")) == ["::1"]
    assert run(r.addresses("127.0.0.9")) == ["127.0.0.9"]
    with pytest.raises(DnsError) as e:
        run(r.addresses("mx1.example.test", "ipv6"))
    assert not e.value.temporary


def test_large_txt_retried_over_tcp(dns_server):
    txt = run(resolver_for(dns_server).txt("long.test"))
    assert txt == ["v=DKIM1; p=" + "A" * 1500]
    assert ("long.test", "TXT", "tcp") in dns_server.queries


def test_nexthop_syntax():
    assert parse_nexthop("[127.0.0.1]:2525") == NextHop("127.0.0.1", 2525, mx=False)
    assert parse_nexthop("[::1]") == NextHop("::1", None, mx=False)
    assert parse_nexthop("smtp:[relay.example.test]:587") == NextHop("relay.example.test", 587, mx=False)
    assert parse_nexthop("Example.TEST") == NextHop("example.test", None, mx=True)
    assert parse_nexthop("bücher.test:26") == NextHop("xn--bcher-kva.test", 26, mx=True)
    for bad in ("[host", "[h]x", "host:99999", "::1:25", "bad host", "", "[a]:"):
        with pytest.raises(ValueError):
            parse_nexthop(bad)
    assert parse_nameserver("127.0.0.1:5353") == ("127.0.0.1", 5353)
    assert parse_nameserver("[::1]:53") == ("::1", 53)
    assert parse_nameserver("::1") == ("::1", 53)
    with pytest.raises(ValueError):
        parse_nameserver("ns.example.test")
    assert to_alabel("Bücher.Test.") == "xn--bcher-kva.test"


def test_config_checks_nexthops(tmp_path):
    from mailstack.config import ConfigError, from_dict
    cfg = from_dict({"delivery": {"relayhost": "[127.0.0.1]:2525",
                                  "transports": {"example.org": "[10.0.0.5]:25"}},
                     "dns": {"nameservers": ["127.0.0.1:5353"]}}, base=tmp_path)
    assert cfg.delivery.relayhost == "[127.0.0.1]:2525"
    with pytest.raises(ConfigError, match="delivery.relayhost"):
        from_dict({"delivery": {"relayhost": "[nope"}}, base=tmp_path)
    with pytest.raises(ConfigError, match="delivery.transports: example.org"):
        from_dict({"delivery": {"transports": {"example.org": "a b"}}}, base=tmp_path)
    with pytest.raises(ConfigError, match="dns.nameservers"):
        from_dict({"dns": {"nameservers": ["ns1.example"]}}, base=tmp_path)


def test_records_answered_from_memory_within_the_ttl_and_asked_again_after():
    """records() keeps an answer until its TTL runs out: a warm look-up sends nothing (and costs
    a dict look-up), an answer past its TTL is asked again and the new data seen; a TTL-0
    answer is never kept.  Names differ only in case: one entry."""
    server = DNSServer({"short.test": {"TXT": ["v=one"]}}, ttl=1).start()
    zero = DNSServer({"zero.test": {"TXT": ["v=zero"]}}, ttl=0).start()
    try:
        async def go():
            r = resolver_for(server)
            assert r.cached("short.test", "TXT") is None
            assert await r.records("short.test", "TXT") == [b"v=one"]
            asked = len(server.queries)
            got = await r.records("SHORT.test", "TXT")
            assert got == [b"v=one"] and len(server.queries) == asked
            got.append(b"changed by the caller")  # a fresh list each time: the entry is not shared
            assert r.cached("short.test", "TXT") == [b"v=one"]
            server.remove("short.test", "TXT")
            server.add("short.test", "TXT", "v=two")
            deadline = time.monotonic() + 10
            while r.cached("short.test", "TXT") is not None:  # the 1 s TTL running out
                assert time.monotonic() < deadline, "answer kept past its TTL"
                await asyncio.sleep(0.05)
            assert await r.records("short.test", "TXT") == [b"v=two"]
            assert len(server.queries) == asked + 1

            r0 = resolver_for(zero)
            for _ in range(2):
                assert await r0.records("zero.test", "TXT") == [b"v=zero"]
            assert r0.cached("zero.test", "TXT") is None and len(zero.queries) == 2

            # "No such name" is kept as long as dnspython keeps it (its cache entry's expiry):
            # no second query, and the same empty answer from memory.
            assert await r0.records("_dmarc.nowhere.zero.test", "TXT") == []
            asked = len(zero.queries)
            assert r0.cached("_dmarc.nowhere.zero.test", "TXT") == []
            assert await r0.records("_dmarc.nowhere.zero.test", "TXT") == [] and len(zero.queries) == asked
            # A name that exists with no records of the type: dnspython's negative answer, as long.
            assert await r0.records("zero.test", "MX") == []
            asked = len(zero.queries)
            assert r0.cached("zero.test", "MX") == [] and await r0.records("zero.test", "MX") == []
            assert len(zero.queries) == asked
        asyncio.run(go())
    finally:
        server.stop()
        zero.stop()
