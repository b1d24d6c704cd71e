"""Import an account from any IMAP server (aioimaplib) into the store.

Per folder: SELECT, UID SEARCH (ALL or SINCE), then in chunks of META_CHUNK UIDs a metadata
FETCH (UID FLAGS INTERNALDATE RFC822.SIZE Message-ID), then the bodies in batches bounded by
BATCH_BYTES (one message alone when it is bigger), appended a batch at a time
(store/preserve.append_new) with their flags, keywords and INTERNALDATE, byte for byte as
BODY.PEEK[] gave them (PEEK: \\Seen is not set on the source).  Memory is bounded by one metadata chunk plus one body batch, never
a folder.

Idempotent and resumable through the journal (state.py), keyed by the source folder's
UIDVALIDITY and UID; Message-ID + size recognise messages the journal cannot vouch for (a
crash's last unsynced lines, a lost journal, a source whose UIDVALIDITY changed).

A remote that throttles (NO [UNAVAILABLE] / [LIMIT] / "too many", BYE, dropped connection)
is retried with exponential backoff from BACKOFF_MIN to BACKOFF_MAX seconds, reconnecting
and re-selecting as needed, up to MAX_RETRIES times in a row.
"""
from __future__ import annotations

import asyncio
import logging
import re
import ssl
import time
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import urlsplit

import aioimaplib

from ..imap import mutf7
from ..store import preserve
from ..store.base import StoreError
from . import folders
from .progress import Progress
from .state import Journal
from .target import Target, check_flags

log = logging.getLogger("mailstack.migrate.imap")

META_CHUNK = 200  # UIDs per metadata FETCH (aioimaplib parses a response recursively per line)
BATCH_BYTES = 4 * 1024 * 1024  # body bytes per FETCH
BATCH_MESSAGES = 50
MAX_MESSAGE = 512 * 1024 * 1024  # larger source messages are reported and skipped
BACKOFF_MIN = 1.0
BACKOFF_MAX = 60.0
MAX_RETRIES = 8
COMMAND_TIMEOUT = 120.0  # seconds without an answer before a command counts as lost
MESSAGE_ID_PEEK = 16 * 1024  # bytes of a destination message read to find its Message-ID
THROTTLE_HINTS = ("[UNAVAILABLE]", "[LIMIT]", "[INUSE]", "[SERVERBUG]", "TOO MANY", "RATE", "THROTTL",
                  "TRY AGAIN", "LATER", "EXCEEDED", "BANDWIDTH", "OVERQUOTA")


class ImportError_(Exception):
    """A failure that ends the import; str() is the one line to print."""


class _Throttled(Exception):
    pass


class _Lost(Exception):
    pass


@dataclass
class Source:
    host: str
    port: int
    tls: bool
    login: str
    secret: str
    oauth2: bool = False
    ssl_context: ssl.SSLContext | None = None

    @property
    def label(self) -> str:
        return f"{'imaps' if self.tls else 'imap'}://{self.host}:{self.port}/{self.login}"


def parse_url(url: str) -> tuple[str, int, bool]:
    parts = urlsplit(url)
    if parts.scheme not in ("imap", "imaps") or not parts.hostname:
        raise ImportError_(f"--from {url}: expected imaps://host[:port] (or imap://host[:port])")
    tls = parts.scheme == "imaps"
    try:
        port = parts.port or (993 if tls else 143)
    except ValueError:
        raise ImportError_(f"--from {url}: bad port") from None
    return parts.hostname, port, tls


# -- response parsing (pure) -------------------------------------------------------------------

# aioimaplib hands over untagged answers without "* LIST " (sometimes with "LIST ").
_LIST_RE = re.compile(rb'^(?:LIST |LSUB )?\(([^)]*)\) (NIL|"(?:[^"\\]|\\.)*") (.*)$', re.I)


def _unquote(b: bytes) -> bytes:
    if len(b) >= 2 and b[:1] == b'"' and b[-1:] == b'"':
        return re.sub(rb'\\(.)', rb'\1', b[1:-1])
    return b


