"""The client's side of the proxy, in process: logging in through the legacy server, and a
client link that dies without a word."""

from __future__ import annotations

import pytest

from tests.peers.rawclient import RawAuthError

from .playbook import Harness, playbook
from .xmlpeer import NS_SM, q

BOB = "bob@localhost/desk"


@playbook()
async def test_login_is_checked_by_the_legacy_server(h: Harness) -> None:
    with pytest.raises(RawAuthError) as refused:
        await h.login("alice", password="wrong")
    assert refused.value.condition == "not-authorized"  # the server's own condition
    assert not h.server.binds

    await h.server.refuse()
    with pytest.raises(RawAuthError) as unavailable:
        await h.login("alice")
    assert unavailable.value.condition == "temporary-auth-failure"


@playbook()
async def test_final_stream_error_from_the_server_reaches_the_client(h: Harness) -> None:
    alice = await h.client("alice", sm=True)
    h.server.push(alice.jid, "<stream:error><policy-violation "
                             "xmlns='urn:ietf:params:xml:ns:xmpp-streams'/></stream:error>"
                             "</stream:stream>")
    await alice.expect_stream_error("policy-violation")
    await alice.expect_closed()
    assert len(h.server.conns) == 1  # "for good": no reconnect


@playbook()
async def test_system_shutdown_from_the_server_is_survived(h: Harness) -> None:
    alice = await h.client("alice", sm=True)
    alice.presence()
    await h.server.expect_stanza(kind="presence")
    h.server.push(alice.jid, "<stream:error><system-shutdown "
                             "xmlns='urn:ietf:params:xml:ns:xmpp-streams'/></stream:error>"
                             "</stream:stream>")
    conn = await h.server.expect_bind("phone", after=1)  # reconnected, same resource
    await h.server.expect_stanza(kind="presence", where=lambda el: el in conn.received)
    h.server.push_message(alice.jid, "still here", frm=BOB)
    await alice.expect_message("still here")
    assert not alice.closed


@playbook(stream_management={"max_queue": 3})
async def test_queue_overflow_while_hibernating_ends_the_session_and_stores(h: Harness) -> None:
    alice = await h.client("alice", sm=True, auto_ack=False)
    alice.cut()
    for n in range(5):
        h.server.push_message(alice.jid, str(n), frm=BOB, id=f"q{n}")
    # Beyond max_queue the session ends at once (its upstream stream is closed) ...
    await h.server.wait_open_connections(0)
    _late, failed = await h.resume(alice, h=0)
    assert failed.tag == q(NS_SM, "failed")
    # ... and what was queued is stored, in order: nothing the server sent is lost.
    again = await h.client("alice", resource="laptop")
    again.presence()
    got = [await again.expect(kind="message", id=f"q{n}") for n in range(5)]
    assert [m.findtext("{jabber:client}body") for m in got] == ["0", "1", "2", "3", "4"]
