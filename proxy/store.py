"""Persistence: one embedded SQLite database (stdlib ``sqlite3``) behind a small interface.

Shape: ``Store`` owns the connection, the schema (numbered migrations recorded in the
``schema_version`` table) and transactions. Each area of the proxy gets a small class that
shares the store's connection and is reached as an attribute:

- ``store.roster`` (:class:`RosterArea`): per account, the cached roster, its version, the
  change log behind roster versioning (RFC 6121 §2.6) and subscription pre-approvals (§3.4).
- ``store.offline`` (:class:`OfflineArea`): messages a client never acknowledged when its
  stream-management session ended, kept for the account's next login.
- ``store.pending`` (:class:`PendingArea`): client stanzas the server never confirmed when
  the proxy stopped, sent upstream first at the account's next login.
- ``store.push`` (:class:`PushArea`): per account, the app servers and nodes clients enabled
  push notifications for (XEP-0357), with their publish options.
- ``store.blocklist`` (:class:`BlocklistArea`): per account, the JIDs it blocked (XEP-0191);
  read once when an account logs in, written on each block or unblock (by the writer).
- ``store.archive`` (:class:`proxy.archive_store.ArchiveArea`): the archiving preferences
  (XEP-0313/0441); the messages are in the archive's own file, written and read by its
  writer thread (``proxy/archive_store.py``).
- ``ledger_journal``: the crash-proof copy of every session's ledger, written by
  :class:`proxy.journal.Journal` on its own connection and thread.

Adding an area: append a migration to
``MIGRATIONS`` (never edit a released one), write a class taking the ``Store``, and attach it
in ``Store.__init__``. Every write goes through ``Store.transaction()``.

The roster is read from memory (an account's :class:`RosterBook` is loaded at a session's
login); its writes, and those of the push registrations and the blocklists (made while
stanzas are relayed), go through the :class:`StoreWriter`: on its own thread and connection
for a file, so the event loop never waits for them. Those two areas are read once per
account (at its first login) and see their own writes not yet committed
(:class:`_Unwritten`). The offline messages and the pending queue are written by it too (at a
session's end, which must not freeze the loop behind another worker's commit) and taken on
the loop's connection once the account's puts are committed (:class:`_InFlight`). The other
areas are synchronous. Files use WAL mode with ``synchronous=NORMAL``.

The guarantee of the writer's areas: a change is on disk with the writer's next batch (the
thread commits as soon as it is handed one, everything queued meanwhile together; a failed
commit is logged, ``store_write_failed``, and tried again, in order); a graceful stop commits
everything (``Store.close``). A crash of the process loses at most the batches not yet
committed, a few milliseconds of changes: the next run says so (``unclean``, logged by the
proxy as ``store_unclean_start``) and gives each account a new roster epoch (a full roster
download for its clients, never a version that names two rosters). A block or a push
registration of those last moments is gone, but its client was never told ``result``: that
reply waits for the commit (``StoreWriter.when_committed``, the ``WhenStored`` command).
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import secrets
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence, Set
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from .features.push import Registration as PushRegistration

from .archive_store import PREFS_SCHEMA, ArchiveArea
from .batching import take_queued
from .fewsets import EMPTY, added, removed

Op = TypeVar("Op")  # what an area's write does, to apply to its reads until committed

DEFAULT_MAX_CHANGES = 1000
BUSY_TIMEOUT_MS = 5000  # how long a statement waits for another connection's commit
WRITE_RETRY_SECONDS = 1.0  # after a failed commit of the writer: the batch is tried again

# (version, SQL). Applied in order, each in its own transaction, on open. Append only.
MIGRATIONS: tuple[tuple[int, str], ...] = (
    (1, """
        CREATE TABLE roster_state (
            account   TEXT PRIMARY KEY,
            epoch     TEXT NOT NULL,              -- random, per account: versions never repeat
            seq       INTEGER NOT NULL,           -- current version is f"{epoch}-{seq}"
            floor     INTEGER NOT NULL,           -- oldest seq the change log can still serve
            populated INTEGER NOT NULL DEFAULT 0  -- 1 once a full roster was stored
        );
        CREATE TABLE roster_items (
            account      TEXT NOT NULL,
            jid          TEXT NOT NULL,
            pos          INTEGER NOT NULL,        -- order of first appearance
            name         TEXT,
            subscription TEXT NOT NULL,
            ask          TEXT,
            groups       TEXT NOT NULL,           -- JSON array of strings, order kept
            PRIMARY KEY (account, jid)
        );
        CREATE TABLE roster_changes (             -- latest change of each jid, by seq
            account TEXT NOT NULL,
            seq     INTEGER NOT NULL,
            jid     TEXT NOT NULL,
            PRIMARY KEY (account, seq),
            UNIQUE (account, jid)
        );
        CREATE TABLE preapprovals (
            account TEXT NOT NULL,
            contact TEXT NOT NULL,
            PRIMARY KEY (account, contact)
        );
    """),
    (2, """
        CREATE TABLE offline_messages (           -- stream management: undelivered messages
            id         INTEGER PRIMARY KEY AUTOINCREMENT,  -- delivery order
            account    TEXT NOT NULL,
            stanza     BLOB NOT NULL,             -- the message as XML, with its <delay/>
            expires_at REAL NOT NULL              -- wall-clock seconds
        );
        CREATE INDEX offline_by_account ON offline_messages (account, id);
    """),
    (3, """
        CREATE TABLE pending_outbound (           -- client stanzas the server never confirmed
            id         INTEGER PRIMARY KEY AUTOINCREMENT,  -- the order they were sent in
            account    TEXT NOT NULL,
            stanza     BLOB NOT NULL,             -- as it was to go upstream, original id kept
            expires_at REAL NOT NULL              -- wall-clock seconds; bounced after this
        );
        CREATE INDEX pending_by_account ON pending_outbound (account, id);
        CREATE TABLE ledger_journal (             -- the live ledgers, for crash recovery:
            session   TEXT NOT NULL,              -- one row per lane per commit
            lane      TEXT NOT NULL,              -- 'c2s' or 's2c'
            first_n   INTEGER NOT NULL,           -- the stanzas' numbers in their lane:
            last_n    INTEGER NOT NULL,           -- first_n .. last_n, consecutive
            account   TEXT NOT NULL,
            queued_at REAL NOT NULL,              -- wall-clock seconds (one event-loop turn)
            stanzas   BLOB NOT NULL,              -- NUL-separated (XML never contains NUL)
            PRIMARY KEY (session, lane, first_n)
        ) WITHOUT ROWID;
        CREATE TABLE ledger_cuts (                -- per lane: everything below has left
            session   TEXT NOT NULL,
            lane      TEXT NOT NULL,
            left_n    INTEGER NOT NULL,
            PRIMARY KEY (session, lane)
        ) WITHOUT ROWID;
    """),
    (4, """
        CREATE TABLE push_registrations (         -- XEP-0357: the account's app servers
            id        INTEGER PRIMARY KEY AUTOINCREMENT,  -- order of (last) enabling
            account   TEXT NOT NULL,
            jid       TEXT NOT NULL,              -- the app server's push service
            node      TEXT NOT NULL,
            options   BLOB,                       -- the publish-options form as XML, if any
            UNIQUE (account, jid, node)
        );
    """),
    (5, """
        CREATE TABLE blocklist (                  -- XEP-0191: the JIDs an account blocked
            account TEXT NOT NULL,
            jid     TEXT NOT NULL,                -- normalized: a full, bare or domain JID
            PRIMARY KEY (account, jid)
        ) WITHOUT ROWID;
    """),
    (6, PREFS_SCHEMA),  # archiving preferences (the messages: proxy/archive_store.py)
)


class StoreError(Exception):
    pass


def create_private(path: str) -> None:
    """Create the database file owner-only (0600) if it does not exist yet: it holds
    messages and rosters. SQLite gives the ``-wal`` and ``-shm`` files it creates beside it
    the database file's permissions. An existing file keeps the permissions it has; any
    other problem is left for SQLite to report."""
    if path == ":memory:" or path.startswith("file:"):
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:
        return
    os.close(fd)


def _new_epoch() -> str:
    return secrets.token_hex(6)


class Store:
    """The database. ``path`` is a file name or ``":memory:"``."""

    def __init__(self, path: str, *, new_epoch: Callable[[], str] = _new_epoch,
                 threaded_writes: bool = True, log: Any = None,
                 clean_start: bool | None = None, mark_clean: bool = True) -> None:
        """``clean_start``/``mark_clean`` (``workers: N``): several processes share the
        file, so the supervisor says whether the last run stopped cleanly and marks the
        clean stop itself once every worker has closed."""
        self.path = path
        create_private(path)
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._depth = 0
        self.mark_clean = mark_clean
        try:
            if self._is_file():
                self._conn.execute("PRAGMA journal_mode=WAL")
                self._conn.execute("PRAGMA synchronous=NORMAL")
                # Other processes (workers) write the same file: wait for their commits.
                self._conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except Exception:
            self._conn.close()
            raise
        # PRAGMA user_version is 1 only between a clean close and the next open.
        self.clean_start = (self._conn.execute("PRAGMA user_version").fetchone()[0] == 1
                            if clean_start is None else clean_start)
        # A run before this one stopped without closing the store (a crash): the writer's
        # last batches may be missing.
        self.unclean = not self.clean_start and not self._created
        self._conn.execute("PRAGMA user_version = 0")
        self.writer = StoreWriter(self, threaded=threaded_writes and self._is_file(), log=log)
        self.roster = RosterArea(self, new_epoch)
        self.offline = OfflineArea(self)
        self.pending = PendingArea(self)
        self.push = PushArea(self)
        self.blocklist = BlocklistArea(self)
        # Archiving preferences only: the messages are written and read on the archive's
        # own thread and connection (proxy/archive_store.py ArchiveWriter).
        self.archive = ArchiveArea(self._conn)

    # ------------------------------------------------------------------ plumbing

    @property
    def conn(self) -> sqlite3.Connection:
        return self._conn

    def _is_file(self) -> bool:
        return self.path != ":memory:" and not self.path.startswith("file::memory:")

    def close(self) -> None:
        """Commit what the writer holds, mark the stop clean, close."""
        self.writer.close()
        if self.mark_clean:
            self._conn.execute("PRAGMA user_version = 1")
        self._conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` … ``COMMIT`` (``ROLLBACK`` on an exception). Nests: an inner
        block joins the outer transaction."""
        if self._depth:
            self._depth += 1
            try:
                yield self._conn
            finally:
                self._depth -= 1
            return
        self._conn.execute("BEGIN IMMEDIATE")
        self._depth = 1
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        else:
            self._conn.execute("COMMIT")
        finally:
            self._depth = 0

    def schema_version(self) -> int:
        row = self._conn.execute("SELECT version FROM schema_version").fetchone()
        return int(row[0]) if row else 0

    def _migrate(self) -> None:
        with self.transaction() as c:
            c.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            if c.execute("SELECT count(*) FROM schema_version").fetchone()[0] == 0:
                c.execute("INSERT INTO schema_version (version) VALUES (0)")
        current = self.schema_version()
        self._created = current == 0
        known = MIGRATIONS[-1][0] if MIGRATIONS else 0
        if current > known:
            raise StoreError(f"database schema {current} is newer than this program ({known})")
        for version, sql in MIGRATIONS:
            if version <= current:
                continue
            # One script, one transaction: a failed migration leaves the previous schema.
            try:
                self._conn.executescript(
                    f"BEGIN IMMEDIATE;\n{sql}\n;UPDATE schema_version SET version = {int(version)};"
                    "\nCOMMIT;")
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise


