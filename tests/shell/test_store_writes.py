"""Blocks and push registrations through the real proxy, in process: written by the store's
writer thread (never on the event loop), answered only once that thread committed them (or
with an error when it cannot), kept across a graceful restart (the stop commits what the
writer holds), and a store a crash left unclosed is reported at the next start."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from proxy.store import Store

from .playbook import inserts_refused, Client, Harness, playbook, run_bounded
from .xmlpeer import error_condition, q

BLOCKING = "urn:xmpp:blocking"
PUSH = "urn:xmpp:push:0"


@playbook()
async def test_a_block_and_a_push_registration_survive_a_graceful_restart(h: Harness) -> None:
    alice = await h.client("alice")
    block = alice.iq(f"<block xmlns='{BLOCKING}'><item jid='romeo@localhost'/></block>",
                     type="set")
    await alice.expect(kind="iq", id=block, type="result")
    enable = alice.iq(f"<enable xmlns='{PUSH}' jid='push.example' node='N1'/>", type="set")
    await alice.expect(kind="iq", id=enable, type="result")
    assert h.proxy is not None
    writer = h.proxy.store.writer
    assert writer.submitted >= 2  # handed to the writer, not written on the loop
    await h.restart_proxy()
    again = await h.client("alice", resource="laptop")
    asked = again.iq(f"<blocklist xmlns='{BLOCKING}'/>")
    answer = await again.expect(kind="iq", id=asked, type="result")
    assert [i.get("jid") for i in answer.iter(q(BLOCKING, "item"))] == ["romeo@localhost"]
    assert h.proxy is not None
    (registration,) = h.proxy.store.push.registrations("alice@localhost")
    assert (registration.jid, registration.node) == ("push.example", "N1")


def test_a_store_left_unclosed_by_a_crash_is_reported_at_start(
        shell_certs: tuple[Path, Path]) -> None:
    async def main() -> None:
        harness = Harness(*shell_certs)
        crashed = Store(str(harness.workdir / "store.sqlite3"))
        crashed.blocklist.add("alice@localhost", ["romeo@localhost"])
        crashed.writer.flush()  # committed; then the process "dies": no close()
        crashed.writer.close()
        crashed.conn.close()  # without the clean-stop mark Store.close would set
        async with harness as h:
            event = await h.logged("store_unclean_start")
            assert event["level"] == "warning"
            alice = await h.client("alice")
            asked = alice.iq(f"<blocklist xmlns='{BLOCKING}'/>")
            answer = await alice.expect(kind="iq", id=asked, type="result")
            assert [i.get("jid") for i in answer.iter(q(BLOCKING, "item"))] == [
                "romeo@localhost"]
        clean = Harness(*shell_certs)
        async with clean as h:  # a new store: nothing to report
            await h.client("alice")
            assert h.events("store_unclean_start") == []
    run_bounded(main(), 8)


@contextmanager
def store_locked(h: Harness) -> Iterator[None]:
    """Another connection holds the store's write lock: the writer's commit waits for it
    (SQLite's busy wait, well within its 5 s), as it would behind a slow disk."""
    blocker = sqlite3.connect(str(h.workdir / "store.sqlite3"), isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()


async def not_yet(client: Client, iq_id: str) -> None:
    with pytest.raises(AssertionError):
        await client.expect(kind="iq", id=iq_id, timeout=0.3)


async def committed(h: Harness, timeout: float = 4.0) -> None:
    assert h.proxy is not None
    writer = h.proxy.store.writer
    for _ in range(int(timeout / 0.02)):
        if writer.committed == writer.submitted:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the store's writer did not commit")


@playbook()
async def test_a_blocks_result_and_pushes_wait_for_the_writers_commit(h: Harness) -> None:
    alice = await h.client("alice")
    laptop = await h.client("alice", resource="laptop")
    asked = laptop.iq(f"<blocklist xmlns='{BLOCKING}'/>")  # laptop wants the pushes
    await laptop.expect(kind="iq", id=asked, type="result")
    with store_locked(h):
        block = alice.iq(f"<block xmlns='{BLOCKING}'><item jid='romeo@localhost'/></block>",
                         type="set")
        # The session goes on meanwhile (only the reply waits): a later message reaches
        # the server, and the block is in force (a message to romeo is refused).
        alice.message("bob@localhost", "after the block")
        await h.server.expect_stanza(kind="message", body="after the block")
        alice.message("romeo@localhost", "blocked")
        refused = await alice.expect(kind="message", type="error", timeout=2.0)
        assert error_condition(refused) == "not-acceptable"
        await not_yet(alice, block)
        assert not [el for el in laptop.backlog if el.find(q(BLOCKING, "block")) is not None]
        assert h.proxy is not None
        assert h.proxy.store.writer.committed < h.proxy.store.writer.submitted
    # The lock is gone: the writer commits, then the result and the pushes go out.
    await alice.expect(kind="iq", id=block, type="result", timeout=3.0)
    push = await laptop.expect(kind="iq", type="set", child=q(BLOCKING, "block"), timeout=2.0)
    assert [i.get("jid") for i in push.iter(q(BLOCKING, "item"))] == ["romeo@localhost"]
    with sqlite3.connect(str(h.workdir / "store.sqlite3")) as other:  # on disk by then
        assert other.execute("SELECT jid FROM blocklist").fetchall() == [("romeo@localhost",)]


@playbook()
async def test_a_push_registrations_result_waits_for_the_writers_commit(h: Harness) -> None:
    alice = await h.client("alice")
    with store_locked(h):
        enable = alice.iq(f"<enable xmlns='{PUSH}' jid='push.example' node='N1'/>",
                          type="set")
        await not_yet(alice, enable)
    await alice.expect(kind="iq", id=enable, type="result", timeout=3.0)
    with sqlite3.connect(str(h.workdir / "store.sqlite3")) as other:
        assert other.execute("SELECT jid, node FROM push_registrations").fetchall() == [
            ("push.example", "N1")]


@playbook(timeout=12.0)
async def test_a_block_the_store_cannot_write_is_answered_with_an_error(h: Harness) -> None:
    alice = await h.client("alice")
    laptop = await h.client("alice", resource="laptop")
    asked = laptop.iq(f"<blocklist xmlns='{BLOCKING}'/>")
    await laptop.expect(kind="iq", id=asked, type="result")
    with inserts_refused(h, "blocklist"):
        block = alice.iq(f"<block xmlns='{BLOCKING}'><item jid='romeo@localhost'/></block>",
                         type="set")
        error = await alice.expect(kind="iq", id=block, type="error", timeout=3.0)
        assert error_condition(error) == "internal-server-error"
        assert error.find(q("jabber:client", "error")).get("type") == "wait"
        event = await h.logged("blocklist_not_stored")
        assert event["level"] == "error" and event["action"] == "block"
        assert "refused by the test" in event["error"] and event["account"] == "alice@localhost"
        assert h.events("store_write_failed")
        assert not [el for el in laptop.backlog if el.find(q(BLOCKING, "block")) is not None]
    # The store is back: the writer's retry commits it; the client's retry is answered.
    await committed(h)
    again = alice.iq(f"<block xmlns='{BLOCKING}'><item jid='romeo@localhost'/></block>",
                     type="set")
    await alice.expect(kind="iq", id=again, type="result", timeout=2.0)
    with sqlite3.connect(str(h.workdir / "store.sqlite3")) as other:
        assert other.execute("SELECT jid FROM blocklist").fetchall() == [("romeo@localhost",)]
