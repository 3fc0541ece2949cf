"""XEP-0198 toward the client, in process: counting, hibernation, resumption, ack timeout,
takeover and the end of a session that never came back."""

from __future__ import annotations

from .playbook import Harness, playbook
from .xmlpeer import NS_DELAY, NS_SM, NS_STANZAS, body, q

BOB = "bob@localhost/desk"


def bodies(elements: list) -> list[str | None]:
    return [body(el) for el in elements]


@playbook()
async def test_sm_enable_and_ack_counting(h: Harness) -> None:
    alice = await h.client("alice", sm=True, auto_ack=False)
    assert alice.sm_id and alice.sm_max == 5  # stream_management.resume_timeout

    # The client's stanzas are counted from <enable/>: every <r/> is answered at once.
    alice.message("bob@localhost", "1")
    alice.presence(show="away")
    alice.iq("<query xmlns='jabber:iq:roster'/>")
    assert await alice.request_ack() == 3
    await h.server.expect_stanza(kind="message", body="1")

    # The proxy's stanzas are counted from <enabled/> and it asks for an ack after writing.
    h.server.push_message(alice.jid, "a")
    h.server.push_message(alice.jid, "b")
    await alice.expect_message("a")
    await alice.expect_message("b")
    await alice.expect(tag=q(NS_SM, "r"))
    # The roster result counts too: three stanzas went to the client.
    assert alice.handled == 3
    alice.ack()
    assert await alice.request_ack() == 3  # still three: acks are not stanzas

    # Acknowledging more than was sent ends the stream, saying how many were sent.
    alice.raw.send(f"<a xmlns='{NS_SM}' h='4'/>")
    error = await alice.expect_stream_error("undefined-condition")
    too_high = error.find(q(NS_SM, "handled-count-too-high"))
    assert too_high is not None and too_high.get("h") == "4"
    assert too_high.get("send-count") == "3"
    await alice.expect_closed()


@playbook(stream_management={"debug_counter_start": 2 ** 32 - 2})
async def test_counters_wrap_at_2_to_the_32(h: Harness) -> None:
    alice = await h.client("alice", sm=True, auto_ack=False)
    alice.handled = 2 ** 32 - 2  # both counters start there (a testing-only option)
    for n in range(3):
        alice.message("bob@localhost", str(n))
    assert await alice.request_ack() == 1  # 2^32 - 2 + 3, mod 2^32
    for n in range(3):
        h.server.push_message(alice.jid, f"s{n}", frm=BOB)
    await alice.expect_message("s2")
    assert alice.handled == 1
    alice.ack()  # acknowledges all three across the wrap
    alice.cut()
    h.server.push_message(alice.jid, "after", frm=BOB)
    again, resumed = await h.resume(alice, auto_ack=False)
    assert resumed.tag == q(NS_SM, "resumed") and resumed.get("h") == "1"
    await again.expect_message("after")
    assert bodies(again.received) == ["after"]  # nothing acknowledged came again


@playbook()
async def test_cut_connection_hibernates_and_resume_resends_unacked(h: Harness) -> None:
    alice = await h.client("alice", sm=True, auto_ack=False)
    h.server.push_message(alice.jid, "1", frm=BOB)
    await alice.expect_message("1")
    alice.ack()  # "1" is acknowledged: it must not come again
    h.server.push_message(alice.jid, "2", frm=BOB)
    await alice.expect_message("2")  # read, never acknowledged
    alice.message("bob@localhost", "from alice")
    alice.cut()

    h.server.push_message(alice.jid, "3", frm=BOB)  # for a hibernating session: queued

    again, resumed = await h.resume(alice, h=1, auto_ack=False)
    assert resumed.tag == q(NS_SM, "resumed") and resumed.get("previd") == alice.sm_id
    assert resumed.get("h") == "1"  # the one message alice sent
    two = await again.expect_message("2")
    three = await again.expect_message("3")
    for el in (two, three):
        delay = el.find(q(NS_DELAY, "delay"))
        assert delay is not None and delay.get("stamp") and delay.get("from") == "localhost"
    assert bodies(again.received) == ["2", "3"]  # "1" was acknowledged: not resent
    await again.expect(tag=q(NS_SM, "r"))  # the proxy asks where the new connection stands

    # The upstream session lived on: not bound again, no presence change; relay goes on.
    assert len(h.server.binds) == 1
    assert not h.server.messages(type="unavailable")
    h.server.push_message(alice.jid, "4", frm=BOB)
    await again.expect_message("4")
    again.message("bob@localhost", "after resume")
    await h.server.expect_stanza(kind="message", body="after resume")


