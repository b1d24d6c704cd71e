"""A minimal HTTP/1.1 client for rspamd's protocol: one POST per connection, bounded.

rspamd speaks plain HTTP on loopback; pulling in an HTTP library for two requests would
bring more than it saves.  `parse_response` is pure (bytes in) and fuzzed.
"""
from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

from .base import FilterUnavailable

MAX_RESPONSE = 4 * 1024 * 1024


class BadResponse(Exception):
    pass


def parse_url(url: str) -> tuple[str, int, str]:
    """"http://127.0.0.1:11333" -> ("127.0.0.1", 11333, ""); ValueError if not http://host:port."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"{url!r}: expected http://HOST:PORT")
    try:
        port = parts.port or 80
    except ValueError:
        raise ValueError(f"{url!r}: bad port") from None
    return parts.hostname, port, parts.path.rstrip("/")


def parse_response(data: bytes, eof: bool = False) -> tuple[int, dict[str, str], bytes] | None:
    """A complete response -> (status, headers lower-cased, body); None if more bytes are needed
    (`eof`: the server closed, so a body without a length ends here).  Raises BadResponse if it
    is not HTTP, or is cut short at EOF."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        if len(data) > 65536:
            raise BadResponse("response head too long")
        return None
    lines = data[:end].decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise BadResponse(f"not an HTTP response: {lines[0][:60]!r}")
    headers = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon:
            raise BadResponse("bad header line")
        headers[name.strip().lower()] = value.strip()
    body = data[end + 4:]
    if headers.get("transfer-encoding", "").lower() == "chunked":
        out, pos = bytearray(), 0
        while True:
            nl = body.find(b"\r\n", pos)
            if nl < 0:
                return None
            try:
                size = int(body[pos:nl].split(b";")[0], 16)
            except ValueError:
                raise BadResponse("bad chunk size") from None
            if size < 0:
                raise BadResponse("bad chunk size")
            if size == 0:
                return int(parts[1]), headers, bytes(out)
            if len(body) < nl + 2 + size + 2:
                return None
            out += body[nl + 2:nl + 2 + size]
            pos = nl + 2 + size + 2
    length = headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise BadResponse("bad Content-Length")
        if len(body) < int(length):
            return None
        return int(parts[1]), headers, body[:int(length)]
    return (int(parts[1]), headers, body) if eof else None  # no length: the body runs to EOF


async def post(host: str, port: int, path: str, headers: list[tuple[str, str]], body: bytes,
               timeout: float) -> tuple[int, dict[str, str], bytes]:
    """POST and read the whole answer within `timeout` seconds; FilterUnavailable on any failure."""
    head = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: close",
            f"Content-Length: {len(body)}"]
    for name, value in headers:  # a list: a name may repeat (rspamd's Rcpt)
        value = value.replace("\r", " ").replace("\n", " ")
        head.append(f"{name}: {value}")
    request = ("\r\n".join(head) + "\r\n\r\n").encode("utf-8")
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(request)
            writer.write(body)
            await writer.drain()
            data = bytearray()
            while True:
                chunk = await reader.read(65536)
                data += chunk
                if len(data) > MAX_RESPONSE:
                    raise FilterUnavailable("answer too large")
                parsed = parse_response(bytes(data))
                if parsed is not None:
                    return parsed
                if not chunk:
                    parsed = parse_response(bytes(data), eof=True)
                    if parsed is None:
                        raise FilterUnavailable("connection closed before a complete answer")
                    return parsed
    except TimeoutError:
        raise FilterUnavailable(f"no answer within {timeout:g}s") from None
    except BadResponse as e:
        raise FilterUnavailable(str(e)) from None
    except OSError as e:
        raise FilterUnavailable(f"cannot reach {host}:{port}: {e.strerror or e}") from None
    finally:
        if writer is not None:
            writer.close()
