"""DKIM (RFC 6376, RFC 8463 Ed25519) and ARC (RFC 8617) verification with dkimpy, its key
lookups answered by the server's own async resolver.

dkimpy's checks are CPU work and its DNS hook (`dnsfunc`) is synchronous, so this runs in
two steps: the key names every signature needs are read from the headers and looked up
concurrently through the async resolver, then dkimpy runs in a worker thread with a
`dnsfunc` that only reads those prefetched answers (it never touches the network).

Current practice on top of the RFCs (as Gmail, rspamd and OpenDKIM do):
  - RSA keys under 1024 bits and rsa-sha1 signatures are not accepted (RFC 8301);
  - a valid signature with l= that leaves body content unsigned is reported as `policy`
    (the unsigned part could be anything) and does not count for DMARC.
"""
from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass

import dkim as dkimpy
from dkim.canonicalization import CanonicalizationPolicy
from dkim.util import InvalidTagValueList

from ..dns import DnsError
from . import dkimpy_speedups  # installs itself on import

MAX_SIGNATURES = 10  # more than this on one message is abuse, not mail: the rest are ignored
KEY_TEMPFAIL = object()


@dataclass
class DKIMResult:
    result: str  # pass | fail | neutral | policy | temperror | permerror
    domain: str = ""  # d=
    selector: str = ""  # s=
    algorithm: str = ""  # a=
    identity: str = ""  # i= (or @d)
    b: str = ""  # the first characters of b=, to tell signatures apart (RFC 6008)
    reason: str = ""


@dataclass
class ARCResult:
    result: str  # pass | fail | none (the chain validation status)
    instance: int = 0  # the newest instance
    sealer: str = ""  # d= of the newest ARC-Seal
    reason: str = ""


def signature_tags(value: bytes) -> dict[bytes, bytes] | None:
    """Tag list of a DKIM-Signature / ARC-* header value; None when it does not parse.
    Parsed once a message: key_names(), verify_dkim() and dkimpy share it (never mutated)."""
    try:
        return dkimpy_speedups.tags_of(value.strip())
    except (InvalidTagValueList, ValueError, IndexError):
        return None


_BLANKS_AND_CONTROLS = re.compile(r"[\s\x00-\x1f\x7f]+")
_BLANKS = re.compile(r"\s+")
_KEY_NAME = re.compile(r"[a-z0-9_.\-]{1,253}")
# dkimpy's logger, as dkimpy.DKIM() would look it up (with a lock) for every message.
_DKIMPY_LOG = dkimpy.get_default_logger()


def _text(value: bytes) -> str:
    """A tag value for headers and logs: ASCII, no white space (it may be folded) or controls."""
    return _BLANKS_AND_CONTROLS.sub("", value.decode("ascii", "replace"))


def _b_prefix(b: bytes) -> str:
    """The first 8 characters of b= without white space; read from its start, not all of it."""
    text = _BLANKS.sub("", b[:64].decode("ascii", "replace"))
    if len(text) < 8 and len(b) > 64:  # white space filled the start: all of it
        text = _BLANKS.sub("", b.decode("ascii", "replace"))
    return text[:8]


def _key_name(tags: dict[bytes, bytes]) -> str | None:
    s, d = tags.get(b"s"), tags.get(b"d")
    if not s or not d:
        return None
    try:
        name = f"{s.decode('ascii').strip()}._domainkey.{d.decode('ascii').strip()}".lower().rstrip(".")
    except UnicodeDecodeError:
        return None
    return name if _KEY_NAME.fullmatch(name) else None


def _headers(message: bytes) -> list[tuple[bytes, bytes]]:
    end = message.find(b"\r\n\r\n")
    head = message if end < 0 else message[:end + 2]
    out: list[tuple[bytes, bytes]] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and out:
            out[-1] = (out[-1][0], out[-1][1] + b"\r\n" + line)
        elif b":" in line:
            name, _, value = line.partition(b":")
            out.append((name.strip(), value))
    return out