# ---------------------------------------------------------------------- the writer


class StoreWriter:
    """Writes that need not be read back at once (the roster's, the push registrations',
    the blocklists'), committed in order.

    For a file database they are committed on the writer's own thread and connection,
    everything queued meanwhile in one transaction, so the event loop never waits for the
    disk; for an in-memory database (one connection only) at once. ``committed`` is the
    ticket of the last batch on disk; ``flush`` waits for all of them; ``when_committed``
    tells the event loop (a reply that promises "stored" waits for it)."""

    def __init__(self, store: Store, *, threaded: bool, log: Any = None) -> None:
        self._store = store
        self.log = log
        self.submitted = 0
        self.committed = 0
        self._queue: queue.Queue[tuple[int, list[Write]] | None] | None = None
        self._thread: threading.Thread | None = None
        self._done = threading.Condition()
        # On the loop: (ticket, done, failed) of what waits for a commit, in ticket order.
        self._waiters: deque[tuple[int, Callable[[], None], Callable[[str], None]]] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        if threaded:
            self._queue = queue.Queue()
            self._thread = threading.Thread(target=self._run, name="xmpp-front-store",
                                            daemon=True)
            self._thread.start()

    def submit(self, writes: list[Write]) -> int:
        """Queue the statements; returns their ticket."""
        self.submitted += 1
        if self._queue is None:
            with self._store.transaction() as c:
                for sql, params in writes:
                    c.execute(sql, params)
            self.committed = self.submitted
        else:
            self._queue.put((self.submitted, writes))
        return self.submitted

    def when_committed(self, done: Callable[[], None], failed: Callable[[str], None]) -> None:
        """On the event loop: call ``done`` once everything submitted so far is committed
        (at once if it is), or ``failed(error)`` if a commit attempt of it fails first. The
        writer goes on trying the failed batch, in order; the waiter hears only once."""
        ticket = self.submitted
        if self.committed >= ticket:
            done()
            return
        self._loop = asyncio.get_running_loop()
        self._waiters.append((ticket, done, failed))
        # The thread may have committed between the check and the append (it tells the loop
        # only when it sees a waiter): settle what it has already done.
        if self.committed >= ticket:
            self._settle_committed(self.committed)

    def _settle_committed(self, committed: int) -> None:
        """On the loop: the waiters of every ticket up to ``committed`` are done."""
        waiters = self._waiters
        while waiters and waiters[0][0] <= committed:
            waiters.popleft()[1]()

    def _settle_failed(self, ticket: int, error: str) -> None:
        """On the loop: a commit attempt of every ticket up to ``ticket`` failed."""
        waiters = self._waiters
        while waiters and waiters[0][0] <= ticket:
            waiters.popleft()[2](error)

    def _tell_loop(self, callback: Callable[..., None], *args: Any) -> None:
        """From the writer's thread: run ``callback`` on the loop, if anything waits."""
        loop = self._loop
        if not self._waiters or loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop closed meanwhile: nobody is waiting any more
            pass

    def flush(self) -> None:
        """Block until everything submitted is committed (at close, and for tools)."""
        with self._done:
            while self.committed < self.submitted and self._thread is not None \
                    and self._thread.is_alive():
                self._done.wait(0.1)

    def close(self) -> None:
        if self._queue is not None and self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._queue = None

    def _run(self) -> None:
        assert self._queue is not None
        conn = sqlite3.connect(self._store.path, isolation_level=None,
                               check_same_thread=False)
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=5000")
        try:
            while True:
                first = self._queue.get()
                if first is None:
                    return
                batch, stop = take_queued(self._queue, first)  # one transaction
                self._commit(conn, batch)
                if stop:
                    return
        finally:
            conn.close()

    def _commit(self, conn: sqlite3.Connection, batch: list[tuple[int, list[Write]]]) -> None:
        while True:
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    for _, writes in batch:
                        for sql, params in writes:
                            conn.execute(sql, params)
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                break
            except sqlite3.Error as exc:  # disk full, locked: tried again, in order
                if self.log is not None:
                    self.log.error("store_write_failed", error=str(exc),
                                   retry_seconds=WRITE_RETRY_SECONDS)
                # A reply held for these writes must not wait for the disk to come back.
                self._tell_loop(self._settle_failed, batch[-1][0], str(exc))
                time.sleep(WRITE_RETRY_SECONDS)
        with self._done:
            self.committed = batch[-1][0]
            self._done.notify_all()
        self._tell_loop(self._settle_committed, self.committed)


