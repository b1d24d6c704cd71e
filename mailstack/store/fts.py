"""The per-mailbox full-text index for SEARCH BODY / TEXT: SQLite FTS5 (in the stdlib's
sqlite3), one file `mailstack-fts.sqlite` per mailbox.

What is indexed is what a plain scan compares (imap/search.py `message_texts`): the
decoded text parts (quoted-printable and base64 undone, charsets decoded) and the decoded
header fields, case-folded by Python, as segments joined by U+FFFF (a noncharacter no
search string contains); of the body, each distinct word once (`words`).  The "trigram"
tokenizer (case_sensitive 1: the text is folded already) with detail=none keeps, per
document, only which three-character sequences occur: a document holding a string holds
the trigrams inside each of the string's words (`_grams`), so the AND of them gives every
match and a few more.  Those few candidates are then read and checked with the
scan's own test, so the answer is exactly the scan's answer.  (detail=full would answer
phrases directly, but makes the index three times slower to fill and bigger.)  Strings
with no word of three characters (and one holding U+FFFF) are not asked here: the caller
scans.

Documents are keyed by the message file's base name: its content never changes under that
name, so a row is right wherever the message is listed, whatever its UID.  Rows of
expunged messages stay (the table is contentless, and SQLite 3.40 cannot delete from
those) and are ignored: only bases in the caller's view count.  When they outnumber the
live ones the file is dropped and rebuilt.  A damaged, unreadable or replaced file is
noticed and dropped too: the index is derived data.

Writes: add() takes a batch (a delivery's group, or BATCH messages read from files) and
sends each table's rows as one JSON array in one INSERT ... SELECT FROM json_each, so a
batch is a few statements, not three a message.  Messages the index lacks are read by the
search that needs them; their batches are written by one writer thread (`_writer`) while
the next batch is read and parsed, so the trigram insertion (SQLite, without the GIL)
overlaps the Python parsing.  When a background indexer runs (`fill_later`), a search that
finds many messages without rows answers for them by a plain scan instead (`scan`, cheaper
than making the rows) and the indexer adds their rows afterwards, in batches that wait
while the process is busy (a background write that did not wait was tried in session 3
and slowed every following command on a loaded 2-core machine).

The module-level functions are blocking (worker threads); one connection per mailbox file,
used under its own lock.  MailboxFulltext is the event-loop side.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Callable

log = logging.getLogger("mailstack.store")

NAME = "mailstack-fts.sqlite"
SEP = "\uffff"
MIN_NEEDLE = 3  # characters: the trigram tokenizer's unit
_MAX_OPEN = 64  # connections kept open (per mailbox file)
SLACK = 1000  # expunged rows tolerated beyond the live ones before a rebuild
BATCH = 500  # messages per transaction when adding from files
LAG = 4  # batches read ahead of the writer (their texts wait in memory: ~2 M characters each)
QUEUE_MAX = 2000  # delivered messages per transaction (their texts wait in memory)
# Messages without rows from which a search, when a background indexer can add the rows
# afterwards, scans them instead of adding them on the way: a scan costs ~50 µs of Python a
# message, reading into the index ~75 µs and SQLite's insertion beside it (docs/benchmarks.md,
# issue 16 session 6).  Fewer are added on the way: cheap, and the next search is quick.
SCAN_MIN = 500
# Two tables: detail=none allows no column filter, and BODY must not match the header.
# docs' column is "name", not "base" as before rows held only words (words()): a program
# from before asks for "base", fails, and drops and rebuilds the file instead of missing
# the trigrams across words it would ask for.  Its files are taken over by renaming the
# column: their whole-text rows hold every trigram asked for now.
_SCHEMA = ("CREATE TABLE IF NOT EXISTS docs(id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL);"
           "CREATE VIRTUAL TABLE IF NOT EXISTS body USING fts5(t, content='', detail=none, "
           "tokenize='trigram case_sensitive 1');"
           "CREATE VIRTUAL TABLE IF NOT EXISTS head USING fts5(t, content='', detail=none, "
           "tokenize='trigram case_sensitive 1');")

_writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fts-write")  # index_files' writes
_open: dict[str, "_Conn"] = {}
_open_lock = threading.Lock()


class _Conn:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # derived data: a lost tail is re-added
        self.db.executescript(_SCHEMA)
        if any(col[1] == "base" for col in self.db.execute("PRAGMA table_info(docs)")):
            self.db.execute("ALTER TABLE docs RENAME COLUMN base TO name")  # a file from before
        self.ident = identity(path)

    def close(self) -> None:
        try:
            self.db.close()
        except sqlite3.Error:
            pass


def identity(path: Path) -> tuple[int, int] | None:
    """Which file is at `path` now (None: none): one removed or replaced behind our back
    (a person, a restore) is noticed, and its rows are not believed."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino)