def key_names(message: bytes, fields: list[tuple[bytes, bytes]] | None = None) -> set[str]:
    """Every selector._domainkey.domain a DKIM or ARC check of `message` will look up.
    `fields`: the message's header fields when the caller has them already (header_fields)."""
    names: set[str] = set()
    if fields is None:
        end = message.find(b"\r\n\r\n")
        head = (message if end < 0 else message[:end]).lower()
        if b"dkim-signature:" not in head and b"arc-seal:" not in head:
            return names
        fields = _headers(message)
    for name, value in fields:
        if name.lower() in (b"dkim-signature", b"arc-seal", b"arc-message-signature"):
            tags = signature_tags(value)
            key = _key_name(tags) if tags else None
            if key:
                names.add(key)
        if len(names) >= 2 * MAX_SIGNATURES:
            break
    return names


header_fields = _headers


def _key_record(txts: list[bytes]) -> bytes | None:
    # RFC 6376 3.6.2.2: several records is an error; take the first key record.
    keys = [t for t in txts if b"p=" in t]
    return keys[0] if keys else (txts[0] if txts else None)


def cached_keys(resolver, names: set[str]) -> dict[str, object] | None:
    """What prefetch_keys() would answer, from the resolver's memory alone (resolver.cached:
    no task, no wait); None when any of the names is not there."""
    out: dict[str, object] = {}
    for name in names:
        txts = resolver.cached(name, "TXT")
        if txts is None:
            return None
        out[name] = _key_record(txts)
    return out


async def prefetch_keys(resolver, names: set[str]) -> dict[str, object]:
    """name -> the key record (bytes), None (no such key), or KEY_TEMPFAIL; concurrently."""
    async def one(name: str):
        try:
            txts = await resolver.records(name, "TXT")
        except DnsError:
            return KEY_TEMPFAIL
        return _key_record(txts)

    if len(names) == 1:  # the common case: no tasks to make
        (name,) = names
        return {name: await one(name)}
    found = await asyncio.gather(*(one(n) for n in names))
    return dict(zip(names, found))


def _dnsfunc(keys: dict[str, object]):
    def lookup(name, timeout=5):
        if isinstance(name, bytes):
            name = name.decode("ascii", "replace")
        value = keys.get(name.lower().rstrip("."))
        if value is KEY_TEMPFAIL:
            raise dkimpy.DnsTimeoutError(f"temporary DNS failure for {name}")
        return value
    return lookup