# ---------------------------------------------------------------------- roster area


@dataclass(frozen=True, slots=True)
class RosterItem:
    """A roster item as the server holds it (RFC 6121 §2.1.2). ``approved`` is not here: the
    proxy keeps pre-approvals separately and adds the attribute when it shows an item."""

    jid: str
    name: str | None = None
    subscription: str = "none"
    ask: str | None = None
    groups: tuple[str, ...] = ()

    def same(self, other: RosterItem | None) -> bool:
        """Equal as a roster item: groups are a set (RFC 6121 §2.1.2.5), and a server may
        send them in another order each time it loads a roster; that is no change."""
        return other is not None and (
            (self.jid, self.name, self.subscription, self.ask) ==
            (other.jid, other.name, other.subscription, other.ask)
            and sorted(self.groups) == sorted(other.groups))


def same_item(a: RosterItem | None, b: RosterItem | None) -> bool:
    return a is b if a is None or b is None else a.same(b)


@dataclass(frozen=True, slots=True)
class RosterVersion:
    """Where an account's roster stands. ``str(v)`` is the opaque ``ver`` sent to clients."""

    epoch: str
    seq: int
    floor: int

    def __str__(self) -> str:
        return f"{self.epoch}-{self.seq}"

    def known(self, text: str | None) -> int | None:
        """The seq of a ``ver`` a client sent if the change log can still serve it (a version
        of this epoch between ``floor`` and now), else None."""
        if not text:
            return None
        epoch, dash, rest = text.rpartition("-")
        if not dash or epoch != self.epoch or not rest.isdigit() or rest != str(int(rest)):
            return None
        seq = int(rest)
        return seq if self.floor <= seq <= self.seq else None


