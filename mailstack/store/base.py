"""The store interface: what IMAP, POP3 and local delivery may ask of a mailbox store.

Maildir (store/maildir.py) is the first backend; keep this interface free of
Maildir details so another backend (a database plus object storage) could stand
beside it.  All methods that touch disk are coroutines and do their blocking work
in a worker thread; nothing here blocks the event loop.

Naming: an *account* is a normalised address ("alice@example.com"); a *mailbox
name* is the IMAP name in UTF-8 with "/" as the hierarchy separator ("INBOX",
"Archive/2024").  Encoding to/from modified UTF-7 is the IMAP layer's job.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Iterable

SYSTEM_FLAGS = ("\\Seen", "\\Answered", "\\Flagged", "\\Deleted", "\\Draft")
# Created for every new account, with their RFC 6154 SPECIAL-USE attribute.
SPECIAL_MAILBOXES = {"Drafts": "\\Drafts", "Sent": "\\Sent", "Trash": "\\Trash", "Junk": "\\Junk",
                     "Archive": "\\Archive"}


class StoreError(Exception):
    """A request the store refuses; str() is a short reason fit for a NO/-ERR reply."""


class MailboxNotFound(StoreError):
    pass


class MailboxExists(StoreError):
    pass


class StoreFull(StoreError):
    """No space left on the disk (or over the filesystem quota); the request changed nothing."""


class StoreIOError(StoreError):
    """The disk failed the request (other than by being full); the request changed nothing."""


class MessageGone(StoreError):
    """The message was expunged (by another session or program) after this session listed it."""


@dataclass(slots=True)  # one per message of every open mailbox: 100,000 of them must stay small
class MessageInfo:
    """One message as listed: everything needed for SELECT/STAT/LIST without reading the body."""

    uid: int
    flags: set[str]  # system flags (\Seen ...) and keywords, as IMAP spells them; never \Recent
    size: int  # bytes of the message as stored (what RFC822.SIZE reports)
    internaldate: float  # seconds since the epoch (arrival time)
    key: str  # backend's stable identity of the message (e.g. Maildir base name)
    modseq: int = 0  # RFC 7162 mod-sequence (0: the backend keeps none)


class FlagsStored(list):
    """What store_flags returns: the changed MessageInfos, and in `failed` the UIDs that a
    conditional STORE (unchanged_since) left alone because they had changed since."""

    failed: list[int]

    def __init__(self, changed=(), failed=()) -> None:
        super().__init__(changed)
        self.failed = list(failed)


@dataclass
class MailboxInfo:
    name: str
    special_use: str | None = None  # "\\Sent" ...
    subscribed: bool = False
    has_children: bool = False
    selectable: bool = True  # False for \Noselect placeholders


@dataclass
class Changes:
    """What changed since the previous look at a mailbox (see Mailbox.refresh)."""

    new: list[MessageInfo] = field(default_factory=list)  # in UID order
    expunged: list[int] = field(default_factory=list)  # UIDs
    flags: list[MessageInfo] = field(default_factory=list)  # messages whose flags changed


class Mailbox(abc.ABC):
    """An opened mailbox of one account, as one session sees it.

    `messages` is this session's view, in UID order (so index+1 is the message
    sequence number).  It changes only when the session calls refresh() or
    performs an operation itself, which is what lets IMAP keep sequence numbers
    consistent between the moments it may announce EXPUNGE.
    """

    account: str
    name: str
    uidvalidity: int
    uidnext: int
    messages: list[MessageInfo]
    read_only: bool
    # RFC 7162: every change up to this mod-sequence is reflected in `messages` (set when
    # the view is brought up to date); None when the backend keeps no modseqs (NOMODSEQ).
    highestmodseq: int | None = None

    def view_summary(self) -> dict | None:
        """Facts about `messages` the store already knows, shared by the sessions that see
        the same view (maildir_mailbox.py keeps one per view cache), or None: "flag_sets",
        the distinct flag sets of `messages` (frozensets); the IMAP layer memoizes what it
        derives from them in the same dict.  Valid only while `messages` is unchanged."""
        return None

    @abc.abstractmethod
    async def refresh(self) -> Changes:
        """Look at the backend again and update `messages`: new messages (also ones dropped into
        new/ or cur/ by another program, which get UIDs now), expunged ones, changed flags."""

    @abc.abstractmethod
    async def read(self, uid: int) -> bytes:
        """The whole message as stored."""

    @abc.abstractmethod
    async def read_range(self, uid: int, start: int, length: int) -> bytes:
        """Part of the message (for partial FETCH and POP3 TOP) without reading the rest."""

    @abc.abstractmethod
    def path(self, uid: int) -> str | None:
        """A file holding the message, when the backend has one (for sendfile); else None."""

    @abc.abstractmethod
    async def store_flags(self, uids: Iterable[int], flags: Iterable[str], mode: str,
                          origin: object = None) -> list[MessageInfo]:
        """mode: "+" add, "-" remove, "=" replace. Returns the messages whose flags changed.
        Publishes a "flags" event (origin passed through).  Backends with modseqs also take
        `unchanged_since=N` (RFC 7162 UNCHANGEDSINCE): messages whose modseq is above N are
        left alone, and the returned list (a FlagsStored) names them in `.failed`."""

    async def vanished_since(self, modseq: int) -> list[int] | None:
        """UIDs expunged with a mod-sequence above `modseq` (QRESYNC), sorted; None when the
        backend does not remember that far back (the caller then answers RFC 7162 3.2.5.2's
        way: every UID of the asked range that no longer exists)."""
        return None

    @abc.abstractmethod
    async def expunge(self, uids: Iterable[int] | None = None, origin: object = None,
                      flagged_only: bool = True) -> list[int]:
        """Remove messages flagged \\Deleted (limited to `uids` when given: UID EXPUNGE).
        `flagged_only=False` removes `uids` whatever their flags (POP3's UPDATE: the QUIT
        commits DELE even if an IMAP client cleared \\Deleted meanwhile, as Dovecot does).
        Returns the expunged UIDs; publishes an "expunge" event."""

    @abc.abstractmethod
    async def copy(self, uids: Iterable[int], dest: str, origin: object = None) -> list[tuple[int, int]]:
        """Copy to mailbox `dest` of the same account keeping flags and internal date.
        Returns [(source uid, new uid)] for UIDPLUS COPYUID; publishes "new" on dest."""

    async def move(self, uids: Iterable[int], dest: str, origin: object = None) -> list[tuple[int, int]]:
        """IMAP MOVE (RFC 6851): like copy() followed by flagging \\Deleted and expunging the
        moved messages, but done at once by backends that can (Maildir renames the files).
        Returns [(source uid, new uid)]; the moved UIDs leave `messages` (the caller announces
        their EXPUNGE); publishes "expunge" here and "new" on dest.  This default is for
        backends without a native move."""
        pairs = await self.copy(uids, dest, origin)
        moved = [src for src, _ in pairs]
        if moved:
            await self.store_flags(moved, ["\\Deleted"], "+", origin)
            await self.expunge(moved, origin)
        return pairs

    @abc.abstractmethod
    async def cache_get(self, uid: int) -> dict | None:
        """The parsed-metadata cache entry of a message (envelope, body structure ...), or None.
        The store persists it; the IMAP layer decides what is in it (JSON-able values)."""

    async def cache_get_many(self, uids: Iterable[int], raw: bool = False) -> dict[int, "dict | bytes"]:
        """cache_get of several messages in one call (a SORT of 10,000 asks for all); the
        messages without an entry are left out.  With `raw`, a store may give an entry as
        the JSON bytes of its index line (imap/fetch.py's cached_envelope reads those);
        this default always gives dicts."""
        out = {}
        for uid in uids:
            entry = await self.cache_get(uid)
            if entry is not None:
                out[uid] = entry
        return out

    @abc.abstractmethod
    async def cache_put(self, entries: dict[int, dict]) -> None:
        """Persist cache entries for several messages at once (one write)."""

    def derived(self) -> dict:
        """A dict shared by every session of this mailbox in this process, for the protocol
        layer's in-memory caches of values derived from message contents (SORT keys, THREAD
        trees): a message never changes under its UID, so they hold until the UIDVALIDITY
        changes, when the dict is emptied.  This default is one view's own dict."""
        return self.__dict__.setdefault("_derived", {})

    async def fulltext_search(self, queries: list[tuple[str, bool]]) -> list[set[int]] | None:
        """For each (case-folded string, body only?) the UIDs of this view whose text (or
        body only) contains it, as a plain scan would find (imap/search.py), from a
        full-text index; None when there is none (the caller scans)."""
        return None

    @abc.abstractmethod
    async def close(self) -> None:
        """Release what the session held (locks, subscriptions)."""


