"""Blocks and push registrations through the real proxy, in process: written by the store's
writer thread (never on the event loop), kept across a graceful restart (the stop commits
what the writer holds), and a store a crash left unclosed is reported at the next start."""

from __future__ import annotations

from pathlib import Path

from proxy.store import Store

from .playbook import Harness, playbook, run_bounded
from .xmlpeer import q

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