def verify_dkim(message: bytes, keys: dict[str, object], min_rsa_bits: int = 1024) -> list[DKIMResult]:
    """Check every DKIM-Signature of `message` (CRLF line ends) against prefetched keys. Blocking."""
    if b"dkim-signature" not in message.lower():  # (the whole message: whatever dkimpy takes as its head)
        # Not signed: nothing to check, "dkim=none" (RFC 8601 2.7.1), without dkimpy's parse
        # of the whole message (~0.1 ms on the loop a message, issue 16) - and so without a
        # "permerror" for a malformed header line of a message that carries no signature.
        return []
    try:
        d = dkimpy.DKIM(message, logger=_DKIMPY_LOG, minkey=min_rsa_bits)
    except Exception as e:  # an unparsable message: nothing to check
        return [DKIMResult("permerror", reason=f"message not parsable: {e}")]
    indices = [i for i, (name, _) in enumerate(d.headers) if name.lower() == b"dkim-signature"]
    lookup = _dnsfunc(keys)
    out = []
    for idx in range(min(len(indices), MAX_SIGNATURES)):
        tags = signature_tags(d.headers[indices[idx]][1]) or {}
        res = DKIMResult("permerror")
        res.domain = _text(tags.get(b"d", b"")).lower()[:253]
        res.selector = _text(tags.get(b"s", b""))[:63]
        res.algorithm = _text(tags.get(b"a", b"")).lower()[:32]
        res.identity = _text(tags.get(b"i", b""))[:254] or (f"@{res.domain}" if res.domain else "")
        res.b = _b_prefix(tags.get(b"b", b""))
        out.append(res)
        if not tags:
            res.reason = "signature does not parse"
            continue
        if res.algorithm == "rsa-sha1":
            res.reason = "rsa-sha1 is not accepted (RFC 8301)"
            continue
        key = _key_name(tags)
        if key is not None and keys.get(key) is KEY_TEMPFAIL:
            res.result, res.reason = "temperror", "key lookup failed"
            continue
        try:
            ok = d.verify(idx=idx, dnsfunc=lookup)
        except dkimpy.KeyFormatError as e:
            res.reason = str(e)[:120]
            continue
        except dkimpy.ValidationError as e:
            res.result, res.reason = "fail" if "body hash" in str(e) else "permerror", str(e)[:120]
            continue
        except dkimpy.DnsTimeoutError as e:
            res.result, res.reason = "temperror", str(e)[:120]
            continue
        except Exception as e:  # MessageFormatError, ParameterError, and anything odd in a signature
            res.reason = str(e)[:120] or type(e).__name__
            continue
        if not ok:
            if key is not None and keys.get(key) is None:
                res.reason = "no key for the signature"
            else:
                res.result, res.reason = "fail", "signature did not verify"
            continue
        res.result = "pass"
        if b"l" in tags and _unsigned_body(d, tags):
            res.result, res.reason = "policy", "l= leaves part of the body unsigned"
    return out


def _unsigned_body(d, tags: dict[bytes, bytes]) -> bool:
    try:
        policy = CanonicalizationPolicy.from_c_value(tags.get(b"c", b"simple/simple"))
        return len(policy.canonicalize_body(d.body)) > int(tags[b"l"])
    except Exception:
        return True


def verify_arc(message: bytes, keys: dict[str, object], min_rsa_bits: int = 1024) -> ARCResult:
    """Validate the ARC chain of `message` (RFC 8617 5.2) with prefetched keys. Blocking."""
    end = message.find(b"\r\n\r\n")
    if b"arc-seal:" not in (message if end < 0 else message[:end]).lower():
        return ARCResult("none")
    seals = [signature_tags(v) or {} for n, v in _headers(message) if n.lower() == b"arc-seal"]
    if not seals:
        return ARCResult("none")
    newest = max(seals, key=lambda t: int(t.get(b"i", b"0")) if t.get(b"i", b"").isdigit() else 0)
    instance = int(newest.get(b"i", b"0")) if newest.get(b"i", b"").isdigit() else 0
    sealer = _text(newest.get(b"d", b"")).lower()[:253]
    try:
        cv, _, reason = dkimpy.ARC(message, logger=_DKIMPY_LOG, minkey=min_rsa_bits).verify(dnsfunc=_dnsfunc(keys))
    except dkimpy.DnsTimeoutError as e:
        return ARCResult("fail", instance, sealer, f"temporary DNS failure: {e}")
    except Exception as e:
        return ARCResult("fail", instance, sealer, str(e)[:120] or type(e).__name__)
    result = cv.decode() if isinstance(cv, bytes) else str(cv)
    return ARCResult(result, instance, sealer, reason if isinstance(reason, str) else "")


async def verify(message: bytes, resolver, min_rsa_bits: int = 1024) -> tuple[list[DKIMResult], ARCResult]:
    """DKIM results of every signature and the ARC chain status: DNS async, CPU in a thread."""
    keys = await prefetch_keys(resolver, key_names(message))
    return await asyncio.to_thread(verify_both, message, keys, min_rsa_bits)


def verify_both(message: bytes, keys: dict, min_rsa_bits: int) -> tuple[list[DKIMResult], ARCResult]:
    return verify_dkim(message, keys, min_rsa_bits), verify_arc(message, keys, min_rsa_bits)

