"""Losses and leaks found by the in-process harness: each case asserts the right behaviour.
They were strict xfails naming the bug until the ledger work (issue 10) fixed them.

Most are issue 10's "nothing acknowledged is ever lost"; each case asserts the correct
outcome, bounded by what a fixed proxy would need with the harness's fast timings.
"""

from __future__ import annotations

import pytest

from tests.peers.faultrelay import FaultRelay
from tests.peers.rawclient import RawAuthError, RawProtocolError
from tests.peers.util import LOCALHOST

from .playbook import Harness, playbook
from .xmlpeer import NS_CLIENT, NS_DELAY, NS_SM, NS_STANZAS, q

BOB = "bob@localhost/desk"


@playbook()
async def test_stop_during_reconnect_leaves_no_upstream_behind(h: Harness) -> None:
    alice = await h.client("alice", sm=True)
    asked = alice.iq("<query xmlns='jabber:iq:version'/>", to=BOB)
    await h.server.expect_stanza(kind="iq", id=asked)
    await h.confirmed(alice)
    await h.server.cut()
    await alice.expect(kind="iq", id=asked)  # the outage was noticed: reconnecting now
    assert h.proxy is not None
    await h.proxy.stop()
    binds = len(h.server.binds)
    await h.server.come_back()
    # A stopped proxy logs nobody in again.
    with pytest.raises(AssertionError, match="timed out"):
        await h.server.expect_bind(after=binds, timeout=0.3)


@playbook()
async def test_clean_close_while_server_down_still_delivers(h: Harness) -> None:
    alice = await h.client("alice", sm=True)
    await h.server.cut()
    alice.message("bob@localhost", "1")
    alice.message("bob@localhost", "2")
    assert await alice.request_ack() == 2  # the proxy took responsibility for both
    await alice.close()

    await h.server.come_back()  # well within max_outage; a reconnect takes milliseconds
    await h.server.expect_stanza(kind="message", body="1", timeout=0.6)
    await h.server.expect_stanza(kind="message", body="2")
    assert h.server.bodies() == ["1", "2"]


@playbook(upstream={"ping_idle": 0.2, "ping_timeout": 0.2})
async def test_clean_close_on_a_silently_dead_link_still_delivers(h: Harness) -> None:
    alice = await h.client("alice", sm=True)
    await h.server.blackhole()
    alice.message("bob@localhost", "last words")
    assert await alice.request_ack() == 1
    await alice.close()
    await h.server.come_back()
    # A dead link is noticed within ping_idle + ping_timeout; then a reconnect replays.
    await h.server.expect_stanza(kind="message", body="last words", timeout=1.5)


@playbook(timeout=10.0)
async def test_hibernation_expiring_while_server_down_still_delivers(h: Harness) -> None:
    alice = await h.client("alice", sm=True, max=1)
    await h.server.cut()
    alice.message("bob@localhost", "1")
    assert await alice.request_ack() == 1
    alice.cut()
    # Only the log can show the timer: no peer is connected to the proxy meanwhile.
    await h.logged("session_ended", timeout=2.5)

    await h.server.come_back()  # well within max_outage; a reconnect takes milliseconds
    await h.server.expect_stanza(kind="message", body="1", timeout=0.6)


@playbook(reconnect={"max_outage": 0.3})
async def test_give_up_while_hibernating_keeps_the_bounces(h: Harness) -> None:
    alice = await h.client("alice", sm=True)
    await h.server.cut()
    sent = alice.message("bob@localhost", "1")
    assert await alice.request_ack() == 1
    alice.cut()
    await h.logged("upstream_gave_up", timeout=1.5)

    await h.server.come_back()
    again = await h.client("alice", resource="laptop")
    again.presence()  # stored messages follow the initial presence
    back = await again.expect(kind="message", id=sent, type="error", timeout=0.6)
    assert back.find(f"{q(NS_CLIENT, 'error')}/{q(NS_STANZAS, 'remote-server-timeout')}") \
        is not None


