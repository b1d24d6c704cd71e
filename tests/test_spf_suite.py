"""The RFC 7208 SPF conformance suite (openspf.org release 2014.04, as shipped with pyspf
2.0.14 and vendored in tests/data with its LICENSE), run against mailstack.senderauth.spf
with each scenario's zone data served by a real DNS server on loopback.

Zone data conventions of the suite (as its reference driver, pyspf's testspf.py, reads them):
an SPF (type 99) record is also published as TXT unless the name has TXT records of its
own; "TIMEOUT" makes the name never answer.
"""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import yaml

from mailstack.dns import Resolver
from mailstack.senderauth import spf
from tests.dnsserver import DNSServer

SUITE = Path(__file__).parent / "data" / "rfc7208-tests.yml"
SCENARIOS = list(yaml.safe_load_all(SUITE.read_bytes()))
RECEIVER = "receiver.example.net"

# Checks that cannot apply here, with the reason.  The result of every test is checked.
EXPLANATION_NOT_COMPARED = {
    # The expected text keeps the upper-case hex of the address as the test writes it
    # (CAFE:BABE::1 -> "...E.B.A.B.E.F.A.C.ip6.arpa").  A client address from a socket is
    # always lower-case, and RFC 7208 7.3's own example expands %{i} in lower case; DNS
    # names are case-insensitive, so only this explanation's letter case differs.
    "v-macro-ip6": "upper-case hex digits of the test's address text",
}


def _zone(data: dict) -> DNSServer:
    server = DNSServer()
    for name, records in data["zonedata"].items():
        has_txt = any(isinstance(r, dict) and "TXT" in r for r in records)
        for i, rec in enumerate(records):
            if rec == "TIMEOUT":  # after records: only the other types time out (testspf.py)
                (server.silent_nodata if i else server.silent).add(name.lower().rstrip("."))
                continue
            for rtype, value in rec.items():
                if value == "TIMEOUT":
                    server.silent.add(name.lower().rstrip("."))
                    continue
                if rtype in ("TXT", "SPF") and value == "NONE":
                    continue
                if rtype == "MX":
                    value = (value[0], value[1] or ".")
                elif rtype in ("TXT", "SPF") and isinstance(value, list):
                    value = tuple(value)
                server.add(name, rtype, value)
                if rtype == "SPF" and not has_txt:
                    server.add(name, "TXT", value)
    return server


def _cases():
    for index, scenario in enumerate(SCENARIOS):
        for name in scenario["tests"]:
            yield pytest.param(index, name, id=name)


@pytest.fixture(scope="module")
def zones():
    started: dict[int, DNSServer] = {}
    yield started
    for server in started.values():
        server.stop()


@pytest.mark.parametrize("scenario,name", list(_cases()))
def test_rfc7208(zones, scenario, name):
    if scenario not in zones:
        zones[scenario] = _zone(SCENARIOS[scenario]).start()
    server = zones[scenario]
    case = SCENARIOS[scenario]["tests"][name]
    resolver = Resolver([(server.host, server.port)], timeout=0.6)
    helo = case.get("helo", "")
    mailfrom = case.get("mailfrom", "")
    if mailfrom:
        domain = mailfrom.rpartition("@")[2]
        sender = mailfrom
    else:  # the HELO identity (RFC 7208 2.3)
        domain, sender = helo, f"postmaster@{helo}"
    result = asyncio.run(spf.check_host(resolver, case["host"], domain, sender, helo, RECEIVER))
    expected = case["result"] if isinstance(case["result"], list) else [case["result"]]
    assert result.result in expected, f"{case.get('description', '')} ({case.get('spec')}): {result.reason}"
    if "explanation" in case and result.result == "fail" and name not in EXPLANATION_NOT_COMPARED:
        want = spf.DEFAULT_EXPLANATION if case["explanation"] == "DEFAULT" else case["explanation"]
        assert result.explanation == want
