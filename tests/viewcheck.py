"""A model checker for what IMAP (and POP3) sessions see while other sessions change the
same mailbox at once.

Each `IMAPChecker` is a real client on a real socket.  It keeps its own view of the
selected mailbox (sequence number -> UID, UIDs it does not know yet as None) built ONLY
from the untagged responses it received, and checks after every response:

* EXISTS never goes down except through EXPUNGE;
* an EXPUNGE names a sequence number inside the view;
* a FETCH names a sequence number inside the view, and its UID is the one the view holds
  for that number (the server and the client mean the same message);
* FETCH data belongs to its UID: every message carries an `X-Token` header, and the
  UID -> token map (learnt from APPENDUID/COPYUID and from every FETCH of every session)
  never contradicts itself;
* UIDs in the view strictly ascend;
* COPYUID source UIDs of a COPY/MOVE by sequence number are the view's UIDs there;
* a keyword shows in a FETCH only after an untagged FLAGS announced it;
* no BAD "invalid sequence number" for a number inside the view;
* \\Recent shows for a UID in one session only;
* at the end, after one NOOP, the view equals the mailbox.

Used by tests/test_imap_views.py (a few seconds) and bench/views.py (minutes).
"""
from __future__ import annotations

import asyncio
import random
import re
import ssl
import time
from dataclasses import dataclass, field

_LITERAL = re.compile(rb"\{(\d+)\+?\}\r\n$")
_UNTAGGED_NUM = re.compile(rb"^\* (\d+) (EXISTS|EXPUNGE|FETCH|RECENT)\b", re.I)
_UID = re.compile(rb"\bUID (\d+)")
_FLAGS = re.compile(rb"\bFLAGS \(([^)]*)\)")
_TOKEN = re.compile(rb"X-Token: (\S+)", re.I)
_COPYUID = re.compile(rb"\[COPYUID (\d+) ([\d:,]+) ([\d:,]+)\]")
_APPENDUID = re.compile(rb"\[APPENDUID (\d+) (\d+)\]")
_FLAGS_LINE = re.compile(rb"^\* FLAGS \(([^)]*)\)", re.I)

FETCH_ITEMS = "(UID FLAGS BODY.PEEK[HEADER.FIELDS (X-Token)])"


def uid_set(text: bytes) -> list[int]:
    out = []
    for part in text.split(b","):
        lo, _, hi = part.partition(b":")
        a, b = int(lo), int(hi or lo)
        out.extend(range(min(a, b), max(a, b) + 1))
    return out


@dataclass
class Shared:
    """What all sessions of one run share: the UID -> token map, the error list, counters."""

    tokens: dict[int, str] = field(default_factory=dict)
    recent_in: dict[int, str] = field(default_factory=dict)  # UID -> the session told it is \\Recent
    errors: list[str] = field(default_factory=list)
    ops: dict[str, int] = field(default_factory=dict)
    serial: int = 0

    def token(self) -> str:
        self.serial += 1
        return f"t{self.serial}-{random.getrandbits(32):08x}"

    def record(self, who: str, uid: int, token: str) -> None:
        old = self.tokens.setdefault(uid, token)
        if old != token:
            self.errors.append(f"{who}: UID {uid} carries token {token}, known as {old}")

    def kinds(self) -> dict[str, int]:
        """Errors counted by kind (the text without numbers and context)."""
        out: dict[str, int] = {}
        for e in self.errors:
            k = re.sub(r"\d+", "N", e.split("  [recent")[0].split(": ", 1)[-1])[:60]
            out[k] = out.get(k, 0) + 1
        return out

    def count(self, what: str) -> None:
        self.ops[what] = self.ops.get(what, 0) + 1


def message(token: str, size: int = 0) -> bytes:
    body = "".join(f"line {i} of {token}\r\n" for i in range(size))
    return (f"From: checker@example.test\r\nTo: alice@example.test\r\nSubject: {token}\r\n"
            f"X-Token: {token}\r\n\r\nbody of {token}\r\n{body}").encode()


