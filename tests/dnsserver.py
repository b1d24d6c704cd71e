"""A real authoritative DNS server on loopback, for tests (UDP and TCP, on dnspython).

    dns = DNSServer({
        "example.test": {"MX": [(10, "mx1.example.test"), (20, "mx2.example.test")]},
        "mx1.example.test": {"A": ["127.0.0.2"]},
        "sel._domainkey.example.test": {"TXT": ["v=DKIM1; k=rsa; p=..."]},
        "alias.test": {"CNAME": ["example.test"]},
    }).start()
    dns.address            # "127.0.0.1:PORT", for config dns.nameservers
    dns.servfail.add("broken.test")   # answer SERVFAIL for this name
    dns.silent.add("slow.test")       # never answer (the client times out)
    dns.silent_nodata.add("odd.test")  # answer for the types it has, time out for the others
    dns.add("multi.test", "TXT", ("v=spf1 ip4:", "192.0.2.5 -all"))  # several character-strings
    dns.add("old.test", "SPF", "v=spf1 -all")     # RFC 4408 type 99
    dns.refused.add("no.test")        # answer REFUSED (a server that will not serve us)
    dns.queries            # [(name, type, "udp"|"tcp"), ...] as received
    dns.stop()

Every name is "in zone": a name with no records (and no names below it) is NXDOMAIN;
a name with records but not of the asked type is NOERROR with no answer. CNAMEs are
followed inside the data, as an authoritative server does for its own zone. UDP
answers larger than the client's buffer are truncated (TC), so clients retry over TCP.
Runs in its own threads, so it serves both async tests and server processes.
"""
from __future__ import annotations

import socket
import socketserver
import struct
import threading

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.SPF
import dns.rdtypes.ANY.TXT
import dns.rrset


def _txt_rdata(text: str) -> str:
    # Split into <=255-byte character strings, as a zone file would carry a long DKIM key.
    data = text.encode()
    chunks = [data[i:i + 255] for i in range(0, len(data), 255)] or [b""]
    return " ".join('"' + c.decode().replace("\\", "\\\\").replace('"', '\\"') + '"' for c in chunks)


def _plain(name: dns.name.Name) -> str:
    """A query name as the zone dict spells it: labels joined by dots, no escapes, lower-case."""
    return ".".join(label.decode("utf-8", "replace") for label in name.labels if label).lower()


