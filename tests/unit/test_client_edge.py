"""The client edge as a playbook: events in, commands out, no sockets and no clock but ours.

Each test feeds the core what the shell would (a stanza for the client, a nonza from it, a
timer, the connection gone) and checks the commands it asks for.
"""

from __future__ import annotations

import itertools
from typing import Any

from lxml import etree

from proxy.client_edge import ACK_TIMER, CLOSE_GRACE, HIBERNATION_TIMER, ClientEdge, EdgePolicy
from proxy.commands import (AbortClient, AckWhenDurable, CancelTimer, ClientLeaves, CloseClient,
                            Command, EndSession, JournalCut, JournalPut, Log, SmRegister,
                            StartTimer, StoreOffline, StorePending, ToClient, ToServerDirect)
from proxy.journal import parse_stored
from proxy.xmpp import codec
from proxy.xmpp import stanza as st

SM = "urn:xmpp:sm:3"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def edge(**policy: Any) -> tuple[ClientEdge, Clock]:
    clock = Clock()
    ids = itertools.count(1)
    core = ClientEdge(EdgePolicy(domain="localhost", ack_timeout=5, **policy),
                      new_sm_id=lambda: f"sm{next(ids)}", clock=clock, wall_clock=clock)
    core.attach(resumed=False)
    return core, clock


def sm(local: str, **attrs: str) -> st.Element:
    return st.element(local, attrs, namespace=SM)


def message(n: int, **attrs: str) -> st.Element:
    el = st.element("message", {"id": f"m{n}", "from": "bob@localhost/pc", "type": "chat",
                                **attrs})
    st.sub(el, "body", text=f"body {n}")
    return el


def kinds(commands: list[Command]) -> list[str]:
    return [type(c).__name__ for c in commands]


def logged(commands: list[Command]) -> list[str]:
    return [c.event for c in commands if isinstance(c, Log)]


def enabled(core: ClientEdge, resume: bool = True) -> list[Command]:
    return core.client_nonza(sm("enable", resume="true" if resume else "false"))


def test_enable_registers_a_resumable_session_and_answers() -> None:
    core, _ = edge()
    out = enabled(core)
    assert kinds(out) == ["SmRegister", "ToClient", "Log"]
    assert out[0] == SmRegister("sm1")
    assert isinstance(out[1], ToClient) and out[1].element.get("id") == "sm1"
    again = core.client_nonza(sm("enable"))
    assert kinds(again) == ["ToClient"] and isinstance(again[0], ToClient)
    assert again[0].element.tag == f"{{{SM}}}failed"


def test_stanzas_are_tracked_acks_requested_and_acks_drop_them() -> None:
    core, _ = edge()
    enabled(core)
    out = core.for_client(message(1), upstream_up=True)
    assert kinds(out) == ["ToClient"]
    request = core.request_ack()
    assert [type(c) for c in request] == [ToClient, StartTimer]
    assert request[1] == StartTimer(ACK_TIMER, 5)
    assert core.request_ack() == []  # one outstanding <r/> at a time
    acked = core.client_nonza(sm("a", h="1"))
    assert acked == [CancelTimer(ACK_TIMER)]
    assert core.ledger.s2c.summary()["delivered"] == 1 and core.ledger.empty


def test_r_is_answered_at_once_or_when_durable_with_the_journal() -> None:
    core, _ = edge()
    enabled(core)
    core.client_stanza()
    core.client_stanza()
    (answer,) = core.client_nonza(sm("r"))
    assert isinstance(answer, ToClient) and answer.element.get("h") == "2"
    journaled, _ = edge(journal=True)
    enabled(journaled)
    (gated,) = journaled.client_nonza(sm("r"))
    assert isinstance(gated, AckWhenDurable) and gated.element.get("h") == "0"


def test_journal_puts_what_enters_and_cuts_what_leaves() -> None:
    core, _ = edge(journal=True)
    enabled(core)
    out = core.for_client(message(1), upstream_up=True)
    assert kinds(out) == ["JournalPut", "ToClient"]
    assert isinstance(out[0], JournalPut) and (out[0].lane, out[0].number) == ("s2c", 0)
    assert core.client_nonza(sm("a", h="1"))[0] == JournalCut("s2c", 1)
    put = core.c2s_taken(message(2))
    assert isinstance(put[0], JournalPut) and put[0].lane == "c2s"
    assert core.c2s_left(1, "delivered") == [JournalCut("c2s", 1)]


