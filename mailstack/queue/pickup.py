"""The public submission socket: how `sendmail`, `mailq` and `sendmail -bv` of ANY local user
reach the running server, with no setuid or setgid program (Postfix uses a setgid postdrop).

It is an abstract unix socket (Linux): no file, so no directory permissions to arrange,
reachable by every local process.  The server learns who is submitting from the socket's
peer credentials (SO_PEERCRED), which the kernel fills in and a client cannot forge; the
client checks the same of the server (root or server.user) so that a process squatting the
name cannot pose as the mail server.

Protocol: one JSON line each way; a "submit" request is followed by exactly `size` bytes of
message.  Actions: submit, list (the queue, as mailq shows it to everyone, like Postfix's
default authorized_mailq_users), verify (how addresses would route, sendmail -bv).
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import pwd
import socket
import struct
import time
from email.utils import formatdate
from .control import read_answer

log = logging.getLogger("mailstack.pickup")

MAX_REQUEST = 1024 * 1024  # the JSON line: up to max_recipients addresses
TIMEOUT = 60.0
MAX_CLIENTS = 64  # local submissions at once; more are closed (sendmail reports it and exits 75)


class PickupError(Exception):
    pass


def socket_name(cfg) -> str:
    """The abstract name, derived from the control socket's path: one per server instance."""
    digest = hashlib.sha256(os.fsencode(os.path.abspath(cfg.control_socket))).hexdigest()[:24]
    return f"\0mailstack-public-{digest}"