def _conn(path: Path) -> _Conn:
    key = os.fspath(path)
    with _open_lock:
        c = _open.pop(key, None)
        if c is not None and c.ident != identity(path):
            with c.lock:
                c.close()
            c = None
        if c is None:
            if len(_open) >= _MAX_OPEN:
                old_key = next(iter(_open))
                old = _open[old_key]
                if old.lock.acquire(blocking=False):  # not in use: close it
                    del _open[old_key]
                    old.close()
                    old.lock.release()
            c = _Conn(path)
        _open[key] = c  # most recently used last
        return c


def drop(path: Path) -> None:
    """Forget the file (rebuilt when next needed)."""
    with _open_lock:
        c = _open.pop(os.fspath(path), None)
    if c is not None:
        with c.lock:
            c.close()
    for suffix in ("", "-wal", "-shm"):
        try:
            os.unlink(os.fspath(path) + suffix)
        except FileNotFoundError:
            pass


def indexed(path: Path) -> tuple[set[str], tuple[int, int] | None]:
    """The bases in the index, and the identity of its file."""
    c = _conn(path)
    with c.lock:
        return {row[0] for row in c.db.execute("SELECT name FROM docs")}, c.ident


def add(path: Path, docs: list[tuple[str, str, str]], worded: bool = False) -> None:
    """docs: (base, head text, body text) as message_texts gives them (worded: the body is
    words() of it already; the row holds its words either way).  One statement per table
    for the whole batch (the rows passed as a JSON array): sqlite3 lets go of the GIL for
    each statement it steps, and a thread that must take it back for every row waits
    behind a busy event loop each time (up to the 5 ms switch interval)."""
    if not docs:
        return
    c = _conn(path)
    with c.lock:
        db = c.db
        db.execute("BEGIN IMMEDIATE")
        try:
            have = {row[0] for row in db.execute(
                "SELECT name FROM docs WHERE name IN (SELECT value FROM json_each(?))",
                (json.dumps([base for base, _, _ in docs]),))}
            fresh: dict[str, tuple[str, str]] = {}
            for base, head, body in docs:
                if base not in have and base not in fresh:
                    fresh[base] = (head, body)
            if fresh:
                first = db.execute("SELECT coalesce(max(id), 0) + 1 FROM docs").fetchone()[0]
                db.execute("INSERT INTO docs(id, name) SELECT ? + key, value FROM json_each(?)",
                           (first, json.dumps(list(fresh))))
                db.execute("INSERT INTO body(rowid, t) SELECT ? + key, value FROM json_each(?)",
                           (first, json.dumps([body if worded else words(body) for _, body in fresh.values()])))
                db.execute("INSERT INTO head(rowid, t) SELECT ? + key, value FROM json_each(?)",
                           (first, json.dumps([head for head, _ in fresh.values()])))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise


def words(text: str) -> str:
    """What a row holds of a (folded) text: each of its words once.  A row answers only
    "which trigrams occur", and a string that holds no white space lies inside one word,
    so the trigrams inside words are all a query needs (see `_grams`); a word repeated,
    and the trigrams across a word boundary, only cost the tokenizer time (each character
    of a row is a trigram to insert: the text of 10,000 bench messages is 28 M characters,
    its words 2.5 M).  Rows written whole (before this) hold every trigram of these, so
    they stay right."""
    return " ".join(set(text.split()))


def _grams(needle: str) -> set[str]:
    """The trigrams a document holding `needle` has inside its words: those of each run of
    the needle without white space (the runs at either end may be parts of longer words,
    the middle ones are words)."""
    return {w[i:i + MIN_NEEDLE] for w in needle.split() for i in range(len(w) - MIN_NEEDLE + 1)}


