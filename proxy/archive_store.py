"""The message archive (XEP-0313) in a SQLite file of its own, and the thread that writes and
queries it off the event loop.

- ``MESSAGES_SCHEMA``: the ``archive`` table, in the archive's own file (``archive_path``:
  beside the store), so its writes never make the journal's commits wait; ``PREFS_SCHEMA``:
  the ``archive_prefs`` table, a migration of ``proxy/store.py``. Every row belongs to one
  account; every index starts with it, so an account's query never reads another's rows,
  and ordering is by ``(ts, seq)``: the time the proxy archived the message, then the order
  it was archived in. Two indexes besides the table (by time, by contact), each entry the
  account, a key and the row number: each archived message costs three B-tree inserts (a
  third index holds only the ids of rows archived before version 2).
- :class:`ArchiveIds`: the proxy's message ids, derived from the row number so that finding
  a message by its id needs no index of its own.
- :class:`ArchiveArea`: the SQL, synchronous, on whatever connection it is given (the
  writer thread's; tests and the benchmark call it directly).
- :class:`ArchiveWriter`: the one thread that touches the archive at run time. Messages
  handed to it on the loop are collected per loop turn and written as one transaction;
  queries go through the same queue, so a query sees every message archived before it was
  asked, and its result comes back on the loop through a callback. Retention (age, and a
  number of messages per account) is enforced on the same thread.

The value types (what a feature asks, what it gets back) are plain frozen dataclasses with no
I/O, so the pure feature (``proxy/features/archive.py``) and the commands can name them.
"""

from __future__ import annotations

import asyncio
import binascii
import functools
import itertools
import json
import os
import queue
import random
import secrets
import sqlite3
import struct
import threading
import time
from base64 import urlsafe_b64decode
from binascii import b2a_base64
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from hashlib import blake2b
from pathlib import Path
from typing import Any, Literal, NamedTuple, cast

# The messages: in a SQLite file of their own (``archive_path``), so that the archive's
# writes never hold the lock the journal's commits (and so the clients' acks) wait for.
# Version 3 (``PRAGMA user_version``): the account and the other party are small integers
# (``archive_jids``), so every index key is a few bytes, not two JIDs' text. Version 2 had
# them as text; version 1 also had no version, a random id per row in a unique index,
# AUTOINCREMENT and an index by age (five B-trees per row, the random one the dearest).
# ``_migrate`` rebuilds an older file, its seqs and ids kept.
ARCHIVE_VERSION = 3
MESSAGES_SCHEMA = """
    CREATE TABLE IF NOT EXISTS archive_jids (     -- the accounts and the other parties
        id         INTEGER PRIMARY KEY,
        jid        TEXT NOT NULL UNIQUE           -- a bare JID
    );
    CREATE TABLE IF NOT EXISTS archive (          -- XEP-0313: the account's messages
        seq        INTEGER PRIMARY KEY,           -- archiving order (ties of ts); the row number
        account    INTEGER NOT NULL,              -- archive_jids.id of the bare JID: whose
        archive_id TEXT NOT NULL,                 -- the stable id (XEP-0359 stanza-id)
        nonce      INTEGER,                       -- set: the id is the proxy's (ArchiveIds),
                                                  -- found through seq; null: found by index
        ts         REAL NOT NULL,                 -- wall-clock seconds when archived
        direction  TEXT NOT NULL,                 -- 'in' (received) or 'out' (sent)
        with_bare  INTEGER NOT NULL,              -- archive_jids.id of the other party, bare
        with_full  TEXT,                          -- the other party as addressed; null: bare
        stanza     BLOB NOT NULL                  -- the message as XML
    );
    -- Each index ends with the row number (seq) implicitly: (account, ts, seq), ...
    CREATE INDEX IF NOT EXISTS archive_by_time ON archive (account, ts);
    CREATE INDEX IF NOT EXISTS archive_by_with ON archive (account, with_bare, ts);
    -- Only the ids that are not the proxy's own are in it (version 1 rows).
    CREATE UNIQUE INDEX IF NOT EXISTS archive_by_stored_id ON archive (account, archive_id)
        WHERE nonce IS NULL;
    CREATE TABLE IF NOT EXISTS archive_meta (     -- the ids' key, the seqs reserved
        name       TEXT PRIMARY KEY,
        value      NOT NULL
    );
"""


