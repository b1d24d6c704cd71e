"""The control socket: how `mailstack queue ...` acts on a running server at once.

A unix socket at cfg.control_socket (mode 0600, owned by the server's user).
Protocol: one JSON object per line each way.

    -> {"action": "flush"}                       <- {"ok": true, "flushed": 3}
    -> {"action": "delete", "id": "0ABC..."}     <- {"ok": false, "error": "..."}

Actions: status, list, show, delete, hold, release, requeue, flush (optionally for one
"domain"), pickup, reload, reload-directory, mailbox-changed (files added by another
process, e.g. `mailstack import`), sieve-changed (`mailstack sieve` changed an account's scripts).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import tempfile
from pathlib import Path

log = logging.getLogger("mailstack.control")

MAX_REQUEST = 64 * 1024
REQUEST_TIMEOUT = 30.0


class ControlError(Exception):
    pass


# --- server ----------------------------------------------------------------------------------
async def handle_request(services, req: dict) -> dict:
    action = req.get("action")
    manager = services.queue
    qid = str(req.get("id", "")).strip()
    if action == "status":
        status = services.extra.get("status")
        out = {"ok": True, **(await status() if status else {"pid": os.getpid()})}
        if manager is not None:
            out["queue_manager"] = manager.status()
        return out
    if action == "reload":
        reload = services.extra.get("reload")
        if reload is None:
            return {"ok": False, "error": "reload is not available"}
        result = reload()
        if asyncio.iscoroutine(result):
            result = await result
        return {"ok": True, "result": result if isinstance(result, (str, dict, list, bool)) else None}
    if action == "reload-directory":
        changed = await asyncio.to_thread(services.directory.reload_if_changed)
        return {"ok": True, "changed": changed}
    if action == "sieve-changed":  # `mailstack sieve put/activate/...`: forget "no script" (scripts.NoScripts)
        from ..sieve.deliver import script_store

        script_store(services.config).no_scripts.changed(str(req.get("account") or "") or None)
        return {"ok": True}
    if action == "mailbox-changed":  # `mailstack import` added files: wake IDLE sessions now
        from ..events import MailboxEvent

        account, mailbox = str(req.get("account", "")), str(req.get("mailbox", ""))
        if not account or not mailbox:
            return {"ok": False, "error": "mailbox-changed: account and mailbox are needed"}
        services.events.publish(MailboxEvent(account, mailbox, "new", (), None))
        return {"ok": True}
    if manager is None:
        return {"ok": False, "error": "the queue manager is not running"}
    if action == "flush":
        domain = str(req.get("domain") or "").strip().lower().rstrip(".")
        if not domain:
            return {"ok": True, "flushed": manager.flush()}
        from .admin import deferred_for_domain

        qids = await asyncio.to_thread(deferred_for_domain, manager.spool, domain)
        return {"ok": True, "flushed": manager.flush(set(qids))}
    if action == "pickup":
        manager.pickup()
        return {"ok": True}
    if action == "list":
        from .admin import collect

        return {"ok": True, "messages": await asyncio.to_thread(collect, manager.spool)}
    if action in ("show", "delete", "hold", "release", "requeue"):
        if not qid:
            return {"ok": False, "error": f"{action}: a queue id is needed"}
        if action == "show":
            from .admin import show_from_files

            info = manager.show(qid)
            if info is None:
                info = await asyncio.to_thread(show_from_files, manager.spool, qid)
            if info is None:
                return {"ok": False, "error": f"{qid}: no such message in the queue"}
            return {"ok": True, "message": info}
        return await getattr(manager, action)(qid)
    return {"ok": False, "error": f"unknown action {action!r}"}


async def _serve_client(services, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    line = await reader.readline()
            except (asyncio.TimeoutError, asyncio.LimitOverrunError, ValueError):
                writer.write(b'{"ok": false, "error": "request too long or too slow"}\n')
                break
            if not line:
                break
            try:
                req = json.loads(line)
                if not isinstance(req, dict):
                    raise ValueError("not an object")
            except ValueError as e:
                resp = {"ok": False, "error": f"bad request: {e}"}
            else:
                try:
                    resp = await handle_request(services, req)
                except Exception as e:
                    log.exception("control action %r failed", req.get("action"))
                    resp = {"ok": False, "error": f"internal error: {e}"}
            writer.write(json.dumps(resp, ensure_ascii=False).encode("utf-8") + b"\n")
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


def _socket_in_use(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def _bind_private(path: Path) -> socket.socket:
    """Bind a unix socket that is never reachable with looser permissions than 0600: bind it
    inside a fresh 0700 directory, chmod it, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.exists() or path.is_symlink():
        if _socket_in_use(path):
            raise ControlError(f"{path}: another server is running (its control socket answers)")
        path.unlink()
    tmpdir = tempfile.mkdtemp(prefix=".control.", dir=path.parent)
    tmp = os.path.join(tmpdir, "s")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(tmp)
        os.chmod(tmp, 0o600)
        os.rename(tmp, path)
    except BaseException:
        sock.close()
        raise
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        os.rmdir(tmpdir)
    return sock


async def start_control(services) -> asyncio.Server:
    """Serve the control socket; call server.close() to stop (the socket file is removed by stop_control)."""
    path = Path(services.config.control_socket)
    sock = _bind_private(path)
    server = await asyncio.start_unix_server(lambda r, w: _serve_client(services, r, w), sock=sock,
                                             limit=MAX_REQUEST)
    log.info("control socket at %s", path)
    return server


def remove_socket(services) -> None:
    try:
        os.unlink(services.config.control_socket)
    except FileNotFoundError:
        pass


# --- client (blocking, for the CLI) -----------------------------------------------------------
def read_answer(s: socket.socket, error: type[Exception], where: str = "") -> dict:
    """One JSON answer line from a blocking socket (the control and the pickup socket);
    `error(where + reason)` when it is too large or missing."""
    buf = bytearray()
    while not buf.endswith(b"\n"):
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
        if len(buf) > 256 * 1024 * 1024:
            raise error(f"{where}answer too large")
    if not buf:
        raise error(f"{where}the server closed the connection without an answer")
    return json.loads(buf)


def request(path, req: dict, timeout: float = 60.0) -> dict | None:
    """Send one request to the socket at `path` (or a Config's control_socket). Returns the
    response, or None when no server listens there."""
    path = getattr(path, "control_socket", path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(os.fspath(path))
        except (FileNotFoundError, ConnectionRefusedError):
            return None
        except PermissionError as e:
            raise ControlError(f"{path}: {e.strerror} (run as the server's user or root)") from None
        s.sendall(json.dumps(req).encode("utf-8") + b"\n")
        return read_answer(s, ControlError, f"{path}: ")
    except socket.timeout:
        raise ControlError(f"{path}: no answer from the server within {timeout:g}s") from None
    finally:
        s.close()
