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
- ``store.archive`` (:class:`proxy.archive_store.ArchiveArea`): the message archive
  (XEP-0313); on this connection only its preferences are read and written, the messages
  by the archive's writer thread on its own connection.
- ``ledger_journal``: the crash-proof copy of every session's ledger, written by
  :class:`proxy.journal.Journal` on its own connection and thread.

Adding an area: append a migration to
``MIGRATIONS`` (never edit a released one), write a class taking the ``Store``, and attach it
in ``Store.__init__``. Every write goes through ``Store.transaction()``.

Synchronous on purpose: each operation touches a handful of rows (a 500-item roster is one
transaction of a few milliseconds) and runs on the event loop thread. Files use WAL mode with
``synchronous=NORMAL``: a crash of the process loses nothing committed; a power cut may lose
the last transactions, which only costs clients a full roster download.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from .archive_store import ARCHIVE_SCHEMA, ArchiveArea

DEFAULT_MAX_CHANGES = 1000

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
    (4, ARCHIVE_SCHEMA),  # the message archive: proxy/archive_store.py
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

    def __init__(self, path: str, *, new_epoch: Callable[[], str] = _new_epoch) -> None:
        self.path = path
        create_private(path)
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._depth = 0
        try:
            if path != ":memory:" and not path.startswith("file::memory:"):
                self._conn.execute("PRAGMA journal_mode=WAL")
                self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except Exception:
            self._conn.close()
            raise
        self.roster = RosterArea(self, new_epoch)
        self.offline = OfflineArea(self)
        self.pending = PendingArea(self)
        # Archiving preferences only: the messages are written and read on the archive's
        # own thread and connection (proxy/archive_store.py ArchiveWriter).
        self.archive = ArchiveArea(self._conn)

    # ------------------------------------------------------------------ plumbing

    @property
    def conn(self) -> sqlite3.Connection:
        return self._conn

    def close(self) -> None:
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