@playbook()
async def test_resume_is_refused_for_another_account_and_for_a_bad_h(h: Harness) -> None:
    alice = await h.client("alice", sm=True)
    h.server.push_message(alice.jid, "1", frm=BOB)
    await alice.expect_message("1")
    # Another user's session id is simply unknown under their own account.
    bob = await h.login("bob")
    bob.raw.send(f"<resume xmlns='{NS_SM}' previd='{alice.sm_id}' h='0'/>")
    failed = await bob.expect(tag=q(NS_SM, "failed"))
    assert failed.find(q(NS_STANZAS, "item-not-found")) is not None
    # An h beyond what was sent ends the new stream, saying how many were sent.
    again = await h.login("alice")
    again.raw.send(f"<resume xmlns='{NS_SM}' previd='{alice.sm_id}' h='5'/>")
    error = await again.expect_stream_error("undefined-condition")
    too_high = error.find(q(NS_SM, "handled-count-too-high"))
    assert too_high is not None and too_high.get("send-count") == "1"
    # The session itself is untouched.
    h.server.push_message(alice.jid, "2", frm=BOB)
    await alice.expect_message("2")


@playbook()
async def test_resume_while_the_old_connection_is_open_evicts_it(h: Harness) -> None:
    alice = await h.client("alice", sm=True)
    _again, resumed = await h.resume(alice)
    assert resumed.tag == q(NS_SM, "resumed")
    await alice.expect_stream_error("conflict")
    await alice.expect_closed()


@playbook(stream_management={"ack_timeout": 0.2})
async def test_ack_timeout_hibernates(h: Harness) -> None:
    alice = await h.client("alice", sm=True, auto_ack=False)
    h.server.push_message(alice.jid, "1", frm=BOB)
    await alice.expect_message("1")
    await alice.expect(tag=q(NS_SM, "r"))
    # No answer to the proxy's <r/>: within ack_timeout the connection is declared dead.
    await alice.expect_closed(timeout=1.0)

    # ... and the session hibernated rather than ended: it resumes with "1" again.
    again, resumed = await h.resume(alice, h=0)
    assert resumed.tag == q(NS_SM, "resumed")
    one = await again.expect_message("1")
    assert one.find(q(NS_DELAY, "delay")) is not None
    assert len(h.server.binds) == 1


@playbook()
async def test_takeover_by_binding_the_same_resource(h: Harness) -> None:
    old = await h.client("alice", resource="phone", sm=True, auto_ack=False)
    h.server.push_message(old.jid, "1", frm=BOB)
    h.server.push_message(old.jid, "2", frm=BOB)
    await old.expect_message("2")  # both written to the old connection, never acked

    new = await h.client("alice", resource="phone")
    assert new.jid == old.jid
    await old.expect_stream_error("conflict")
    await old.expect_closed()
    # The new connection gets the whole queue, stamped, in order.
    one, two = await new.expect_message("1"), await new.expect_message("2")
    assert one.find(q(NS_DELAY, "delay")) is not None
    assert two.find(q(NS_DELAY, "delay")) is not None
    assert bodies(new.received) == ["1", "2"]
    # The upstream session was kept, not bound again.
    assert len(h.server.binds) == 1
    h.server.push_message(new.jid, "3", frm=BOB)
    await new.expect_message("3")


