"""IMAP FETCH: rendering from the metadata index where it can, reading message files in
batches off the loop where it must, and streaming big messages in bounded pieces."""
from __future__ import annotations

import asyncio
import logging
import operator
import os

from ..store.base import StoreError
from ..store.index import Plain, serialize
from . import bigmessage, binary, fetch, flaglisting, response, search, sort
from .fetch_files import HEADER_PEEK, head_of, read_header, read_whole  # noqa: F401 (tests import them from here)
from .parser import Command, FetchAtt
from .states import FETCH_BATCH, Bye

# _render_plain's items: (how each is written, where its value is in the tuple it makes)
_PLAIN_ITEMS = {"UID": (b"UID %d", 1), "FLAGS": (b"%b", 2), "RFC822.SIZE": (b"RFC822.SIZE %d", 3),
                "INTERNALDATE": (b"INTERNALDATE %b", 4), "ENVELOPE": (b"%b", 5), "MODSEQ": (b"MODSEQ (%d)", 6)}

log = logging.getLogger("mailstack.imap")

BIG_CHUNK = 65536
STREAM_MIN = 1 << 20  # whole messages at least this big are streamed, not read whole
STREAM_CHUNK = 256 * 1024  # bytes read per piece when streaming
_PLAIN = frozenset({"UID", "FLAGS", "RFC822.SIZE", "INTERNALDATE", "MODSEQ", "ENVELOPE"})  # rendered without a read

class _Lit:
    """A FETCH item whose value is a literal: kept apart so big bodies are not copied."""

    __slots__ = ("label", "data")

    def __init__(self, label: bytes, data: bytes) -> None:
        self.label, self.data = label, data


class _Lit8(_Lit):
    """A literal8 (RFC 3516 "~{n}"): BINARY data that holds NUL."""

    __slots__ = ()


class _Stream:
    """A literal that is a byte range of a big message file, sent in bounded pieces read
    from the store as the client takes them (never whole in memory)."""

    __slots__ = ("label", "uid", "start", "size")

    def __init__(self, label: bytes, uid: int, size: int, start: int = 0) -> None:
        self.label, self.uid, self.size, self.start = label, uid, size, start


class _BigHead(tuple):
    """(header bytes, body start) of a streamed message, plus `parts`: the byte range (or the
    made bytes) of each MIME part section asked for, by section spec (bigmessage.py)."""

    def __new__(cls, head: tuple, parts: dict):
        self = super().__new__(cls, head)
        self.parts = parts
        return self


def _join_fetch(seq: int, items: list) -> "bytes | list":
    """One "* n FETCH (...)" response: bytes, or a list of chunks when it holds a literal."""
    chunks: list[bytes] = []
    cur = bytearray(b"* %d FETCH (" % seq)
    for i, item in enumerate(items):
        if i:
            cur += b" "
        if isinstance(item, _Stream):
            cur += item.label + b" {%d}\r\n" % item.size
            chunks.append(bytes(cur))
            chunks.append(item)
            cur = bytearray()
        elif isinstance(item, _Lit):  # apart, not copied: _blocks joins the pieces once
            cur += item.label + (b" ~{%d}\r\n" if isinstance(item, _Lit8) else b" {%d}\r\n") % len(item.data)
            chunks.append(bytes(cur))
            chunks.append(item.data)
            cur = bytearray()
        else:
            cur += item
    cur += b")\r\n"
    if not chunks:
        return bytes(cur)
    chunks.append(bytes(cur))
    return chunks


def _whole_body_head(atts) -> "tuple[bytes, bool] | None":
    """For a FETCH of a whole body alone (BODY[] / BODY.PEEK[] / RFC822, with the UID first,
    as UID FETCH adds it): the format of each response's head up to its literal, and whether
    it takes the UID.  _render_batch then makes a response with one %-format (the general
    loop costs ~1.7 us a message: 100 bodies, ~0.17 ms of the worker's ~1 ms).  None for
    anything else."""
    names = [a.name for a in atts]
    uid = names[:1] == ["UID"]
    body = atts[1:] if uid else atts
    if len(body) != 1:
        return None
    a = body[0]
    if a.partial is not None or a.name not in ("BODY[]", "RFC822"):
        return None
    if a.name == "BODY[]" and (a.section.part or a.section.text):
        return None
    label = b"RFC822" if a.name == "RFC822" else b"BODY[]"
    return b"* %d FETCH (" + (b"UID %d " if uid else b"") + label + b" {%d}\r\n", uid