class RosterArea:
    """Per account (bare JID string): items, version, change log, pre-approvals.

    The change log keeps one row per jid: the seq of its latest change. That is all versioning
    needs (RFC 6121 §2.6.3: one push per changed item, in its final state, in order of change):
    the final state is the current item (absent: removed). At most ``max_changes`` rows are
    kept; dropping older rows raises ``floor``, and a client holding an older version gets the
    full roster.
    """

    def __init__(self, store: Store, new_epoch: Callable[[], str]) -> None:
        self._store = store
        self._new_epoch = new_epoch

    # -------------------------------------------------------------- reading

    def version(self, account: str) -> RosterVersion:
        """The current version (the account's state is created, with a new epoch, on first
        use)."""
        row = self._store.conn.execute(
            "SELECT epoch, seq, floor FROM roster_state WHERE account = ?", (account,)).fetchone()
        if row is not None:
            return RosterVersion(row[0], int(row[1]), int(row[2]))
        with self._store.transaction():
            return self._state(account)

    def populated(self, account: str) -> bool:
        row = self._store.conn.execute(
            "SELECT populated FROM roster_state WHERE account = ?", (account,)).fetchone()
        return bool(row and row[0])

    def items(self, account: str) -> list[RosterItem]:
        rows = self._store.conn.execute(
            "SELECT jid, name, subscription, ask, groups FROM roster_items"
            " WHERE account = ? ORDER BY pos", (account,)).fetchall()
        return [_item(row) for row in rows]

    def item(self, account: str, jid: str) -> RosterItem | None:
        row = self._store.conn.execute(
            "SELECT jid, name, subscription, ask, groups FROM roster_items"
            " WHERE account = ? AND jid = ?", (account, jid)).fetchone()
        return _item(row) if row else None

    def changes_since(self, account: str, seq: int) -> list[tuple[int, str]] | None:
        """``(seq, jid)`` of every jid changed after ``seq``, oldest first; None when the log
        no longer reaches back to ``seq``."""
        version = self.version(account)
        if seq < version.floor:
            return None
        rows = self._store.conn.execute(
            "SELECT seq, jid FROM roster_changes WHERE account = ? AND seq > ? ORDER BY seq",
            (account, seq)).fetchall()
        return [(int(s), j) for s, j in rows]

    # -------------------------------------------------------------- writing

    def replace(self, account: str, items: Iterable[RosterItem], *,
                max_changes: int = DEFAULT_MAX_CHANGES) -> RosterVersion:
        """Store a full roster from the server. The first one of an account is taken as is
        under one new version (no client can hold an older one); later ones are diffed
        against the stored items and each difference is a change with its own version."""
        new: dict[str, RosterItem] = {}
        for it in items:
            new.pop(it.jid, None)
            new[it.jid] = it
        with self._store.transaction() as c:
            state = self._state(account)
            if not self.populated(account):
                c.execute("DELETE FROM roster_items WHERE account = ?", (account,))
                c.execute("DELETE FROM roster_changes WHERE account = ?", (account,))
                c.executemany(
                    "INSERT INTO roster_items (account, jid, pos, name, subscription, ask,"
                    " groups) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(account, it.jid, pos, it.name, it.subscription, it.ask,
                      _groups(it.groups)) for pos, it in enumerate(new.values())])
                seq = state.seq + 1
                c.execute("UPDATE roster_state SET seq = ?, floor = ?, populated = 1"
                          " WHERE account = ?", (seq, seq, account))
                return RosterVersion(state.epoch, seq, seq)
            current = {it.jid: it for it in self.items(account)}
            changes: list[Change] = [(jid, it) for jid, it in new.items()
                                     if not same_item(current.get(jid), it)]
            changes += [(jid, None) for jid in current if jid not in new]
            return self._apply(account, changes, max_changes)

    def update(self, account: str, changes: Sequence[Change], *,
               max_changes: int = DEFAULT_MAX_CHANGES) -> RosterVersion:
        """Apply item changes (from roster pushes); each one that differs from the stored item
        gets a new version, the others are no-ops."""
        with self._store.transaction():
            self._state(account)
            real: list[Change] = [(jid, it) for jid, it in changes
                                  if not same_item(self.item(account, jid), it)]
            return self._apply(account, real, max_changes)

    def touch(self, account: str, jids: Iterable[str], *,
              max_changes: int = DEFAULT_MAX_CHANGES) -> RosterVersion:
        """A new version for items whose presentation changed without the server's state
        changing (the ``approved`` flag). Jids with no item are skipped."""
        with self._store.transaction():
            self._state(account)
            changes: list[Change] = []
            for jid in jids:
                it = self.item(account, jid)
                if it is not None:
                    changes.append((jid, it))
            return self._apply(account, changes, max_changes)

    def forget(self, account: str) -> None:
        """Drop everything stored for an account (its next versions get a new epoch)."""
        with self._store.transaction() as c:
            for table in ("roster_state", "roster_items", "roster_changes", "preapprovals"):
                c.execute(f"DELETE FROM {table} WHERE account = ?", (account,))

    # -------------------------------------------------------------- pre-approvals

    def preapprovals(self, account: str) -> set[str]:
        rows = self._store.conn.execute(
            "SELECT contact FROM preapprovals WHERE account = ?", (account,)).fetchall()
        return {r[0] for r in rows}

    def add_preapproval(self, account: str, contact: str) -> bool:
        """Record a pre-approval; False if it was already there."""
        with self._store.transaction() as c:
            cur = c.execute("INSERT OR IGNORE INTO preapprovals (account, contact)"
                            " VALUES (?, ?)", (account, contact))
            return cur.rowcount > 0

    def remove_preapproval(self, account: str, contact: str) -> bool:
        """Remove a pre-approval; False if there was none."""
        with self._store.transaction() as c:
            cur = c.execute("DELETE FROM preapprovals WHERE account = ? AND contact = ?",
                            (account, contact))
            return cur.rowcount > 0

    # -------------------------------------------------------------- internals

    def _state(self, account: str) -> RosterVersion:
        """Inside a transaction: the account's state, created if missing."""
        c = self._store.conn
        row = c.execute("SELECT epoch, seq, floor FROM roster_state WHERE account = ?",
                        (account,)).fetchone()
        if row is not None:
            return RosterVersion(row[0], int(row[1]), int(row[2]))
        epoch = self._new_epoch()
        if not epoch or "-" in epoch:
            raise StoreError(f"bad roster epoch {epoch!r}")
        c.execute("INSERT INTO roster_state (account, epoch, seq, floor) VALUES (?, ?, 0, 0)",
                  (account, epoch))
        return RosterVersion(epoch, 0, 0)

    def _apply(self, account: str, changes: Sequence[Change],
               max_changes: int) -> RosterVersion:
        c = self._store.conn
        state = self._state(account)
        seq, floor = state.seq, state.floor
        for jid, it in changes:
            seq += 1
            if it is None:
                c.execute("DELETE FROM roster_items WHERE account = ? AND jid = ?",
                          (account, jid))
            else:
                c.execute(
                    "INSERT INTO roster_items (account, jid, pos, name, subscription, ask,"
                    " groups) VALUES (?, ?, (SELECT coalesce(max(pos), -1) + 1 FROM roster_items"
                    " WHERE account = ?), ?, ?, ?, ?) ON CONFLICT (account, jid) DO UPDATE SET"
                    " name = excluded.name, subscription = excluded.subscription,"
                    " ask = excluded.ask, groups = excluded.groups",
                    (account, jid, account, it.name, it.subscription, it.ask,
                     _groups(it.groups)))
            c.execute("INSERT OR REPLACE INTO roster_changes (account, seq, jid)"
                      " VALUES (?, ?, ?)", (account, seq, jid))
        if changes:
            count = c.execute("SELECT count(*) FROM roster_changes WHERE account = ?",
                              (account,)).fetchone()[0]
            excess = count - max(0, max_changes)
            if excess > 0:
                cut = c.execute(
                    "SELECT max(seq) FROM (SELECT seq FROM roster_changes WHERE account = ?"
                    " ORDER BY seq LIMIT ?)", (account, excess)).fetchone()[0]
                c.execute("DELETE FROM roster_changes WHERE account = ? AND seq <= ?",
                          (account, cut))
                floor = max(floor, int(cut))
            c.execute("UPDATE roster_state SET seq = ?, floor = ? WHERE account = ?",
                      (seq, floor, account))
        return RosterVersion(state.epoch, seq, floor)