def _rebuild_script(nonce: str) -> str:
    """An older version's ``archive`` table (account and parties as text) rebuilt as this
    version's: every row with its seq, id, time and bytes; ``nonce``: the column's value
    (``NULL`` for version 1, whose ids are all stored as given)."""
    return """
    ALTER TABLE archive RENAME TO archive_old;
    DROP INDEX IF EXISTS archive_by_id;
    DROP INDEX IF EXISTS archive_by_time;
    DROP INDEX IF EXISTS archive_by_with;
    DROP INDEX IF EXISTS archive_by_age;
    DROP INDEX IF EXISTS archive_by_stored_id;
    """ + MESSAGES_SCHEMA + f"""
    INSERT OR IGNORE INTO archive_jids (jid)
        SELECT account FROM archive_old UNION SELECT with_bare FROM archive_old;
    INSERT INTO archive (seq, account, archive_id, nonce, ts, direction, with_bare, with_full,
                         stanza)
        SELECT o.seq, a.id, o.archive_id, {nonce}, o.ts, o.direction, w.id,
               nullif(o.with_full, o.with_bare), o.stanza
        FROM archive_old AS o JOIN archive_jids AS a ON a.jid = o.account
             JOIN archive_jids AS w ON w.jid = o.with_bare
        ORDER BY o.seq;
    DROP TABLE archive_old;
    """


# The preferences: small, read at login, in the store (a migration of proxy/store.py).
PREFS_SCHEMA = """
    CREATE TABLE archive_prefs (                  -- XEP-0441 preferences, per account
        account    TEXT PRIMARY KEY,
        default_   TEXT NOT NULL,                 -- 'always', 'never' or 'roster'
        always     TEXT NOT NULL,                 -- JSON array of bare JIDs
        never      TEXT NOT NULL
    );
"""

Direction = Literal["in", "out"]
PrefsDefault = Literal["always", "never", "roster"]


# ---------------------------------------------------------------------- values


class ArchivedMessage(NamedTuple):
    """One message to archive for the session's account (the shell adds the account).
    ``seq`` and ``nonce``: what ``ArchiveIds.new`` derived ``archive_id`` from; without them
    the id is stored as given and the store picks the seq. (A named tuple, immutable like
    the other values, and made for every message: a third of a frozen dataclass's cost.)"""

    archive_id: str
    timestamp: float
    direction: Direction
    with_bare: str
    with_full: str
    stanza: bytes
    seq: int | None = None
    nonce: int | None = None


@dataclass(frozen=True, slots=True)
class ArchiveFilter:
    """The query form's fields (XEP-0313 §4.1), parsed. ``with_jid`` matches the bare
    column when ``with_bare`` (any resource), else the full one exactly."""

    with_jid: str | None = None
    with_bare: bool = True
    start: float | None = None
    end: float | None = None
    after_id: str | None = None
    before_id: str | None = None
    ids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class PageRequest:
    """XEP-0059: at most ``max`` items; after an id (forward), before one (backward;
    ``""``: the last page), or from an ``index``."""

    max: int
    after: str | None = None
    before: str | None = None
    index: int | None = None

    @property
    def backward(self) -> bool:
        return self.before is not None


@dataclass(frozen=True, slots=True)
class ArchiveSearch:
    filter: ArchiveFilter = field(default_factory=ArchiveFilter)
    page: PageRequest = field(default_factory=lambda: PageRequest(max=50))
    counts: bool = True  # RSM <count/> and the first item's index


@dataclass(frozen=True, slots=True)
class ArchiveBounds:
    """XEP-0313 §5 archive metadata: the first and the last message."""


ArchiveRequest = ArchiveSearch | ArchiveBounds


@dataclass(frozen=True, slots=True)
class ArchiveItem:
    archive_id: str
    timestamp: float
    stanza: bytes


@dataclass(frozen=True, slots=True)
class ArchivePage:
    items: tuple[ArchiveItem, ...]
    complete: bool
    count: int | None = None
    first_index: int | None = None


@dataclass(frozen=True, slots=True)
class ArchiveMissing:
    """An id the query named (RSM after/before, before-id, after-id, ids) is not in the
    account's archive: item-not-found."""

    archive_id: str


@dataclass(frozen=True, slots=True)
class ArchiveEnds:
    first: ArchiveItem | None
    last: ArchiveItem | None


@dataclass(frozen=True, slots=True)
class ArchiveFailed:
    """The query could not run (the database failed): internal-server-error."""

    reason: str


ArchiveResult = ArchivePage | ArchiveMissing | ArchiveEnds | ArchiveFailed


@dataclass(frozen=True, slots=True)
class Prefs:
    """XEP-0441: archive by ``default`` except for the JIDs listed (bare JIDs)."""

    default: PrefsDefault = "always"
    always: frozenset[str] = frozenset()
    never: frozenset[str] = frozenset()


# ---------------------------------------------------------------------- ids


_URLSAFE = bytes.maketrans(b"+/", b"-_")  # base64url (RFC 4648 §5), without padding
_MASKS = struct.Struct(">8Q")  # a 64-byte digest: eight masks
# Eight ids' bytes (nonce, masked seq), each followed by two zero bytes: 18 bytes are 24
# base64 characters of their own, and the first 22 are the 16 bytes' base64 unpadded.
_IDS = struct.Struct(">" + "QQ2x" * 8)
# (archive_id, seq, nonce): what the feature stamps, and what the store derives it from.
ArchiveKey = tuple[str, int | None, int | None]