class DNSServer:
    def __init__(self, zone: dict[str, dict[str, list]] | None = None, host: str = "127.0.0.1",
                 ttl: int = 0) -> None:
        self.host = host
        self.ttl = ttl
        self.records: dict[str, dict[str, list]] = {}
        self.servfail: set[str] = set()
        self.silent: set[str] = set()
        self.silent_nodata: set[str] = set()  # names that never answer for types they have none of
        self.refused: set[str] = set()
        self.queries: list[tuple[str, str, str]] = []
        self._lock = threading.Lock()
        for name, types in (zone or {}).items():
            for rtype, values in types.items():
                for value in values:
                    self.add(name, rtype, value)
        self._servers: list[socketserver.BaseServer] = []
        self.port = 0

    @staticmethod
    def _key(name: str) -> str:
        return name.lower().rstrip(".")

    def add(self, name: str, rtype: str, value) -> None:
        with self._lock:
            self.records.setdefault(self._key(name), {}).setdefault(rtype.upper(), []).append(value)

    def remove(self, name: str, rtype: str | None = None) -> None:
        with self._lock:
            if rtype is None:
                self.records.pop(self._key(name), None)
            else:
                self.records.get(self._key(name), {}).pop(rtype.upper(), None)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    # --- answering (no I/O) ---------------------------------------------------
    def _rdata_text(self, rtype: str, value) -> str:
        if rtype == "MX":
            if isinstance(value, tuple):
                pref, host = value
                return f"{pref} {host.rstrip('.')}." if host.rstrip(".") else f"{pref} ."
            return str(value)
        if rtype == "TXT":
            return _txt_rdata(value)
        if rtype in ("CNAME", "PTR", "NS"):
            return value.rstrip(".") + "."
        return str(value)

    def _exists(self, key: str) -> bool:
        if key in self.records:
            return True
        suffix = "." + key
        return any(k.endswith(suffix) for k in self.records)  # empty non-terminal

    def answer(self, wire: bytes) -> bytes | None:
        """Bytes of the response to the query `wire`, or None to stay silent."""
        try:
            query = dns.message.from_wire(wire)
        except Exception:
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if not query.question:
            response.set_rcode(dns.rcode.FORMERR)
            return response.to_wire()
        q = query.question[0]
        qname = _plain(q.name)
        qtype = dns.rdatatype.to_text(q.rdtype)
        with self._lock:
            if qname in self.silent:
                return None
            if qname in self.silent_nodata and qtype not in self.records.get(qname, {}):
                return None
            if qname in self.servfail:
                response.set_rcode(dns.rcode.SERVFAIL)
                return response.to_wire()
            if qname in self.refused:
                response.set_rcode(dns.rcode.REFUSED)
                return response.to_wire()
            name, seen = qname, set()
            while True:
                types = self.records.get(name, {})
                if "CNAME" in types and qtype != "CNAME" and name not in seen:
                    seen.add(name)
                    target = types["CNAME"][0]
                    response.answer.append(self._rrset(name, "CNAME", [target]))
                    name = self._key(target)
                    if name in self.servfail:
                        response.set_rcode(dns.rcode.SERVFAIL)
                        return response.to_wire()
                    continue
                if qtype in types:
                    response.answer.append(self._rrset(name, qtype, types[qtype]))
                elif not self._exists(name):
                    response.set_rcode(dns.rcode.NXDOMAIN)
                break
        return response.to_wire()

    def _rrset(self, name: str, rtype: str, values: list) -> dns.rrset.RRset:
        owner = dns.name.Name([label.encode() for label in name.split(".")] + [b""])
        if rtype in ("TXT", "SPF"):
            # Built from bytes, not zone text: test data may hold any octets (UTF-8 here).
            cls = dns.rdtypes.ANY.TXT.TXT if rtype == "TXT" else dns.rdtypes.ANY.SPF.SPF
            rrset = dns.rrset.RRset(owner, dns.rdataclass.IN, dns.rdatatype.from_text(rtype))
            for value in values:
                strings = [value] if isinstance(value, (str, bytes)) else list(value) or [b""]
                raw = [s.encode("utf-8") if isinstance(s, str) else s for s in strings]
                chunks = [c[i:i + 255] for c in raw for i in range(0, max(len(c), 1), 255)]
                rrset.add(cls(dns.rdataclass.IN, dns.rdatatype.from_text(rtype), chunks), self.ttl)
            return rrset
        return dns.rrset.from_text_list(owner, self.ttl, dns.rdataclass.IN, rtype,
                                        [self._rdata_text(rtype, v) for v in values])

    # --- transport --------------------------------------------------------------
    def start(self) -> "DNSServer":
        outer = self

        class UDPHandler(socketserver.BaseRequestHandler):
            def handle(self):
                data, sock = self.request
                reply = outer._reply(data, "udp")
                if reply is None:
                    return
                try:
                    limit = dns.message.from_wire(data).payload
                except Exception:
                    limit = 512
                if len(reply) > max(limit, 512):
                    truncated = dns.message.from_wire(reply)
                    truncated.answer.clear()
                    truncated.flags |= dns.flags.TC
                    reply = truncated.to_wire()
                sock.sendto(reply, self.client_address)

        class TCPHandler(socketserver.BaseRequestHandler):
            def handle(self):
                conn = self.request
                conn.settimeout(5)
                try:
                    while True:
                        head = self._read(conn, 2)
                        if head is None:
                            return
                        data = self._read(conn, struct.unpack("!H", head)[0])
                        if data is None:
                            return
                        reply = outer._reply(data, "tcp")
                        if reply is None:
                            return
                        conn.sendall(struct.pack("!H", len(reply)) + reply)
                except OSError:
                    return

            @staticmethod
            def _read(conn, n):
                buf = b""
                while len(buf) < n:
                    chunk = conn.recv(n - len(buf))
                    if not chunk:
                        return None
                    buf += chunk
                return buf

        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET

        class UDP(socketserver.ThreadingUDPServer):
            address_family = family
            daemon_threads = True

        class TCP(socketserver.ThreadingTCPServer):
            address_family = family
            daemon_threads = True
            allow_reuse_address = True

        for _ in range(20):  # UDP and TCP must share one port number
            udp = UDP((self.host, 0), UDPHandler)
            port = udp.server_address[1]
            try:
                tcp = TCP((self.host, port), TCPHandler)
            except OSError:
                udp.server_close()
                continue
            break
        else:
            raise RuntimeError("no free port for UDP and TCP")
        self.port = port
        self._servers = [udp, tcp]
        for srv in self._servers:
            threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def _reply(self, data: bytes, proto: str) -> bytes | None:
        try:
            q = dns.message.from_wire(data).question[0]
            with self._lock:
                self.queries.append((_plain(q.name),
                                     dns.rdatatype.to_text(q.rdtype), proto))
        except Exception:
            pass
        return self.answer(data)

    def stop(self) -> None:
        for srv in self._servers:
            srv.shutdown()
            srv.server_close()
        self._servers = []

    def __enter__(self) -> "DNSServer":
        return self.start() if not self._servers else self

    def __exit__(self, *exc) -> None:
        self.stop()