class IMAPChecker:
    def __init__(self, name: str, shared: Shared, mailbox: str = "INBOX") -> None:
        self.name = name
        self.shared = shared
        self.mailbox = mailbox
        self.view: list[int | None] = []
        self.told_gone: set[int] = set()  # UIDs this session was told are expunged
        self.announced: set[str] = set()  # keywords announced by * FLAGS
        self.tagn = 0
        self.last_copyuid: re.Match | None = None
        self.transcript: list[bytes] = []
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    # ---------------------------------------------------------------- errors
    def error(self, text: str) -> None:
        tail = b" | ".join(x[:120].replace(b"\r\n", b" ") for x in self.transcript[-6:]).decode("utf-8", "replace")
        self.shared.errors.append(f"{self.name}: {text}  [recent: {tail}]")

    # ---------------------------------------------------------------- I/O
    async def connect(self, host: str, port: int, user: str, password: str,
                      tls: ssl.SSLContext | None = None) -> None:
        name = None if tls is None else "mail.example.test"
        self.reader, self.writer = await asyncio.open_connection(host, port, ssl=tls, server_hostname=name)
        await self.read_response()  # greeting
        await self.command(f"LOGIN {user} {password}", check_ok=True)
        await self.command(f"SELECT {self.mailbox}", check_ok=True)

    async def close(self) -> None:
        if self.writer is not None:
            try:
                await asyncio.wait_for(self.command("LOGOUT"), 10)
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                pass
            self.writer.close()

    async def read_response(self) -> bytes:
        assert self.reader is not None
        line = await self.reader.readline()
        if not line:
            raise ConnectionError(f"{self.name}: connection closed by server")
        data = line
        while (m := _LITERAL.search(line)):
            data += await self.reader.readexactly(int(m.group(1)))
            line = await self.reader.readline()
            data += line
        self.transcript.append(data.rstrip(b"\r\n"))
        del self.transcript[:-40]
        return data

    async def send(self, data: bytes) -> None:
        assert self.writer is not None
        self.transcript.append(b"C: " + data.rstrip(b"\r\n")[:200])
        self.writer.write(data)
        await self.writer.drain()

    async def command(self, text: str, literal: bytes | None = None, check_ok: bool = False
                      ) -> tuple[bytes, bytes]:
        """Send a command; every untagged response goes through the model.
        Returns (status, whole tagged line)."""
        self.tagn += 1
        tag = f"{self.name}.{self.tagn}".encode()
        if literal is not None:
            await self.send(tag + b" " + text.encode() + b" {%d+}\r\n" % len(literal) + literal + b"\r\n")
        else:
            await self.send(tag + b" " + text.encode() + b"\r\n")
        while True:
            resp = await self.read_response()
            if resp.startswith(tag + b" "):
                status = resp[len(tag) + 1:].split(b" ", 1)[0].upper()
                if check_ok and status != b"OK":
                    raise AssertionError(f"{self.name}: {text!r} -> {resp!r}")
                return status, resp
            if resp.startswith(b"* "):
                self.on_untagged(resp)
            elif resp.startswith(b"+"):
                return b"+", resp

    # ---------------------------------------------------------------- the model
    def on_untagged(self, resp: bytes) -> None:
        m = _UNTAGGED_NUM.match(resp)
        if m is None:
            if resp.startswith(b"* OK [COPYUID"):
                self.last_copyuid = _COPYUID.search(resp)
            fm = _FLAGS_LINE.match(resp)
            if fm:
                self.announced = {f for f in fm.group(1).decode().split() if not f.startswith("\\")}
            return
        n, kind = int(m.group(1)), m.group(2).upper()
        if kind == b"EXISTS":
            if n < len(self.view):
                self.error(f"EXISTS went down from {len(self.view)} to {n} without EXPUNGE")
                del self.view[n:]
            else:
                self.view.extend([None] * (n - len(self.view)))
        elif kind == b"EXPUNGE":
            if not 1 <= n <= len(self.view):
                self.error(f"EXPUNGE {n} outside the view of {len(self.view)} messages")
                return
            uid = self.view.pop(n - 1)
            if uid is not None:
                self.told_gone.add(uid)
        elif kind == b"FETCH":
            self.on_fetch(n, resp)

    def on_fetch(self, n: int, resp: bytes) -> None:
        if not 1 <= n <= len(self.view):
            self.error(f"FETCH for sequence {n} outside the view of {len(self.view)} messages")
            return
        um = _UID.search(resp)
        uid = int(um.group(1)) if um else None
        if uid is not None:
            have = self.view[n - 1]
            if have is None:
                self.learn(n, uid)
            elif have != uid:
                self.error(f"UID changed for sequence {n}: {have} -> {uid}")
            if uid in self.told_gone:
                self.error(f"UID {uid} shows in a FETCH after its EXPUNGE")
            tm = _TOKEN.search(resp)
            if tm:
                self.shared.record(self.name, uid, tm.group(1).decode())
        fm = _FLAGS.search(resp)
        if fm and uid is not None and b"\\Recent" in fm.group(1):
            first = self.shared.recent_in.setdefault(uid, self.name)
            if first != self.name:
                self.error(f"UID {uid} is \\Recent here and in {first} (RFC 3501: one session only)")
        if fm:
            kws = {f for f in fm.group(1).decode().split() if not f.startswith("\\")}
            if kws - self.announced:
                self.error(f"FETCH shows keywords {sorted(kws - self.announced)} never announced in FLAGS")

    def learn(self, n: int, uid: int) -> None:
        self.view[n - 1] = uid
        lower = next((u for u in reversed(self.view[:n - 1]) if u is not None), 0)
        higher = next((u for u in self.view[n:] if u is not None), None)
        if uid <= lower or (higher is not None and uid >= higher):
            self.error(f"UID {uid} at sequence {n} breaks ascending order ({lower} .. {higher})")

    def check_bad(self, status: bytes, resp: bytes, what: str) -> None:
        if status == b"BAD":
            self.error(f"{what} answered {resp.strip()!r}")

    # ---------------------------------------------------------------- operations
    def pick_seq(self) -> int | None:
        return random.randint(1, len(self.view)) if self.view else None

    async def op_append(self, dest: str | None = None) -> None:
        token = self.shared.token()
        flags = random.choice(["", "(\\Seen)", "($Label1)", "(\\Flagged $Label2)"])
        status, resp = await self.command(f"APPEND {dest or self.mailbox} {flags}".replace("  ", " ").strip(),
                                          literal=message(token, random.randint(0, 3)))
        self.check_bad(status, resp, "APPEND")
        m = _APPENDUID.search(resp)
        if m and (dest or self.mailbox) == self.mailbox:
            self.shared.record(self.name, int(m.group(2)), token)

    async def op_store(self) -> None:
        n = self.pick_seq()
        if n is None:
            return
        flags = random.choice(["(\\Deleted)", "(\\Deleted)", "(\\Seen)", "($Label3)", "(\\Flagged)"])
        mode = random.choice(["+FLAGS", "+FLAGS.SILENT", "+FLAGS", "-FLAGS"])
        uid = self.view[n - 1]
        if uid is not None and random.random() < 0.5:
            status, resp = await self.command(f"UID STORE {uid} {mode} {flags}")
        else:
            status, resp = await self.command(f"STORE {n} {mode} {flags}")
        self.check_bad(status, resp, "STORE")

    async def op_expunge(self) -> None:
        known = [u for u in self.view if u is not None]
        if known and random.random() < 0.3:
            status, resp = await self.command(f"UID EXPUNGE {random.choice(known)}:*")
        else:
            status, resp = await self.command("EXPUNGE")
        self.check_bad(status, resp, "EXPUNGE")

    async def op_copy(self, move: bool, same_mailbox: bool, other: str) -> None:
        n = self.pick_seq()
        if n is None:
            return
        hi = min(len(self.view), n + random.randint(0, 2))
        before = list(self.view[n - 1:hi])
        dest = self.mailbox if same_mailbox else other
        verb = "MOVE" if move else "COPY"
        self.last_copyuid = None
        status, resp = await self.command(f"{verb} {n}:{hi} {dest}")
        self.check_bad(status, resp, verb)
        # COPYUID is in the tagged line (COPY) or in an untagged OK before it (MOVE)
        m = _COPYUID.search(resp) or (self.last_copyuid if move else None)
        if m and status == b"OK":
            srcs, dsts = uid_set(m.group(2)), uid_set(m.group(3))
            if None not in before and not set(srcs) <= set(before):
                self.error(f"{verb} {n}:{hi} acted on UIDs {srcs}, the view had {before} there")
            if dest == self.mailbox:
                for s, d in zip(srcs, dsts):
                    tok = self.shared.tokens.get(s)
                    if tok is not None:
                        self.shared.record(self.name, d, tok)

    async def op_fetch(self) -> None:
        n = self.pick_seq()
        if n is None:
            return
        hi = min(len(self.view), n + random.randint(0, 4))
        status, resp = await self.command(f"FETCH {n}:{hi} {FETCH_ITEMS}")
        self.check_bad(status, resp, "FETCH")

    async def op_uid_fetch(self) -> None:
        known = [u for u in self.view if u is not None]
        if not known:
            status, resp = await self.command(f"UID FETCH 1:* {FETCH_ITEMS}")
        else:
            lo = random.choice(known)
            status, resp = await self.command(f"UID FETCH {lo}:{lo + random.randint(0, 5)} {FETCH_ITEMS}")
        self.check_bad(status, resp, "UID FETCH")

    async def op_idle(self) -> None:
        status, resp = await self.command("IDLE")
        if status != b"+":
            self.check_bad(status, resp, "IDLE")
            return
        tag = f"{self.name}.{self.tagn}".encode()
        end = time.monotonic() + random.uniform(0.005, 0.08)
        while True:
            left = end - time.monotonic()
            if left <= 0:
                break
            try:
                resp = await asyncio.wait_for(self.read_response(), left)
            except asyncio.TimeoutError:
                break
            if resp.startswith(b"* "):
                self.on_untagged(resp)
        await self.send(b"DONE\r\n")
        while True:
            resp = await self.read_response()
            if resp.startswith(tag + b" "):
                self.check_bad(resp.split(b" ")[1], resp, "IDLE")
                return
            if resp.startswith(b"* "):
                self.on_untagged(resp)

    async def random_op(self, same_mailbox_moves: bool = True, copy_into_self: bool = True,
                        other: str = "Other", target_size: int = 30) -> None:
        big = len(self.view) > target_size
        choices = [("append", 3 if not big else 1), ("store", 4), ("expunge", 2 if not big else 5),
                   ("copy", 1), ("move", 1), ("noop", 2), ("idle", 1), ("fetch", 3), ("uid_fetch", 2)]
        what = random.choices([c for c, _ in choices], [w for _, w in choices])[0]
        self.shared.count(what)
        if what == "append":
            await self.op_append()
        elif what == "store":
            await self.op_store()
        elif what == "expunge":
            await self.op_expunge()
        elif what in ("copy", "move"):
            same = (same_mailbox_moves if what == "move" else copy_into_self) and random.random() < 0.5
            await self.op_copy(what == "move", same, other)
        elif what == "noop":
            await self.command("NOOP")
        elif what == "idle":
            await self.op_idle()
        elif what == "fetch":
            await self.op_fetch()
        else:
            await self.op_uid_fetch()

    async def final_check(self, truth: list[int]) -> None:
        """After all sessions stopped: one NOOP, then the view must equal `truth`."""
        await self.command("NOOP")
        if self.view:
            await self.command("FETCH 1:* (UID)")
        if self.view != truth:
            self.error(f"view after NOOP {self.view} differs from the mailbox {truth}")