class ArchiveIds:
    """The proxy's archive ids, derived from the row number (``seq``), so that a message is
    found by its id through the table itself, with no index of ids: a random nonce, then the
    seq masked with a keyed hash of the nonce (blake2b; the key is in the archive's file).
    Without the key an id tells nothing of the seq, so nothing of the archive's size or
    rate (XEP-0359 §5); each row has one id. Seqs come from a range reserved in the file
    before any is handed out (``reserved``), so after a crash none is given out again.

    One keyed hash serves eight ids (``MASKS``): a nonce is a random ``base`` and an index
    ``j`` (its low three bits), and its mask is the j-th eight bytes of a 64-byte blake2b of
    the base. The hash was most of an id's cost, and an id is made for every archived
    message on the event loop. Ids made before (one 8-byte blake2b of the whole nonce per
    id, ``_mask_v2``) are still found: ``candidates`` gives the seq under both, and the row
    must hold the very id either way."""

    BLOCK = 1 << 20  # seqs reserved at a time
    LENGTH = 22      # characters: 16 bytes, base64url (version 1 ids had 16)
    MASKS = 8        # ids per hash (64-byte digest, 8 bytes each)

    def __init__(self, key: bytes, start: int, limit: int,
                 rng: random.Random | None = None) -> None:
        # Seqs are taken in blocks of MASKS, one block per hash (``_refill``).
        self._blocks = itertools.count(start, self.MASKS)
        self.last = start - 1  # the last seq taken, near enough (for reserving more in time)
        self.limit = limit     # seqs below it are reserved in the file
        self._rng = rng or random.Random(os.urandom(32))
        # Copied per hash: cheaper than keying.
        self._hash = blake2b(key=key, digest_size=8 * self.MASKS)
        self._hash_v2 = blake2b(key=key, digest_size=8)
        # The next ids, made together, last first (list.pop from the end).
        self._ready: list[ArchiveKey] = []

    def _refill(self) -> bool:
        """The next block of seqs and their ids, all made at once: one hash, one pack, one
        base64 for eight ids (made one by one, the encoding cost more than the hash).
        False if the block is past the seqs reserved in the file."""
        first = next(self._blocks)
        self.last = first + self.MASKS - 1
        if self.last >= self.limit:
            return False
        base = self._rng.getrandbits(60)  # nonce: 60 random bits, 3 of index (63 in all)
        masks = _MASKS.unpack(self._masks(base))
        nonce = base << 3
        fields: list[int] = []
        for j in range(self.MASKS):
            fields += (nonce | j, (first + j) ^ masks[j])
        text = b2a_base64(_IDS.pack(*fields), newline=False).translate(_URLSAFE).decode()
        self._ready = [(text[24 * j:24 * j + 22], first + j, nonce | j)
                       for j in range(self.MASKS - 1, -1, -1)]
        return True

    def _masks(self, base: int) -> bytes:
        h = self._hash.copy()
        h.update(base.to_bytes(8, "big"))
        return h.digest()

    def new(self) -> ArchiveKey:
        """On the loop: an id for a message about to be archived."""
        ready = self._ready
        if ready:
            return ready.pop()
        if self._refill():
            return self._ready.pop()
        # The writer has not reserved more seqs yet: an id of the old kind.
        return secrets.token_urlsafe(12), None, None

    def take(self) -> int:
        """A seq for a row whose id is stored as given (the writer reserves past it; the
        rest of its block is never used)."""
        seq = self.last = next(self._blocks)
        return seq

    def encode(self, seq: int, nonce: int) -> str:
        """The id of ``seq`` with this nonce (what ``new`` hands out)."""
        raw = nonce.to_bytes(8, "big") + (seq ^ self._mask(nonce)).to_bytes(8, "big")
        return b2a_base64(raw, newline=False)[:22].translate(_URLSAFE).decode()

    def _mask(self, nonce: int) -> int:
        j = nonce & (self.MASKS - 1)
        return int.from_bytes(self._masks(nonce >> 3)[8 * j:8 * j + 8], "big")

    def _mask_v2(self, nonce_bytes: bytes) -> int:
        h = self._hash_v2.copy()
        h.update(nonce_bytes)
        return int.from_bytes(h.digest(), "big")

    def candidates(self, archive_id: str) -> list[int]:
        """The seqs an id ``new`` made could name (this derivation's, then the one before;
        none for what cannot be such an id). The row found must still have this very id:
        a forged one finds nothing."""
        if len(archive_id) != self.LENGTH:
            return []
        try:
            raw = urlsafe_b64decode(archive_id + "==")
        except (binascii.Error, ValueError):
            return []
        if len(raw) != 16:
            return []
        nonce, masked = int.from_bytes(raw[:8], "big"), int.from_bytes(raw[8:], "big")
        seqs = [masked ^ self._mask(nonce), masked ^ self._mask_v2(raw[:8])]
        return [seq for seq in seqs if seq < 1 << 63]