Change = tuple[str, RosterItem | None]  # (jid, new state or None for removal)


class RosterBook:
    """One account's roster as the proxy caches it (items, version, change log,
    pre-approvals), in memory, with the rows each change asks the database for.

    The change log keeps one entry per jid: the seq of its latest change. That is all versioning
    needs (RFC 6121 §2.6.3: one push per changed item, in its final state, in order of change):
    the final state is the current item (absent: removed). At most ``max_changes`` entries are
    kept; dropping older ones raises ``floor``, and a client holding an older version gets the
    full roster.

    Every change appends its statements to ``writes`` and hands them to ``sink`` (the store's
    writer), so reads never touch the database and writes can be committed off the event loop.
    """

    def __init__(self, account: str, state: RosterVersion, populated: bool,
                 items: Iterable[RosterItem], changes: Iterable[tuple[int, str]],
                 preapprovals: Iterable[str], sink: Callable[[list[Write]], None],
                 next_pos: int = 0) -> None:
        self.account = account
        self._version = state
        self._populated = populated
        self._items: dict[str, RosterItem] = {it.jid: it for it in items}  # in order of pos
        self._next_pos = next_pos  # pos only orders the items: a new jid goes last
        self._changes: dict[str, int] = {jid: seq for seq, jid in sorted(changes)}  # by seq
        self._preapprovals: Set[str] = set(preapprovals) or EMPTY
        self._sink = sink

    # -------------------------------------------------------------- reading

    @property
    def version(self) -> RosterVersion:
        return self._version

    @property
    def populated(self) -> bool:
        return self._populated

    def items(self) -> list[RosterItem]:
        return list(self._items.values())

    def item(self, jid: str) -> RosterItem | None:
        return self._items.get(jid)

    def changes_since(self, seq: int) -> list[tuple[int, str]] | None:
        """``(seq, jid)`` of every jid changed after ``seq``, oldest first; None when the log
        no longer reaches back to ``seq``."""
        if seq < self._version.floor:
            return None
        return [(s, jid) for jid, s in self._changes.items() if s > seq]

    def preapprovals(self) -> set[str]:
        return set(self._preapprovals)

    # -------------------------------------------------------------- writing

    def replace(self, items: Iterable[RosterItem], *,
                max_changes: int = DEFAULT_MAX_CHANGES) -> RosterVersion:
        """Store a full roster from the server. The first one of an account is taken as is
        under one new version (no client can hold an older one); later ones are diffed
        against the stored items and each difference is a change with its own version."""
        new: dict[str, RosterItem] = {}
        for it in items:
            new.pop(it.jid, None)
            new[it.jid] = it
        if not self._populated:
            writes: list[Write] = [(_DELETE_ITEMS, (self.account,)),
                                   (_DELETE_CHANGES, (self.account,))]
            self._items, self._changes, self._next_pos = {}, {}, 0
            for it in new.values():
                writes.append(self._put_item(it))
            seq = self._version.seq + 1
            self._version = RosterVersion(self._version.epoch, seq, seq)
            self._populated = True
            writes.append(self._state_write())
            self._emit(writes)
            return self._version
        changes: list[Change] = [(jid, it) for jid, it in new.items()
                                 if not same_item(self._items.get(jid), it)]
        changes += [(jid, None) for jid in self._items if jid not in new]
        return self._apply(changes, max_changes)

    def update(self, changes: Sequence[Change], *,
               max_changes: int = DEFAULT_MAX_CHANGES) -> RosterVersion:
        """Apply item changes (from roster pushes); each one that differs from the stored item
        gets a new version, the others are no-ops."""
        real: list[Change] = [(jid, it) for jid, it in changes
                              if not same_item(self._items.get(jid), it)]
        return self._apply(real, max_changes)

    def touch(self, jids: Iterable[str], *,
              max_changes: int = DEFAULT_MAX_CHANGES) -> RosterVersion:
        """A new version for items whose presentation changed without the server's state
        changing (the ``approved`` flag). Jids with no item are skipped."""
        changes: list[Change] = [(jid, self._items[jid]) for jid in jids if jid in self._items]
        return self._apply(changes, max_changes)

    def add_preapproval(self, contact: str) -> bool:
        """Record a pre-approval; False if it was already there."""
        if contact in self._preapprovals:
            return False
        self._preapprovals = added(self._preapprovals, contact)
        self._emit([(_ADD_PREAPPROVAL, (self.account, contact))])
        return True

    def remove_preapproval(self, contact: str) -> bool:
        """Remove a pre-approval; False if there was none."""
        if contact not in self._preapprovals:
            return False
        self._preapprovals = removed(self._preapprovals, contact)
        self._emit([(_REMOVE_PREAPPROVAL, (self.account, contact))])
        return True

    # -------------------------------------------------------------- internals

    def _emit(self, writes: list[Write]) -> None:
        if writes:
            self._sink(writes)

    def _state_write(self) -> Write:
        v = self._version
        return (_PUT_STATE, (self.account, v.epoch, v.seq, v.floor, int(self._populated)))

    def _put_item(self, it: RosterItem) -> Write:
        """The item's row; a new jid goes last (order of first appearance), a known one
        keeps its place."""
        pos = self._next_pos
        if it.jid not in self._items:
            self._next_pos += 1
        self._items[it.jid] = it
        return (_PUT_ITEM, (self.account, it.jid, pos, it.name, it.subscription, it.ask,
                            _groups(it.groups)))

    def _apply(self, changes: Sequence[Change], max_changes: int) -> RosterVersion:
        if not changes:
            return self._version
        seq, floor = self._version.seq, self._version.floor
        writes: list[Write] = []
        for jid, it in changes:
            seq += 1
            if it is None:
                self._items.pop(jid, None)
                writes.append((_DELETE_ITEM, (self.account, jid)))
            else:
                writes.append(self._put_item(it))
            self._changes.pop(jid, None)
            self._changes[jid] = seq
            writes.append((_PUT_CHANGE, (self.account, seq, jid)))
        excess = len(self._changes) - max(0, max_changes)
        if excess > 0:
            dropped = list(self._changes.items())[:excess]
            for jid, _ in dropped:
                del self._changes[jid]
            cut = dropped[-1][1]
            writes.append((_TRIM_CHANGES, (self.account, cut)))
            floor = max(floor, cut)
        self._version = RosterVersion(self._version.epoch, seq, floor)
        writes.append(self._state_write())
        self._emit(writes)
        return self._version