@playbook()
async def test_graceful_restart_while_server_down_keeps_held_messages(h: Harness) -> None:
    alice = await h.client("alice", sm=True)
    await h.server.cut()
    alice.message("bob@localhost", "held", id="held")
    assert await alice.request_ack() == 1
    await h.restart_proxy()
    await h.server.come_back()

    again = await h.client("alice", resource="laptop")
    conn = h.server.connection_of(again.jid)
    # Sent upstream on the account's next login (or else bounced to it).
    await h.server.expect_stanza(kind="message", id="held", timeout=0.6,
                                 where=lambda el: el in conn.received)


@playbook()
async def test_resume_during_an_outage(h: Harness) -> None:
    alice = await h.client("alice", sm=True)
    await h.server.cut()
    alice.message("bob@localhost", "1")
    assert await alice.request_ack() == 1
    alice.cut()
    again, resumed = await h.resume(alice)
    assert resumed.tag == q(NS_SM, "resumed")
    await h.server.come_back()
    await h.server.expect_stanza(kind="message", body="1")
    h.server.push_message(again.jid, "welcome back", frm=BOB)
    await again.expect_message("welcome back")


@playbook(timeout=10.0, stream_management={"ack_timeout": 0.2})
async def test_dead_client_link_hibernates_then_ends(h: Harness) -> None:
    with FaultRelay(LOCALHOST, h.port) as relay:
        alice = await h.client("alice", sm=True, max=1, port=relay.port)
        relay.blackhole()
        h.server.push_message(alice.jid, "1", frm=BOB, id="kept")  # then an unanswered <r/>
        # ack_timeout, then max: the session ends and logs out of the server.
        await h.server.wait_open_connections(0, timeout=1.6)

    # ... and the message was stored, not lost.
    again = await h.client("alice", resource="laptop")
    again.presence()
    stored = await again.expect_message("1", timeout=1.0)
    assert stored.find(q(NS_DELAY, "delay")) is not None


@playbook()
async def test_stanza_the_server_sends_while_closing_is_not_lost(h: Harness) -> None:
    h.server.before_close.append(
        f"<message from='{BOB}' to='{{to}}' type='chat' id='late'><body>late</body></message>")
    alice = await h.client("alice", sm=True)
    await alice.close()  # the session ends: the proxy closes its upstream stream
    await h.server.wait_open_connections(0)

    again = await h.client("alice", resource="laptop")
    again.presence()  # stored messages follow the initial presence
    await again.expect(kind="message", id="late", timeout=0.6)


@playbook()
async def test_during_an_outage_only_the_live_sessions_password_logs_in(h: Harness) -> None:
    alice = await h.client("alice", sm=True)
    await h.server.cut()
    try:
        await h.login("alice", password="not-the-password")
        raise AssertionError("a wrong password logged in while the server was away")
    except RawAuthError as exc:
        assert exc.condition == "temporary-auth-failure"
    try:
        await h.login("carol")  # no live session vouches for carol
        raise AssertionError("an unknown account logged in while the server was away")
    except RawAuthError as exc:
        assert exc.condition == "temporary-auth-failure"
    # The right password logs in, but a new resource cannot be bound without the server.
    other = await h.login("alice")
    try:
        await other.raw.bind("tablet", timeout=2.0)
        raise AssertionError("bound a resource while the server was away")
    except RawProtocolError as exc:
        assert "remote-server-timeout" in str(exc)
    alice.message("bob@localhost", "still here")
    assert await alice.request_ack() == 1


@playbook()
async def test_a_new_session_of_the_resource_takes_over_what_a_finishing_one_owes(
        h: Harness) -> None:
    alice = await h.client("alice", sm=True)
    h.server.answer_pings = False  # the server takes it but confirms nothing
    alice.message("bob@localhost", "owed")
    assert await alice.request_ack() == 1
    await alice.close()  # the session ends; its upstream side is still finishing
    await h.logged("upstream_finishing")
    h.server.answer_pings = True
    again = await h.client("alice", resource="phone")  # the same resource, at once
    again.message("bob@localhost", "new")
    # What the old session owed goes first, on the new connection, then the new message;
    # the two upstream streams never held the resource at once (no conflict, no kick).
    new_conn = await h.server.expect_bind("phone", after=1)
    owed = await h.server.expect_stanza(kind="message", body="owed",
                                        where=lambda el: el in new_conn.received)
    fresh = await h.server.expect_stanza(kind="message", body="new")
    assert new_conn.received.index(owed) < new_conn.received.index(fresh)
    assert not again.closed