def load_ids(conn: sqlite3.Connection) -> ArchiveIds:
    """The archive file's ids: its key (made at first use) and a new range of seqs reserved
    above every seq ever reserved or used (in the caller's transaction if one is open)."""
    own = not conn.in_transaction
    if own:
        conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("INSERT OR IGNORE INTO archive_meta (name, value) VALUES ('id_key', ?)",
                     (os.urandom(32),))
        key = bytes(conn.execute(
            "SELECT value FROM archive_meta WHERE name = 'id_key'").fetchone()[0])
        row = conn.execute("SELECT value FROM archive_meta WHERE name = 'reserved'").fetchone()
        top = conn.execute("SELECT max(seq) FROM archive").fetchone()[0]
        start = max(int(row[0]) if row else 1, int(top or 0) + 1)
        limit = start + ArchiveIds.BLOCK
        _set_reserved(conn, limit)
        if own:
            conn.execute("COMMIT")
    except BaseException:
        if own:
            conn.execute("ROLLBACK")
        raise
    return ArchiveIds(key, start, limit)


def _set_reserved(conn: sqlite3.Connection, limit: int) -> None:
    conn.execute("INSERT INTO archive_meta (name, value) VALUES ('reserved', ?) ON CONFLICT"
                 " (name) DO UPDATE SET value = excluded.value", (limit,))


# ---------------------------------------------------------------------- the SQL


# A batch is the account and the message's fields (``ArchivedMessage``'s order), row after
# row, as the loop collected them: the statement puts each in its column (with_full only
# when it is not the bare JID).
_BATCH_FIELDS = ("account", *ArchivedMessage._fields)
_WIDTH = len(_BATCH_FIELDS)
_ACCOUNT = _BATCH_FIELDS.index("account")
_SEQ = _BATCH_FIELDS.index("seq")
_NONCE = _BATCH_FIELDS.index("nonce")
_WITH_BARE = _BATCH_FIELDS.index("with_bare")
_WITH_FULL = _BATCH_FIELDS.index("with_full")
_STANZA = _BATCH_FIELDS.index("stanza")
_STANZA_FROM_END = _STANZA - _WIDTH
_ROW = "(" + ", ".join("?" * _WIDTH) + ")"
# Inserted by statements of these many rows (each a prepared statement kept in the
# connection's cache): one step per statement, not one per row.
_CHUNKS = (256, 64, 16, 4, 1)


# The columns in the batch's order (the account and the other party bound as their
# numbers, with_full as null when it is the bare JID).
_INSERT = {n: "INSERT OR IGNORE INTO archive (account, archive_id, ts, direction, with_bare,"
              " with_full, stanza, seq, nonce) VALUES " + ", ".join([_ROW] * n)
           for n in _CHUNKS}
_ITEM = "archive_id, ts, stanza, seq"  # an ArchiveItem, and the seq for the first index