BLOCK = 256 * 1024  # small responses are joined into writes of about this size
DATA_BATCH = 2 << 20  # message bytes read per batch (one worker call) by a FETCH of whole bodies


def _batches(picked: list, by_bytes: bool) -> list[list]:
    """(seq, info) pairs cut into batches of FETCH_BATCH messages, and with `by_bytes` of
    about DATA_BATCH message bytes too (a streamed message counts for little: only its head
    is read), so that what a FETCH of whole bodies holds at once stays bounded."""
    if not by_bytes:
        return [picked[i:i + FETCH_BATCH] for i in range(0, len(picked), FETCH_BATCH)]
    out: list[list] = []
    batch: list = []
    size = 0
    for pair in picked:
        batch.append(pair)
        size += pair[1].size if pair[1].size < STREAM_MIN else BIG_CHUNK
        if size >= DATA_BATCH or len(batch) >= FETCH_BATCH:
            out.append(batch)
            batch, size = [], 0
    if batch:
        out.append(batch)
    return out


class _Vector(list):
    """Pieces of about BLOCK bytes in all, for one writelines(): a transport that hands them
    to the kernel in one writev (uvloop's TCP) sends them without a join (see _blocks)."""

    __slots__ = ()


def writes_vectors(writer) -> bool:
    """Does `writer.writelines` send its pieces without joining them?  uvloop's plain TCP
    transport does (one writev); asyncio's 3.11 transports and TLS join them (on the loop,
    where a copy of a batch would cost more than in the worker), and COMPRESS's writer
    compresses each write."""
    transport = type(writer.transport)
    return type(writer) is asyncio.StreamWriter and transport.__name__ == "TCPTransport" and \
        transport.__module__ == "uvloop.loop"


def _blocks(rendered: list, gone: bool, vectors: bool = False) -> tuple[list, bool]:
    """A batch's responses as few writes (in the worker that rendered them): small ones
    joined into BLOCK-sized bytes, instead of copied one by one into the session's buffer
    on the loop and out of it again; literals of BIG_CHUNK or more and streamed ones stay
    apart, uncopied.  With `vectors` a block is a _Vector of the pieces, not joined: a
    FETCH of 100 bodies joined ~1 MB into new memory (a page fault every 4 KiB, the
    arena trimmed again once it was sent), ~0.25 ms of the worker's ~1 ms."""
    out: list = []
    parts: list[bytes] = []
    size = 0

    def block() -> "bytes | _Vector":
        # a short one is joined: it goes into the session's buffer with the tagged reply
        return _Vector(parts) if vectors and size >= BIG_CHUNK else b"".join(parts)

    for item in rendered:
        for chunk in ((item,) if isinstance(item, bytes) else item):
            if isinstance(chunk, bytes) and len(chunk) < BIG_CHUNK:
                parts.append(chunk)
                size += len(chunk)
                if size >= BLOCK:
                    out.append(block())
                    parts, size = [], 0
                continue
            if parts:
                out.append(block())
                parts, size = [], 0
            out.append(chunk)
    if parts:
        out.append(block())
    return out, gone


