"""The Sendmail/Postfix milter protocol, version 6, as bytes in and events out (no I/O).

Every packet on the wire is a 4-byte big-endian length (command byte included), one
command byte, then the command's data.  The MTA sends commands (`encode_*` below); the
milter answers with responses, parsed by `Decoder` into `Response` objects.  The
client in client.py owns the sockets and the order of the conversation.

References: libmilter's mfdef.h / mfapi.h and Postfix's src/milter/milter8.c (what
Postfix really sends: macros before each stage, body in 65535-byte chunks, header
values without the leading space).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

VERSION = 6
MAX_PACKET = 1024 * 1024 + 64  # a 1 MB body-replacement chunk (SMFIP_MDS_1M) plus its header
BODY_CHUNK = 65535  # MILTER_CHUNK_SIZE: what Postfix sends per SMFIC_BODY

# --- MTA -> milter commands (SMFIC_*) --------------------------------------------------
ABORT, BODY, CONNECT, MACRO, BODYEOB, HELO, QUIT_NC, HEADER, MAIL, EOH, OPTNEG, QUIT, RCPT, DATA, UNKNOWN = (
    b"A", b"B", b"C", b"D", b"E", b"H", b"K", b"L", b"M", b"N", b"O", b"Q", b"R", b"T", b"U")

# --- milter -> MTA responses (SMFIR_*) --------------------------------------------------
R_ADDRCPT, R_DELRCPT, R_ADDRCPT_PAR, R_SHUTDOWN = b"+", b"-", b"2", b"4"
R_ACCEPT, R_REPLBODY, R_CONTINUE, R_DISCARD, R_CHGFROM, R_CONN_FAIL = b"a", b"b", b"c", b"d", b"e", b"f"
R_ADDHEADER, R_INSHEADER, R_SETSYMLIST, R_CHGHEADER, R_PROGRESS, R_QUARANTINE = b"h", b"i", b"l", b"m", b"p", b"q"
R_REJECT, R_SKIP, R_TEMPFAIL, R_REPLYCODE, R_OPTNEG = b"r", b"s", b"t", b"y", b"O"

# Responses that end a stage (anything else is a modification or progress).
FINAL = frozenset({R_ACCEPT, R_CONTINUE, R_DISCARD, R_REJECT, R_TEMPFAIL, R_REPLYCODE, R_SKIP,
                   R_CONN_FAIL, R_SHUTDOWN})
MODIFICATIONS = frozenset({R_ADDRCPT, R_DELRCPT, R_ADDRCPT_PAR, R_REPLBODY, R_CHGFROM, R_ADDHEADER,
                           R_INSHEADER, R_CHGHEADER, R_QUARANTINE})

# --- actions the milter may take (SMFIF_*) ----------------------------------------------
F_ADDHDRS, F_CHGBODY, F_ADDRCPT, F_DELRCPT, F_CHGHDRS, F_QUARANTINE, F_CHGFROM, F_ADDRCPT_PAR, F_SETSYMLIST = (
    0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0x100)
ALL_ACTIONS = 0x1FF

# --- protocol steps (SMFIP_*) -------------------------------------------------------------
P_NOCONNECT, P_NOHELO, P_NOMAIL, P_NORCPT, P_NOBODY, P_NOHDRS, P_NOEOH, P_NR_HDR = (
    0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80)
P_NOUNKNOWN, P_NODATA, P_SKIP, P_RCPT_REJ = 0x100, 0x200, 0x400, 0x800
P_NR_CONN, P_NR_HELO, P_NR_MAIL, P_NR_RCPT, P_NR_DATA, P_NR_UNKN, P_NR_EOH, P_NR_BODY = (
    0x1000, 0x2000, 0x4000, 0x8000, 0x10000, 0x20000, 0x40000, 0x80000)
P_HDR_LEADSPC = 0x100000
P_MDS_256K, P_MDS_1M = 0x10000000, 0x20000000
# What this MTA can do: every step may be skipped or left unanswered; RCPT_REJ is not
# offered (rejected recipients are never shown to milters, as Postfix does by default).
MTA_PROTOCOL = (P_NOCONNECT | P_NOHELO | P_NOMAIL | P_NORCPT | P_NOBODY | P_NOHDRS | P_NOEOH | P_NR_HDR
                | P_NOUNKNOWN | P_NODATA | P_SKIP | P_NR_CONN | P_NR_HELO | P_NR_MAIL | P_NR_RCPT
                | P_NR_DATA | P_NR_UNKN | P_NR_EOH | P_NR_BODY | P_HDR_LEADSPC | P_MDS_256K | P_MDS_1M)

# Macro stages of SMFIR_SETSYMLIST (SMFIM_*), and the command each one precedes.
STAGE_CONNECT, STAGE_HELO, STAGE_ENVFROM, STAGE_ENVRCPT, STAGE_DATA, STAGE_EOM, STAGE_EOH = range(7)
STAGE_COMMAND = {STAGE_CONNECT: CONNECT, STAGE_HELO: HELO, STAGE_ENVFROM: MAIL, STAGE_ENVRCPT: RCPT,
                 STAGE_DATA: DATA, STAGE_EOM: BODYEOB, STAGE_EOH: EOH}

# Which step a "no step" / "no reply" bit refers to, per command.
SKIP_BIT = {CONNECT: P_NOCONNECT, HELO: P_NOHELO, MAIL: P_NOMAIL, RCPT: P_NORCPT, DATA: P_NODATA,
            HEADER: P_NOHDRS, EOH: P_NOEOH, BODY: P_NOBODY, UNKNOWN: P_NOUNKNOWN}
NOREPLY_BIT = {CONNECT: P_NR_CONN, HELO: P_NR_HELO, MAIL: P_NR_MAIL, RCPT: P_NR_RCPT, DATA: P_NR_DATA,
               HEADER: P_NR_HDR, EOH: P_NR_EOH, BODY: P_NR_BODY, UNKNOWN: P_NR_UNKN}


class ProtocolError(Exception):
    """The milter sent something that is not the milter protocol."""


# --- encoding (MTA side) ------------------------------------------------------------------
def packet(cmd: bytes, data: bytes = b"") -> bytes:
    return struct.pack("!I", len(data) + 1) + cmd + data


def _cstr(text: str | bytes) -> bytes:
    raw = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text
    return raw.replace(b"\0", b"") + b"\0"  # a NUL inside would end the string early


def encode_optneg(version: int = VERSION, actions: int = ALL_ACTIONS, protocol: int = MTA_PROTOCOL) -> bytes:
    return packet(OPTNEG, struct.pack("!III", version, actions, protocol))


def encode_macros(command: bytes, macros: dict[str, str]) -> bytes:
    """SMFIC_MACRO for the command that follows; names as Postfix sends them ("j", "{daemon_name}")."""
    data = command + b"".join(_cstr(k) + _cstr(v) for k, v in macros.items())
    return packet(MACRO, data)


def encode_connect(hostname: str, ip: str | None, port: int = 0) -> bytes:
    """SMFIC_CONNECT: family '4' or '6' with port and address; 'U' (unknown) without an address."""
    if ip is None:
        return packet(CONNECT, _cstr(hostname) + b"U")
    family = b"6" if ":" in ip else b"4"
    return packet(CONNECT, _cstr(hostname) + family + struct.pack("!H", port) + _cstr(ip))


def encode_helo(helo: str) -> bytes:
    return packet(HELO, _cstr(helo))


def encode_envelope(cmd: bytes, address: str, args: list[str] = ()) -> bytes:
    """SMFIC_MAIL / SMFIC_RCPT: "<address>" then the ESMTP parameters, each NUL-terminated."""
    return packet(cmd, _cstr(f"<{address}>") + b"".join(_cstr(a) for a in args))


def encode_header(name: str | bytes, value: str | bytes) -> bytes:
    return packet(HEADER, _cstr(name) + _cstr(value))


def encode_body(chunk: bytes) -> list[bytes]:
    """SMFIC_BODY packets of at most BODY_CHUNK bytes each."""
    return [packet(BODY, chunk[i:i + BODY_CHUNK]) for i in range(0, len(chunk), BODY_CHUNK)]


# --- decoding (milter side -> MTA) --------------------------------------------------------
@dataclass
class Response:
    """One response of the milter.  Fields that a given code does not use stay empty.

    code       the SMFIR_* byte
    text       reply text (replycode), rcpt/sender (add/del rcpt, chgfrom), reason (quarantine)
    args       ESMTP arguments (addrcpt_par, chgfrom)
    name/value header name and value (add/ins/chg header); value "" deletes (chgheader)
    index      header index: 1-based occurrence for chgheader, position for insheader
    body       a piece of the replacement body
    version/actions/protocol/symlists   option negotiation
    """

    code: bytes
    text: str = ""
    args: list[str] = field(default_factory=list)
    name: str = ""
    value: str = ""
    index: int = 0
    body: bytes = b""
    version: int = 0
    actions: int = 0
    protocol: int = 0
    symlists: dict[int, list[str]] = field(default_factory=dict)


def _strings(data: bytes, n: int | None = None) -> list[str]:
    """NUL-terminated strings; exactly n when n is given (else ProtocolError)."""
    if data and not data.endswith(b"\0"):
        raise ProtocolError("string not NUL-terminated")
    parts = [p.decode("utf-8", "surrogateescape") for p in data[:-1].split(b"\0")] if data else []
    if n is not None and len(parts) != n:
        raise ProtocolError(f"expected {n} strings, got {len(parts)}")
    return parts


def parse_response(code: bytes, data: bytes) -> Response:
    """One packet's command byte and data -> Response (ProtocolError if malformed)."""
    if code == R_OPTNEG:
        if len(data) < 12:
            raise ProtocolError("short option negotiation")
        version, actions, protocol = struct.unpack("!III", data[:12])
        symlists: dict[int, list[str]] = {}
        rest = data[12:]
        while rest:  # pairs of (uint32 stage, NUL-terminated space-separated macro names)
            if len(rest) < 5:
                raise ProtocolError("short macro list")
            (stage,), rest = struct.unpack("!I", rest[:4]), rest[4:]
            end = rest.find(b"\0")
            if end < 0 or stage not in STAGE_COMMAND:
                raise ProtocolError("bad macro list")
            symlists[stage] = rest[:end].decode("ascii", "replace").split()
            rest = rest[end + 1:]
        return Response(code, version=version, actions=actions, protocol=protocol, symlists=symlists)
    if code in (R_ACCEPT, R_CONTINUE, R_DISCARD, R_REJECT, R_TEMPFAIL, R_SKIP, R_PROGRESS, R_CONN_FAIL,
                R_SHUTDOWN):
        return Response(code)
    if code == R_REPLYCODE:
        (text,) = _strings(data, 1)
        if len(text) < 3 or not text[:3].isdigit() or text[0] not in "45" or (len(text) > 3 and text[3] not in " -"):
            raise ProtocolError(f"bad reply code {text[:20]!r}")
        return Response(code, text=text)
    if code in (R_ADDRCPT, R_DELRCPT):
        (rcpt,) = _strings(data, 1)
        return Response(code, text=rcpt)
    if code in (R_ADDRCPT_PAR, R_CHGFROM):
        parts = _strings(data)
        if not parts:
            raise ProtocolError("missing address")
        args = parts[1].split() if len(parts) > 1 else []
        return Response(code, text=parts[0], args=args)
    if code == R_QUARANTINE:
        (reason,) = _strings(data, 1)
        return Response(code, text=reason)
    if code == R_REPLBODY:
        return Response(code, body=data)
    if code == R_ADDHEADER:
        name, value = _strings(data, 2)
        return Response(code, name=name, value=value)
    if code in (R_INSHEADER, R_CHGHEADER):
        if len(data) < 4:
            raise ProtocolError("short header index")
        (index,) = struct.unpack("!I", data[:4])
        name, value = _strings(data[4:], 2)
        return Response(code, name=name, value=value, index=index)
    raise ProtocolError(f"unknown response {code!r}")