Write = tuple[str, tuple[object, ...]]  # one SQL statement and its parameters

_PUT_STATE = ("INSERT INTO roster_state (account, epoch, seq, floor, populated)"
              " VALUES (?, ?, ?, ?, ?) ON CONFLICT (account) DO UPDATE SET"
              " epoch = excluded.epoch, seq = excluded.seq, floor = excluded.floor,"
              " populated = excluded.populated")
# A known jid keeps its pos (the pos given is then unused).
_PUT_ITEM = ("INSERT INTO roster_items (account, jid, pos, name, subscription, ask, groups)"
             " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (account, jid) DO UPDATE SET"
             " name = excluded.name, subscription = excluded.subscription,"
             " ask = excluded.ask, groups = excluded.groups")
_DELETE_ITEM = "DELETE FROM roster_items WHERE account = ? AND jid = ?"
_DELETE_ITEMS = "DELETE FROM roster_items WHERE account = ?"
_PUT_CHANGE = "INSERT OR REPLACE INTO roster_changes (account, seq, jid) VALUES (?, ?, ?)"
_TRIM_CHANGES = "DELETE FROM roster_changes WHERE account = ? AND seq <= ?"
_DELETE_CHANGES = "DELETE FROM roster_changes WHERE account = ?"
_ADD_PREAPPROVAL = "INSERT OR IGNORE INTO preapprovals (account, contact) VALUES (?, ?)"
_REMOVE_PREAPPROVAL = "DELETE FROM preapprovals WHERE account = ? AND contact = ?"