@playbook(timeout=10.0)
async def test_resumption_timeout_stores_unacked_messages(h: Harness) -> None:
    alice = await h.client("alice", sm=True, max=1, auto_ack=False)
    assert alice.sm_max == 1
    alice.message("bob@localhost", "sent")
    h.server.push_message(alice.jid, "1", frm=BOB, id="keep")
    await alice.expect_message("1")
    alice.cut()
    # A request for the absent client: it must not hang when the session ends.
    h.server.push(alice.jid, f"<iq type='get' id='q1' from='{BOB}' to='{alice.jid}'>"
                             "<query xmlns='jabber:iq:version'/></iq>")
    # stream_management.resume_timeout and the client's max are whole seconds: at least 1.
    conn = h.server.connection_of(alice.jid)
    await h.server.wait_open_connections(0, timeout=2.5)  # the session ended upstream too
    assert conn.closed
    answer = await h.server.expect_stanza(kind="iq", id="q1")
    assert answer.get("type") == "error" and answer.get("to") == BOB
    assert answer.find(f"{q('jabber:client', 'error')}/{q(NS_STANZAS, 'service-unavailable')}")\
        is not None

    late, failed = await h.resume(alice, h=0)
    assert failed.tag == q(NS_SM, "failed")
    assert failed.find(q(NS_STANZAS, "item-not-found")) is not None
    assert failed.get("h") == "1"  # what the ended session had handled of alice's
    # The message was stored: it follows the account's next initial presence.
    late.jid = await late.raw.bind("laptop")
    late.presence()
    stored = await late.expect_message("1")
    assert stored.get("id") == "keep" and stored.get("from") == BOB
    assert stored.find(q(NS_DELAY, "delay")) is not None


@playbook(timeout=10.0, stream_management={"on_timeout": "bounce"})
async def test_resumption_timeout_bounces_unacked_messages(h: Harness) -> None:
    alice = await h.client("alice", sm=True, max=1, auto_ack=False)
    h.server.push_message(alice.jid, "1", frm=BOB, id="back")
    await alice.expect_message("1")
    alice.cut()
    bounce = await h.server.expect_stanza(kind="message", type="error", timeout=2.5)
    assert bounce.get("to") == BOB and bounce.get("id") == "back"
    assert bounce.get("from") == alice.jid
    assert bounce.find(f"{q('jabber:client', 'error')}/{q(NS_STANZAS, 'recipient-unavailable')}")\
        is not None
    await h.server.wait_open_connections(0)


@playbook()
async def test_takeover_of_a_hibernating_session(h: Harness) -> None:
    old = await h.client("alice", resource="phone", sm=True, auto_ack=False)
    old.cut()
    h.server.push_message(old.jid, "while away", frm=BOB)
    new = await h.client("alice", resource="phone", sm=True)  # binds instead of resuming
    away = await new.expect_message("while away")
    assert away.find(q(NS_DELAY, "delay")) is not None
    assert len(h.server.binds) == 1
    # The old stream-management id is gone with the takeover.
    _late, failed = await h.resume(old, h=0)
    assert failed.tag == q(NS_SM, "failed")


@playbook()
async def test_cut_without_resumption_ends_the_session_and_stores(h: Harness) -> None:
    alice = await h.client("alice", sm=True, resume=False, auto_ack=False)
    assert alice.sm_id is None  # no resumption offered when not asked for
    h.server.push_message(alice.jid, "unacked", frm=BOB, id="u1")
    await alice.expect_message("unacked")
    alice.cut()
    await h.server.wait_open_connections(0)  # ended at once: no hibernation
    again = await h.client("alice", resource="laptop")
    again.presence()
    stored = await again.expect(kind="message", id="u1")
    assert stored.find(q(NS_DELAY, "delay")) is not None


@playbook(timeout=10.0, stream_management={"on_timeout": "bounce"})
async def test_resumption_timeout_with_the_server_down_stores_instead_of_bouncing(
        h: Harness) -> None:
    alice = await h.client("alice", sm=True, max=1, auto_ack=False)
    h.server.push_message(alice.jid, "1", frm=BOB, id="no-way-back")
    await alice.expect_message("1")
    alice.cut()
    await h.server.cut()  # a bounce could not leave now
    # Only the log can show the timer: no peer is connected to the proxy meanwhile.
    await h.logged("session_ended", timeout=2.5)
    await h.server.come_back()
    again = await h.client("alice", resource="laptop")
    again.presence()
    stored = await again.expect(kind="message", id="no-way-back")
    assert stored.find(q(NS_DELAY, "delay")) is not None
    assert not h.server.messages(type="error")