class ArchiveArea:
    """The archive's SQL on one connection (the writer thread's at run time)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self._ids: ArchiveIds | None = None
        # archive_jids as far as this connection read or wrote it (a JID's number never
        # changes once committed; ``forget_jids`` after a rollback).
        self._jid_ids: dict[str, int] = {}

    @property
    def ids(self) -> ArchiveIds:
        """The file's ids (loaded at first use: the store's connection, which has the
        preferences only, never needs them)."""
        if self._ids is None:
            self._ids = load_ids(self.conn)
        return self._ids

    JID_CACHE = 100_000  # numbers of JIDs kept (then forgotten at once, read again)

    def jid_id(self, jid: str) -> int:
        """The number of a bare JID in ``archive_jids``, given one if new (in the caller's
        transaction)."""
        found = self._jid_ids.get(jid)
        if found is None:
            conn = self.conn
            conn.execute("INSERT OR IGNORE INTO archive_jids (jid) VALUES (?)", (jid,))
            found = int(conn.execute("SELECT id FROM archive_jids WHERE jid = ?",
                                     (jid,)).fetchone()[0])
            self._remember(jid, found)
        return found

    def _known(self, jid: str) -> int:
        """The number of a JID for a query; -1 (no row has it) if it has none."""
        found = self._jid_ids.get(jid)
        if found is None:
            row = self.conn.execute("SELECT id FROM archive_jids WHERE jid = ?",
                                    (jid,)).fetchone()
            if row is None:
                return -1  # not remembered: another process may give it one
            found = int(row[0])
            self._remember(jid, found)
        return found

    def _remember(self, jid: str, number: int) -> None:
        if len(self._jid_ids) >= self.JID_CACHE:
            self._jid_ids.clear()
        self._jid_ids[jid] = number

    def forget_jids(self) -> None:
        """After a rollback: numbers given in it may not exist (or be another's later)."""
        self._jid_ids.clear()

    def put(self, rows: Sequence[tuple[str, ArchivedMessage]]) -> None:
        """Insert (account, message) rows; the caller holds the transaction. A seq already
        in the archive is kept (a replayed put is a no-op), as is an id stored already."""
        values: list[object] = []
        for account, m in rows:
            values.append(account)
            values += m
        self.insert(values)

    def insert(self, values: list[object]) -> None:
        """Insert rows given as the account and the message's fields, one row after
        another (the writer's batches are built so on the loop: its own thread then holds
        the GIL for little more than the statements' parameters). ``values`` is left as it
        is but for the seqs picked (so a retry of a failed commit inserts the same)."""
        width = _WIDTH
        if None in values[_SEQ::width]:  # ids stored as given: their seqs are picked here
            for at in range(_SEQ, len(values), width):
                if values[at] is None:
                    values[at] = self.ids.take()
                    values[at - _SEQ + _NONCE] = None  # so the id is in the index
        params = values.copy()
        known = self._jid_ids
        number = self.jid_id
        accounts = cast(list[str], values[_ACCOUNT::width])
        bares = cast(list[str], values[_WITH_BARE::width])
        params[_ACCOUNT::width] = [known.get(a) or number(a) for a in accounts]
        params[_WITH_BARE::width] = [known.get(b) or number(b) for b in bares]
        params[_WITH_FULL::width] = [None if f == b else f
                                     for f, b in zip(values[_WITH_FULL::width], bares, strict=True)]
        # Bound as bytearrays: the sqlite3 module binds a bytes parameter only after asking
        # the adaptation protocol for it (two failed attribute lookups, each formatting an
        # AttributeError: about a fifth of the insert's cost), a bytearray at once; both are
        # stored as the same BLOB.
        params[_STANZA::width] = [bytearray(b) for b in values[_STANZA::width]]  # type: ignore[call-overload]
        values = params
        rows, at = len(values) // width, 0
        # A few statements of many rows each, not one step per row: each step lets go of
        # the GIL and takes it back, and on a busy machine every such hand-over costs the
        # event loop's thread far more than the insert itself.
        for n in _CHUNKS:
            while rows - at >= n:
                self.conn.execute(_INSERT[n], values[at * width:(at + n) * width])
                at += n

    def reserve_more(self) -> int | None:
        """If the seqs reserved run low, reserve the next range (the caller holds the
        transaction and, once it committed, sets ``ids.limit`` to what this returns)."""
        ids = self.ids
        if ids.limit - ids.last > ArchiveIds.BLOCK // 2:
            return None
        limit = max(ids.limit, ids.last + 1) + ArchiveIds.BLOCK
        _set_reserved(self.conn, limit)
        return limit

    def _item(self, row: Sequence[Any]) -> ArchiveItem:
        return ArchiveItem(str(row[0]), float(row[1]), bytes(row[2]))

    def _key(self, account: int, archive_id: str) -> tuple[float, int] | None:
        """(ts, seq) of the account's message with this id (``account``: its number)."""
        for seq in self.ids.candidates(archive_id):
            row = self.conn.execute("SELECT ts, seq FROM archive WHERE seq = ? AND account = ?"
                                    " AND archive_id = ?", (seq, account, archive_id)
                                    ).fetchone()
            if row is not None:
                return float(row[0]), int(row[1])
        row = self.conn.execute("SELECT ts, seq FROM archive WHERE account = ? AND"
                                " archive_id = ? AND nonce IS NULL", (account, archive_id)
                                ).fetchone()
        return (float(row[0]), int(row[1])) if row else None

    def search(self, account: str, search: ArchiveSearch) -> ArchivePage | ArchiveMissing:
        f, page = search.filter, search.page
        number = self._known(account)
        where = ["account = ?"]
        args: list[Any] = [number]
        if f.with_jid is not None:
            if f.with_bare:
                where.append("with_bare = ?")
                args.append(self._known(f.with_jid))
            else:
                where += ["with_bare = ?", "with_full = ?"]
                args += [self._known(f.with_jid.partition("/")[0]), f.with_jid]
        if f.start is not None:
            where.append("ts >= ?")
            args.append(f.start)
        if f.end is not None:
            where.append("ts <= ?")
            args.append(f.end)
        for name, op in ((f.after_id, ">"), (f.before_id, "<")):
            if name is not None:
                key = self._key(number, name)
                if key is None:
                    return ArchiveMissing(name)
                where.append(f"(ts, seq) {op} (?, ?)")
                args += key
        if f.ids:
            seqs = []
            for name in f.ids:
                key = self._key(number, name)
                if key is None:
                    return ArchiveMissing(name)
                seqs.append(key[1])
            where.append(f"seq IN ({', '.join('?' * len(seqs))})")
            args += seqs
        base_where, base_args = list(where), list(args)  # the whole result set
        anchor = page.after if page.after is not None else (page.before or None)
        if anchor is not None:
            key = self._key(number, anchor)
            if key is None:
                return ArchiveMissing(anchor)
            where.append(f"(ts, seq) {'<' if page.backward else '>'} (?, ?)")
            args += key
        order = "DESC" if page.backward else "ASC"
        offset = page.index if (page.index is not None and not page.backward
                                and page.after is None) else 0
        limit = max(0, page.max)
        rows = self.conn.execute(
            f"SELECT {_ITEM} FROM archive WHERE {' AND '.join(where)}"
            f" ORDER BY ts {order}, seq {order} LIMIT ? OFFSET ?",
            (*args, limit + 1, offset)).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        if page.backward:
            rows.reverse()
        items = tuple(self._item(r) for r in rows)
        count = first_index = None
        if search.counts:
            count = int(self.conn.execute(
                f"SELECT count(*) FROM archive WHERE {' AND '.join(base_where)}",
                base_args).fetchone()[0])
            if rows:
                first_index = int(self.conn.execute(
                    f"SELECT count(*) FROM archive WHERE {' AND '.join(base_where)}"
                    " AND (ts, seq) < (?, ?)", (*base_args, rows[0][1], rows[0][3])
                ).fetchone()[0])
        return ArchivePage(items, complete=not more, count=count, first_index=first_index)

    def ends(self, account: str) -> ArchiveEnds:
        number = self._known(account)

        def one(order: str) -> ArchiveItem | None:
            row = self.conn.execute(
                f"SELECT {_ITEM} FROM archive WHERE account = ?"
                f" ORDER BY ts {order}, seq {order} LIMIT 1", (number,)).fetchone()
            return self._item(row) if row else None
        return ArchiveEnds(one("ASC"), one("DESC"))

    def count(self, account: str) -> int:
        return int(self.conn.execute("SELECT count(*) FROM archive WHERE account = ?",
                                     (self._known(account),)).fetchone()[0])

    def trim(self, account: str, keep: int, *, chunk: int = 5000) -> int:
        """Keep the account's ``keep`` newest messages; returns how many were deleted (at
        most ``chunk``: a long backlog is cut over several transactions)."""
        number = self._known(account)
        row = self.conn.execute(
            "SELECT ts, seq FROM archive WHERE account = ? ORDER BY ts DESC, seq DESC"
            " LIMIT 1 OFFSET ?", (number, keep)).fetchone()
        if row is None:
            return 0
        return self.conn.execute(
            "DELETE FROM archive WHERE seq IN (SELECT seq FROM archive WHERE account = ?"
            " AND (ts, seq) <= (?, ?) ORDER BY ts, seq LIMIT ?)",
            (number, row[0], row[1], chunk)).rowcount

    def accounts(self) -> list[str]:
        """Every account with messages."""
        return [str(self.conn.execute("SELECT jid FROM archive_jids WHERE id = ?",
                                      (number,)).fetchone()[0])
                for number in self._account_numbers()]

    def _account_numbers(self) -> list[int]:
        """The numbers of every account with messages: one index step each (no scan of
        the rows)."""
        found: list[int] = []
        while True:
            row = self.conn.execute("SELECT account FROM archive WHERE account > ? ORDER BY"
                                    " account LIMIT 1", (found[-1] if found else -1,)
                                    ).fetchone()
            if row is None:
                return found
            found.append(int(row[0]))

    def expire(self, before: float, *, chunk: int = 5000) -> int:
        """Delete messages archived before ``before`` (every account; at most ``chunk``),
        account by account through the time index (there is no index by age alone)."""
        deleted = 0
        for account in self._account_numbers():
            deleted += self.conn.execute(
                "DELETE FROM archive WHERE seq IN (SELECT seq FROM archive WHERE account = ?"
                " AND ts < ? ORDER BY ts LIMIT ?)", (account, before, chunk - deleted)
            ).rowcount
            if deleted >= chunk:
                break
        return deleted

    # -------------------------------------------------------------- preferences

    def prefs(self, account: str) -> Prefs | None:
        row = self.conn.execute("SELECT default_, always, never FROM archive_prefs"
                                " WHERE account = ?", (account,)).fetchone()
        if row is None:
            return None
        default = str(row[0])
        if default not in ("always", "never", "roster"):
            default = "always"
        return Prefs(default, frozenset(json.loads(row[1])),  # type: ignore[arg-type]
                     frozenset(json.loads(row[2])))

    def set_prefs(self, account: str, prefs: Prefs) -> None:
        self.conn.execute(
            "INSERT INTO archive_prefs (account, default_, always, never) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (account) DO UPDATE SET default_ = excluded.default_,"
            " always = excluded.always, never = excluded.never",
            (account, prefs.default, json.dumps(sorted(prefs.always)),
             json.dumps(sorted(prefs.never))))


# ---------------------------------------------------------------------- the writer thread


@dataclass(frozen=True, slots=True)
class Retention:
    max_age: float | None = None       # seconds; None: kept until the size limit
    max_per_account: int | None = None  # newest kept; None: no limit
    # An account's size is checked after this many new messages of it (trimming is an
    # index walk of max_per_account rows: not something to do per message).
    check_every: int = 1000
    expire_every: float = 60.0         # seconds between age purges


@dataclass
class _Query:
    account: str
    request: ArchiveRequest
    callback: Callable[[ArchiveResult], None]


_Job = list[object] | _Query | None  # a batch: account and message fields, row after row

RETRY_SECONDS = 1.0


def archive_path(store_path: str, configured: str | None = None) -> str:
    """Where the messages live: ``archive.path``, else beside the store (``front.sqlite3``
    -> ``front-archive.sqlite3``); in memory for an in-memory store."""
    if configured:
        return configured
    if store_path == ":memory:" or store_path.startswith("file:"):
        return ":memory:"
    p = Path(store_path)
    return str(p.with_name(f"{p.stem}-archive{p.suffix}"))


def open_archive_connection(path: str, log: Any = None) -> sqlite3.Connection:
    """A connection to the archive's own file (made owner-only, schema created if new, an
    older version's rebuilt, logged on ``log``); an in-memory archive for ``:memory:``
    (gone at exit)."""
    if path != ":memory:":
        from .store import create_private
        create_private(path)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    if path != ":memory:":
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL: no fsync per commit, only at checkpoints. A crash of the process loses
        # nothing committed; a crash of the machine may lose the last commits (never the
        # file): the archive is not the journal, and no acknowledgement waits for it.
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=5000")
        # Checkpoints every 4000 pages (16 MiB at 4 KiB), not SQLite's 1000: the pages the
        # latest commits touched are copied into the file once per checkpoint, and more
        # commits per checkpoint means fewer copies of the same index pages.
        conn.execute("PRAGMA wal_autocheckpoint=4000")
        conn.execute("PRAGMA journal_size_limit=67108864")
    _migrate(conn, log)
    return conn


def _migrate(conn: sqlite3.Connection, log: Any = None) -> None:
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version >= ARCHIVE_VERSION:
        return
    columns = {str(r[1]) for r in conn.execute("PRAGMA table_info(archive)")}
    if not columns:  # a new file
        _upgrade(conn, MESSAGES_SCHEMA)
        return
    # An older file (version 1 had no nonce column): rebuilt before the proxy starts (about
    # half a minute a million rows).
    old = 2 if "nonce" in columns else 1
    rows = int(conn.execute("SELECT count(*) FROM archive").fetchone()[0])
    if log is not None:
        log.warning("archive_migrating", rows=rows, from_version=old,
                    to_version=ARCHIVE_VERSION)
    started = time.monotonic()
    if not _upgrade(conn, _rebuild_script("o.nonce" if old == 2 else "NULL")):
        return  # another process did it while this one looked
    if log is not None:
        log.info("archive_migrated", rows=rows, from_version=old, to_version=ARCHIVE_VERSION,
                 seconds=round(time.monotonic() - started, 1))


def _upgrade(conn: sqlite3.Connection, script: str) -> bool:
    """``script`` and the new version in one transaction, unless the file is at this version
    by the time the lock is held (two processes opening an old file at once: the second
    must not rebuild what the first just rebuilt). Statement by statement, because
    ``executescript`` commits first. Returns whether it ran."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        if int(conn.execute("PRAGMA user_version").fetchone()[0]) >= ARCHIVE_VERSION:
            conn.execute("COMMIT")
            return False
        statement = ""
        for piece in script.split(";"):
            statement += piece + ";"
            if sqlite3.complete_statement(statement):
                if statement.strip(" \n\t;"):
                    conn.execute(statement)
                statement = ""
        conn.execute(f"PRAGMA user_version = {ARCHIVE_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return True


# Messages are handed to the writer in batches at most this old: one transaction per batch
# (a query hands over what is waiting first, so it still sees everything archived before it).
BATCH_SECONDS = 0.05


class ArchiveWriter:
    """Writes and queries the archive on its own thread and connection."""

    def __init__(self, path: str, *, retention: Retention = Retention(), log: Any = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.log = log
        self.retention = retention
        self.clock = clock
        self._conn = open_archive_connection(path, log)
        self.area = ArchiveArea(self._conn)
        self.ids = self.area.ids  # reserves this run's first range of seqs now
        # An id for a message about to be archived (the feature's ``new_id``; no wrapper:
        # it runs for every archived message).
        self.new_id: Callable[[], ArchiveKey] = self.ids.new
        self._batch: list[object] = []
        self._scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: queue.Queue[_Job] = queue.Queue()
        self._since_check: dict[str, int] = {}
        self._last_expire = 0.0
        self.written = 0    # messages committed
        self.commits = 0
        self.trimmed = 0    # messages removed by the limits
        self._thread = threading.Thread(target=self._run, name="xmpp-front-archive",
                                        daemon=True)
        self._thread.start()

    # On the event loop ---------------------------------------------------------------------------

    def put(self, account: str, message: Sequence[object],
            stanza: bytes | None = None) -> None:
        """``message``: an ``ArchivedMessage`` or its fields in its order (``ArchivePut.row``);
        ``stanza``: the message's bytes instead of its own (the shell's, as it serialized the
        message for the wire)."""
        batch = self._batch
        batch.append(account)
        batch += message
        if stanza is not None:
            batch[_STANZA_FROM_END] = stanza
        if not self._scheduled:
            self._scheduled = True
            self._loop = asyncio.get_running_loop()
            self._loop.call_later(BATCH_SECONDS, self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if self._batch:
            batch, self._batch = self._batch, []
            self._queue.put(batch)

    def query(self, account: str, request: ArchiveRequest,
              callback: Callable[[ArchiveResult], None]) -> None:
        """Run ``request`` on ``account``'s archive after everything put so far; the result
        comes to ``callback`` on the loop."""
        self._loop = asyncio.get_running_loop()
        self.flush()
        self._queue.put(_Query(account, request, callback))

    async def close(self) -> None:
        """Write what is queued, stop the thread, close the connection."""
        self.flush()
        self._queue.put(None)
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
        self._conn.close()

    def close_now(self) -> None:
        """From synchronous code (no loop running): same as ``close``."""
        self.flush()
        self._queue.put(None)
        self._thread.join()
        self._conn.close()

    # On the thread -------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            # Messages queued behind this one go into the same transaction.
            values: list[object] = []
            pending: _Job = job
            stop = False
            while isinstance(pending, list):
                values += pending
                try:
                    pending = self._queue.get_nowait()
                except queue.Empty:
                    pending = None
                    break
                if pending is None:
                    stop = True
            if values:
                self._with_retry(functools.partial(self._write, values))
            if isinstance(pending, _Query):
                self._answer(pending)
            if stop:
                return

    def _with_retry(self, work: Callable[[], None]) -> None:
        while True:
            try:
                work()
                return
            except sqlite3.Error as exc:
                if self.log is not None:
                    self.log.error("archive_write_failed", error=str(exc),
                                   retry_seconds=RETRY_SECONDS)
                time.sleep(RETRY_SECONDS)

    def _transaction(self, work: Callable[[], None]) -> None:
        c = self._conn
        c.execute("BEGIN IMMEDIATE")
        try:
            work()
            c.execute("COMMIT")
        except BaseException:
            self.area.forget_jids()  # numbers given in it are not in the file
            c.execute("ROLLBACK")
            raise

    def _write(self, values: list[object]) -> None:
        limit: int | None = None

        def work() -> None:
            nonlocal limit
            self.area.insert(values)
            limit = self.area.reserve_more()
        self._transaction(work)
        if limit is not None:  # reserved in the file now: the loop may hand them out
            self.ids.limit = limit
        accounts = values[_ACCOUNT::_WIDTH]
        self.written += len(accounts)
        self.commits += 1
        self._enforce_limits(accounts)

    def _enforce_limits(self, accounts: list[object]) -> None:
        r = self.retention
        if r.max_per_account is not None:
            since = self._since_check
            for account, n in Counter(accounts).items():
                since[str(account)] = since.get(str(account), 0) + n
            due = [a for a, n in since.items() if n >= r.check_every]
            for account in due:
                del since[account]
                self._trim_fully(functools.partial(self.area.trim, account,
                                                   r.max_per_account))
        now = self.clock()
        if r.max_age is not None and now - self._last_expire >= r.expire_every:
            self._last_expire = now
            self._trim_fully(functools.partial(self.area.expire, now - r.max_age))

    def _trim_fully(self, step: Callable[[], int]) -> None:
        while True:
            deleted = 0

            def run() -> None:
                nonlocal deleted
                deleted = step()
            self._transaction(run)
            self.trimmed += deleted
            if deleted == 0:
                return

    def _answer(self, job: _Query) -> None:
        result: ArchiveResult
        try:
            if isinstance(job.request, ArchiveBounds):
                result = self.area.ends(job.account)
            else:
                result = self.area.search(job.account, job.request)
        except sqlite3.Error as exc:
            if self.log is not None:
                self.log.error("archive_query_failed", error=str(exc))
            result = ArchiveFailed(str(exc))
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(job.callback, result)
            except RuntimeError:  # the loop closed meanwhile: nobody waits for it
                pass