class RosterArea:
    """Per account (bare JID string): items, version, change log, pre-approvals.

    ``open`` gives the account's :class:`RosterBook`, loaded once (at a session's login) and
    kept in memory while a session uses it; its changes go to the store's writer, which
    commits them off the event loop for a file database. The other methods are the same
    operations by account name, for tools and tests (they use the open book if there is one,
    so they see the latest state).

    A version must never name two rosters. After an unclean stop (a crash), the writes in
    flight may be lost, so each account's first book of the run gets a new epoch: its
    clients download the full roster once.
    """

    def __init__(self, store: Store, new_epoch: Callable[[], str]) -> None:
        self._store = store
        self._new_epoch = new_epoch
        self._books: dict[str, RosterBook] = {}
        self._users: dict[str, int] = {}
        self._last_write: dict[str, int] = {}  # account -> the writer's ticket of its last
        self._renewed: set[str] = set()  # accounts whose epoch this run already checked
        # The books no session uses (kept until their writes are committed): what a sweep
        # looks at, so that a release costs the same with 10 or 100,000 books open.
        self._unused: set[str] = set()

    # -------------------------------------------------------------- books

    def open(self, account: str) -> RosterBook:
        """The account's book, for a session that uses it until ``release``."""
        book = self.book(account)
        self._users[account] = self._users.get(account, 0) + 1
        self._unused.discard(account)
        return book

    def release(self, account: str) -> None:
        users = self._users.get(account, 0) - 1
        if users > 0:
            self._users[account] = users
        else:
            self._users.pop(account, None)
            if account in self._books:
                self._unused.add(account)
        self._sweep()

    def book(self, account: str) -> RosterBook:
        """The account's book: kept while a session uses it or its writes are not yet
        committed (until then the database is behind it), else loaded."""
        book = self._books.get(account)
        if book is not None and (account in self._users or self._pending(account)):
            return book
        self._sweep()
        book = self._books[account] = self._load(account)
        if account not in self._users:
            self._unused.add(account)
        return book

    def _pending(self, account: str) -> bool:
        return self._last_write.get(account, 0) > self._store.writer.committed

    def _sweep(self) -> None:
        """Forget the books nobody uses once their writes are committed (until then the
        database may be behind them)."""
        for account in [a for a in self._unused if not self._pending(a)]:
            self._unused.discard(account)
            del self._books[account]
            self._last_write.pop(account, None)

    def _sink(self, account: str) -> Callable[[list[Write]], None]:
        def write(writes: list[Write]) -> None:
            self._last_write[account] = self._store.writer.submit(writes)
        return write

    def _load(self, account: str) -> RosterBook:
        c = self._store.conn
        row = c.execute("SELECT epoch, seq, floor, populated FROM roster_state"
                        " WHERE account = ?", (account,)).fetchone()
        sink = self._sink(account)
        if row is None:
            book = RosterBook(account, RosterVersion(self._epoch(), 0, 0), False, (), (), (),
                              sink)
            self._renewed.add(account)
            sink([book._state_write()])
            return book
        state = RosterVersion(row[0], int(row[1]), int(row[2]))
        items = [_item(r) for r in c.execute(
            "SELECT jid, name, subscription, ask, groups FROM roster_items"
            " WHERE account = ? ORDER BY pos", (account,)).fetchall()]
        changes = [(int(s), j) for s, j in c.execute(
            "SELECT seq, jid FROM roster_changes WHERE account = ?", (account,)).fetchall()]
        preapprovals = [r[0] for r in c.execute(
            "SELECT contact FROM preapprovals WHERE account = ?", (account,)).fetchall()]
        top = c.execute("SELECT max(pos) FROM roster_items WHERE account = ?",
                        (account,)).fetchone()[0]
        book = RosterBook(account, state, bool(row[3]), items, changes, preapprovals, sink,
                          next_pos=0 if top is None else int(top) + 1)
        if account not in self._renewed:
            self._renewed.add(account)
            if not self._store.clean_start:
                # No older version of a new epoch exists: the change log serves nobody.
                book._version = RosterVersion(self._epoch(), state.seq, state.seq)
                book._changes.clear()
                sink([(_DELETE_CHANGES, (account,)), book._state_write()])
        return book

    def _epoch(self) -> str:
        epoch = self._new_epoch()
        if not epoch or "-" in epoch:
            raise StoreError(f"bad roster epoch {epoch!r}")
        return epoch

    # -------------------------------------------------------------- by account name

    def version(self, account: str) -> RosterVersion:
        """The current version (the account's state is created, with a new epoch, on first
        use)."""
        return self.book(account).version

    def populated(self, account: str) -> bool:
        return self._known(account) and self.book(account).populated

    def items(self, account: str) -> list[RosterItem]:
        return self.book(account).items() if self._known(account) else []

    def item(self, account: str, jid: str) -> RosterItem | None:
        return self.book(account).item(jid) if self._known(account) else None

    def _known(self, account: str) -> bool:
        """Whether the account has a roster state: reading one that has none creates none
        (only ``version`` and the writes start an account's epoch)."""
        return account in self._books or self._store.conn.execute(
            "SELECT 1 FROM roster_state WHERE account = ?", (account,)).fetchone() is not None

    def changes_since(self, account: str, seq: int) -> list[tuple[int, str]] | None:
        return self.book(account).changes_since(seq)

    def replace(self, account: str, items: Iterable[RosterItem], *,
                max_changes: int = DEFAULT_MAX_CHANGES) -> RosterVersion:
        return self.book(account).replace(items, max_changes=max_changes)

    def update(self, account: str, changes: Sequence[Change], *,
               max_changes: int = DEFAULT_MAX_CHANGES) -> RosterVersion:
        return self.book(account).update(changes, max_changes=max_changes)

    def touch(self, account: str, jids: Iterable[str], *,
              max_changes: int = DEFAULT_MAX_CHANGES) -> RosterVersion:
        return self.book(account).touch(jids, max_changes=max_changes)

    def preapprovals(self, account: str) -> set[str]:
        if self._known(account):
            return self.book(account).preapprovals()
        return {r[0] for r in self._store.conn.execute(
            "SELECT contact FROM preapprovals WHERE account = ?", (account,)).fetchall()}

    def add_preapproval(self, account: str, contact: str) -> bool:
        return self.book(account).add_preapproval(contact)

    def remove_preapproval(self, account: str, contact: str) -> bool:
        return self.book(account).remove_preapproval(contact)

    def forget(self, account: str) -> None:
        """Drop everything stored for an account (its next versions get a new epoch)."""
        if account in self._users:
            raise StoreError(f"the roster of {account} is in use")
        self._store.writer.flush()
        self._books.pop(account, None)
        self._unused.discard(account)
        self._renewed.discard(account)
        with self._store.transaction() as c:
            for table in ("roster_state", "roster_items", "roster_changes", "preapprovals"):
                c.execute(f"DELETE FROM {table} WHERE account = ?", (account,))