async def mailbox_truth(host: str, port: int, user: str, password: str, mailbox: str = "INBOX") -> list[int]:
    """The mailbox's UIDs as a fresh session sees them."""
    shared = Shared()
    c = IMAPChecker("truth", shared, mailbox)
    await c.connect(host, port, user, password)
    _, _ = await c.command("UID SEARCH ALL")
    line = next((x for x in reversed(c.transcript) if x.startswith(b"* SEARCH")), b"* SEARCH")
    await c.close()
    return [int(x) for x in line.split()[2:]]


# -------------------------------------------------------------------- POP3
class POP3Checker:
    """A POP3 client that deletes a few messages per session (DELE + QUIT) and checks its own
    view: STAT agrees with LIST/UIDL, and a UIDL always names the same message (X-Token)."""

    def __init__(self, name: str, shared: Shared) -> None:
        self.name = name
        self.shared = shared
        self.uidl_tokens: dict[str, str] = {}
        self.deleted_tokens: set[str] = set()
        self.sessions = 0

    async def session(self, host: str, port: int, user: str, password: str) -> None:
        reader, writer = await asyncio.open_connection(host, port)

        async def cmd(line: str, multi: bool = False) -> tuple[bytes, list[bytes]]:
            writer.write(line.encode() + b"\r\n")
            await writer.drain()
            first = await reader.readline()
            lines: list[bytes] = []
            if multi and first.startswith(b"+OK"):
                while True:
                    ln = await reader.readline()
                    if ln in (b".\r\n", b""):
                        break
                    lines.append(ln[1:] if ln.startswith(b"..") else ln)
            return first, lines

        try:
            await reader.readline()
            await cmd(f"USER {user}")
            first, _ = await cmd(f"PASS {password}")
            if not first.startswith(b"+OK"):
                return  # e.g. [IN-USE]: another POP3 session holds the mailbox
            self.sessions += 1
            stat, _ = await cmd("STAT")
            count = int(stat.split()[1])
            _, uidls = await cmd("UIDL", multi=True)
            _, lists = await cmd("LIST", multi=True)
            if len(uidls) != count or len(lists) != count:
                self.shared.errors.append(f"{self.name}: STAT says {count}, UIDL {len(uidls)}, LIST {len(lists)}")
            keys = {int(x.split()[0]): x.split()[1].decode() for x in uidls}
            picks = random.sample(sorted(keys), min(len(keys), random.randint(0, 3)))
            for n in picks:
                first, lines = await cmd(f"TOP {n} 0", multi=True)
                if not first.startswith(b"+OK"):
                    continue  # expunged over IMAP meanwhile
                tm = _TOKEN.search(b"".join(lines))
                if tm:
                    tok = tm.group(1).decode()
                    old = self.uidl_tokens.setdefault(keys[n], tok)
                    if old != tok:
                        self.shared.errors.append(f"{self.name}: UIDL {keys[n]} was {old}, now {tok}")
                first, _ = await cmd(f"DELE {n}")
                if first.startswith(b"+OK") and tm:
                    self.deleted_tokens.add(tm.group(1).decode())
            first, _ = await cmd("QUIT")
            if not first.startswith(b"+OK"):
                self.shared.errors.append(f"{self.name}: QUIT answered {first!r}")
            self.shared.count("pop3-dele")
        finally:
            writer.close()


