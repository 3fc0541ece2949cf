"""The server edge as a playbook: what the legacy server did in, what to do out."""

from __future__ import annotations

import itertools
import random

from proxy.commands import Log, ToClient
from proxy.server_edge import (Confirmed, Finished, GiveUp, ServerEdge, ServerLost,
                               ServerPolicy, ToServer)
from proxy.xmpp import stanza as st

SM = "urn:xmpp:sm:3"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def edge(**policy: float) -> tuple[ServerEdge, Clock]:
    clock = Clock()
    ids = itertools.count(1)
    core = ServerEdge(ServerPolicy(domain="localhost", barrier_every=2, ping_idle=60,
                                   ping_timeout=20, first_delay_max=1, base=1, cap=4,
                                   **policy),  # type: ignore[arg-type]
                      new_id=lambda: f"xf-barrier-s-{next(ids)}", rng=random.Random(7),
                      clock=clock)
    return core, clock


def message(n: int) -> st.Element:
    el = st.element("message", {"id": f"m{n}", "to": "bob@localhost", "type": "chat"})
    st.sub(el, "body", text=str(n))
    return el


def written(commands: object) -> list[st.Element]:
    assert isinstance(commands, list)
    return [c.element for c in commands if isinstance(c, ToServer)]


def test_a_barrier_follows_every_few_stanzas_and_its_reply_confirms_them() -> None:
    core, _ = edge()
    assert [el.get("id") for el in written(core.submit(message(1)))] == ["m1"]
    out = written(core.submit(message(2)))
    assert [el.get("id") for el in out] == ["m2", "xf-barrier-s-1"]
    reply = st.element("iq", {"type": "result", "id": "xf-barrier-s-1"})
    assert core.server_stanza(reply) == [Confirmed(2)]
    assert core.server_stanza(message(9)) is None  # an ordinary stanza: relay it


def test_silence_is_pinged_then_declared_dead() -> None:
    core, _ = edge()
    assert core.read_timeout() == 60
    (ping,) = written(core.silence())
    assert ping.get("type") == "get" and core.read_timeout() == 20
    assert core.silence() == [ServerLost("no answer to a ping within 20s")]
    core.heard()
    assert core.read_timeout() == 60


def test_stream_errors_are_transient_or_final() -> None:
    core, _ = edge()
    err = st.element("error", namespace="http://etherx.jabber.org/streams")
    st.sub(err, "system-shutdown", namespace="urn:ietf:params:xml:ns:xmpp-streams")
    assert core.stream_error(err) == [ServerLost("stream error: system-shutdown")]
    conflict = st.element("error", namespace="http://etherx.jabber.org/streams")
    st.sub(conflict, "conflict", namespace="urn:ietf:params:xml:ns:xmpp-streams")
    (final,) = core.stream_error(conflict)
    assert isinstance(final, GiveUp) and b"conflict" in final.error


def test_an_outage_holds_answers_pings_and_replays_in_order() -> None:
    core, clock = edge()
    request = st.element("iq", {"type": "get", "id": "q1", "to": "localhost"})
    st.sub(request, "query", namespace="jabber:iq:version")
    core.submit(request)
    core.submit(message(1))  # the barrier after these two is unanswered
    reply = st.element("iq", {"type": "result", "id": "xf-barrier-s-1"})
    core.server_stanza(reply)  # both confirmed; the version request still unanswered
    out = core.lost("connection lost (eof)")
    errors = [c.element for c in out if isinstance(c, ToClient)]
    assert [e.get("id") for e in errors] == ["q1"]  # confirmed, unanswered: no hanging
    assert any(isinstance(c, Log) and c.event == "upstream_down" for c in out)
    assert core.submit(message(2)) == []  # held
    ping = st.element("iq", {"type": "get", "id": "p", "to": "localhost"})
    st.sub(ping, "ping", namespace="urn:xmpp:ping")
    answer = core.submit(ping)
    assert isinstance(answer, st.Element) and answer.get("type") == "result"
    clock.now += 3
    assert core.restored() == 3
    assert [el.get("id") for el in core.replay()][:1] == ["m2"]


def test_backoff_gives_up_past_max_outage() -> None:
    core, clock = edge(max_outage=10)
    core.lost("gone")
    delays = []
    while True:
        step = core.next_attempt()
        if isinstance(step, GiveUp):
            break
        delays.append(step)
        clock.now += step
        assert len(delays) < 100
    assert delays and all(0 <= d <= 4 for d in delays)
    assert b"remote-connection-failed" in step.error
    assert core.outage_left() <= 4


def test_the_server_s_own_acks_confirm_and_a_finishing_session_finishes() -> None:
    core, _ = edge()
    features = st.element("features", namespace="http://etherx.jabber.org/streams")
    st.sub(features, "sm", namespace=SM)
    (enable,) = written(core.connected(features))
    assert enable.tag == f"{{{SM}}}enable"
    core.submit(message(1))
    core.submit(message(2))
    finish = core.finish()
    assert any(isinstance(c, Log) and c.event == "upstream_finishing" for c in finish)
    (answer,) = written(core.server_nonza(st.element("r", namespace=SM)))
    assert answer.get("h") == "0"
    assert core.server_nonza(st.element("a", {"h": "2"}, namespace=SM)) == \
        [Confirmed(2), Finished()]


def test_give_up_returns_messages_and_requests_but_not_its_own_or_results() -> None:
    core, _ = edge()
    core.lost("gone")
    core.submit(message(1))
    core.submit(st.element("iq", {"type": "set", "id": "q"}))
    core.submit(st.element("iq", {"type": "result", "id": "r"}))
    core.submit(st.element("iq", {"type": "get", "id": "xf-roster-1"}))
    errors, discarded = core.give_up()
    assert [(e.get("id"), e.get("type")) for e in errors] == [("m1", "error"), ("q", "error")]
    assert discarded == 2 and core.state == "gone" and core.outbox.size == 0


def test_a_restored_session_must_be_the_client_s() -> None:
    assert ServerEdge.bound_check("a@localhost/x", "a@localhost/x") is None
    other = ServerEdge.bound_check("a@localhost/y", "a@localhost/x")
    assert other is not None and b"conflict" in other.error
    assert b"not-authorized" in ServerEdge.login_refused("not-authorized").error


def test_the_servers_stanzas_count_only_after_its_enabled() -> None:
    core, _ = edge()
    features = st.element("features", namespace="http://etherx.jabber.org/streams")
    st.sub(features, "sm", namespace=SM)
    core.connected(features)
    # A message the server routed to the new resource before it read our <enable/>.
    assert core.server_stanza(message(1)) is None
    core.server_nonza(st.element("enabled", namespace=SM))
    core.server_stanza(message(2))
    (answer,) = written(core.server_nonza(st.element("r", namespace=SM)))
    assert answer.get("h") == "1"  # only what came after <enabled/>