def peer_ids(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end, from the kernel."""
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", data)


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def server_uid(cfg) -> int | None:
    try:
        return pwd.getpwnam(cfg.server.user or "mailstack").pw_uid
    except KeyError:
        return None


def may_set_sender(cfg, uid: int, server: int | None = None) -> bool:
    """-f / MAIL FROM: root, the server's own user (`server`: its uid), and sendmail.trusted_users
    (Postfix lets anyone; sendmail(8) only trusted users — the safer habit on a shared host)."""
    return uid == 0 or uid == server or user_name(uid) in set(cfg.sendmail.trusted_users)


# --- server -------------------------------------------------------------------------------------
async def start_public(services) -> asyncio.AbstractServer:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(socket_name(services.config))
    except OSError:
        sock.close()
        raise
    slots = asyncio.Semaphore(MAX_CLIENTS)

    async def client(reader, writer):
        if slots.locked():
            writer.transport.abort()
            return
        async with slots:
            await _serve(services, reader, writer)

    server = await asyncio.start_unix_server(client, sock=sock, limit=MAX_REQUEST)
    log.info("local submission socket ready (sendmail and mailq for every local user)")
    return server


async def _serve(services, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        _, uid, _ = peer_ids(writer.get_extra_info("socket"))
        async with asyncio.timeout(TIMEOUT):
            line = await reader.readline()
            try:
                req = json.loads(line)
                if not isinstance(req, dict):
                    raise ValueError("not an object")
            except ValueError as e:
                resp = {"ok": False, "error": f"bad request: {e}"}
            else:
                resp = await _handle(services, uid, req, reader)
        writer.write(json.dumps(resp, ensure_ascii=False).encode() + b"\n")
        await writer.drain()
    except (TimeoutError, ConnectionError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
            ValueError):
        pass
    except Exception:
        log.exception("local submission failed")
    finally:
        writer.close()


async def _handle(services, uid: int, req: dict, reader) -> dict:
    action = req.get("action")
    cfg = services.config
    if action == "list":
        from .admin import collect
        return {"ok": True, "messages": await asyncio.to_thread(collect, services.spool)}
    if action == "verify":
        addrs = [str(a) for a in (req.get("addresses") or [])][:cfg.smtp.max_recipients]
        return {"ok": True, "results": [describe(services.directory, cfg, a) for a in addrs]}
    if action != "submit":
        return {"ok": False, "error": f"unknown action {action!r}"}
    size = req.get("size")
    if not isinstance(size, int) or not 0 <= size <= cfg.smtp.max_message_size:
        return {"ok": False, "code": 65, "error": f"message too large (more than {cfg.smtp.max_message_size} bytes)"}
    message = await reader.readexactly(size)
    from .maildrop import SendmailError, check_address
    hostname = cfg.server.hostname
    user = user_name(uid)
    sender = req.get("sender")
    try:
        if sender is None:
            sender = f"{user}@{hostname}"
        else:
            sender = "" if str(sender) in ("", "<>") else check_address(str(sender), hostname)
            if sender != f"{user}@{hostname}" and not may_set_sender(cfg, uid, os.geteuid()):
                return {"ok": False, "code": 77, "error": f"user {user} may not set the envelope sender (-f): only "
                                                          "root, the server's user and sendmail.trusted_users"}
        recipients = list(dict.fromkeys(check_address(str(r), hostname) for r in req.get("recipients") or []))
    except SendmailError as e:
        return {"ok": False, "code": e.code, "error": str(e)}
    if not recipients:
        return {"ok": False, "code": 64, "error": "no recipients"}
    if len(recipients) > cfg.smtp.max_recipients:
        return {"ok": False, "code": 65, "error": f"too many recipients (at most {cfg.smtp.max_recipients})"}
    qid = services.spool.new_id()
    # Who submitted is what the kernel says, never what the client claims.
    received = (f"Received: by {hostname} (mailstack, from userid {uid})\r\n\tid {qid}; "
                f"{formatdate(time.time(), localtime=True)}\r\n").encode()
    meta = {"listener": "sendmail", "uid": uid, "user": user,
            "body": "7BIT" if message.isascii() else "8BITMIME"}
    if not all(a.isascii() for a in recipients + [sender]):
        meta["smtputf8"] = True
    await services.spool.enqueue(sender, recipients, [received, message], meta, qid=qid)
    services.metrics.received["sendmail"] += 1
    log.info("uid=%s from=<%s> (local submission)", uid, sender, extra={"qid": qid})
    return {"ok": True, "qid": qid}


def describe(directory, cfg, address: str) -> dict:
    """How one address would be delivered (sendmail -bv)."""
    from ..directory import normalize_address
    addr = address.strip().strip("<>")
    if "@" not in addr:
        addr = f"{addr}@{cfg.server.hostname}"
    res = directory.resolve(addr)
    if res.kind == "unknown":
        return {"address": addr, "deliverable": False, "route": "user unknown"}
    if res.kind == "remote":
        domain = addr.rpartition("@")[2].lower()
        d = cfg.delivery
        if not d.outbound:
            how = "remote, but delivery.outbound is off: it would wait in the queue"
        elif domain in d.transports:
            how = f"remote via {d.transports[domain]} (delivery.transports)"
        elif d.relayhost:
            how = f"remote via relayhost {d.relayhost}"
        else:
            how = f"remote via the MX hosts of {domain}"
        return {"address": addr, "deliverable": True, "route": how}
    local, remote = directory.expand(normalize_address(addr))
    parts = [f"local account {a}" for a in local] + [f"remote {a}" for a in remote]
    return {"address": addr, "deliverable": bool(parts), "route": ", ".join(parts) or "alias leads nowhere"}


# --- client (blocking) ---------------------------------------------------------------------------
def request(cfg, req: dict, body: bytes = b"", timeout: float = TIMEOUT) -> dict | None:
    """One request to the running server; None when none listens."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(socket_name(cfg))
        except (ConnectionRefusedError, FileNotFoundError):
            return None
        _, peer_uid, _ = peer_ids(s)
        expected = {0, os.getuid(), server_uid(cfg)}
        if peer_uid not in expected:
            raise PickupError(f"the process behind the mail server's socket runs as uid {peer_uid}, not as "
                              "root or server.user: refusing to talk to it")
        s.sendall(json.dumps(req).encode() + b"\n" + body)
        return read_answer(s, PickupError)
    except socket.timeout:
        raise PickupError(f"no answer from the server within {timeout:g}s") from None
    finally:
        s.close()