async def run_mix(host: str, imap_port: int, user: str, password: str, *, sessions: int = 6,
                  seconds: float = 5.0, pop3_port: int | None = None, seed: int | None = None,
                  other: str = "Other", same_mailbox_moves: bool = True, reconnect_every: int = 0,
                  on_progress=None) -> Shared:
    """N checked IMAP sessions doing random work on one mailbox for `seconds`; with
    `pop3_port`, a POP3 client deleting messages meanwhile.  Returns the Shared record
    (errors empty when every view stayed right)."""
    if seed is not None:
        random.seed(seed)
    shared = Shared()
    copy_into_self = pop3_port is None  # POP3 checks identify messages by token: keep them unique
    moves_in_place = same_mailbox_moves and pop3_port is None
    checkers = [IMAPChecker(f"s{i}", shared) for i in range(sessions)]
    for c in checkers:
        await c.connect(host, imap_port, user, password)
    deadline = time.monotonic() + seconds

    async def worker(c: IMAPChecker) -> None:
        done = 0
        while time.monotonic() < deadline:
            await c.random_op(moves_in_place, copy_into_self, other)
            done += 1
            if reconnect_every and done % reconnect_every == 0:
                await c.close()
                c.view, c.told_gone, c.announced = [], set(), set()
                await c.connect(host, imap_port, user, password)

    pop = POP3Checker("pop3", shared) if pop3_port else None

    async def pop_worker() -> None:
        while time.monotonic() < deadline:
            await pop.session(host, pop3_port, user, password)
            await asyncio.sleep(random.uniform(0.01, 0.1))

    tasks = [worker(c) for c in checkers] + ([pop_worker()] if pop else [])
    if on_progress is not None:
        tasks.append(on_progress(shared, deadline))
    await asyncio.gather(*tasks)
    truth = await mailbox_truth(host, imap_port, user, password)
    for c in checkers:
        await c.final_check(truth)
    if pop is not None:
        c = IMAPChecker("final", shared)
        await c.connect(host, imap_port, user, password)
        if c.view:
            await c.command(f"FETCH 1:* {FETCH_ITEMS}")
        alive = {shared.tokens.get(u) for u in c.view}
        back = alive & pop.deleted_tokens
        if back:
            shared.errors.append(f"messages deleted over POP3 are still there: {sorted(back)[:5]}")
        shared.ops["pop3-sessions"] = pop.sessions
        await c.close()
    for c in checkers:
        await c.close()
    return shared