def usable(needle: str) -> bool:
    """Can the index answer a search for this (case-folded) string?  Not when no word of it
    has three characters ("to be"): no trigram to ask for."""
    return (SEP not in needle and "\x00" not in needle  # SQL text ends at NUL
            and any(len(w) >= MIN_NEEDLE for w in needle.split()))


def candidates(path: Path, needle: str, body_only: bool) -> set[str]:
    """Bases of the documents holding every trigram of `needle` (case-folded) in their body
    (BODY) or anywhere (TEXT): each match, and perhaps a few more."""
    grams = sorted(_grams(needle))
    if not grams:  # not usable(): nothing to filter by, every document is a candidate
        return indexed(path)[0]
    query = " AND ".join('"' + g.replace('"', '""') + '"' for g in grams)
    sql = "SELECT rowid FROM body WHERE body MATCH ?"
    if not body_only:
        sql += " UNION SELECT rowid FROM head WHERE head MATCH ?"
    c = _conn(path)
    with c.lock:
        return {row[0] for row in c.db.execute(
            f"SELECT name FROM docs WHERE id IN ({sql})", (query,) if body_only else (query, query))}


def texts_of(data: bytes) -> tuple[str, str]:
    """At delivery: what the index stores of a message, from the bytes in hand."""
    from ..imap.search import message_texts  # the store stays importable without IMAP
    return message_texts(data)


def index_files(path: Path, files: list[tuple[str, Path]],
                relocate: Callable[[], dict[str, Path]] | None = None,
                seen: Callable[[str, str, str], None] | None = None, whole: bool = False) -> set[str]:
    """Add messages to the index from their files, in batches of BATCH (the messages that
    were not delivered here, or were before the index existed).  A file renamed meanwhile
    (new/ to cur/, a flag change) is looked up once more with `relocate` (base -> file
    now).  `seen(base, head, body)` is told each message's texts on the way (a search
    answers from them): the body is its words() unless `whole` (a string with white
    space needs the text itself; one without is in the text iff it is in one word).  The
    batches are written by one writer thread while the next ones are read and parsed here
    (up to LAG batches behind): SQLite's trigram insertion runs without the GIL, so this
    costs about the longer of the two when a second core is free.
    Returns the bases added."""
    added: set[str] = set()
    batch: list[tuple[str, str, str]] = []
    writing: deque[tuple[Future, list[str]]] = deque()

    def write(docs: list[tuple[str, str, str]]) -> None:
        while len(writing) >= LAG:  # bounded memory; a write's error is raised here
            writing.popleft()[0].result()
        writing.append((_writer.submit(add, path, docs, True), [b for b, _, _ in docs]))
        added.update(b for b, _, _ in docs)
    try:
        for base, head, body, row in _texts(files, relocate, whole):
            if seen is not None:
                seen(base, head, body)
            batch.append((base, head, row))
            if len(batch) >= BATCH:
                write(batch)
                batch = []
        if batch:
            write(batch)
    except BaseException:
        wait([f for f, _ in writing])  # nothing left writing behind the caller's back
        raise
    while writing:
        writing.popleft()[0].result()
    return added


def _piece_words(pieces: list) -> str:
    """words() of the body text (segments joined by SEP, not folded), from its pieces: a
    text, or a UTF-8 / ASCII part's bytes split at ASCII white space before decoding (each
    word decoded alone is that run of the decoded text, and words across other white space
    are only longer: the trigrams inside the text's words are all in them, and a string
    without white space is in them iff it is in the text)."""
    out: set = set()
    by_codec: dict[str, set[bytes]] = {}
    for piece in pieces:
        if type(piece) is str:
            out.update(piece.split())
        else:
            raw, codec = piece
            got = by_codec.get(codec)
            if got is None:
                got = by_codec[codec] = set()
            got.update(raw.split())
    texts = [b" ".join(got).decode(codec, "replace") for codec, got in by_codec.items()]
    if not out:
        return " ".join(texts)
    return " ".join([*out, *texts])