def parse_list(lines: list) -> list[tuple[str, str | None, set[str]]]:
    """(raw name, delimiter, attributes) of each LIST answer line; names given as literals too."""
    out = []
    pending = None
    for line in lines:
        if pending is not None and isinstance(line, (bytes, bytearray)) and not isinstance(line, bytes):
            attrs, delim = pending
            out.append((bytes(line).decode("utf-8", "replace"), delim, attrs))
            pending = None
            continue
        if not isinstance(line, bytes):
            continue
        m = _LIST_RE.match(line)
        if not m:
            continue
        attrs = set(m.group(1).decode("ascii", "replace").split())
        delim_raw = m.group(2)
        delim = None if delim_raw.upper() == b"NIL" else _unquote(delim_raw).decode("utf-8", "replace")
        name = m.group(3).strip()
        lit = re.fullmatch(rb"\{(\d+)\+?\}", name)
        if lit:
            pending = (attrs, delim)
            continue
        out.append((_unquote(name).decode("utf-8", "replace"), delim, attrs))
    return out


@dataclass
class Meta:
    uid: int
    flags: set[str]
    internaldate: float | None
    size: int
    message_id: str | None
    body: bytes | None = None


_FETCH_START = re.compile(rb"^\d+ FETCH \(", re.I)
_LIT_MARK = re.compile(rb"\x00(\d+)\x00")


def _records(lines: list) -> list[tuple[bytes, list[bytes]]]:
    """Group FETCH answer lines into (text with literal markers, literals)."""
    recs: list[tuple[bytearray, list[bytes]]] = []
    for line in lines:
        if isinstance(line, bytes):
            if _FETCH_START.match(line):
                recs.append((bytearray(line), []))
            elif recs:
                recs[-1][0].extend(line)
        elif recs:  # a literal (bytearray)
            text, lits = recs[-1]
            text[:] = re.sub(rb"\{\d+\+?\}$", b"\x00%d\x00" % len(lits), bytes(text))
            lits.append(bytes(line))
    return [(bytes(t), lits) for t, lits in recs]


def parse_internaldate(text: str) -> float | None:
    try:
        return datetime.strptime(text.strip(), "%d-%b-%Y %H:%M:%S %z").timestamp()
    except ValueError:
        return None


_MSGID_RE = re.compile(rb"^message-id:[ \t]*(.*?)\r?$", re.I | re.M)


def message_id_of(header: bytes) -> str | None:
    m = _MSGID_RE.search(header)
    if not m:
        return None
    value = m.group(1).strip()
    # folded onto the next line
    after = header[m.end():].lstrip(b"\n")
    while after[:1] in (b" ", b"\t"):
        line, _, after = after.partition(b"\n")
        value += line.strip()
    return value.decode("utf-8", "replace") or None


def parse_fetch(lines: list) -> list[Meta]:
    out = []
    for text, lits in _records(lines):
        uid = re.search(rb"\bUID (\d+)", text)
        if not uid:
            continue
        flags_m = re.search(rb"\bFLAGS \(([^)]*)\)", text)
        date_m = re.search(rb'\bINTERNALDATE "([^"]+)"', text)
        size_m = re.search(rb"\bRFC822\.SIZE (\d+)", text)
        flags = set(flags_m.group(1).decode("utf-8", "replace").split()) if flags_m else set()
        meta = Meta(int(uid.group(1)), flags,
                    parse_internaldate(date_m.group(1).decode("ascii", "replace")) if date_m else None,
                    int(size_m.group(1)) if size_m else 0, None)
        for m in re.finditer(rb"BODY\[([^\]]*)\](?:<\d+>)? (NIL|\"(?:[^\"\\]|\\.)*\"|\x00(\d+)\x00)", text):
            section = m.group(1).upper()
            if m.group(3) is not None:
                data = lits[int(m.group(3))]
            elif m.group(2).upper() == b"NIL":
                data = b""
            else:
                data = _unquote(m.group(2))
            if section == b"":
                meta.body = data
            elif section.startswith(b"HEADER.FIELDS"):
                meta.message_id = message_id_of(data)
        out.append(meta)
    return out


