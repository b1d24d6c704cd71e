"""Speed-ups of dkimpy's internals (pyproject pins dkimpy below 1.2 for them).

Verifying a typical signed message must cost well under a millisecond of CPU.  dkimpy does
the RSA public-key operation with Python's pow() (~0.3 ms for 2048 bits), parses the key
record's ASN.1 in Python for every signature, splits and re-joins the whole body into lines,
and runs its whitespace regexes over every blank of the body.  Here OpenSSL (through
`cryptography`) does the first in ~0.03 ms, a parsed key is kept per record, the body is
taken as it is when the message has CRLF line ends only, and the regexes run only when
there is something to rewrite.  Also (issue 16, session 6): the b= value is blanked in one
scan, and each signature's tag list is parsed once for the stage, dkim.py and dkimpy
together.  Same results:
tests/test_senderauth.py compares each replacement with dkimpy's own on fuzzed input.
Importing this module installs them.  dkimpy internals relied on: the module globals
RSASSA_PKCS1_v1_5_verify, load_pk_from_dns, rfc822_parse, RE_BTAG, parse_tag_value,
and canonicalization's compress_whitespace, strip_trailing_whitespace, unfold_header_value.
"""
from __future__ import annotations

import functools
import re

import dkim as dkimpy
import dkim.canonicalization as _canon
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils
from dkim.util import DuplicateTag, InvalidTagSpec
from dkim.util import parse_tag_value as _dkimpy_parse_tag_value

_dkimpy_rsa_verify = dkimpy.RSASSA_PKCS1_v1_5_verify
_dkimpy_compress = _canon.compress_whitespace
_RSA_KEYS: dict[tuple[int, int], object] = {}
_HASHES = {"sha256": hashes.SHA256, "sha1": hashes.SHA1}


def _openssl_rsa_verify(hash, signature, public_key) -> bool:
    n, e = public_key["modulus"], public_key["publicExponent"]
    key = _RSA_KEYS.get((n, e))
    if key is None:
        try:
            key = rsa.RSAPublicNumbers(e, n).public_key()
        except ValueError:  # a key OpenSSL will not load: let dkimpy judge it
            return _dkimpy_rsa_verify(hash, signature, public_key)
        if len(_RSA_KEYS) > 1000:
            _RSA_KEYS.clear()
        _RSA_KEYS[(n, e)] = key
    algorithm = _HASHES.get(hash.name)
    if algorithm is None:
        return _dkimpy_rsa_verify(hash, signature, public_key)
    try:
        key.verify(signature, hash.digest(), padding.PKCS1v15(), utils.Prehashed(algorithm()))
        return True
    except InvalidSignature:
        return False


_RUNS = re.compile(rb"[\t ]{2,}|\t")
_dkimpy_strip_trailing = _canon.strip_trailing_whitespace


def _compress_whitespace(content: bytes) -> bytes:
    return _RUNS.sub(b" ", content) if b"  " in content or b"\t" in content else content


def _strip_trailing_whitespace(content: bytes) -> bytes:
    if b" \r\n" in content or b"\t\r\n" in content:
        return _dkimpy_strip_trailing(content)
    return content


_dkimpy_unfold = _canon.unfold_header_value


def _unfold_header_value(content: bytes) -> bytes:
    # Same as dkimpy's re.sub(b"\r?\n", b"", ...): every LF goes, and a CR only right before one.
    return content.replace(b"\r\n", b"").replace(b"\n", b"")


_dkimpy_rfc822_parse = dkimpy.rfc822_parse
_FIELD_NAME = re.compile(rb"([\x21-\x7e]+?):")  # dkimpy's, compiled once


