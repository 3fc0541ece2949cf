"""The journal: a crash-proof copy of every session's ledger, in the store's SQLite file.

``durability: {mode: journal}``. Each stanza that enters a ledger lane is written here
(``put``) and each run of stanzas that leaves it is deleted (``cut``: a lane is first in, first
out, so "everything below number N" names them). Writes are collected per turn of the event
loop and committed as one transaction on the journal's own thread and connection, so the loop
never waits for the disk. An acknowledgement to a client waits for the commit that covers
what it acknowledges (``when_durable``): an ack means durable.

After a crash (or a graceful stop) :func:`recover` settles what the journal holds exactly as
a session's end would: server stanzas into the offline store, client stanzas into the pending
queue for the server. Puts and cuts of the same batch cancel out before they reach the disk,
so a stanza that is confirmed within one turn costs nothing.
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lxml import etree

from .batching import take_queued
from .features.stream_management import delay_stamp
from .session import OWN_ID_PREFIX
from .xmpp import ns
from .xmpp import stanza as st

RETRY_SECONDS = 1.0  # after a failed commit (disk full, locked): the batch is tried again

# Presence types that carry a subscription decision: they must reach the server (RFC 6121
# §3); every other presence is state that the next session sends afresh.
SUBSCRIPTION_PRESENCE = frozenset(("subscribe", "subscribed", "unsubscribe", "unsubscribed"))

Key = tuple[str, str]  # (session, lane)

# A worker's journal in a file of its own (``workers: N``): the store's ledger tables
# (migration 3), so a worker's commits never wait for another's.
JOURNAL_TABLES = """
    CREATE TABLE IF NOT EXISTS ledger_journal (
        session TEXT NOT NULL, lane TEXT NOT NULL, first_n INTEGER NOT NULL,
        last_n INTEGER NOT NULL, account TEXT NOT NULL, queued_at REAL NOT NULL,
        stanzas BLOB NOT NULL, PRIMARY KEY (session, lane, first_n)) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS ledger_cuts (
        session TEXT NOT NULL, lane TEXT NOT NULL, left_n INTEGER NOT NULL,
        PRIMARY KEY (session, lane)) WITHOUT ROWID;
"""


def create_journal_file(path: str) -> None:
    """A worker's own journal file with its two tables (kept if it exists)."""
    from .store import create_private

    create_private(path)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(JOURNAL_TABLES)
    finally:
        conn.close()


def origin_id_template() -> st.Element:
    """An empty ``<origin-id xmlns="urn:xmpp:sid:0"/>`` for ``ensure_origin_id`` to copy
    into each journaled client message (``Journal.origin_id``: one per proxy, never changed
    itself)."""
    return st.element("origin-id", namespace=ns.SID)


@dataclass
class _Batch:
    puts: dict[Key, list[tuple[int, str, bytes, float]]] = field(
        default_factory=lambda: defaultdict(list))
    cuts: dict[Key, int] = field(default_factory=dict)
    drops: set[str] = field(default_factory=set)  # sessions whose ledger is settled for good
    waiters: list[Callable[[], None]] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.puts and not self.cuts and not self.drops


