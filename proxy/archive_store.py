"""The message archive (XEP-0313) in a SQLite file of its own, and the thread that writes and
queries it off the event loop.

- ``MESSAGES_SCHEMA``: the ``archive`` table, in the archive's own file (``archive_path``:
  beside the store), so its writes never make the journal's commits wait; ``PREFS_SCHEMA``:
  the ``archive_prefs`` table, a migration of ``proxy/store.py``. Every row belongs to one
  account; every index starts with it, so an account's query never reads another's rows,
  and ordering is by ``(ts, seq)``: the time the proxy archived the message, then the order
  it was archived in.
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
import functools
import json
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

# The messages: in a SQLite file of their own (``archive_path``), so that the archive's
# writes never hold the lock the journal's commits (and so the clients' acks) wait for.
MESSAGES_SCHEMA = """
    CREATE TABLE IF NOT EXISTS archive (          -- XEP-0313: the account's messages
        seq        INTEGER PRIMARY KEY AUTOINCREMENT,  -- archiving order (ties of ts)
        account    TEXT NOT NULL,                 -- bare JID: whose archive
        archive_id TEXT NOT NULL,                 -- the stable id (XEP-0359 stanza-id)
        ts         REAL NOT NULL,                 -- wall-clock seconds when archived
        direction  TEXT NOT NULL,                 -- 'in' (received) or 'out' (sent)
        with_bare  TEXT NOT NULL,                 -- the other party, bare
        with_full  TEXT NOT NULL,                 -- the other party as addressed
        stanza     BLOB NOT NULL                  -- the message as XML
    );
    CREATE UNIQUE INDEX IF NOT EXISTS archive_by_id ON archive (account, archive_id);
    CREATE INDEX IF NOT EXISTS archive_by_time ON archive (account, ts, seq);
    CREATE INDEX IF NOT EXISTS archive_by_with ON archive (account, with_bare, ts, seq);
    CREATE INDEX IF NOT EXISTS archive_by_age ON archive (ts);
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


@dataclass(frozen=True, slots=True)
class ArchivedMessage:
    """One message to archive for the session's account (the shell adds the account)."""

    archive_id: str
    timestamp: float
    direction: Direction
    with_bare: str
    with_full: str
    stanza: bytes


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


# ---------------------------------------------------------------------- the SQL


_PUT_BATCH = (
    "INSERT OR IGNORE INTO archive (account, archive_id, ts, direction, with_bare, with_full,"
    " stanza) SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'),"
    " json_extract(value, '$[2]'), json_extract(value, '$[3]'), json_extract(value, '$[4]'),"
    " json_extract(value, '$[5]'), CAST(json_extract(value, '$[6]') AS BLOB)"
    " FROM json_each(?)")


