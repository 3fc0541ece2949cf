"""The legacy server goes away under a live session, in process: hold, restore, replay,
give up; and what must not be lost on the way."""

from __future__ import annotations

import pytest

from .playbook import Harness, playbook
from .scripted_server import ScriptedServer
from .xmlpeer import NS_CLIENT, NS_DELAY, NS_PING, NS_SM, NS_STANZAS, kind, q

BOB = "bob@localhost/desk"


def bodies_on(server: ScriptedServer, conn_index: int) -> list[str]:
    conn = server.conns[conn_index]
    return server.bodies(conn=conn)


@playbook()
async def test_outage_holds_then_restores_and_replays_in_order(h: Harness) -> None:
    alice = await h.client("alice", sm=True)
    alice.presence(show="chat")
    alice.message("bob@localhost", "0")
    await h.server.expect_stanza(kind="message", body="0")
    await h.confirmed(alice)

    await h.server.cut()  # crash: connections aborted, new ones refused
    for n in ("1", "2", "3"):
        alice.message("bob@localhost", n)
    # Accepted, counted and acknowledged while the server is away.
    assert await alice.request_ack() == alice.sent
    # A ping to the server's domain is answered by the proxy meanwhile.
    ping = alice.iq(f"<ping xmlns='{NS_PING}'/>", to="localhost")
    pong = await alice.expect(kind="iq", id=ping)
    assert pong.get("type") == "result"
    # Another request waits for the server (held like the messages, answered after).
    asked = alice.iq("<query xmlns='jabber:iq:version'/>", to="localhost")

    await h.server.come_back()
    alice.message("bob@localhost", "4")  # new traffic, maybe during the restore
    conn = await h.server.expect_bind("phone", after=1)
    assert conn.jid == alice.jid  # the same resource bound again
    await h.server.expect_stanza(kind="message", body="4", timeout=2)

    # On the new stream: presence restored first, then the held stanzas in their order,
    # then the new one. Across both streams: each message exactly once.
    after_bind = conn.received[1:]
    assert kind(after_bind[0]) == "presence" and after_bind[0].findtext(
        q(NS_CLIENT, "show")) == "chat"
    assert bodies_on(h.server, conn.index) == ["1", "2", "3", "4"]
    assert h.server.bodies(to="bob@localhost") == ["0", "1", "2", "3", "4"]
    assert all(m.get("from") == alice.jid for m in h.server.messages())

    answer = await alice.expect(kind="iq", id=asked)  # the server's own answer
    assert answer.get("type") == "error" and answer.find(
        f"{q(NS_CLIENT, 'error')}/{q(NS_STANZAS, 'service-unavailable')}") is not None

    # The client never noticed: same stream, relay both ways goes on.
    h.server.push_message(alice.jid, "back", frm=BOB)
    await alice.expect_message("back")
    assert not alice.closed


@playbook(server_sm=True)
async def test_outage_with_server_acks_replays_only_what_was_not_acked(h: Harness) -> None:
    alice = await h.client("alice", sm=True)
    conn = await h.server.expect_bind("phone")
    alice.message("bob@localhost", "0")
    await h.server.expect_nonza("r", conn=conn)  # answered with <a h/> at once
    marker = h.server.push_message(alice.jid, "marker", frm=BOB)
    await alice.expect(kind="message", id=marker)  # so the proxy has read that <a/>
    h.server.sm_acks = False
    alice.message("bob@localhost", "1")  # handled by the server, never acknowledged
    await h.server.expect_stanza(kind="message", body="1")
    await h.server.cut()
    alice.message("bob@localhost", "2")
    assert await alice.request_ack() == 3
    h.server.sm_acks = True
    await h.server.come_back()

    again = await h.server.expect_bind("phone", after=1)
    await h.server.expect_stanza(kind="message", body="2")
    # "0" was acknowledged by the server: not sent again; "1" was not: replayed, in order.
    assert bodies_on(h.server, again.index) == ["1", "2"]
    assert h.server.bodies() == ["0", "1", "1", "2"]


@playbook(upstream={"ping_idle": 0.2, "ping_timeout": 0.2})
async def test_blackholed_server_is_noticed_by_ping_and_replayed(h: Harness) -> None:
    alice = await h.client("alice", sm=True)
    old = await h.server.expect_bind("phone")
    await h.server.blackhole()  # no FIN, no RST: the link just goes quiet
    alice.message("bob@localhost", "lost in the void")
    # Noticed within ping_idle + ping_timeout: the proxy drops the dead link itself.
    await h.server.wait_open_connections(0, timeout=1.5)
    assert old.closed and not old.received[1:]  # nothing reached the server through it

    await h.server.come_back()
    conn = await h.server.expect_bind("phone", after=1)
    await h.server.expect_stanza(kind="message", body="lost in the void")
    assert bodies_on(h.server, conn.index) == ["lost in the void"]


@playbook()
async def test_confirmed_but_unanswered_iq_gets_an_error_on_outage(h: Harness) -> None:
    alice = await h.client("alice", sm=True)
    # An iq for another entity: the server takes it (the barrier confirms) but the answer
    # never comes before the crash.
    asked = alice.iq("<query xmlns='jabber:iq:version'/>", to=BOB)
    await h.server.expect_stanza(kind="iq", id=asked)
    await h.confirmed(alice)
    await h.server.cut()
    error = await alice.expect(kind="iq", id=asked)
    assert error.get("type") == "error"
    assert error.find(f"{q(NS_CLIENT, 'error')}/{q(NS_STANZAS, 'remote-server-timeout')}") \
        is not None
    assert error.find(q(NS_CLIENT, "error")).get("type") == "wait"

    # It was confirmed, so it is not replayed after the restore: the server saw it once.
    await h.server.come_back()
    await h.server.expect_bind("phone", after=1)
    alice.message("bob@localhost", "after")
    await h.server.expect_stanza(kind="message", body="after")
    assert len([r for r in h.server.log if r.stanza.get("id") == asked]) == 1