def _groups(groups: tuple[str, ...]) -> str:
    return json.dumps(list(groups), ensure_ascii=False)


def _item(row: Sequence[object]) -> RosterItem:
    jid, name, subscription, ask, groups = row
    return RosterItem(str(jid), None if name is None else str(name), str(subscription),
                      None if ask is None else str(ask),
                      tuple(str(g) for g in json.loads(str(groups))))


# ---------------------------------------------------------------------- offline area


class _InFlight:
    """The last writer ticket of each account's puts, so a take can tell whether rows of
    the account may not be committed yet."""

    def __init__(self, writer: StoreWriter) -> None:
        self._writer = writer
        self._tickets: dict[str, int] = {}

    def submit(self, account: str, writes: list[Write]) -> int:
        ticket = self._writer.submit(writes)
        self._tickets[account] = ticket
        return ticket

    def unwritten(self, account: str) -> bool:
        ticket = self._tickets.get(account)
        if ticket is None:
            return False
        if ticket <= self._writer.committed:
            del self._tickets[account]
            return False
        return True

    def settle(self, account: str) -> None:
        """Before a take: what the account has in flight is committed first (a session
        waits for ``when_committed`` instead, so the loop never blocks here)."""
        if self.unwritten(account):
            self._writer.flush()
            self.unwritten(account)


class OfflineArea:
    """Messages waiting for their account (``stream_management.on_timeout: store``).
    Written by the store's writer (a session's end must not wait for the disk); a take
    sees every put before it (``unwritten``: the session waits for the commit first)."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._in_flight = _InFlight(store.writer)

    def offline_put(self, account: str, stanza: bytes, expires_at: float) -> int:
        """Hand the message to the writer; returns its ticket (``StoreWriter``)."""
        return self._in_flight.submit(account, [
            ("INSERT INTO offline_messages (account, stanza, expires_at) VALUES (?, ?, ?)",
             (account, stanza, expires_at))])

    def unwritten(self, account: str) -> bool:
        """Whether a put of the account may not be committed yet."""
        return self._in_flight.unwritten(account)

    def offline_take(self, account: str, now: float,
                     limit: int | None = None) -> list[bytes]:
        """The account's unexpired messages, oldest first (at most ``limit``); they leave
        the store (expired ones of every account are purged on the way)."""
        self._in_flight.settle(account)
        with self._store.transaction() as c:
            c.execute("DELETE FROM offline_messages WHERE expires_at <= ?", (now,))
            rows = c.execute("SELECT id, stanza FROM offline_messages WHERE account = ?"
                             " ORDER BY id LIMIT ?", (account, -1 if limit is None else limit)
                             ).fetchall()
            if rows:
                c.execute("DELETE FROM offline_messages WHERE account = ? AND id <= ?",
                          (account, rows[-1][0]))
        return [bytes(row[1]) for row in rows]

    def count(self, account: str) -> int:
        row = self._store.conn.execute(
            "SELECT count(*) FROM offline_messages WHERE account = ?", (account,)).fetchone()
        return int(row[0])


# ---------------------------------------------------------------------- pending outbound


class PendingArea:
    """Client stanzas for the server, left over when the proxy stopped or crashed."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._in_flight = _InFlight(store.writer)

    def put(self, account: str, stanzas: Iterable[bytes], expires_at: float) -> int:
        """Hand the stanzas to the writer (one transaction, in order); returns the ticket."""
        return self._in_flight.submit(account, [
            ("INSERT INTO pending_outbound (account, stanza, expires_at) VALUES (?, ?, ?)",
             (account, stanza, expires_at)) for stanza in stanzas])

    def unwritten(self, account: str) -> bool:
        return self._in_flight.unwritten(account)

    def take(self, account: str) -> list[tuple[bytes, float]]:
        """The account's stanzas in their original order, with their expiry; they leave.
        Puts still in flight are committed first (they happen at a stop, so a login of the
        same run rarely finds any)."""
        self._in_flight.settle(account)
        with self._store.transaction() as c:
            rows = c.execute("SELECT stanza, expires_at FROM pending_outbound WHERE account = ?"
                             " ORDER BY id", (account,)).fetchall()
            if rows:
                c.execute("DELETE FROM pending_outbound WHERE account = ?", (account,))
        return [(bytes(r[0]), float(r[1])) for r in rows]

    def count(self, account: str | None = None) -> int:
        if account is None:
            row = self._store.conn.execute("SELECT count(*) FROM pending_outbound").fetchone()
        else:
            row = self._store.conn.execute(
                "SELECT count(*) FROM pending_outbound WHERE account = ?", (account,)).fetchone()
        return int(row[0])