def _groups(groups: tuple[str, ...]) -> str:
    return json.dumps(list(groups), ensure_ascii=False)


def _item(row: Sequence[object]) -> RosterItem:
    jid, name, subscription, ask, groups = row
    return RosterItem(str(jid), None if name is None else str(name), str(subscription),
                      None if ask is None else str(ask),
                      tuple(str(g) for g in json.loads(str(groups))))


# ---------------------------------------------------------------------- offline area


class OfflineArea:
    """Messages waiting for their account (``stream_management.on_timeout: store``)."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def offline_put(self, account: str, stanza: bytes, expires_at: float) -> None:
        with self._store.transaction() as c:
            c.execute("INSERT INTO offline_messages (account, stanza, expires_at)"
                      " VALUES (?, ?, ?)", (account, stanza, expires_at))

    def offline_take(self, account: str, now: float,
                     limit: int | None = None) -> list[bytes]:
        """The account's unexpired messages, oldest first (at most ``limit``); they leave
        the store (expired ones of every account are purged on the way)."""
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

    def put(self, account: str, stanzas: Iterable[bytes], expires_at: float) -> None:
        with self._store.transaction() as c:
            c.executemany("INSERT INTO pending_outbound (account, stanza, expires_at)"
                          " VALUES (?, ?, ?)", [(account, s, expires_at) for s in stanzas])

    def take(self, account: str) -> list[tuple[bytes, float]]:
        """The account's stanzas in their original order, with their expiry; they leave."""
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