@playbook(reconnect={"max_outage": 0.3})
async def test_give_up_after_max_outage_bounces_unconfirmed(h: Harness) -> None:
    alice = await h.client("alice", sm=True)
    await h.server.cut()
    one = alice.message("bob@localhost", "1")
    two = alice.message("bob@localhost", "2")
    asked = alice.iq("<query xmlns='jabber:iq:version'/>", to="localhost")
    assert await alice.request_ack() == 3

    # Past max_outage: every unconfirmed message and request comes back as an error...
    for sent in (one, two, asked):
        back = await alice.expect(id=sent, type="error", timeout=1.5)
        assert back.find(f"{q(NS_CLIENT, 'error')}/{q(NS_STANZAS, 'remote-server-timeout')}") \
            is not None
    # ... then the stream ends saying why.
    await alice.expect_stream_error("remote-connection-failed")
    await alice.expect_closed()
    assert not h.server.messages()


@playbook(upstream={"max_buffer": 3})
async def test_backpressure_while_down_loses_nothing(h: Harness) -> None:
    alice = await h.client("alice", sm=True)
    await h.server.cut()
    for n in range(6):
        alice.message("bob@localhost", str(n))
    # Three are held; then the proxy stops reading this client, so its <r/> waits ...
    with pytest.raises(AssertionError, match=r"within 0\.3s"):
        await alice.request_ack(timeout=0.3)
    await h.server.come_back()
    # ... until the server is back: then everything flows, in order, once.
    await alice.expect(tag=q(NS_SM, "a"), where=lambda el: el.get("h") == "6")
    await h.server.expect_stanza(kind="message", body="5")
    assert h.server.bodies() == ["0", "1", "2", "3", "4", "5"]


@playbook()
async def test_restore_binding_another_resource_gives_up_with_conflict(h: Harness) -> None:
    alice = await h.client("alice", sm=True)
    await h.server.cut()
    sent = alice.message("bob@localhost", "1")
    assert await alice.request_ack() == 1
    h.server.bind_as = "someone-else"
    await h.server.come_back()
    # The client's JID is never silently changed: its message back, then the stream ends.
    back = await alice.expect(kind="message", id=sent, type="error")
    assert back.find(f"{q(NS_CLIENT, 'error')}/{q(NS_STANZAS, 'remote-server-timeout')}") \
        is not None
    await alice.expect_stream_error("conflict")
    await alice.expect_closed()
    assert not h.server.messages()


@playbook()
async def test_graceful_restart_stores_a_hibernating_clients_queue(h: Harness) -> None:
    alice = await h.client("alice", sm=True, auto_ack=False)
    h.server.push_message(alice.jid, "1", frm=BOB, id="before-restart")
    await alice.expect_message("1")
    alice.cut()  # hibernating, "1" unacknowledged
    await h.restart_proxy()
    # After the restart the stored message follows the next initial presence.
    again = await h.client("alice", resource="laptop")
    again.presence()
    stored = await again.expect(kind="message", id="before-restart")
    assert stored.find(q(NS_DELAY, "delay")) is not None


@playbook()
async def test_outage_while_hibernating_is_restored_before_the_resume(h: Harness) -> None:
    alice = await h.client("alice", sm=True, auto_ack=False)
    alice.presence(show="dnd")
    h.server.push_message(alice.jid, "1", frm=BOB)
    await alice.expect_message("1")
    alice.cut()  # hibernating with "1" unacknowledged
    await h.server.cut()
    await h.server.come_back()
    conn = await h.server.expect_bind("phone", after=1)  # restored with nobody connected
    await h.server.expect_stanza(kind="presence", where=lambda el: el in conn.received)
    h.server.push_message(alice.jid, "2", frm=BOB)

    again, resumed = await h.resume(alice, h=0)
    assert resumed.tag == q(NS_SM, "resumed")
    await again.expect_message("1")
    await again.expect_message("2")
    assert [body for body in (m.findtext(q(NS_CLIENT, "body")) for m in again.received)
            if body] == ["1", "2"]


@playbook(reconnect={"settle_presence": 0.6})
async def test_contacts_do_not_flap_offline_while_the_server_restores_everyone(
        h: Harness) -> None:
    alice = await h.client("alice")
    alice.presence()
    await h.server.expect_stanza(kind="presence")
    await h.server.cut()
    await h.server.come_back()
    conn = await h.server.expect_bind("phone", after=1)
    # The restarted server answers its probes: carol's session is not restored yet...
    h.server.push(alice.jid, f"<presence from='carol@localhost/pc' to='{alice.jid}' "
                             "type='unavailable'/>")
    h.server.push(alice.jid, f"<presence from='dave@localhost/pc' to='{alice.jid}' "
                             "type='unavailable'/>")
    # ...and a moment later she is back; dave is not.
    h.server.push(alice.jid, f"<presence from='carol@localhost/pc' to='{alice.jid}'/>")
    back = await alice.expect(kind="presence", from_="carol@localhost/pc")
    assert back.get("type") is None
    gone = await alice.expect(kind="presence", from_="dave@localhost/pc", timeout=2)
    assert gone.get("type") == "unavailable"  # after the window: dave really is offline
    carol = [el for el in alice.received if el.get("from") == "carol@localhost/pc"]
    assert [el.get("type") for el in carol] == [None]  # never shown offline
    del conn
