"""DMARC (RFC 7489): the policy record, the organisational domain, alignment, the verdict.

    record = parse_record("v=DMARC1; p=reject; pct=50")     # pure; ValueError when unusable
    verdict = await evaluate(resolver, from_domain, spf_domain, spf_result, dkim_results)
    verdict.result       pass | fail | none | temperror | permerror
    verdict.disposition  none | quarantine | reject   (what the domain asks for this message,
                                                       after pct sampling)

The organisational domain comes from the Public Suffix List of the publicsuffixlist
package (its bundled copy: nothing is downloaded at run time).
"""
from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass, field

from ..dns import DnsError

_PSL = None


@functools.lru_cache(maxsize=4096)  # the same few domains over and over; the list does not change
def org_domain(domain: str) -> str:
    """RFC 7489 3.2: the public suffix plus one label; a public suffix itself stays as it is."""
    global _PSL
    if _PSL is None:
        from publicsuffixlist import PublicSuffixList
        _PSL = PublicSuffixList()
    domain = domain.lower().rstrip(".")
    return _PSL.privatesuffix(domain) or domain


@dataclass
class Record:
    p: str  # none | quarantine | reject
    sp: str | None = None
    pct: int = 100
    adkim: str = "r"  # r | s
    aspf: str = "r"
    rua: list[str] = field(default_factory=list)
    ruf: list[str] = field(default_factory=list)


_POLICIES = ("none", "quarantine", "reject")


@functools.lru_cache(maxsize=1024)  # the same few records arrive over and over; never mutated
def parse_record(text: str) -> Record:
    """6.3 / 6.6.3: a usable record, or ValueError.  A record with a bad or missing p= but a
    valid rua= counts as p=none (6.6.3 step 6)."""
    parts = [p.strip() for p in text.split(";")]
    if not parts or parts[0].replace(" ", "") != "v=DMARC1":
        raise ValueError("does not start with v=DMARC1")
    tags: dict[str, str] = {}
    for part in parts[1:]:
        if not part:
            continue
        name, eq, value = part.partition("=")
        name = name.strip().lower()
        if not eq or not re.fullmatch(r"[a-z]+", name):
            raise ValueError(f"bad tag {part[:40]!r}")
        tags.setdefault(name, value.strip())
    rua = [u.strip() for u in tags.get("rua", "").split(",") if u.strip()]
    ruf = [u.strip() for u in tags.get("ruf", "").split(",") if u.strip()]
    valid_rua = [u for u in rua if u.lower().startswith("mailto:")]
    p = tags.get("p", "").lower()
    sp = tags.get("sp", "").lower() or None
    if p not in _POLICIES or (sp is not None and sp not in _POLICIES):
        if not valid_rua:
            raise ValueError("no valid p= (and no rua=)")
        p, sp = "none", None
    pct = 100
    if "pct" in tags:
        try:
            pct = min(max(int(tags["pct"]), 0), 100)
        except ValueError:
            pct = 100  # 6.3: an invalid value is ignored
    adkim = tags.get("adkim", "r").lower()
    aspf = tags.get("aspf", "r").lower()
    return Record(p, sp, pct, adkim if adkim in ("r", "s") else "r", aspf if aspf in ("r", "s") else "r",
                  valid_rua, ruf)


def aligned(identifier: str, from_domain: str, mode: str) -> bool:
    """3.1: strict = the same name; relaxed = the same organisational domain."""
    identifier, from_domain = identifier.lower().rstrip("."), from_domain.lower().rstrip(".")
    if not identifier:
        return False
    if mode == "s":
        return identifier == from_domain
    return identifier == from_domain or org_domain(identifier) == org_domain(from_domain)


@dataclass
class Verdict:
    result: str  # pass | fail | none | temperror | permerror
    from_domain: str = ""
    policy: str = "none"  # the p= (or sp=) that applies
    disposition: str = "none"  # after pct sampling: none | quarantine | reject
    record_domain: str = ""  # where the record was found
    pct: int = 100
    spf_aligned: bool = False
    dkim_aligned: bool = False
    reason: str = ""

    def as_dict(self) -> dict:
        """What an aggregate report (RFC 7489 7.2) needs later, for the queue meta."""
        return {"result": self.result, "from": self.from_domain, "policy": self.policy,
                "disposition": self.disposition, "record": self.record_domain, "pct": self.pct,
                "spf_aligned": self.spf_aligned, "dkim_aligned": self.dkim_aligned}


def _single_record(txts: list[bytes]) -> Record | None:
    """The one usable DMARC record among a name's TXT records (none, or several: None)."""
    records = []
    for t in txts:
        if t[:8].replace(b" ", b"").lower().startswith(b"v=dmarc1"):
            try:
                records.append(parse_record(t.decode("utf-8", "replace")))
            except ValueError:
                continue
    return records[0] if len(records) == 1 else None


async def find_record(resolver, domain: str) -> tuple[Record | None, str]:
    """6.6.3: _dmarc.<From domain>, else _dmarc.<organisational domain>. DnsError passes up."""
    for where in dict.fromkeys((domain, org_domain(domain))):
        record = _single_record(await resolver.records(f"_dmarc.{where}", "TXT"))
        if record is not None:
            return record, where
    return None, ""


def cached_record(resolver, domain: str) -> tuple[Record | None, str] | None:
    """What find_record() would answer, from the resolver's memory alone (resolver.cached);
    None when a look-up it needs is not there."""
    for where in dict.fromkeys((domain, org_domain(domain))):
        txts = resolver.cached(f"_dmarc.{where}", "TXT")
        if txts is None:
            return None
        record = _single_record(txts)
        if record is not None:
            return record, where
    return None, ""


async def evaluate(resolver, from_domain: str, spf_domain: str, spf_result: str, dkim_results,
                   rng: random.Random | None = None) -> Verdict:
    """The DMARC verdict for a message whose From: domain is `from_domain`.

    `spf_domain`/`spf_result`: the SPF-checked identity (MAIL FROM domain, or HELO for the
    null sender) and its result; `dkim_results`: DKIMResult-like objects (result, domain)."""
    from_domain = from_domain.lower().rstrip(".")
    try:
        record, where = await find_record(resolver, from_domain)
    except DnsError as e:
        return Verdict("temperror", from_domain, reason=str(e))
    return judge(record, where, from_domain, spf_domain, spf_result, dkim_results, rng)


def judge(record: Record | None, where: str, from_domain: str, spf_domain: str, spf_result: str,
          dkim_results, rng: random.Random | None = None) -> Verdict:
    """The verdict once the record is known (find_record); pure."""
    from_domain = from_domain.lower().rstrip(".")
    if record is None:
        return Verdict("none", from_domain, reason="no DMARC record")
    spf_ok = spf_result == "pass" and aligned(spf_domain, from_domain, record.aspf)
    dkim_ok = any(r.result == "pass" and aligned(r.domain, from_domain, record.adkim) for r in dkim_results)
    # sp= applies to subdomains when the record is the organisational domain's (6.6.3).
    policy = record.sp if (record.sp and where != from_domain) else record.p
    verdict = Verdict("pass" if spf_ok or dkim_ok else "fail", from_domain, policy, "none", where, record.pct,
                      spf_ok, dkim_ok)
    if verdict.result == "fail":
        disposition = policy
        if policy != "none" and (rng or random).random() * 100 >= record.pct:
            # 6.6.4: a message not sampled gets the next less strict policy.
            disposition = "quarantine" if policy == "reject" else "none"
        verdict.disposition = disposition
        verdict.reason = "neither SPF nor DKIM aligned with the From: domain"
    return verdict