class Journal:
    def __init__(self, path: str, *, synchronous: str = "NORMAL", log: Any = None) -> None:
        self.path = path
        self.log = log
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        if path != ":memory:":
            self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute(f"PRAGMA synchronous={synchronous}")
        self._conn.execute("PRAGMA busy_timeout=5000")
        self._batch = _Batch()
        self._scheduled = False
        self._in_flight = 0
        self._queue: queue.Queue[_Batch | None] = queue.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name="xmpp-front-journal",
                                        daemon=True)
        self._thread.start()
        self.commits = 0
        self.rows_written = 0
        self.origin_id = origin_id_template()  # copied, never changed (ensure_origin_id)

    # On the event loop ---------------------------------------------------------------------------

    def put(self, session: str, lane: str, n: int, account: str, stanza: bytes,
            queued_at: float) -> None:
        self._batch.puts[(session, lane)].append((n, account, stanza, queued_at))
        if not self._scheduled:  # once per turn (a call per stanza saved: the relay path)
            self._schedule()

    def cut(self, session: str, lane: str, left: int) -> None:
        """Every stanza of the lane numbered below ``left`` has left the ledger."""
        key = (session, lane)
        if self._batch.cuts.get(key, -1) < left:
            self._batch.cuts[key] = left
            self._schedule()

    def drop(self, session: str) -> None:
        """The session's ledger is empty and the session gone: forget it."""
        self._batch.drops.add(session)
        self._schedule()

    def when_durable(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` on the loop once everything journaled so far is committed."""
        if self._batch.empty and not self._in_flight:
            callback()
            return
        self._batch.waiters.append(callback)
        self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self._loop = asyncio.get_running_loop()
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Hand the current batch to the writer thread (also an empty one with waiters: the
        thread works in order, so its commit comes after every earlier one)."""
        self._scheduled = False
        batch, self._batch = self._batch, _Batch()
        if batch.empty and not batch.waiters:
            return
        self._in_flight += 1
        self._queue.put(batch)

    def _done(self, batch: _Batch) -> None:
        self._in_flight -= 1
        for callback in batch.waiters:
            callback()

    async def close(self) -> None:
        """Commit what is queued, stop the thread, close the connection."""
        self.flush()
        self._queue.put(None)
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
        self._conn.close()

    # On the writer thread ------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            batch = self._queue.get()
            if batch is None:
                return
            # What queued up meanwhile goes into the same transaction: one commit (one
            # fsync with ``fsync: full``) however far the disk fell behind.
            batches, stop = take_queued(self._queue, batch)
            merged = _merge(batches)
            while True:
                try:
                    self._write(merged)
                    break
                except sqlite3.Error as exc:
                    if self.log is not None:
                        self.log.error("journal_write_failed", error=str(exc),
                                       retry_seconds=RETRY_SECONDS)
                    time.sleep(RETRY_SECONDS)
            self.commits += 1
            if self._loop is not None and not self._loop.is_closed():
                for done in batches:
                    try:
                        self._loop.call_soon_threadsafe(self._done, done)
                    except RuntimeError:  # the loop closed meanwhile: nobody is waiting
                        break
            if stop:
                return

    def _write(self, batch: _Batch) -> None:
        """One transaction; a few rows however many stanzas: per lane, one row holding the
        new stanzas (numbers first_n..last_n) and the furthest cut."""
        rows: list[tuple[str, str, int, int, str, float, bytes]] = []
        written = 0
        for (session, lane), puts in batch.puts.items():
            cut = batch.cuts.get((session, lane), -1)
            # A lane's stanzas enter in order and a cut removes a prefix: what is left of
            # this batch's puts is consecutive.
            kept = [p for p in puts if p[0] >= cut]
            if kept:
                rows.append((session, lane, kept[0][0], kept[-1][0], kept[0][1], kept[0][3],
                             b"\0".join(p[2] for p in kept)))
                written += len(kept)
        c = self._conn
        c.execute("BEGIN IMMEDIATE")
        try:
            if batch.cuts:
                cuts = [(s, lane, left) for (s, lane), left in batch.cuts.items()]
                c.executemany("INSERT INTO ledger_cuts (session, lane, left_n) VALUES (?, ?, ?)"
                              " ON CONFLICT (session, lane) DO UPDATE SET"
                              " left_n = max(left_n, excluded.left_n)", cuts)
                c.executemany("DELETE FROM ledger_journal WHERE session = ? AND lane = ?"
                              " AND last_n < ?", cuts)
            if rows:
                c.executemany("INSERT OR REPLACE INTO ledger_journal (session, lane, first_n,"
                              " last_n, account, queued_at, stanzas) VALUES"
                              " (?, ?, ?, ?, ?, ?, ?)", rows)
            if batch.drops:
                gone = [(session,) for session in batch.drops]
                c.executemany("DELETE FROM ledger_journal WHERE session = ?", gone)
                c.executemany("DELETE FROM ledger_cuts WHERE session = ?", gone)
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise
        self.rows_written += written


def _merge(batches: list[_Batch]) -> _Batch:
    """Several batches as one (puts in order, the furthest cut per lane); waiters are the
    callers' to call per batch."""
    if len(batches) == 1:
        return batches[0]
    merged = _Batch()
    for batch in batches:
        for key, puts in batch.puts.items():
            merged.puts[key].extend(puts)
        for key, left in batch.cuts.items():
            merged.cuts[key] = max(left, merged.cuts.get(key, -1))
        merged.drops |= batch.drops
    return merged


# Settling: where held stanzas go when their session cannot deliver them --------------------------


def replayable(el: st.Element) -> bool:
    """Is a client stanza worth sending to the server at the account's next login?"""
    if el.get("id", "").startswith(OWN_ID_PREFIX):
        return False  # the proxy's own request, made for a session that is gone
    kind = st.kind(el)
    if kind == "message":
        return True
    if kind == "presence":
        return el.get("type") in SUBSCRIPTION_PRESENCE
    return False  # an iq belongs to its session: nobody would read the answer


def storable(el: st.Element) -> bool:
    """Is a server stanza for the client worth keeping for the account's next login?"""
    kind = st.kind(el)
    if kind == "message":
        return True  # errors too: they tell the sender what became of its message
    return kind == "presence" and el.get("type") in SUBSCRIPTION_PRESENCE


_SAFE_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)


def parse_stored(data: bytes) -> st.Element:
    """A stanza the proxy serialized itself, parsed back with nothing expanded."""
    return etree.fromstring(data, _SAFE_PARSER)


def recover(store: Any, *, now: float, stored_ttl: float, domain: str,
            log: Any = None, journal_path: str | None = None) -> dict[str, int]:
    """Settle every ledger left in the journal (after a crash or a graceful stop): server
    stanzas for a client into the offline store (messages stamped with ``<delay/>`` from the
    account's domain; ``domain`` for an account without one), client
    stanzas into the pending queue for the server; the rest is discarded, counted.

    ``journal_path``: a worker's journal file instead of the store's own tables. The store's
    commit comes first, the journal's emptying second: a crash between them settles the
    same stanzas twice (a duplicate the client's dedupe may catch), never none."""
    if journal_path is not None:
        conn = sqlite3.connect(journal_path, isolation_level=None)
        conn.execute("PRAGMA busy_timeout=5000")
        try:
            counts = _recover_from(conn, store, now=now, stored_ttl=stored_ttl,
                                   domain=domain, log=log, same_file=False)
        finally:
            conn.close()
        return counts
    return _recover_from(store.conn, store, now=now, stored_ttl=stored_ttl, domain=domain,
                         log=log, same_file=True)


def _recover_from(conn: sqlite3.Connection, store: Any, *, now: float, stored_ttl: float,
                  domain: str, log: Any, same_file: bool) -> dict[str, int]:
    cuts = {(session, lane): int(left) for session, lane, left in
            conn.execute("SELECT session, lane, left_n FROM ledger_cuts").fetchall()}
    rows = conn.execute("SELECT session, lane, first_n, account, queued_at, stanzas"
                        " FROM ledger_journal ORDER BY account, queued_at, session, lane,"
                        " first_n").fetchall()
    counts = {"sessions": len({r[0] for r in rows}), "stored": 0, "pending": 0,
              "discarded": 0}
    if not rows and not cuts:
        return counts
    with store.transaction() as c:
        for session, lane, first_n, account, queued_at, blob in rows:
            left = cuts.get((session, lane), 0)
            for offset, data in enumerate(bytes(blob).split(b"\0")):
                if first_n + offset < left:
                    continue  # it had left the ledger; only its row's deletion was pending
                try:
                    el = parse_stored(data)
                except etree.XMLSyntaxError:
                    counts["discarded"] += 1
                    continue
                if lane == "s2c" and storable(el):
                    # The account's own domain stamps it (several may be served).
                    delay_stamp(el, float(queued_at), account.rpartition("@")[2] or domain)
                    c.execute("INSERT INTO offline_messages (account, stanza, expires_at)"
                              " VALUES (?, ?, ?)", (account, etree.tostring(el),
                                                    now + stored_ttl))
                    counts["stored"] += 1
                elif lane == "c2s" and replayable(el):
                    c.execute("INSERT INTO pending_outbound (account, stanza, expires_at)"
                              " VALUES (?, ?, ?)", (account, data, now + stored_ttl))
                    counts["pending"] += 1
                else:
                    counts["discarded"] += 1
        if same_file:
            c.execute("DELETE FROM ledger_journal")
            c.execute("DELETE FROM ledger_cuts")
    if not same_file:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("DELETE FROM ledger_journal")
        conn.execute("DELETE FROM ledger_cuts")
        conn.execute("COMMIT")
    if not rows:
        return counts
    if log is not None:
        log.info("journal_recovered", **counts)
    return counts