class ArchiveArea:
    """The archive's SQL on one connection (the writer thread's at run time)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def put(self, rows: Sequence[tuple[str, ArchivedMessage]]) -> None:
        """Insert (account, message) rows; the caller holds the transaction. An id already
        in the account's archive is kept (ids never repeat: a replayed put is a no-op)."""
        # One statement for the whole batch (the rows as one JSON array), not one step per
        # row: each step lets go of the GIL and takes it back, and on a busy machine every
        # such hand-over costs the event loop's thread far more than the insert itself.
        self.conn.execute(_PUT_BATCH, (json.dumps(
            [(account, m.archive_id, m.timestamp, m.direction, m.with_bare, m.with_full,
              m.stanza.decode("utf-8")) for account, m in rows]),))

    def _key(self, account: str, archive_id: str) -> tuple[float, int] | None:
        row = self.conn.execute("SELECT ts, seq FROM archive WHERE account = ? AND"
                                " archive_id = ?", (account, archive_id)).fetchone()
        return (float(row[0]), int(row[1])) if row else None

    def search(self, account: str, search: ArchiveSearch) -> ArchivePage | ArchiveMissing:
        f, page = search.filter, search.page
        where = ["account = ?"]
        args: list[Any] = [account]
        if f.with_jid is not None:
            if f.with_bare:
                where.append("with_bare = ?")
                args.append(f.with_jid)
            else:
                where += ["with_bare = ?", "with_full = ?"]
                args += [f.with_jid.partition("/")[0], f.with_jid]
        if f.start is not None:
            where.append("ts >= ?")
            args.append(f.start)
        if f.end is not None:
            where.append("ts <= ?")
            args.append(f.end)
        for name, op in ((f.after_id, ">"), (f.before_id, "<")):
            if name is not None:
                key = self._key(account, name)
                if key is None:
                    return ArchiveMissing(name)
                where.append(f"(ts, seq) {op} (?, ?)")
                args += key
        if f.ids:
            found = {r[0] for r in self.conn.execute(
                f"SELECT archive_id FROM archive WHERE account = ? AND archive_id IN"
                f" ({', '.join('?' * len(f.ids))})", (account, *f.ids))}
            for name in f.ids:
                if name not in found:
                    return ArchiveMissing(name)
            where.append(f"archive_id IN ({', '.join('?' * len(f.ids))})")
            args += f.ids
        base_where, base_args = list(where), list(args)  # the whole result set
        anchor = page.after if page.after is not None else (page.before or None)
        if anchor is not None:
            key = self._key(account, anchor)
            if key is None:
                return ArchiveMissing(anchor)
            where.append(f"(ts, seq) {'<' if page.backward else '>'} (?, ?)")
            args += key
        order = "DESC" if page.backward else "ASC"
        offset = page.index if (page.index is not None and not page.backward
                                and page.after is None) else 0
        limit = max(0, page.max)
        rows = self.conn.execute(
            f"SELECT archive_id, ts, stanza, seq FROM archive WHERE {' AND '.join(where)}"
            f" ORDER BY ts {order}, seq {order} LIMIT ? OFFSET ?",
            (*args, limit + 1, offset)).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        if page.backward:
            rows.reverse()
        items = tuple(ArchiveItem(str(r[0]), float(r[1]), bytes(r[2])) for r in rows)
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
        def one(order: str) -> ArchiveItem | None:
            row = self.conn.execute(
                "SELECT archive_id, ts, stanza FROM archive WHERE account = ?"
                f" ORDER BY ts {order}, seq {order} LIMIT 1", (account,)).fetchone()
            return ArchiveItem(str(row[0]), float(row[1]), bytes(row[2])) if row else None
        return ArchiveEnds(one("ASC"), one("DESC"))

    def count(self, account: str) -> int:
        return int(self.conn.execute("SELECT count(*) FROM archive WHERE account = ?",
                                     (account,)).fetchone()[0])

    def trim(self, account: str, keep: int, *, chunk: int = 5000) -> int:
        """Keep the account's ``keep`` newest messages; returns how many were deleted (at
        most ``chunk``: a long backlog is cut over several transactions)."""
        row = self.conn.execute(
            "SELECT ts, seq FROM archive WHERE account = ? ORDER BY ts DESC, seq DESC"
            " LIMIT 1 OFFSET ?", (account, keep)).fetchone()
        if row is None:
            return 0
        return self.conn.execute(
            "DELETE FROM archive WHERE seq IN (SELECT seq FROM archive WHERE account = ?"
            " AND (ts, seq) <= (?, ?) ORDER BY ts, seq LIMIT ?)",
            (account, row[0], row[1], chunk)).rowcount

    def expire(self, before: float, *, chunk: int = 5000) -> int:
        """Delete messages archived before ``before`` (every account; at most ``chunk``)."""
        return self.conn.execute(
            "DELETE FROM archive WHERE seq IN (SELECT seq FROM archive WHERE ts < ?"
            " ORDER BY ts LIMIT ?)", (before, chunk)).rowcount

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


_Job = list[tuple[str, ArchivedMessage]] | _Query | None

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


def open_archive_connection(path: str) -> sqlite3.Connection:
    """A connection to the archive's own file (made owner-only, schema created if new); an
    in-memory archive for ``:memory:`` (gone at exit)."""
    if path != ":memory:":
        from .store import create_private
        create_private(path)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    if path != ":memory:":
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=5000")
    conn.executescript(MESSAGES_SCHEMA)
    return conn


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
        self._conn = open_archive_connection(path)
        self.area = ArchiveArea(self._conn)
        self._batch: list[tuple[str, ArchivedMessage]] = []
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

    def put(self, account: str, message: ArchivedMessage) -> None:
        self._batch.append((account, message))
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
            rows: list[tuple[str, ArchivedMessage]] = []
            pending: _Job = job
            stop = False
            while isinstance(pending, list):
                rows.extend(pending)
                try:
                    pending = self._queue.get_nowait()
                except queue.Empty:
                    pending = None
                    break
                if pending is None:
                    stop = True
            if rows:
                self._with_retry(functools.partial(self._write, rows))
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
            c.execute("ROLLBACK")
            raise

    def _write(self, rows: list[tuple[str, ArchivedMessage]]) -> None:
        self._transaction(lambda: self.area.put(rows))
        self.written += len(rows)
        self.commits += 1
        self._enforce_limits(rows)

    def _enforce_limits(self, rows: list[tuple[str, ArchivedMessage]]) -> None:
        r = self.retention
        if r.max_per_account is not None:
            for account, _ in rows:
                self._since_check[account] = self._since_check.get(account, 0) + 1
            due = [a for a, n in self._since_check.items() if n >= r.check_every]
            for account in due:
                del self._since_check[account]
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