def _rfc822_parse(message: bytes):
    """dkimpy's parse, without splitting and re-joining the whole body into lines: with CRLF
    line ends only (what the SMTP server stores), the body is simply what follows the blank line.
    The header lines are read as dkimpy reads them; anything it would treat specially (a
    "From " line, a malformed line, a continuation before any field) goes to dkimpy's own."""
    end = message.find(b"\r\n\r\n")
    if end <= 0 or message.startswith(b"\r\n") or message.count(b"\n") != message.count(b"\r\n"):
        return _dkimpy_rfc822_parse(message)
    headers: list[list[bytes]] = []
    for line in message[:end].split(b"\r\n"):  # no empty line before `end`: the first blank one
        if line[:1] in (b" ", b"\t"):
            if not headers:
                return _dkimpy_rfc822_parse(message)
            headers[-1][1] += line + b"\r\n"
        else:
            m = _FIELD_NAME.match(line)
            if m is None:
                return _dkimpy_rfc822_parse(message)
            headers.append([m.group(1), line[m.end():] + b"\r\n"])
    return headers, message[end + 4:]


# The b= value blanked in the signature field before it is hashed.  dkimpy's pattern repeats
# (FWS base64-char) per character, ~30 us on a 2048-bit signature; FWS matches exactly the
# runs of white space, so "as many (white space, base64 char) as possible" is "the longest run
# of white space and base64 chars that ends in a base64 char": the same matches, one scan.
_dkimpy_re_btag = dkimpy.RE_BTAG
_RE_BTAG = re.compile(rb"([;\s]b" + dkimpy.FWS + rb"=)(?:[\sa-zA-Z0-9+/=]*[a-zA-Z0-9+/=])?(?:\r?\n\Z)?")


def _parse_tag_value_fresh(tag_list: bytes) -> dict[bytes, bytes]:
    """dkimpy.util.parse_tag_value without a regex call per tag (its ^[a-zA-Z](\\w)* match only
    asks that the name start with an ASCII letter); same results, same exceptions."""
    tags: dict[bytes, bytes] = {}
    tag_specs = tag_list.strip().split(b";")
    if not tag_specs[-1]:  # trailing semicolons are valid
        tag_specs.pop()
    for tag_spec in tag_specs:
        key, eq, value = tag_spec.partition(b"=")
        if not eq:
            raise InvalidTagSpec(tag_spec)
        key = key.strip()
        if not key[:1].isalpha():  # bytes.isalpha(): ASCII letters only
            raise InvalidTagSpec(tag_spec)
        if key in tags:
            raise DuplicateTag(key)
        tags[key] = value.strip()
    return tags


@functools.lru_cache(maxsize=64)
def tags_of(stripped_value: bytes) -> dict[bytes, bytes]:
    """The parsed tag list of a DKIM-Signature / ARC-* value with its outer white space
    stripped (the parse strips it first anyway), shared: the stage reads the key names from
    it, verify_dkim the d=/s=/i= tags, dkimpy's DKIM and ARC checks everything: one parse a
    message.  Never mutate the result.  Raises dkimpy's InvalidTagValueList (not cached)."""
    return _parse_tag_value_fresh(stripped_value)


def _parse_tag_value(tag_list):
    if type(tag_list) is not bytes:
        return _dkimpy_parse_tag_value(tag_list)
    return dict(tags_of(tag_list.strip()))  # dkimpy may change its copy


_PARSED_KEYS: dict[tuple, tuple] = {}


def _load_pk_from_dns(name, dnsfunc, timeout=5):
    """dkimpy's key loading, with the parsed key kept for the same record (ASN.1 in Python)."""
    record = dnsfunc(name, timeout=timeout)
    found = _PARSED_KEYS.get((name, record))
    if found is None:
        found = dkimpy.evaluate_pk(name, record)
        if len(_PARSED_KEYS) > 1000:
            _PARSED_KEYS.clear()
        _PARSED_KEYS[(name, record)] = found
    return found


dkimpy.RSASSA_PKCS1_v1_5_verify = _openssl_rsa_verify
dkimpy.load_pk_from_dns = _load_pk_from_dns
dkimpy.rfc822_parse = _rfc822_parse
dkimpy.RE_BTAG = _RE_BTAG
dkimpy.parse_tag_value = _parse_tag_value
_canon.compress_whitespace = _compress_whitespace
_canon.strip_trailing_whitespace = _strip_trailing_whitespace
_canon.unfold_header_value = _unfold_header_value