class Store(abc.ABC):
    # -- \Recent (RFC 3501 2.3.2): a message is recent to the first session that sees it
    # selected read-write; EXAMINE and STATUS report it without taking it.  Kept per mailbox
    # (and UIDVALIDITY) as the highest UID some session took; in memory, for this process.

    def _recent_marks(self) -> dict:
        return self.__dict__.setdefault("_recent_marks_", {})

    def recent_mark(self, account: str, name: str, uidvalidity: int) -> int:
        """UIDs above this one are still recent (no read-write session has seen them)."""
        return self._recent_marks().get((account, name, uidvalidity), 0)

    def claim_recent(self, account: str, name: str, uidvalidity: int, uids: Iterable[int],
                     take: bool = True) -> set[int]:
        """Which of `uids` are recent to this session; with `take` (a read-write session)
        no later session sees them as recent."""
        marks = self._recent_marks()
        key = (account, name, uidvalidity)
        mark = marks.get(key, 0)
        mine = {u for u in uids if u > mark}
        if mine and take:
            marks[key] = max(mine)
        return mine

    @abc.abstractmethod
    async def ensure_account(self, account: str) -> None:
        """Create the account's INBOX and the SPECIAL_MAILBOXES if missing. Idempotent."""

    @abc.abstractmethod
    async def deliver(self, account: str, message: "bytes | MessageSource", delivery_id: str,
                      mailbox: str = "INBOX", flags: Iterable[str] = ()) -> bool:
        """Durably add a message (write to a temporary name, fsync, rename into place, fsync the
        folder) and publish a "new" event.  Idempotent on delivery_id: a second call with the same
        id for the same account and mailbox adds nothing and returns False (crash recovery:
        the queue may deliver again after a restart)."""

    @abc.abstractmethod
    async def append(self, account: str, mailbox: str, message: bytes, flags: Iterable[str] = (),
                     internaldate: float | None = None, origin: object = None) -> tuple[int, int]:
        """IMAP APPEND. Returns (uidvalidity, uid) for UIDPLUS APPENDUID."""

    async def append_many(self, account: str, mailbox: str,
                          messages: list[tuple[bytes, Iterable[str], float | None]],
                          origin: object = None) -> tuple[int, list[int]]:
        """IMAP MULTIAPPEND (RFC 3502): (message, flags, internal date) each, all added or
        none.  Returns (uidvalidity, UIDs in order).  This default appends one by one and
        expunges what it added when one fails; the Maildir store overrides it so that the
        messages appear together (store/multiappend.py)."""
        uidvalidity, done = 0, []
        try:
            for message, flags, date in messages:
                uidvalidity, uid = await self.append(account, mailbox, message, flags, date, origin)
                done.append(uid)
        except BaseException:
            if done:
                box = await self.open(account, mailbox)
                try:
                    await box.store_flags(done, ["\\Deleted"], "+", origin)
                    await box.expunge(done, origin)
                finally:
                    await box.close()
            raise
        return uidvalidity, done

    @abc.abstractmethod
    async def open(self, account: str, name: str, read_only: bool = False) -> Mailbox:
        """Open a mailbox for a session (raises MailboxNotFound)."""

    @abc.abstractmethod
    async def status(self, account: str, name: str) -> dict:
        """{"MESSAGES", "RECENT", "UIDNEXT", "UIDVALIDITY", "UNSEEN", "SIZE" (bytes of all
        messages), "DELETED" (messages flagged \\Deleted)} without opening it for a session
        (and "DELETED-STORAGE" in KiB, RFC 9208, where the backend knows it; "HIGHESTMODSEQ"
        from backends that keep modseqs, RFC 7162)."""

    @abc.abstractmethod
    async def list_mailboxes(self, account: str) -> list[MailboxInfo]:
        """Every mailbox of the account, INBOX first."""

    @abc.abstractmethod
    async def create_mailbox(self, account: str, name: str, special_use: str | None = None) -> None:
        """Create (and any missing parents). Raises MailboxExists, StoreError for a bad name."""

    @abc.abstractmethod
    async def delete_mailbox(self, account: str, name: str) -> None:
        """RFC 3501 DELETE semantics (INBOX cannot be deleted; a mailbox with children becomes
        \\Noselect)."""

    @abc.abstractmethod
    async def rename_mailbox(self, account: str, old: str, new: str) -> None:
        """RFC 3501 RENAME, children included; renaming INBOX moves its messages to `new` and
        leaves INBOX empty."""

    @abc.abstractmethod
    async def subscribe(self, account: str, name: str, subscribed: bool) -> None:
        """Persist (un)subscription."""

    async def subscriptions(self, account: str) -> list[str]:
        """Every subscribed name, including names of mailboxes that no longer exist (RFC 3501
        LSUB must still show them).  Backends should override; this default lists only
        existing mailboxes."""
        return [b.name for b in await self.list_mailboxes(account) if b.subscribed]


@dataclass(frozen=True)
class MessageSource:
    """A message that lives in a file already (e.g. a spool file), so delivery can copy it
    in a worker thread without loading it into memory."""

    path: str
    offset: int  # where the message starts in the file
    size: int  # bytes of the message in the file
    prefix: bytes = b""  # header lines written before it (final delivery's Return-Path, Delivered-To)

    @property
    def length(self) -> int:
        """Bytes of the message as delivered: the prefix and the file's range."""
        return len(self.prefix) + self.size

    def read(self) -> bytes:
        """The message as delivered, in memory (blocking: call it in a worker thread)."""
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.offset)
            return self.prefix + f.read(self.size)
