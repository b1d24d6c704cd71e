"""RETR and TOP: sending messages, for POP3Session (a mixin over its state: messages, sizes,
mailbox, conn).  Small messages come from the read-ahead (retrieve.py) in one write, answered
straight from the connection's data_received when the session is waiting for a command
(retr_at_once); big ones are streamed a piece at a time; a message without a file goes
through the store's read_range."""
from __future__ import annotations

import asyncio
import logging

from ..store.base import StoreError
from .parser import MAX_NUMBER_DIGITS, TRANSACTION, Command, CommandError, MessageEncoder, TopCutter, err, ok, parse_number
from .retrieve import READ_AHEAD_BYTES, READ_AHEAD_COUNT, SMALL_MESSAGE, FileStream, read_ahead

log = logging.getLogger("mailstack.pop3")

# RETR streams the message in pieces of this size: memory per session stays bounded.
READ_CHUNK = 256 * 1024
# TOP reads this much first and more only when the header is longer.
TOP_FIRST_READ = 16 * 1024


class Retrieval:
    async def cmd_retr(self, cmd: Command) -> bool:
        if len(cmd.args) != 1:
            raise CommandError("RETR takes one argument: RETR msg")
        i = self._message(cmd)
        if i is None:
            return True
        uid = self.messages[i].uid
        path = self.mailbox.path(uid)  # None: gone meanwhile, or a backend without files
        if path is not None:
            ready = self._ahead.pop(i, None)
            if ready is None and i in self._ahead_pending:
                ready = await self._read_ahead_wait(i)
            if ready is not None:  # read and encoded while the client handled the last one
                self._send_ready(i, ready)
                return True
            try:
                stream = await asyncio.to_thread(FileStream, path)
            except FileNotFoundError:  # renamed (a flag change) or removed: ask the store
                stream = None
            except OSError as e:
                log.warning("RETR %d (uid %d) failed: %s", i + 1, uid, e, extra=self._log_extra)
                self.conn.write(err("Message is no longer available", "SYS/TEMP"))
                return True
            if stream is not None:
                try:
                    return await self._retr_stream(i, stream)
                finally:
                    stream.close()
        return await self._retr_by_range(i, uid)

    def _send_ready(self, i: int, ready: tuple[bytes, int]) -> None:
        answer, octets = ready
        self._ahead_bytes -= len(answer)
        self._sent_message(i, octets)
        self.conn.write(answer)  # status line, message and terminator: one write
        self._read_ahead_from(i)

    def retr_at_once(self, line: bytes) -> bool:
        """Connection.on_line: "RETR n" of a message already read ahead, answered straight from
        data_received while the session waits for its next command (no task wake-up): what
        the command loop and cmd_retr would do for it.  False for anything else, which then
        takes the ordinary way (so every error, and every other command, is answered there)."""
        if line[:5] not in (b"RETR ", b"retr ", b"Retr ") or self.idle_since is None \
                or self.state != TRANSACTION:
            return False
        number = line[5:]
        if not number.isdigit() or len(number) > MAX_NUMBER_DIGITS or self.commands >= self.cfg.max_commands:
            return False
        i = int(number) - 1
        ready = self._ahead.get(i)
        # as cmd_retr: only a message that still exists in the store (not expunged over IMAP)
        if ready is None or i < 0 or i in self.deleted or self.mailbox.path(self.messages[i].uid) is None:
            return False
        del self._ahead[i]
        self.commands += 1
        self._send_ready(i, ready)
        self.idle_since = asyncio.get_running_loop().time()  # waiting for the next command again
        return True

    def _sent_message(self, i: int, sent: int) -> None:
        self.bytes_sent += sent
        if sent < self.sizes[i]:  # would mean the file changed under us: Maildir files never do
            log.warning("RETR %d (uid %d) sent %d octets, LIST said %d", i + 1, self.messages[i].uid, sent,
                        self.sizes[i], extra=self._log_extra)
        self.retrieved.add(i)

    async def _read_ahead_wait(self, i: int) -> tuple[bytes, int] | None:
        """Message i from the read running now (waiting beats a second read), or None."""
        try:
            await asyncio.shield(self._ahead_task)
        except (OSError, StoreError):
            return None
        return self._ahead.pop(i, None)

    def _read_ahead_from(self, i: int) -> None:
        """After RETR i: read the next small messages in one thread hop, unless enough are
        read already or a read is running.  Bounded by READ_AHEAD_BYTES / _COUNT."""
        if self._ahead_pending:  # a read is running, or its result is not taken in yet
            return
        ahead = self._ahead
        # Skipped by the client: not kept.  The scan of all (up to READ_AHEAD_COUNT, each RETR)
        # is made only when the first key is not past i: read in order it is the lowest; after
        # RETRs out of order one may wait behind it until it is (bounded all the same).
        if next(iter(ahead), i + 1) <= i:
            for k in [k for k in ahead if k <= i]:
                self._ahead_bytes -= len(ahead.pop(k)[0])
        held = self._ahead_bytes
        if len(ahead) >= READ_AHEAD_COUNT // 2 or held >= READ_AHEAD_BYTES // 2:
            return
        wanted: list[tuple[int, str, int]] = []
        budget = READ_AHEAD_BYTES - held
        j = i + 1
        while j < len(self.messages) and len(wanted) + len(ahead) < READ_AHEAD_COUNT:
            if j not in self.deleted and j not in ahead:
                size = self.sizes[j]
                if size > SMALL_MESSAGE or size > budget:
                    break
                path = self.mailbox.path(self.messages[j].uid)
                if path is None:
                    break
                wanted.append((j, path, size))
                budget -= size
            j += 1
        if not wanted:
            return
        self._ahead_pending = {j for j, _, _ in wanted}
        # the executor's future itself, not a task around to_thread: one step less on the loop
        task = asyncio.get_running_loop().run_in_executor(None, read_ahead, wanted)

        def done(t: asyncio.Future) -> None:
            if self._ahead_task is not t:  # the session ended (_release)
                return
            self._ahead_pending = set()
            if not t.cancelled() and t.exception() is None:
                for k, answer in t.result().items():
                    self._ahead[k] = answer
                    self._ahead_bytes += len(answer[0])
        task.add_done_callback(done)
        self._ahead_task = task

    async def _retr_stream(self, i: int, stream: FileStream) -> bool:
        """RETR from an open file: pieces read and encoded in a thread, one piece ahead."""
        uid = self.messages[i].uid
        try:
            out = await asyncio.to_thread(stream.next)
        except OSError as e:
            log.warning("RETR %d (uid %d) failed: %s", i + 1, uid, e, extra=self._log_extra)
            self.conn.write(err("Message is no longer available", "SYS/TEMP"))
            return True
        self._in_multiline = True
        head = ok(f"{self.sizes[i]} octets")
        sent = 0
        while True:
            ahead = None if stream.done else asyncio.ensure_future(asyncio.to_thread(stream.next))
            sent += len(out)
            if head:  # one write (one segment) for a message that fits in a piece
                out, head = head + out, b""
            self.conn.write(out + b".\r\n" if ahead is None else out)
            if ahead is None:
                break
            try:
                await self.conn.drain()
                out = await ahead
            except OSError as e:
                # Half a message is out: no way to say -ERR now, so hang up without the
                # terminator; the client sees a failed download, never a short message.
                log.error("RETR %d (uid %d) failed after %d bytes: %s", i + 1, uid, sent, e,
                          extra=self._log_extra)
                self.conn.abort()
                return False
            except BaseException:  # cancelled (shutdown): the read ahead goes too
                ahead.cancel()
                raise
        self._in_multiline = False
        self._sent_message(i, sent)
        self._read_ahead_from(i)
        return True

    async def _first_piece(self, what: str, i: int, uid: int, want: int, status: bytes) -> bytes | None:
        """The first piece of message i through read_range, read before the status line is
        written (and the answer begins): a message that has gone (expunged over IMAP meanwhile)
        or an I/O error still gets a proper -ERR, and None."""
        try:
            chunk = await self.mailbox.read_range(uid, 0, want)
        except (StoreError, OSError, KeyError) as e:
            log.warning("%s %d (uid %d) failed: %s", what, i + 1, uid, e, extra=self._log_extra)
            self.conn.write(err("Message is no longer available", "SYS/TEMP"))
            return None
        self._in_multiline = True
        self.conn.write(status)
        return chunk

    async def _retr_by_range(self, i: int, uid: int) -> bool:
        """RETR through the store's read_range: a backend without files, or a file that moved."""
        chunk = await self._first_piece("RETR", i, uid, READ_CHUNK, ok(f"{self.sizes[i]} octets"))
        if chunk is None:
            return True
        encoder = MessageEncoder()
        sent = 0
        offset = 0
        while True:
            offset += len(chunk)
            # the next piece is read (in a thread) while this one goes out: one piece ahead
            ahead = asyncio.ensure_future(self.mailbox.read_range(uid, offset, READ_CHUNK)) \
                if len(chunk) == READ_CHUNK else None
            out = encoder.feed(chunk)
            sent += len(out)
            self.conn.write(out)
            if ahead is None:
                break
            try:
                await self.conn.drain()
            except BaseException:  # cancelled (shutdown): the read ahead goes too
                ahead.cancel()
                raise
            try:
                chunk = await ahead
            except (StoreError, OSError, KeyError) as e:
                # Half a message is out: no way to say -ERR now, so hang up without the
                # terminator; the client sees a failed download, never a short message.
                log.error("RETR %d (uid %d) failed after %d bytes: %s", i + 1, uid, offset, e,
                          extra=self._log_extra)
                self.conn.abort()
                return False
        out = encoder.end()
        sent += len(out)
        self.conn.write(out + b".\r\n")
        self._in_multiline = False
        self._sent_message(i, sent)
        return True

    async def cmd_top(self, cmd: Command) -> bool:
        if len(cmd.args) != 2:
            raise CommandError("TOP takes two arguments: TOP msg n")
        lines = parse_number(cmd.args[1], "line count")
        i = self._message(cmd)
        if i is None:
            return True
        uid = self.messages[i].uid
        # Read piece by piece, like RETR: TOP 1 1000000 of a 50 MB message must not hold it whole.
        chunk = await self._first_piece("TOP", i, uid, TOP_FIRST_READ, ok())
        if chunk is None:
            return True
        cutter, encoder = TopCutter(lines), MessageEncoder()
        offset, want = 0, TOP_FIRST_READ
        while True:
            out = encoder.feed(cutter.feed(chunk))
            self.bytes_sent += len(out)
            self.conn.write(out)
            offset += len(chunk)
            if cutter.done or len(chunk) < want:
                break
            await self.conn.drain()
            want = READ_CHUNK
            try:
                chunk = await self.mailbox.read_range(uid, offset, want)
            except (StoreError, OSError, KeyError) as e:
                log.error("TOP %d (uid %d) failed after %d bytes: %s", i + 1, uid, offset, e, extra=self._log_extra)
                self.conn.abort()
                return False
        out = encoder.end()
        self.bytes_sent += len(out)
        self.conn.write(out + b".\r\n")
        self._in_multiline = False
        return True