def _read(file: Path) -> bytes:
    """The file's bytes, by os.read: open() builds a buffered file object per message
    (0.13 against 0.08 s of CPU for the 10,000 bench messages).  The first read asks for
    the size fstat gives, plus one byte: asking for 1 MiB made CPython allocate (mmap)
    and shrink a 1 MiB buffer for every message (~5 µs of a 12 KB one).  A file that
    grew meanwhile is read on to its end."""
    fd = os.open(file, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        data = os.read(fd, size + 1)
        if len(data) == size:  # asked one byte more and did not get it: the end
            return data
        chunks = [data]  # longer than fstat said, or a short read: read on to the end
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class _Gone(Exception):
    """A file to read is gone, even after a relocate (_contents, strict)."""


def _contents(files: list[tuple[str, Path]], relocate: Callable[[], dict[str, Path]] | None,
              strict: bool = False):
    """(base, bytes) of each file.  One renamed meanwhile (a flag change moves it between
    new/ and cur/) is looked up once more with `relocate`, after the others; one gone for
    good is skipped, or raises _Gone when `strict`."""
    moved: list[str] = []
    for base, file in files:
        try:
            data = _read(file)
        except FileNotFoundError:
            moved.append(base)
            continue
        yield base, data
    if not moved:
        return
    now = relocate() if relocate is not None else {}
    for base in moved:
        try:
            if base not in now:
                raise FileNotFoundError(base)
            data = _read(now[base])
        except FileNotFoundError:
            if strict:
                raise _Gone(base) from None
            continue
        yield base, data


def _texts(files: list[tuple[str, Path]], relocate: Callable[[], dict[str, Path]] | None, whole: bool):
    """(base, head text, body text, body row) of each file that can be read (after one
    relocate).  The body text is the row (its words) unless `whole`: folding only the
    distinct words is folding the text and then taking them (casefold maps each
    character alone, keeps white space and makes none: tested over every code point)."""
    from ..imap.search import head_and_body, head_and_pieces
    for base, data in _contents(files, relocate):
        if whole:
            head, body = head_and_body(data)
            body = body.casefold()
            yield base, head, body, words(body)
        else:
            head, pieces = head_and_pieces(data)
            row = _piece_words(pieces).casefold()
            yield base, head, row, row


def _holds(head: str, body: str, needle: str, body_only: bool) -> bool:
    return needle in body or (not body_only and needle in head)


def scan(files: list[tuple[str, Path]], queries: list[tuple[str, bool]],
         relocate: Callable[[], dict[str, Path]] | None = None) -> list[set[str]] | None:
    """Blocking: for each (folded string, body only?) the bases of `files` whose texts hold
    it, by reading every message and testing its texts as a row's candidates are tested
    (search.scan_texts: parts decoded, case-folded, substring), adding nothing to the index:
    Dovecot's plain scan, about two thirds of the CPU of reading the same messages into the
    index (no distinct words, no SQLite).  A file renamed meanwhile is looked up once more
    with `relocate`; None when one is gone (the caller scans its own way)."""
    from ..imap.search import scan_texts
    out: list[set[str]] = [set() for _ in queries]
    with_head = not all(body_only for _, body_only in queries)  # BODY never looks at the head
    try:
        for base, data in _contents(files, relocate, strict=True):
            head, body = scan_texts(data, with_head)
            for i, (needle, body_only) in enumerate(queries):
                if _holds(head, body, needle, body_only):
                    out[i].add(base)
    except _Gone:
        return None
    return out


def answer(path: Path, files: dict[str, Path], queries: list[tuple[str, bool]],
           missing: list[tuple[str, Path]] = (),
           relocate: Callable[[], dict[str, Path]] | None = None,
           scan_missing: bool = False) -> tuple[list[set[str]], set[str]] | None:
    """For each (folded string, body only?) the bases of `files` whose texts hold it, and
    the bases added to the index.  The `missing` messages are read, answered from their
    texts and added (one pass: a first search costs a scan, the insertions overlapping
    it), or with `scan_missing` only read and answered (`scan`: rows left for later); the
    others come from the index's candidates, checked against the message itself.
    None when a file is gone (renamed meanwhile, not found again): the caller scans."""
    from ..imap.search import message_texts
    out: list[set[str]] = [set() for _ in queries]

    def seen(base: str, head: str, body: str) -> None:
        for i, (needle, body_only) in enumerate(queries):
            if _holds(head, body, needle, body_only):
                out[i].add(base)
    added: set[str] = set()
    skip: set[str] = set()  # answered already: not asked of the index
    if missing and scan_missing:
        found = scan(list(missing), queries, relocate)
        if found is None:
            return None
        for i, bases in enumerate(found):
            out[i] |= bases
        skip = {b for b, _ in missing}
    elif missing:
        whole = any(n != "".join(n.split()) for n, _ in queries)
        added = skip = index_files(path, list(missing), relocate, seen, whole)
        if len(added) < len(missing):
            return None
    texts: dict[str, tuple[str, str]] = {}
    for i, (needle, body_only) in enumerate(queries):
        for base in (candidates(path, needle, body_only) & files.keys()) - skip:
            if base not in texts:
                try:
                    with open(files[base], "rb") as f:
                        texts[base] = message_texts(f.read())
                except FileNotFoundError:
                    return None
            if _holds(*texts[base], needle, body_only):
                out[i].add(base)
    return out, added


class MailboxFulltext:
    """This process's view of one mailbox's index file: the bases it holds (so a search
    knows what to add first).  Used on the event loop."""

    def __init__(self, path: Path, label: str) -> None:
        self.path = path
        self.label = label  # account/mailbox, for the log
        self.lock = asyncio.Lock()
        self.bases: set[str] | None = None  # None: not read (or released)
        self.ident: tuple[int, int] | None = None  # the file `bases` was read from
        self.pending: list[tuple[str, str, str]] = []  # delivered, not written yet
        self.flusher: asyncio.Task | None = None
        # Set by the store when a background indexer runs (store/background.py): asks it to
        # add the rows a search found missing.  With it, a search that finds SCAN_MIN or
        # more messages without rows scans them and answers, and their rows are made after
        # the answer, off the client's path; without it they are added on the way.
        self.fill_later: Callable[[], None] | None = None

    def queue(self, base: str, head: str, body: str) -> None:
        """A delivered message's texts: written with the others that arrive meanwhile, in
        one transaction (one commit per message would cost more than the delivery).  A
        crash loses only the queue: those messages are added at the next search."""
        if len(self.pending) >= 10 * QUEUE_MAX:  # the file is stuck (locked by another
            return                                # process?): left for the next search
        self.pending.append((base, head, body))
        if self.flusher is None or self.flusher.done():
            self.flusher = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        while self.pending:
            async with self.lock:
                batch, self.pending = self.pending[:QUEUE_MAX], self.pending[QUEUE_MAX:]
                try:
                    await asyncio.to_thread(add, self.path, batch)
                except sqlite3.Error as e:
                    log.warning("full-text index of %s not updated (%s): filled at the next search",
                                self.label, e)
                    continue
                if self.bases is not None:
                    self.bases.update(b for b, _, _ in batch)

    def release(self) -> None:
        """No session on the mailbox: forget the base set (reread when needed)."""
        self.bases = None

    async def search(self, view: dict[str, Path], queries: list[tuple[str, bool]],
                     relocate: Callable[[], dict[str, Path]] | None = None) -> list[set[str]] | None:
        """For each (folded string, body only?) the bases of `view` (base -> file) that match,
        or None: the caller scans (damaged index, or a file renamed meanwhile).  Messages
        the index lacks (put there behind our back, or from before it existed) are added
        on the way, in the same pass that answers for them."""
        path = self.path
        async with self.lock:
            try:
                if self.bases is None or self.ident != await asyncio.to_thread(identity, path):
                    self.bases, self.ident = await asyncio.to_thread(indexed, path)
                known = self.bases
                missing = [(b, f) for b, f in view.items() if b not in known]
                later = self.fill_later if len(missing) >= SCAN_MIN else None
                result = await asyncio.to_thread(answer, path, view, queries, missing, relocate,
                                                 later is not None)
                if later is not None:
                    later()
                if result is None:
                    return None
                found, added = result
                known.update(added)
                if len(known) > 2 * len(view) + SLACK:  # mostly expunged rows: rebuild
                    await asyncio.to_thread(drop, path)
                    self.bases = None
                return found
            except sqlite3.Error as e:  # damaged or no room: drop it, answer by scanning
                log.warning("full-text index of %s unusable (%s): rebuilt", self.label, e)
                self.bases = None
                await asyncio.to_thread(drop, path)
                return None
