"""Offline messages are written by the store's writer thread, off the event loop, and the
journal forgets a stored stanza only once the store has committed it (docs/durability.md):
a crash between the two must never lose it."""

from __future__ import annotations

import asyncio
import sqlite3

from .playbook import inserts_refused, Harness, playbook

BOB = "bob@localhost/desk"


def rows(h: Harness, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(str(h.workdir / "store.sqlite3"), isolation_level=None) as other:
        return other.execute(sql).fetchall()


def journaled_s2c(h: Harness) -> int:
    """Server stanzas the journal still holds (not cut) for the sessions of the store."""
    held = rows(h, "SELECT j.first_n, j.last_n, coalesce(c.left_n, 0) FROM ledger_journal j"
                   " LEFT JOIN ledger_cuts c ON c.session = j.session AND c.lane = j.lane"
                   " WHERE j.lane = 's2c'")
    return sum(max(0, int(last) + 1 - max(int(first), int(cut)))  # type: ignore[call-overload]
               for first, last, cut in held)


async def until(condition: object, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():  # type: ignore[operator]
        if loop.time() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.02)


@playbook(timeout=20.0)
async def test_the_journal_keeps_a_stored_message_until_the_store_committed_it(
        h: Harness) -> None:
    alice = await h.client("alice", sm=True, auto_ack=False)
    h.server.push_message(alice.jid, "kept", frm=BOB, id="kept")
    await alice.expect(kind="message", id="kept")  # written, never acknowledged
    await until(lambda: journaled_s2c(h) == 1, 3.0)
    with inserts_refused(h, "offline_messages"):
        await alice.close()  # the session ends: the message goes to the offline store
        await h.logged("session_ended", timeout=2.0)
        await h.logged("store_write_failed", timeout=3.0)
        # The session and the loop went on (the proxy answers a new login meanwhile) ...
        other = await h.client("bob", resource="pc")
        other.presence()
        # ... and the journal had every chance to commit a cut: it did not.
        await asyncio.sleep(0.5)
        assert rows(h, "SELECT count(*) FROM offline_messages") == [(0,)]
        assert journaled_s2c(h) == 1
    # The writer's retry commits it; only then does the journal let it go.
    await until(lambda: rows(h, "SELECT count(*) FROM offline_messages") == [(1,)], 5.0)
    await until(lambda: journaled_s2c(h) == 0, 3.0)
    again = await h.client("alice", resource="laptop")
    again.presence()  # stored messages follow the initial presence
    await again.expect(kind="message", id="kept", timeout=2.0)
    assert h.proxy is not None
    await h.proxy.stop()  # a graceful stop's recovery finds nothing more to store
    h.proxy = None
    assert rows(h, "SELECT count(*) FROM offline_messages") == [(0,)]
    assert [e for e in h.events("journal_recovered") if e.get("stored")] == []