def test_a_journaled_stanza_is_written_from_the_bytes_the_journal_got() -> None:
    """Serialized once: the write to the client derives its bytes from the journal's, which
    parse back to the stanza as it was sent."""
    core, _ = edge(journal=True)
    enabled(core)
    el = message(1)
    put, write = core.for_client(el, upstream_up=True)
    assert isinstance(put, JournalPut) and isinstance(write, ToClient)
    assert write.element is el and write.document == put.stanza
    assert codec.serialize(el, document=write.document) == codec.serialize(el)
    assert etree.tostring(parse_stored(put.stanza)) == etree.tostring(el)
    plain, _ = edge()
    enabled(plain)
    (write,) = plain.for_client(message(2), upstream_up=True)
    assert isinstance(write, ToClient) and write.document is None  # nothing to reuse


def test_h_too_high_and_a_bad_a_end_the_session_with_the_right_error() -> None:
    core, _ = edge()
    enabled(core)
    out = core.client_nonza(sm("a", h="3"))
    assert logged(out) == ["sm_h_too_high"]
    leaves = out[-1]
    assert isinstance(leaves, ClientLeaves) and leaves.error is not None
    assert b"handled-count-too-high" in leaves.error
    (bad,) = edge()[0].client_nonza(sm("a", h="1"))  # no SM enabled
    assert isinstance(bad, ClientLeaves) and b"undefined-condition" in (bad.error or b"")


def test_no_ack_within_ack_timeout_declares_the_link_dead() -> None:
    core, _ = edge()
    enabled(core)
    core.for_client(message(1), upstream_up=True)
    core.request_ack()
    out = core.timer_fired(ACK_TIMER)
    assert logged(out) == ["client_link_dead"] and isinstance(out[-1], AbortClient)
    assert core.connection_lost("eof") == "no ack from the client within ack_timeout"
    assert edge()[0].timer_fired(ACK_TIMER) == []  # nothing outstanding: nothing to do


def test_a_lost_resumable_session_hibernates_then_ends() -> None:
    core, _ = edge()
    enabled(core)
    core.for_client(message(1), upstream_up=True)
    out = core.client_left("client connection lost (eof)", end_session=False)
    assert CloseClient(hard=True) in out and logged(out) == ["hibernating"]
    assert out[-1] == StartTimer(HIBERNATION_TIMER, 300) and core.state == "hibernating"
    # Meanwhile stanzas queue up, unwritten.
    assert core.for_client(message(2), upstream_up=True) == []
    assert core.timer_fired(HIBERNATION_TIMER) == [EndSession("resumption timed out")]


def test_a_clean_close_or_no_resumption_ends_the_session() -> None:
    core, _ = edge()
    enabled(core, resume=False)
    out = core.client_left("client closed the stream", end_session=False)
    assert CloseClient(None, grace=CLOSE_GRACE) in out
    assert out[-1] == EndSession("client closed the stream")


def test_resumption_resends_the_unacknowledged_with_delay() -> None:
    core, _ = edge()
    enabled(core)
    for n in range(3):
        core.for_client(message(n), upstream_up=True)
    core.client_left("client connection lost (eof)", end_session=False)
    assert core.resume_problem(4) is not None and core.resume_problem(1) is None
    first, out = core.resume(1)
    assert first[0].tag == f"{{{SM}}}resumed" and [el.get("id") for el in first[1:]] == \
        ["m1", "m2"]
    assert all(el.find("{urn:xmpp:delay}delay") is not None for el in first[1:])
    assert "resumed" in logged(out) and core.ledger.s2c.summary()["delivered"] == 1
    attach = core.attach(resumed=True)
    assert attach[0] == CancelTimer(HIBERNATION_TIMER)
    assert isinstance(attach[1], ToClient) and attach[1].element.tag == f"{{{SM}}}r"


def test_takeover_hands_the_queue_over_and_switches_sm_off() -> None:
    core, _ = edge()
    enabled(core)
    core.client_stanza()
    core.for_client(message(1), upstream_up=True)
    queue, out = core.take_over()
    assert [el.get("id") for el in queue] == ["m1"]
    assert "client_evicted" in logged(out) and SmRegister(None, 1) in out
    assert core.sm is None and core.ledger.empty