# ---------------------------------------------------------------------- writes in flight


class _Unwritten(Generic[Op]):
    """The writes an area handed to the writer that may not be committed yet, per account,
    so that its reads (on the loop's connection) see them at once.

    A read takes ``committed`` first, then the rows, then applies again, in order, every op
    after that ticket: some may be in the rows already, which changes nothing, since each op
    sets its keys (adds, removes, moves to the end) whatever they held, so the last op on a
    key decides either way."""

    def __init__(self, writer: StoreWriter) -> None:
        self._writer = writer
        self._ops: dict[str, list[tuple[int, Op]]] = {}

    def submit(self, account: str, writes: list[Write], op: Op) -> None:
        self._sweep()
        self._ops.setdefault(account, []).append((self._writer.submit(writes), op))

    def committed(self) -> int:
        return self._writer.committed

    def after(self, account: str, committed: int) -> list[Op]:
        """The account's ops after ticket ``committed``, oldest first."""
        return [op for ticket, op in self._ops.get(account, ()) if ticket > committed]

    def _sweep(self) -> None:
        done = self._writer.committed
        for account in [a for a, ops in self._ops.items() if ops[-1][0] <= done]:
            del self._ops[account]


# ---------------------------------------------------------------------- push registrations


class PushArea:
    """XEP-0357 registrations per account, oldest first (``proxy/features/push.py``). Read
    when an account's first session starts; written by the store's writer."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._unwritten: _Unwritten[tuple[str, PushRegistration | tuple[str, str | None]]] = \
            _Unwritten(store.writer)

    def registrations(self, account: str) -> list[PushRegistration]:
        committed = self._unwritten.committed()
        rows = self._store.conn.execute(
            "SELECT jid, node, options FROM push_registrations WHERE account = ? ORDER BY id",
            (account,)).fetchall()
        regs = {(str(j), str(n)): PushRegistration(str(j), str(n),
                                                   None if o is None else bytes(o))
                for j, n, o in rows}
        for action, arg in self._unwritten.after(account, committed):
            if action == "save":
                assert isinstance(arg, PushRegistration)
                regs.pop(arg.key, None)
                regs[arg.key] = arg
            else:
                assert isinstance(arg, tuple)
                jid, node = arg
                for key in [k for k in regs if k[0] == jid and node in (None, k[1])]:
                    del regs[key]
        return list(regs.values())

    def save(self, account: str, registration: PushRegistration) -> None:
        """Add it, or move it to the newest with its new options (the last enable wins)."""
        self._unwritten.submit(account, [
            ("DELETE FROM push_registrations WHERE account = ? AND jid = ? AND node = ?",
             (account, registration.jid, registration.node)),
            ("INSERT INTO push_registrations (account, jid, node, options) VALUES (?, ?, ?, ?)",
             (account, registration.jid, registration.node, registration.options))],
            ("save", registration))

    def delete(self, account: str, jid: str, node: str | None = None) -> int:
        """Remove one node of an app server, or all of them (no ``node``); returns how many
        there were (counted on a read: a disable is rare, and a read never waits for the
        writer in WAL mode)."""
        gone = sum(1 for r in self.registrations(account)
                   if r.jid == jid and node in (None, r.node))
        if node is None:
            write: Write = ("DELETE FROM push_registrations WHERE account = ? AND jid = ?",
                            (account, jid))
        else:
            write = ("DELETE FROM push_registrations WHERE account = ? AND jid = ? AND node = ?",
                     (account, jid, node))
        self._unwritten.submit(account, [write], ("delete", (jid, node)))
        return gone


# ---------------------------------------------------------------------- blocklist


class BlocklistArea:
    """Per account (bare JID string): the JIDs it blocked (XEP-0191). Read at login into the
    memory of the account's sessions; written (a few rows) on each block or unblock by the
    store's writer."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._unwritten: _Unwritten[tuple[str, tuple[str, ...]]] = _Unwritten(store.writer)

    def items(self, account: str) -> set[str]:
        committed = self._unwritten.committed()
        rows = self._store.conn.execute(
            "SELECT jid FROM blocklist WHERE account = ?", (account,)).fetchall()
        items = {str(r[0]) for r in rows}
        for action, jids in self._unwritten.after(account, committed):
            if action == "add":
                items.update(jids)
            elif action == "remove":
                items.difference_update(jids)
            else:
                items.clear()
        return items

    def add(self, account: str, jids: Iterable[str]) -> None:
        jids = tuple(jids)
        self._unwritten.submit(account, [
            ("INSERT OR IGNORE INTO blocklist (account, jid) VALUES (?, ?)", (account, j))
            for j in jids], ("add", jids))

    def remove(self, account: str, jids: Iterable[str]) -> None:
        jids = tuple(jids)
        self._unwritten.submit(account, [
            ("DELETE FROM blocklist WHERE account = ? AND jid = ?", (account, j))
            for j in jids], ("remove", jids))

    def clear(self, account: str) -> None:
        self._unwritten.submit(account, [("DELETE FROM blocklist WHERE account = ?", (account,))],
                               ("clear", ()))
