"""The message as Sieve sees it: header fields (decoded RFC 2047 words), addresses, body parts.

Built once per delivery from bytes; everything costly (decoding, address parsing, MIME
walking) happens on first use only, so a script that looks at two headers pays for two.
editheader changes the header list in place; `as_bytes()` gives the edited message.
"""
from __future__ import annotations

import email
import email.policy
import email.utils
from email.header import decode_header, make_header

MAX_HEADER_BYTES = 1 << 20  # header section parsed at most this far


def _decode_words(value: str) -> str:
    if "=?" not in value:
        return value
    try:
        return str(make_header(decode_header(value)))
    except Exception:  # a malformed encoded-word is matched as written
        return value


class RawAddress(str):
    """A header value in which no address could be read ("undisclosed-recipients:;", "junk"):
    the address test's :all sees the whole value, :localpart/:domain see nothing (as Pigeonhole)."""


def parse_addresses(values: list[str]) -> list[str]:
    out: list[str] = []
    for value in values:
        found = []
        for _, addr in email.utils.getaddresses([value]):
            local, at, domain = addr.rpartition("@")
            if at and local and domain:
                found.append(addr)
        if found:
            out.extend(found)
        elif value.strip():
            out.append(RawAddress(value.strip()))
    return out


class SieveMessage:
    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        end = raw.find(b"\r\n\r\n", 0, MAX_HEADER_BYTES)
        sep = 4
        if end < 0:
            end2 = raw.find(b"\n\n", 0, MAX_HEADER_BYTES)
            if end2 >= 0:
                end, sep = end2, 2
        if raw.startswith(b"\r\n"):
            end, sep = 0, 2
        if end < 0:
            head, self.body_offset = raw[:MAX_HEADER_BYTES], len(raw)
        else:
            head, self.body_offset = raw[:end], end + sep
        self.header_edited = False
        # [name as written, raw value (unfolded, leading blank removed)]
        self.fields: list[list[str]] = []
        text = head.decode("utf-8", "surrogateescape")
        for line in text.replace("\r\n", "\n").split("\n"):
            if not line:
                continue
            if line[0] in " \t" and self.fields:
                # unfold: the line break goes (RFC 5322 2.2.3); the fold's tabs read as spaces,
                # as Pigeonhole reads them
                lead = len(line) - len(line.lstrip(" \t"))
                self.fields[-1][1] += line[:lead].replace("\t", " ") + line[lead:]
                continue
            name, colon, value = line.partition(":")
            if not colon:
                continue
            self.fields.append([name.strip(), value.lstrip(" \t")])
        for f in self.fields:
            f[1] = f[1].rstrip(" \t")
        self._email = None
        self._reindex()

    def _reindex(self) -> None:
        self._by_name: dict[str, list[str]] = {}  # lower-case name -> raw values, top to bottom
        for name, value in self.fields:
            self._by_name.setdefault(name.lower(), []).append(value)
        self._decoded: dict[str, list[str]] = {}
        self._addresses: dict[str, list[str]] = {}

    @property
    def size(self) -> int:
        return len(self.raw)

    def headers(self, name: str) -> list[str]:
        """Decoded values of every field called `name` (any case), top to bottom."""
        lname = name.lower()
        out = self._decoded.get(lname)
        if out is None:
            out = self._decoded[lname] = [
                _decode_words(v).encode("utf-8", "surrogateescape").decode("utf-8", "replace")
                for v in self._by_name.get(lname, ())]
        return out

    def exists(self, name: str) -> bool:
        return name.lower() in self._by_name

    def addresses(self, name: str) -> list[str]:
        """Every address in the fields called `name` (groups flattened); "" for an empty <>."""
        lname = name.lower()
        out = self._addresses.get(lname)
        if out is None:
            out = self._addresses[lname] = parse_addresses(self.headers(lname))
        return out

    # --- mime (RFC 5703) ----------------------------------------------------------------
    def part_headers(self, name: str, anychild: bool) -> list[tuple[str, object]]:
        """[(decoded value, part)] of a header in the top level, or in every MIME part."""
        if not anychild:
            return [(v, None) for v in self.headers(name)]
        out = []
        for part in self._parsed().walk():
            for raw in part.get_all(name, []) or []:
                out.append((_decode_words(" ".join(str(raw).split())), part))
        return out

    def _parsed(self):
        if self._email is None:
            self._email = email.message_from_bytes(self.as_bytes(), policy=email.policy.compat32)
        return self._email

    # --- editheader --------------------------------------------------------------------
    def add_header(self, name: str, value: str, last: bool) -> None:
        field = [name, value]
        self.fields.append(field) if last else self.fields.insert(0, field)
        self.header_edited = True
        self._email = None
        self._reindex()

    def delete_header(self, name: str, keep: callable) -> int:
        """Delete fields called `name` whose decoded value keep(index, value) says to delete."""
        lname, out, n, idx = name.lower(), [], 0, 0
        for f in self.fields:
            if f[0].lower() == lname:
                idx += 1
                if keep(idx, _decode_words(f[1])):
                    n += 1
                    continue
            out.append(f)
        if n:
            self.fields = out
            self.header_edited = True
            self._email = None
            self._reindex()
        return n

    def as_bytes(self) -> bytes:
        if not self.header_edited:
            return self.raw
        head = "".join(f"{n}: {v}\r\n" for n, v in self.fields).encode("utf-8", "surrogateescape")
        return head + b"\r\n" + self.raw[self.body_offset:]

    # --- body (RFC 5173) -----------------------------------------------------------------
    def body_raw(self) -> str:
        return self.raw[self.body_offset:].decode("utf-8", "replace")

    def body_parts(self, content_types: list[str] | None) -> list[str]:
        """Decoded text of the leaf parts whose type matches (":text" = ["text"]).  A content
        type "" matches every part; "text" matches text/*; "text/plain" only that."""
        out = []
        for part in self._parsed().walk():
            ctype = part.get_content_type().lower()
            main = ctype.split("/")[0]
            if part.is_multipart():
                if content_types and any(t.lower() in (ctype, main) for t in content_types if t):
                    # a multipart matched by type: its prologue/epilogue text
                    out.append((part.preamble or "") + (part.epilogue or ""))
                continue
            if content_types is not None and not any(t == "" or t.lower() in (ctype, main) for t in content_types):
                continue
            payload = part.get_payload(decode=True) or b""
            charset = part.get_content_charset() or "us-ascii"
            try:
                text = payload.decode(charset, "replace")
            except LookupError:
                text = payload.decode("utf-8", "replace")
            if main == "text" and ctype == "text/html":
                text = _strip_html(text)
            out.append(text)
        return out


def _strip_html(text: str) -> str:
    import re
    return re.sub(r"<[^>]*>", " ", text)