class Decoder:
    """Bytes from the milter in, Responses out; buffering bounded by MAX_PACKET."""

    def __init__(self, max_packet: int = MAX_PACKET) -> None:
        self.buf = bytearray()
        self.max_packet = max_packet

    def feed(self, data: bytes) -> list[Response]:
        self.buf += data
        out = []
        while len(self.buf) >= 4:
            (length,) = struct.unpack("!I", self.buf[:4])
            if length < 1 or length > self.max_packet:
                raise ProtocolError(f"bad packet length {length}")
            if len(self.buf) < 4 + length:
                break
            code, data = bytes(self.buf[4:5]), bytes(self.buf[5:4 + length])
            del self.buf[:4 + length]
            out.append(parse_response(code, data))
        return out


# --- the message, as the milter sees it ------------------------------------------------------
def split_message(message: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """Message bytes -> ([(name, raw value with its folding)], body).  Lines end in CRLF."""
    end = message.find(b"\r\n\r\n")
    if message.startswith(b"\r\n"):
        head, body = b"", message[2:]
    elif end < 0:
        head, body = message, b""
    else:
        head, body = message[:end + 2], message[end + 4:]
    headers: list[tuple[bytes, bytes]] = []
    for line in head.split(b"\r\n"):
        if not line:
            continue
        if line[:1] in (b" ", b"\t") and headers:
            name, value = headers[-1]
            headers[-1] = (name, value + b"\r\n" + line)
            continue
        name, colon, value = line.partition(b":")
        if not colon:  # not a header line (a broken message): keep it as a nameless header
            headers.append((line, None))  # type: ignore[arg-type]
            continue
        headers.append((name, value))
    return headers, body


def join_message(headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
    out = []
    for name, value in headers:
        out.append(name if value is None else name + b":" + value)
    return b"".join(line + b"\r\n" for line in out) + b"\r\n" + body


def milter_value(raw: bytes, leading_space: bool) -> bytes:
    """A header's raw value as milters are given it: folds as LF (as Postfix sends them), the
    leading space kept only if the milter asked for SMFIP_HDR_LEADSPC."""
    value = raw.replace(b"\r\n", b"\n")
    if not leading_space and value[:1] == b" ":
        value = value[1:]
    return value


def wire_value(value: str, leading_space: bool) -> bytes:
    """A header value from a milter -> raw bytes after the colon, CRLF folds.  Every
    continuation line starts with white space, so a value can never start a header of its own."""
    raw = value.encode("utf-8", "surrogateescape").replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    lines = raw.split(b"\n")
    raw = b"\r\n".join([lines[0]] + [line if line[:1] in (b" ", b"\t") else b" " + line for line in lines[1:]])
    if not leading_space and raw[:1] not in (b" ", b"\t"):
        raw = b" " + raw
    return raw


def check_header_name(name: str) -> bytes:
    """A header name from a milter: printable ASCII without ':' or white space (RFC 5322 2.2)."""
    raw = name.encode("utf-8", "surrogateescape")
    if not raw or any(c < 33 or c > 126 or c == 58 for c in raw):
        raise ProtocolError(f"bad header name {name[:40]!r}")
    return raw


def normalize_body(body: bytes) -> bytes:
    """A replacement body with bare LF -> CRLF line ends."""
    return body.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


@dataclass
class Changes:
    """What the modifications of one end-of-message answer amount to."""

    message: bytes | None = None  # the new message if headers or body changed
    add_rcpts: list[str] = field(default_factory=list)
    del_rcpts: list[str] = field(default_factory=list)
    sender: str | None = None
    quarantine: str | None = None
    actions: list[str] = field(default_factory=list)  # for the log: "addheader", "replbody", …


def _unbracket(address: str) -> str:
    address = address.strip()
    return address[1:-1] if address.startswith("<") and address.endswith(">") else address


def apply_modifications(message: bytes, mods: list[Response], leading_space: bool = False) -> Changes:
    """Apply a milter's end-of-message modifications, in the order sent (libmilter semantics:
    ProtocolError for a header name that is not one;
    chgheader's index is the n-th header of that name, 1-based, an empty value deletes it and a
    missing one is added; insheader's index is a position among all headers, 0 = top)."""
    out = Changes()
    headers, body = split_message(message)
    new_body: list[bytes] | None = None
    edited = False
    for m in mods:
        out.actions.append({R_ADDHEADER: "addheader", R_INSHEADER: "insheader", R_CHGHEADER: "chgheader",
                            R_REPLBODY: "replbody", R_ADDRCPT: "addrcpt", R_ADDRCPT_PAR: "addrcpt",
                            R_DELRCPT: "delrcpt", R_CHGFROM: "chgfrom", R_QUARANTINE: "quarantine"}[m.code])
        name = check_header_name(m.name) if m.code in (R_ADDHEADER, R_INSHEADER, R_CHGHEADER) else b""
        if m.code == R_ADDHEADER:
            headers.append((name, wire_value(m.value, leading_space)))
            edited = True
        elif m.code == R_INSHEADER:
            headers.insert(min(m.index, len(headers)), (name, wire_value(m.value, leading_space)))
            edited = True
        elif m.code == R_CHGHEADER:
            seen, at = 0, None
            for i, (n, _) in enumerate(headers):
                if n is not None and n.strip().lower() == name.lower():
                    seen += 1
                    if seen == max(m.index, 1):
                        at = i
                        break
            if at is not None and m.value == "":
                del headers[at]
            elif at is not None:
                headers[at] = (headers[at][0], wire_value(m.value, leading_space))
            elif m.value != "":
                headers.append((name, wire_value(m.value, leading_space)))
            edited = True
        elif m.code == R_REPLBODY:
            new_body = (new_body or []) + [m.body]
        elif m.code in (R_ADDRCPT, R_ADDRCPT_PAR):
            out.add_rcpts.append(_unbracket(m.text))
        elif m.code == R_DELRCPT:
            out.del_rcpts.append(_unbracket(m.text))
        elif m.code == R_CHGFROM:
            out.sender = _unbracket(m.text)
        elif m.code == R_QUARANTINE:
            out.quarantine = m.text or "quarantined by milter"
    if new_body is not None:
        body = normalize_body(b"".join(new_body))
        edited = True
    if edited:
        out.message = join_message(headers, body)
    return out