class FetchCommands:
    """Mixed into IMAPSession (session.py), which owns the I/O and the state."""

    def _render_streamed(self, m, a, entries, head=None) -> "bytes | _Lit | _Stream | None":
        """One FETCH item of a big message that is streamed: its literals are byte ranges of
        the file (the whole, the header, the text, a partial of those); `head` is
        (header bytes, body start) when an item needs the header's end."""
        name = a.name
        if name == "BODY[]" and a.section.part:  # a MIME part: its range was found by _read_heads
            label = b"BODY[" + a.section.spec() + b"]"
            found = head.parts.get(a.section.spec(), b"")
            if isinstance(found, bytes):
                if a.partial is not None:
                    found = found[a.partial[0]:a.partial[0] + a.partial[1]]
                    label += b"<%d>" % a.partial[0]
                return _Lit(label, found)
            start, size = found[0], found[1] - found[0]
        elif name in ("RFC822.HEADER", "RFC822.TEXT") or (name == "BODY[]" and a.section.text):
            header, bstart = head
            text = "HEADER" if name == "RFC822.HEADER" else "TEXT" if name == "RFC822.TEXT" else a.section.text
            label = name.encode() if name != "BODY[]" else b"BODY[" + a.section.spec() + b"]"
            if text.startswith("HEADER.FIELDS"):  # a few lines out of the header: small
                hend, _ = fetch.split_header(header)
                value = fetch.header_fields(header[:hend], a.section.fields, text == "HEADER.FIELDS.NOT")
                if a.partial is not None:
                    value = value[a.partial[0]:a.partial[0] + a.partial[1]]
                    label += b"<%d>" % a.partial[0]
                return _Lit(label, value)
            start, size = (0, bstart) if text == "HEADER" else (bstart, m.size - bstart)
        elif name in ("RFC822", "BODY[]"):
            label = b"RFC822" if name == "RFC822" else b"BODY[]"
            start, size = 0, m.size
        else:
            label = None
        if label is not None:
            if a.partial is not None:
                off, length = a.partial
                off_in = min(off, size)
                start, size = start + off_in, min(length, size - off_in)
                label += b"<%d>" % off
            return _Stream(label, m.uid, size, start)
        if name == "UID":
            return b"UID %d" % m.uid
        if name == "FLAGS":
            return b"FLAGS " + response.flag_list(self.flags_of(m))
        if name == "INTERNALDATE":
            return b"INTERNALDATE " + response.internaldate(m.internaldate)
        if name == "RFC822.SIZE":
            return b"RFC822.SIZE %d" % m.size
        if name == "MODSEQ":
            return b"MODSEQ (%d)" % m.modseq
        if name in ("ENVELOPE", "BODYSTRUCTURE", "BODY"):
            value = fetch.cached(entries.get(m.uid), {"ENVELOPE": "env", "BODYSTRUCTURE": "bs", "BODY": "body"}[name])
            return None if value is None else name.encode() + b" " + value
        return None

    async def _read_many(self, infos, header_only: bool = False, then=None):
        """Message bytes for several messages, read in one worker thread when the store
        gives file paths; messages that vanished meanwhile are left out.  With `then` the
        result is (datas, then(datas)): `then` runs in the same worker call when every file
        was read (the common case: one thread hop for a FETCH batch, not two), else None."""
        mbox = self.mbox
        paths = [(m.uid, mbox.path(m.uid), m.size) for m in infos]

        def work():
            out: dict[int, bytes | None] = {}
            complete = True
            for uid, path, size in paths:
                if path is None:
                    out[uid] = complete = None
                    continue
                try:
                    out[uid] = read_header(path) if header_only else read_whole(path, size)
                except OSError:
                    out[uid] = complete = None
            return out, then(out) if complete and then is not None else None

        got, done = await asyncio.to_thread(work)
        if then is not None and done is not None:
            return got, done
        for uid, data in list(got.items()):
            if data is None:
                try:
                    got[uid] = await mbox.read(uid)
                except (StoreError, OSError, KeyError):
                    del got[uid]
        if then is not None:
            return got, None
        return got  # type: ignore[return-value]

    async def _compute_entries(self, infos, structure: bool, old: dict | None = None,
                               lines: bool = False) -> tuple[dict[int, dict], dict[int, bytes] | None]:
        """Read and parse messages in one worker-thread call (the cold-cache path). Without
        `structure` only the header is read and parsed (enough for ENVELOPE and SENT*).
        Gives the entries to keep (merged over what `old` holds of them; header entries
        marked index.Plain) and, with `lines`, their index lines made in the same call (one
        hop per batch instead of two: hops wait their turn when the machine is busy)."""
        mbox = self.mbox
        paths = {m.uid: mbox.path(m.uid) for m in infos}
        old = old or {}

        def entry(data: bytes) -> dict:
            # the searchable header texts come along (cheap once the envelope parsed the
            # addresses): a header SEARCH after a first listing reads no file again
            return fetch.cache_entry(data) if structure else fetch.header_entry(data)

        def kept(uid: int, e: dict) -> dict:
            # keep what other modules (POP3 sizes) put there; header_entry's values are plain
            # JSON values (index.Plain: kept without a check)
            o = old.get(uid)
            return {**o, **e} if o else e if structure else Plain(e)

        def work() -> tuple[dict[int, dict], list[int], dict[int, bytes] | None]:
            out: dict[int, dict] = {}
            retry: list[int] = []
            for uid, path in paths.items():
                try:
                    if path is None:
                        raise FileNotFoundError
                    if structure and os.stat(path).st_size >= STREAM_MIN:
                        # a big message is parsed through a read-only map, never read whole
                        out[uid] = kept(uid, bigmessage.cache_entry_of_file(path))
                        continue
                    if structure:
                        with open(path, "rb") as f:
                            data = f.read()
                    else:
                        data = read_header(path)
                except OSError:
                    retry.append(uid)
                    continue
                out[uid] = kept(uid, entry(data))
            return out, retry, (serialize(out) if lines else None)

        out, retry, raws = await asyncio.to_thread(work)
        for uid in retry:  # renamed meanwhile, or a backend without files
            try:
                data = await mbox.read(uid)
            except (StoreError, OSError, KeyError):
                continue
            out[uid] = kept(uid, await asyncio.to_thread(entry, data))
        return out, raws

    async def _cache_entries(self, picked, structure: bool = False, search_fields: bool = False,
                             envelope_only: bool = False) -> dict:
        """Metadata cache entries for these messages; missing ones are computed (one thread
        call for the batch) and written back with one cache_put. An entry made from the header
        alone lacks the body structure: it is completed when `structure` is asked for.
        With `envelope_only` the values are the rendered b"ENVELOPE (...)" items instead,
        taken from the index lines without parsing them (fetch.cached_envelope)."""
        mbox = self.mbox
        many = getattr(mbox, "cache_get_many", None)
        if many is not None:
            got = await many([m.uid for _, m in picked], raw=envelope_only)
        else:
            got = {}
            for _, m in picked:
                e = await mbox.cache_get(m.uid)
                if e:
                    got[m.uid] = e
        entries: dict = {}
        missing = []
        old: dict[int, dict] = {}
        version = fetch.CACHE_VERSION
        for _, m in picked:
            e = got.get(m.uid)
            if e is None:
                missing.append(m)
                continue
            if envelope_only:
                env = fetch.cached_envelope(e)
                if env is not None:
                    entries[m.uid] = env
                    continue
                e = fetch.parse_entry(e)
                missing.append(m)
                if e:
                    old[m.uid] = e
                continue
            if e and e.get("v") == version and (not structure or "bs" in e) and \
                    (not search_fields or "hs" in e):
                entries[m.uid] = e
            else:
                missing.append(m)
                if e:
                    old[m.uid] = e  # keep what other modules (POP3 sizes) put there
        if missing:
            derived = mbox.derived()
            put_lines = getattr(mbox, "cache_put_lines", None)
            # A header-only listing's entries can have their index lines written after the
            # answer (by the background indexer, when the process is quiet): not made now
            puts_later = getattr(mbox, "puts_later", None)
            later = not structure and puts_later is not None and puts_later()
            fresh, raws = await self._compute_entries(missing, structure, old,
                                                      lines=put_lines is not None and not later)
            if mbox.derived() is derived:  # same UIDVALIDITY: the UIDs computed for are these
                sort.note_listed(derived, fresh)  # a first SORT (SUBJECT) then reads no entry
                search.note_listed(derived, fresh)  # nor a first SEARCH SUBJECT / FROM ...
            if envelope_only:
                for uid, e in fresh.items():
                    env = fetch.cached_envelope(e)
                    if env is not None:
                        entries[uid] = env
            else:
                entries.update(fresh)
            if fresh:
                try:
                    if later and await mbox.cache_put_later(fresh):
                        pass
                    elif put_lines is not None:
                        await put_lines(fresh, raws)
                    else:
                        await mbox.cache_put(fresh)
                except (StoreError, OSError):
                    log.warning("cache_put failed", exc_info=True, extra={"client": self.peer_ip})
        return entries

    async def _entries_ahead(self, batch, envelope_only: bool) -> asyncio.Future:
        """_cache_entries of a listing's next batch, started now: a cold one's files are read
        and parsed in a worker thread while the loop renders, writes and sends the batch
        before (the thread hops and the socket waits overlap).  At most one batch ahead."""
        fut = asyncio.ensure_future(self._cache_entries(batch, False, envelope_only=envelope_only))
        # a FETCH cut short (the client gone) leaves it to finish alone, awaited by nobody
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())
        await asyncio.sleep(0)  # let it look up the index and hand the files to a worker now
        return fut

    async def cmd_fetch(self, cmd: Command) -> None:
        if await flaglisting.fetch_uid_flags(self, cmd):  # a resynchronisation, in bulk
            return
        picked = self.resolve(cmd)
        if picked is None:
            return self.tagged(cmd, "BAD", "Invalid message sequence number")
        atts: list[FetchAtt] = list(cmd.args["atts"])
        if cmd.uid and not any(a.name == "UID" for a in atts):
            atts.insert(0, FetchAtt("UID"))
        picked = await self.condstore_fetch(cmd, picked, atts)  # RFC 7162 (condstore.py)
        if picked is None:
            return
        need_cache = any(a.name in ("ENVELOPE", "BODYSTRUCTURE", "BODY") for a in atts)
        need_structure = any(a.name in ("BODYSTRUCTURE", "BODY") for a in atts)
        need_data = None  # None, "header", "full"
        for a in atts:
            if a.name in ("RFC822", "RFC822.TEXT", "BINARY[]", "BINARY.SIZE") or (
                    a.name == "BODY[]" and not fetch.header_only(a.section)):
                need_data = "full"
            elif a.name in ("RFC822.HEADER", "BODY[]") and need_data is None:
                need_data = "header"
        sets_seen = not self.mbox.read_only and any(
            a.name in ("RFC822", "RFC822.TEXT") or (a.name in ("BODY[]", "BINARY[]") and not a.peek) for a in atts)
        if sets_seen:
            unseen = [m.uid for _, m in picked if "\\Seen" not in m.flags]
            if unseen:
                await self.mbox.store_flags(unseen, ["\\Seen"], "+", origin=self)
                if not any(a.name == "FLAGS" for a in atts):
                    atts.append(FetchAtt("FLAGS"))
                # refresh the infos from the view so FLAGS shows \Seen
                msgs = self.mbox.messages
                picked = [(s, msgs[s - 1] if s <= len(msgs) and msgs[s - 1].uid == m.uid else m)
                          for s, m in picked]
        if self.condstore and any(a.name == "FLAGS" for a in atts) and not any(a.name == "MODSEQ" for a in atts):
            atts.append(FetchAtt("MODSEQ"))  # RFC 7162 3.1.2: FLAGS come with their MODSEQ
        if sets_seen and self.qresync and not any(a.name == "UID" for a in atts):
            atts.insert(0, FetchAtt("UID"))  # RFC 7162 3.2.4: an implicit \Seen is told with the UID
        if any(a.name == "FLAGS" for a in atts):
            # A keyword shows in a FETCH only after an untagged FLAGS announced it.
            self._note_keywords(set().union(*flaglisting.distinct_of([m for _, m in picked])))  # flag sets are shared
        if any(a.name.startswith("BINARY") for a in atts):
            self.note_extension("BINARY")
        # Big messages are streamed when every literal asked for is a byte range of the file:
        # the whole message, its header or its text (BODY[]/RFC822 family, no MIME part),
        # partial or not.  A MIME part (BODY[1]) or BINARY still needs the message parsed whole.
        body_atts = [a for a in atts if a.name.startswith(("RFC822", "BODY[")) and a.name != "RFC822.SIZE"]
        streamable = need_data == "full" and not any(a.name.startswith("BINARY") for a in atts)
        # BODY[1.2], BODY[2.MIME]...: byte ranges found by parsing the file through a map
        part_sections = [a.section for a in body_atts if a.name == "BODY[]" and a.section.part]
        need_head = any(a.name in ("RFC822.HEADER", "RFC822.TEXT") or (a.name == "BODY[]" and a.section.text)
                        for a in body_atts)
        missing = False
        # Metadata only (what clients list a mailbox with): rendered item by item from the
        # view and the index, flag lists once per distinct set, no parse of index lines.
        plain = not need_data and all(a.name in _PLAIN for a in atts)
        envelope_only = need_cache and not need_structure
        flag_cache: dict = {}
        pending = None  # a listing's next batch of entries, made while this one is rendered and sent
        batches = _batches(picked, need_data == "full")
        vectors = writes_vectors(self.writer)
        for i, batch in enumerate(batches):
            entries = await (pending or self._cache_entries(batch, need_structure, envelope_only=envelope_only)) \
                if need_cache else {}
            pending = None
            if need_cache and plain and i + 1 < len(batches):
                pending = await self._entries_ahead(batches[i + 1], envelope_only)
            if plain:
                rendered, gone = self._render_plain(batch, atts, flag_cache, entries)
            elif need_data:
                streams = {m.uid for _, m in batch if m.size >= STREAM_MIN} if streamable else set()
                if streams and (need_head or part_sections):
                    streams = await self._read_heads([m for _, m in batch if m.uid in streams], part_sections)
                def render(datas, batch=batch, entries=entries, streams=streams):
                    return _blocks(*self._render_batch(batch, atts, entries, datas, streams), vectors)
                try:  # rendered in the reading worker call; decoding BINARY sections too, off the loop
                    datas, done = await self._read_many([m for _, m in batch if m.uid not in streams],
                                                        header_only=need_data == "header", then=render)
                    rendered, gone = done or await asyncio.to_thread(render, datas)
                except binary.UnknownCTE as e:
                    return await self.done(cmd, f"[UNKNOWN-CTE] Cannot decode {str(e)[:40]!r}", "NO")
                except binary.NotLeaf:
                    return await self.done(cmd, "[CANNOT] BINARY is for leaf body parts only (RFC 9051 6.4.5)",
                                           "NO")
            else:
                rendered, gone = self._render_batch(batch, atts, entries, None)
            missing = missing or gone
            for item in rendered:
                if isinstance(item, bytes) and len(item) < BIG_CHUNK:
                    self.out += item
                elif isinstance(item, _Vector):  # one writev of the pieces, not joined
                    await self.flush()
                    self.writer.writelines(item)
                    transport = self.writer.transport
                    if transport.get_write_buffer_size() or transport.is_closing():
                        await self.drain()
                else:  # big literals and _blocks' blocks go to the transport as they are, not copied
                    for chunk in item if isinstance(item, list) else (item,):
                        if isinstance(chunk, _Stream):
                            await self.flush()
                            await self._stream(chunk)
                        elif len(chunk) >= BIG_CHUNK:
                            await self.flush()
                            self.writer.write(chunk)
                            transport = self.writer.transport
                            if transport.get_write_buffer_size() or transport.is_closing():
                                await self.drain()  # (all taken by the socket: nothing to wait for)
                        else:
                            self.out += chunk
                await self.maybe_flush()
        if missing:
            # RFC 2180 4.1.3 lets us choose.  As Dovecot: what is still known (UID, FLAGS,
            # sizes, a cached ENVELOPE) and NIL for the contents, then OK: a NO makes clients
            # count the whole FETCH as failed and retry it; with OK they go on and learn of
            # the EXPUNGE at the next command that may announce it.
            await self.done(cmd, "[EXPUNGEISSUED] Some messages were already expunged")
        else:
            await self.done(cmd, "FETCH completed")

    async def _read_heads(self, infos, sections=()) -> dict:
        """{uid: (header bytes, body start)} of big messages, read in bounded pieces in one
        worker thread; a message that vanished meanwhile is not streamed (its FETCH says NIL).
        With MIME part `sections` the value is a _BigHead that also has their byte ranges."""
        paths = {m.uid: self.mbox.path(m.uid) for m in infos}

        def work() -> dict:
            out = {}
            for uid, path in paths.items():
                try:
                    if path is not None:
                        out[uid] = head_of(path)
                        if sections:
                            out[uid] = _BigHead(out[uid], bigmessage.sections_of_file(path, sections))
                except (OSError, ValueError):  # ValueError: mmap of a file that shrank meanwhile
                    out.pop(uid, None)
            return out

        return await asyncio.to_thread(work)

    async def _stream(self, item: _Stream) -> None:
        """Send a literal piece by piece.  The size was announced: a file that
        shrank or vanished meanwhile (Maildir files never change; a person could) cannot
        be answered any more, so the connection is closed rather than the literal faked."""
        offset = 0
        ahead = None  # the next piece, read in a thread while this one goes out
        while offset < item.size:
            want = min(STREAM_CHUNK, item.size - offset)
            if ahead is None:
                ahead = asyncio.ensure_future(self.mbox.read_range(item.uid, item.start + offset, want))
            try:
                chunk = await ahead
            except (StoreError, OSError) as e:
                chunk, why = b"", str(e)
            else:
                why = "the file is shorter than its size"
            ahead = None
            if not chunk:
                log.error("FETCH of UID %d cut after %d of %d bytes: %s", item.uid, offset, item.size,
                          why, extra={"client": self.peer_ip})
                self.writer.transport.abort()
                raise Bye()
            chunk = chunk[:item.size - offset]
            self.writer.write(chunk)
            offset += len(chunk)
            if offset < item.size:
                ahead = asyncio.ensure_future(self.mbox.read_range(
                    item.uid, item.start + offset, min(STREAM_CHUNK, item.size - offset)))
            transport = self.writer.transport
            if transport.get_write_buffer_size() or transport.is_closing():
                # (a piece the socket took whole: no drain, which is an asyncio.wait_for and
                # a task each time; 20 clients of a 50 MB message make 4,000 pieces)
                try:
                    await self.drain()
                except BaseException:
                    if ahead is not None:
                        ahead.cancel()
                    raise

    def _render_plain(self, batch, atts, flag_cache: dict, entries: dict) -> tuple[list[bytes], bool]:
        """FETCH of UID/FLAGS/RFC822.SIZE/INTERNALDATE/MODSEQ/ENVELOPE only (how clients
        list and resynchronise a mailbox: `FETCH 1:* (UID FLAGS)`, `(... ENVELOPE)`): no
        read; each flag list is rendered once per distinct flag set (the store shares
        them); ENVELOPE comes rendered from _cache_entries(envelope_only=True).  Returns
        the responses and whether a message had vanished unindexed."""
        names = [a.name for a in atts]
        recent = self.recent
        out = []
        if names == ["UID", "FLAGS"]:  # a client's resynchronisation: the one loop, tight
            for seq, m in batch:
                flags = m.flags
                key = (flags, m.uid in recent) if isinstance(flags, frozenset) else None
                value = flag_cache.get(key) if key is not None else None
                if value is None:
                    value = b"FLAGS " + response.flag_list(self.flags_of(m))
                    if key is not None:
                        flag_cache[key] = value
                out.append(b"* %d FETCH (UID %d %s)\r\n" % (seq, m.uid, value))
            return out, False
        if names and all(n in _PLAIN_ITEMS for n in names):
            return self._render_plain_formatted(batch, names, flag_cache, entries)
        return self._render_plain_items(batch, names, flag_cache, entries)

    def _render_plain_formatted(self, batch, names, flag_cache: dict, entries: dict) -> tuple[list[bytes], bool]:
        """_render_plain_items, each response made by one %-format of the values the items
        ask for (picked in their order by an itemgetter): a part list, its join and four
        small formats per message cost three times as much (a 10,000-message listing)."""
        fmt = b"* %d FETCH (" + b" ".join(_PLAIN_ITEMS[n][0] for n in names) + b")\r\n"
        pick = operator.itemgetter(0, *(_PLAIN_ITEMS[n][1] for n in names))
        want_flags, want_date, want_env = "FLAGS" in names, "INTERNALDATE" in names, "ENVELOPE" in names
        want_modseq = "MODSEQ" in names
        internaldate = response.internaldate
        out = []
        gone = False
        for seq, m in batch:
            env = None
            if want_env:
                env = entries.get(m.uid)
                if env is None:  # expunged meanwhile, and never parsed: said without it
                    out += self._render_plain_items([(seq, m)], names, flag_cache, entries)[0]
                    gone = True
                    continue
            value = self._flags_item(m, flag_cache) if want_flags else None
            out.append(fmt % pick((seq, m.uid, value, m.size, internaldate(m.internaldate) if want_date else None,
                                   env, m.modseq if want_modseq else None)))
        return out, gone

    def _flags_item(self, m, flag_cache: dict) -> bytes:
        """b"FLAGS (...)" of a message, rendered once per distinct flag set (and \\Recent)."""
        key = (m.flags, m.uid in self.recent) if isinstance(m.flags, frozenset) else None
        value = flag_cache.get(key) if key is not None else None
        if value is None:
            value = b"FLAGS " + response.flag_list(self.flags_of(m))
            if key is not None:
                flag_cache[key] = value
        return value

    def _render_plain_items(self, batch, names, flag_cache: dict, entries: dict) -> tuple[list[bytes], bool]:
        internaldate = response.internaldate
        out = []
        gone = False
        for seq, m in batch:
            parts = []
            for name in names:
                if name == "UID":
                    parts.append(b"UID %d" % m.uid)
                elif name == "FLAGS":
                    parts.append(self._flags_item(m, flag_cache))
                elif name == "RFC822.SIZE":
                    parts.append(b"RFC822.SIZE %d" % m.size)
                elif name == "ENVELOPE":
                    value = entries.get(m.uid)
                    if value is None:  # expunged meanwhile, and never parsed
                        gone = True
                    else:
                        parts.append(value)
                elif name == "MODSEQ":
                    parts.append(b"MODSEQ (%d)" % m.modseq)
                else:
                    parts.append(b"INTERNALDATE " + internaldate(m.internaldate))
            if parts:  # "* n FETCH ()" is not valid: nothing left to say of a vanished message
                out.append(b"* %d FETCH (%s)\r\n" % (seq, b" ".join(parts)))
        return out, gone

    @staticmethod
    def _render_binary(a, data: bytes, root) -> list:
        """BINARY[part]<partial> or BINARY.SIZE[part] (RFC 3516): decoded; a literal8 when the
        bytes hold NUL."""
        spec = a.section.spec()
        if a.name == "BINARY.SIZE":
            return [b"BINARY.SIZE[%s] %d" % (spec, binary.fetch_size(data, root, a.section.part))]
        value = binary.fetch_value(data, root, a.section.part)
        label = b"BINARY[" + spec + b"]"
        if a.partial is not None:
            off, length = a.partial
            value = value[off:off + length]
            label += b"<%d>" % off
        return [(_Lit8 if b"\0" in value else _Lit)(label, value)]

    def _render_batch(self, batch, atts, entries, datas, streams=frozenset()) -> tuple[list, bool]:
        """The FETCH responses of a batch, and whether a message had vanished meanwhile."""
        out: list = []
        gone = False
        whole = _whole_body_head(atts) if datas is not None else None
        for seq, m in batch:
            data = None
            root = None
            if whole is not None and m.uid not in streams:
                data = datas.get(m.uid)
                if data is not None:  # what the loop below would make, in one format
                    head, with_uid = whole
                    values = (seq, m.uid, len(data)) if with_uid else (seq, len(data))
                    out.append([head % values, data, b")\r\n"])
                    continue
            if m.uid in streams:
                head = streams.get(m.uid) if isinstance(streams, dict) else None
                items = [self._render_streamed(m, a, entries, head) for a in atts]
                out.append(_join_fetch(seq, [x for x in items if x is not None]))
                continue
            if datas is not None:
                data = datas.get(m.uid)
            vanished = datas is not None and data is None
            gone = gone or vanished
            items: list[bytes] = []
            for a in atts:
                name = a.name
                if name == "UID":
                    items.append(b"UID %d" % m.uid)
                elif name == "FLAGS":
                    items.append(b"FLAGS " + response.flag_list(self.flags_of(m)))
                elif name == "INTERNALDATE":
                    items.append(b"INTERNALDATE " + response.internaldate(m.internaldate))
                elif name == "RFC822.SIZE":
                    items.append(b"RFC822.SIZE %d" % m.size)
                elif name == "MODSEQ":
                    items.append(b"MODSEQ (%d)" % m.modseq)
                elif name in ("ENVELOPE", "BODYSTRUCTURE", "BODY"):
                    key = {"ENVELOPE": "env", "BODYSTRUCTURE": "bs", "BODY": "body"}[name]
                    value = fetch.cached(entries.get(m.uid), key)
                    if value is None:  # expunged meanwhile, and never parsed
                        gone = True
                        continue
                    items.append(name.encode() + b" " + value)
                elif name in ("BINARY[]", "BINARY.SIZE"):
                    if vanished:
                        if name == "BINARY[]":
                            items.append(b"BINARY[" + a.section.spec() + b"] NIL")
                        continue
                    if root is None:
                        root = fetch.parse(data)
                    items += self._render_binary(a, data, root)
                elif vanished and name.startswith(("RFC822", "BODY[")):
                    label = name.encode() if name != "BODY[]" else b"BODY[" + a.section.spec() + b"]"
                    if a.partial is not None:
                        label += b"<%d>" % a.partial[0]
                    items.append(label + b" NIL")
                elif name == "RFC822":
                    items.append(_Lit(b"RFC822", data))
                elif name == "RFC822.HEADER":
                    hend, bstart = fetch.split_header(data)
                    items.append(_Lit(b"RFC822.HEADER", data[:bstart]))
                elif name == "RFC822.TEXT":
                    hend, bstart = fetch.split_header(data)
                    items.append(_Lit(b"RFC822.TEXT", data[bstart:]))
                elif name == "BODY[]":
                    sec = a.section
                    if not sec.part and not sec.text:
                        body = data
                    else:
                        if root is None:
                            root = fetch.parse(data)
                        body = fetch.section_bytes(data, root, sec)
                    label = b"BODY[" + sec.spec() + b"]"
                    if a.partial is not None:
                        off, length = a.partial
                        body = body[off:off + length]
                        label += b"<%d>" % off
                    items.append(_Lit(label, body))
            if items:  # "* n FETCH ()" is not valid: nothing left to say of a vanished message
                out.append(_join_fetch(seq, items))
        return out, gone