def uid_set(uids: list[int]) -> str:
    """Compact sequence set: 1:5,7,9:10."""
    out = []
    start = prev = None
    for u in sorted(uids):
        if start is None:
            start = prev = u
        elif u == prev + 1:
            prev = u
        else:
            out.append(f"{start}:{prev}" if start != prev else str(start))
            start = prev = u
    if start is not None:
        out.append(f"{start}:{prev}" if start != prev else str(start))
    return ",".join(out)


def quote(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _status_text(resp) -> str:
    return " ".join((ln.decode("utf-8", "replace") if isinstance(ln, (bytes, bytearray)) else str(ln))
                    for ln in resp.lines[-2:])[:300]


# -- the connection ----------------------------------------------------------------------------

class Connection:
    """aioimaplib with what a long import needs: loss detection, backoff, reconnect."""

    def __init__(self, source: Source, progress: Progress, timeout: float = COMMAND_TIMEOUT) -> None:
        self.src = source
        self.progress = progress
        self.timeout = timeout
        self.client: aioimaplib.IMAP4 | None = None
        self.lost = asyncio.Event()
        self.selected: str | None = None
        self.select_response = None
        self.backoffs = 0
        self.ever_connected = False

    async def _connect_once(self) -> None:
        self.lost = asyncio.Event()
        lost = self.lost

        def on_lost(exc) -> None:
            lost.set()
        ctx = self.src.ssl_context if self.src.tls else None
        if self.src.tls and ctx is None:
            ctx = ssl.create_default_context()
        self.client = aioimaplib.IMAP4(self.src.host, self.src.port, timeout=30, conn_lost_cb=on_lost,
                                       ssl_context=ctx)
        try:
            await self._call(self.client.wait_hello_from_server(), 30)
        except ssl.SSLCertVerificationError as e:
            raise ImportError_(f"{self.src.host}:{self.src.port}: certificate not trusted ({e.verify_message}); "
                               "use --ca-file for a private CA") from None
        except (OSError, ssl.SSLError, asyncio.TimeoutError, _Lost) as e:
            if not self.ever_connected:  # a typo or a closed port: say so now, not after minutes
                raise ImportError_(f"cannot connect to {self.src.host}:{self.src.port}: {e or 'timeout'}") from None
            raise _Lost(f"cannot connect to {self.src.host}:{self.src.port}: {e}") from None
        self.ever_connected = True
        proto = self.client.protocol
        if self.src.oauth2:
            resp = await self._call(proto.xoauth2(self.src.login, self.src.secret), 60)
        else:
            resp = await self._call(proto.login(self.src.login, self.src.secret), 60)
        if resp.result != "OK":
            text = _status_text(resp)
            if self._throttle(text) or "BYE" in text.upper():
                await self.close()  # a fresh connection for the next try
                raise _Throttled(f"login: {text}")
            raise ImportError_(f"login as {self.src.login} refused: {text}")
        self.selected = None

    @staticmethod
    def _throttle(text: str) -> bool:
        up = text.upper()
        return any(h in up for h in THROTTLE_HINTS)

    async def _call(self, coro, timeout: float | None = None):
        task = asyncio.ensure_future(coro)
        lost = asyncio.ensure_future(self.lost.wait())
        try:
            done, _ = await asyncio.wait({task, lost}, timeout=timeout or self.timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
        if task in done:
            return task.result()
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception):
            pass
        raise _Lost("connection lost" if self.lost.is_set() else "no answer in time")

    async def close(self) -> None:
        if self.client is not None and not self.lost.is_set():
            try:
                await self._call(self.client.protocol.logout(), 10)
            except Exception:
                pass
        if self.client is not None and self.client.protocol.transport is not None:
            self.client.protocol.transport.close()
        self.client = None

    async def _backoff(self, why: str, tries: int) -> None:
        self.backoffs += 1
        delay = min(BACKOFF_MAX, BACKOFF_MIN * 2 ** min(tries - 1, 10))
        self.progress.line(f"remote busy or gone ({why}); retrying in {delay:g}s")
        await asyncio.sleep(delay)

    async def run(self, make, mailbox: str | None = None, timeout: float | None = None):
        """Run `make(protocol)` (a command coroutine) with `mailbox` selected; retry with
        backoff on throttling NO, BYE and lost connections."""
        tries = 0
        while True:
            try:
                if self.client is None or self.lost.is_set():
                    await self.close()
                    await self._connect_once()
                if mailbox is not None and self.selected != mailbox:
                    resp = await self._call(self.client.protocol.select(quote(mailbox)))
                    if resp.result != "OK":
                        text = _status_text(resp)
                        if self._throttle(text):
                            raise _Throttled(f"SELECT: {text}")
                        raise ImportError_(f"cannot select {mailbox}: {text}")
                    self.selected = mailbox
                    self.select_response = resp
                resp = await self._call(make(self.client.protocol), timeout)
                if resp.result != "OK":
                    text = _status_text(resp)
                    if self._throttle(text) or self.lost.is_set():
                        raise _Throttled(text)
                    return resp
                return resp
            except (_Throttled, _Lost, aioimaplib.AioImapException, ConnectionError) as e:
                tries += 1
                if tries > MAX_RETRIES:
                    raise ImportError_(f"{self.src.host}: giving up after {MAX_RETRIES} retries: {e}") from None
                if isinstance(e, _Lost) or self.lost.is_set():
                    self.selected = None
                    await self.close()
                await self._backoff(str(e) or type(e).__name__, tries)


def _select_info(resp) -> tuple[int | None, int | None]:
    uidvalidity = uidnext = None
    for line in resp.lines:
        if not isinstance(line, bytes):
            continue
        m = re.search(rb"\[UIDVALIDITY (\d+)\]", line)
        if m:
            uidvalidity = int(m.group(1))
        m = re.search(rb"\[UIDNEXT (\d+)\]", line)
        if m:
            uidnext = int(m.group(1))
    return uidvalidity, uidnext


# -- the import --------------------------------------------------------------------------------

@dataclass
class Options:
    folders: list[str]
    exclude: list[str]
    since: str | None  # IMAP date "01-Jan-2024"


async def list_folders(conn: Connection, opts: Options, progress: Progress) -> list[tuple[str, str, set[str]]]:
    """[(remote name, local name, attributes)] of the folders to copy, INBOX first."""
    resp = await conn.run(lambda p: p.simple_command("LIST", '""', '"*"'))
    if resp.result != "OK":
        raise ImportError_(f"LIST refused: {_status_text(resp)}")
    out = []
    seen_local: dict[str, str] = {}
    for raw, delim, attrs in parse_list(resp.lines):
        try:
            name = mutf7.decode(raw)
        except Exception:
            name = raw
        levels = name.split(delim) if delim else [name]
        remote = name
        try:
            local = folders.local_name(levels, attrs)
        except StoreError as e:
            progress.warn(f"skipping {remote}: no mailstack name for it ({e})")
            continue
        local_slash = "/".join(levels)
        if opts.folders and not folders.matches(local_slash, opts.folders) and \
                not folders.matches(local, opts.folders):
            continue
        if opts.exclude and (folders.matches(local_slash, opts.exclude) or folders.matches(local, opts.exclude)):
            continue
        if any(a.lower() == "\\noselect" or a.lower() == "\\nonexistent" for a in attrs):
            continue
        if folders.is_virtual(attrs) and not opts.folders:
            progress.line(f"skipping {remote}: a virtual view of other folders ({' '.join(sorted(attrs))})")
            continue
        if local in seen_local:
            progress.warn(f"{remote} and {seen_local[local]} both go to {local}")
        seen_local[local] = remote
        out.append((raw, local, attrs))
    out.sort(key=lambda t: (t[1] != "INBOX", t[1]))
    return out


async def _dest_index(target: Target, dest: str, above_uid: int) -> dict[tuple[str, int], int]:
    """(Message-ID, size) -> destination UID of the messages in `dest` above `above_uid`."""
    index: dict[tuple[str, int], int] = {}
    try:
        mbox = await target.store.open(target.account, dest, read_only=True)
    except StoreError:
        return index
    try:
        for info in mbox.messages:
            if info.uid <= above_uid:
                continue
            try:
                head = await mbox.read_range(info.uid, 0, MESSAGE_ID_PEEK)
            except StoreError:
                continue
            end = head.find(b"\r\n\r\n")
            mid = message_id_of(head[:end] if end >= 0 else head)
            if mid:
                index[(mid, info.size)] = info.uid
    finally:
        await mbox.close()
    return index


async def import_folder(conn: Connection, target: Target, journal: Journal, progress: Progress,
                        raw: str, local: str, opts: Options, known: set[str], expected: int = 0) -> None:
    name = raw  # as the server spells it (modified UTF-7): what SELECT and the journal use
    await target.ensure_mailbox(local, known)
    await conn.run(lambda p: p.simple_command("NOOP"), mailbox=name)
    uidvalidity, _ = _select_info(conn.select_response)
    if uidvalidity is None:
        raise ImportError_(f"{name}: the server gave no UIDVALIDITY")
    state = journal.load(name, uidvalidity, local)
    criteria = ["SINCE", opts.since] if opts.since else ["ALL"]
    resp = await conn.run(lambda p: p.search(*criteria, by_uid=True, charset=None), mailbox=name)
    if resp.result != "OK":
        raise ImportError_(f"{name}: UID SEARCH refused: {_status_text(resp)}")
    uids: list[int] = []
    for line in resp.lines[:-1]:  # the last one is the tagged OK's text
        if isinstance(line, bytes) and re.fullmatch(rb"(?:SEARCH)?[\d ]*", line, re.I):
            uids += [int(x) for x in line.split() if x.isdigit()]
    uids.sort()
    todo = [u for u in uids if u not in state.done]
    progress.add_work(len(uids) - expected)  # STATUS counted `expected` already
    progress.skipped(len(uids) - len(todo))
    if not todo:
        return
    # Messages the journal cannot vouch for: everything when it knows nothing of this folder
    # (lost journal, UIDVALIDITY changed), else only what came after its last synced line.
    index = await _dest_index(target, local, state.max_dest_uid)
    for i in range(0, len(todo), META_CHUNK):
        chunk = todo[i:i + META_CHUNK]
        resp = await conn.run(lambda p: p.fetch(uid_set(chunk),
                                                "(UID FLAGS INTERNALDATE RFC822.SIZE "
                                                "BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])", by_uid=True),
                              mailbox=name)
        metas = [m for m in parse_fetch(resp.lines) if m.uid in set(chunk)]
        progress.add_work(0, sum(m.size for m in metas))
        batch: list[Meta] = []
        batch_bytes = 0
        for meta in metas:
            hit = index.pop((meta.message_id, meta.size), None) if meta.message_id else None
            if hit is not None:
                journal.record(name, uidvalidity, meta.uid, local, hit)
                progress.skipped(1, meta.size)
                continue
            if meta.size > MAX_MESSAGE:
                progress.failed(f"{name} UID {meta.uid}: {meta.size} bytes is over the {MAX_MESSAGE} limit")
                continue
            if batch and (batch_bytes + meta.size > BATCH_BYTES or len(batch) >= BATCH_MESSAGES):
                await _copy_batch(conn, target, journal, progress, name, uidvalidity, local, batch)
                batch, batch_bytes = [], 0
            batch.append(meta)
            batch_bytes += meta.size
        if batch:
            await _copy_batch(conn, target, journal, progress, name, uidvalidity, local, batch)
    await asyncio.to_thread(journal.sync)
    await target.changed(local, force=True)


async def _copy_batch(conn: Connection, target: Target, journal: Journal, progress: Progress,
                      name: str, uidvalidity: int, local: str, batch: list[Meta]) -> None:
    want = {m.uid: m for m in batch}
    size = sum(m.size for m in batch)
    timeout = COMMAND_TIMEOUT + size / (256 * 1024)  # a slow link still gets through
    resp = await conn.run(lambda p: p.fetch(uid_set(list(want)), "(UID BODY.PEEK[])", by_uid=True,
                                            timeout=timeout),
                          mailbox=name, timeout=timeout)
    got = {m.uid: m.body for m in parse_fetch(resp.lines) if m.body is not None}
    del resp
    mdir = target.store.mailbox_dir(target.account, local)
    items, order = [], []
    for uid, meta in want.items():
        body = got.pop(uid, None)
        if body is None:
            progress.failed(f"{name} UID {uid}: the server sent no body (expunged meanwhile?)")
            continue
        flags, dropped = check_flags(meta.flags)
        if dropped:
            progress.warn(f"{name} UID {uid}: flags not kept: {' '.join(dropped)}")
        tmp = await asyncio.to_thread(preserve.write_tmp, mdir, body)
        date = meta.internaldate if meta.internaldate is not None and meta.internaldate >= 0 else time.time()
        items.append((tmp, len(body), date, set(flags)))
        order.append(uid)
        del body
    if not items:
        return
    # One uidlist update for the batch (see preserve.append_new for why not store.append).
    _, dest_uids, lost_keywords = await asyncio.to_thread(preserve.append_new, mdir, items)
    if lost_keywords:
        progress.warn(f"{local}: keywords not kept (26 per folder at most): {' '.join(lost_keywords)}")
    for uid, dest_uid, (_, size, _, _) in zip(order, dest_uids, items):
        journal.record(name, uidvalidity, uid, local, dest_uid)
        progress.copied(size)
    await target.changed(local)


async def run_import(cfg, account: str, source: Source, opts: Options, progress: Progress) -> int:
    target = Target(cfg, account)
    await target.open()
    if target.server_running:
        progress.line("the server is running: new mail is announced to its IMAP sessions as it arrives")
    journal = Journal(cfg.data_dir, target.account, source.label)
    conn = Connection(source, progress)
    try:
        todo = await list_folders(conn, opts, progress)
        expected = {raw: await _message_count(conn, raw) for raw, _, _ in todo}
        progress.plan(len(todo), sum(expected.values()))
        known = await target.existing()
        subscribed = await _remote_subscriptions(conn)
        for raw, local, _attrs in todo:
            progress.begin_folder(local)
            await import_folder(conn, target, journal, progress, raw, local, opts, known, expected[raw])
            if raw in subscribed:
                await target.store.subscribe(target.account, local, True)
            progress.end_folder()
    finally:
        journal.close()
        await conn.close()
    progress.summary()
    return 1 if progress.c.failed else 0


async def _message_count(conn: Connection, raw: str) -> int:
    """MESSAGES of a folder (STATUS), for the progress total; 0 when the server will not say."""
    resp = await conn.run(lambda p: p.simple_command("STATUS", quote(raw), "(MESSAGES)"))
    for line in resp.lines:
        m = re.search(rb"\(MESSAGES (\d+)\)", line) if isinstance(line, bytes) else None
        if m:
            return int(m.group(1))
    return 0


async def _remote_subscriptions(conn: Connection) -> set[str]:
    resp = await conn.run(lambda p: p.simple_command("LSUB", '""', '"*"'))
    if resp.result != "OK":
        return set()
    return {raw for raw, _, _ in parse_list(resp.lines)}