def test_the_end_stores_messages_bounces_without_a_store_and_answers_iqs() -> None:
    core, _ = edge(on_timeout="bounce")
    enabled(core)
    core.for_client(message(1), upstream_up=True)
    core.for_client(st.element("iq", {"type": "get", "id": "q1", "from": "x@localhost"}),
                    upstream_up=True)
    core.for_client(st.element("presence", {"from": "bob@localhost/pc"}), upstream_up=True)
    core.client_left("gone", end_session=False)
    out = core.end(upstream_up=True, stopping=False)
    replies = [c.element for c in out if isinstance(c, ToServerDirect)]
    assert [(r.tag.split("}")[1], r.get("type")) for r in replies] == \
        [("message", "error"), ("iq", "error")]
    summary = core.ledger.s2c.summary()
    assert (summary["bounced"], summary["discarded"], summary["held"]) == (2, 1, 0)
    # The same with the server away: a bounce cannot leave, the message is stored.
    away, _ = edge(on_timeout="bounce")
    enabled(away)
    away.for_client(message(2), upstream_up=False)
    assert any(isinstance(c, StoreOffline) for c in away.end(upstream_up=False, stopping=False))


def test_a_stanza_for_an_ended_session_is_settled_not_lost() -> None:
    core, _ = edge()
    core.end(upstream_up=True, stopping=False)
    stored = core.for_client(message(1), upstream_up=True)
    assert [type(c) for c in stored] == [StoreOffline]
    assert b"urn:xmpp:delay" in stored[0].stanza  # type: ignore[union-attr]
    answered = core.for_client(st.element("iq", {"type": "set", "id": "s"}), upstream_up=True)
    assert [type(c) for c in answered] == [ToServerDirect]
    assert core.for_client(st.element("presence"), upstream_up=True) == []
    assert core.ledger.s2c.summary() == {"entered": 3, "held": 0, "delivered": 0,
                                         "stored": 1, "bounced": 1, "discarded": 1}


def test_settling_the_outbox_keeps_messages_answers_iqs_and_counts_the_rest() -> None:
    core, clock = edge(pending_ttl=60)
    held = [message(1), st.element("iq", {"type": "get", "id": "q"}),
            st.element("presence"), message(2, id="xf-own-1")]
    for el in held:
        core.c2s_taken(el)
    out = core.settle_outbox(held, client_here=True, upstream_up=False)
    pending = [c for c in out if isinstance(c, StorePending)]
    assert len(pending) == 1 and pending[0].expires_at == clock.now + 60
    assert [etree.fromstring(s).get("id") for s in pending[0].stanzas] == ["m1"]
    errors = [c.element for c in out if isinstance(c, ToClient)]
    assert [e.get("id") for e in errors] == ["q"] and errors[0].get("type") == "error"
    assert core.ledger.c2s.summary() == {"entered": 4, "held": 0, "delivered": 0,
                                         "stored": 1, "bounced": 1, "discarded": 2}


def test_pending_replay_sends_current_ones_and_bounces_expired_messages() -> None:
    core, clock = edge()
    rows = [(etree.tostring(message(1)), clock.now + 10), (etree.tostring(message(2)),
                                                           clock.now - 1)]
    send, out = core.pending_replay(rows, "alice@localhost/new", upstream_up=True)
    assert [(el.get("id"), el.get("from")) for el in send] == [("m1", "alice@localhost/new")]
    errors = [c.element for c in out if isinstance(c, ToClient)]
    assert [e.get("id") for e in errors] == ["m2"] and errors[0].get("type") == "error"
    assert logged(out) == ["pending_replayed"]


def test_stored_messages_follow_initial_presence_once() -> None:
    core, _ = edge()
    assert not core.stored_ready(st.element("presence", {"to": "room@muc/nick"}))
    assert core.stored_ready(st.element("presence"))
    assert not core.stored_ready(st.element("presence"))


def test_stream_events_say_why_the_client_left() -> None:
    core, _ = edge()
    assert core.stream_event(codec.StreamClosed()).error is None
    violation = core.stream_event(codec.StreamViolation("not-well-formed", "bad"))
    assert b"not-well-formed" in (violation.error or b"")
    header = core.stream_event(codec.StreamOpened({}, None))
    assert "second stream header" in header.reason
