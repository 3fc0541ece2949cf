"""The XEP-0198 core: enabling, counting, acks modulo 2^32, resumption, takeover."""

from __future__ import annotations

import pytest
from lxml import etree

from proxy.features.stream_management import (MOD, HandledCountTooHigh, StreamManagement,
                                              failed, parse_h)
from proxy.xmpp import codec, stanza

SM = "urn:xmpp:sm:3"


def enable(attrs: str = "resume='true'", **kw: int) -> tuple[StreamManagement, etree._Element]:
    request = etree.fromstring(f"<enable xmlns='{SM}' {attrs}/>")
    options = {"resume_timeout": 300, "max_resume_timeout": 600, "max_queue": 10}
    options.update(kw)
    return StreamManagement.enable(request, sm_id="id1", resume_allowed=True,
                                   wall_clock=lambda: 1_700_000_000.0, **options)


def msg(n: int) -> etree._Element:
    return stanza.element("message", {"to": "a@localhost/r", "id": f"m{n}"})


def test_enabled_grants_min_of_asked_and_maximum() -> None:
    state, enabled = enable("resume='true' max='5000'")
    assert enabled.get("resume") == "true" and enabled.get("id") == "id1"
    assert enabled.get("max") == "600" and state.max_resume == 600
    state, enabled = enable("resume='true' max='30'")
    assert enabled.get("max") == "30"
    state, enabled = enable("resume='true'")
    assert enabled.get("max") == "300"
    state, enabled = enable("")
    assert not state.resumable and enabled.get("id") is None and enabled.get("resume") is None


def test_acks_drop_what_they_acknowledge_and_too_high_is_refused() -> None:
    state, _ = enable()
    for n in range(3):
        state.track(msg(n), written=True)
    assert state.acknowledge(2) == 2
    assert [u.element.get("id") for u in state.unacked] == ["m2"]
    assert state.acknowledge(2) == 0  # a repeated ack changes nothing
    with pytest.raises(HandledCountTooHigh) as info:
        state.acknowledge(4)
    assert info.value.app_condition().get("send-count") == "3"


def test_counters_wrap_at_2_to_the_32() -> None:
    state, _ = enable(counter_start=MOD - 2)
    for _ in range(3):
        state.count_inbound()
    assert state.answer().get("h") == "1"
    for n in range(4):
        state.track(msg(n), written=True)
    assert state.sent == 2  # (2^32 - 2 + 4) mod 2^32
    assert state.acknowledge(MOD - 1) == 1
    assert state.acknowledge(1) == 2
    assert len(state.unacked) == 1
    with pytest.raises(HandledCountTooHigh):
        state.acknowledge(3)


def test_stanzas_kept_while_away_are_not_acknowledgeable_until_resent() -> None:
    state, _ = enable()
    state.track(msg(0), written=True)
    state.detached()
    state.track(msg(1), written=False)
    with pytest.raises(HandledCountTooHigh):
        state.acknowledge(2)  # m1 never went out
    resend = state.resume(1, "localhost")
    assert [e.get("id") for e in resend] == ["m1"]
    delay = resend[0].find("{urn:xmpp:delay}delay")
    assert delay is not None and delay.get("stamp") == "2023-11-14T22:13:20.000000Z"
    assert state.acknowledge(2) == 1


def test_ack_request_only_when_written_and_none_outstanding() -> None:
    state, _ = enable()
    assert state.request_ack(0.0) is None
    state.track(msg(0), written=True)
    assert state.request_ack(1.0) is not None
    assert state.request_ack(2.0) is None  # one outstanding at most
    assert state.ack_requested_at == 1.0
    state.acknowledge(1)
    assert state.ack_requested_at is None


def test_overflow_and_take_all() -> None:
    state, _ = enable(max_queue=2)
    for n in range(3):
        state.track(msg(n), written=False)
    assert state.overflowing
    assert [u.element.get("id") for u in state.take_all()] == ["m0", "m1", "m2"]
    assert not state.unacked and state.written == 0


def test_failed_has_the_condition_as_a_direct_child_and_h() -> None:
    el = failed("item-not-found", h=7)
    assert el.get("h") == "7"
    assert [c.tag for c in el] == ["{urn:ietf:params:xml:ns:xmpp-stanzas}item-not-found"]
    assert b"<failed" in codec.serialize(el)


@pytest.mark.parametrize("value,expected", [("0", 0), ("4294967295", MOD - 1),
                                            ("4294967296", None), ("-1", None), ("x", None)])
def test_parse_h(value: str, expected: int | None) -> None:
    assert parse_h(etree.fromstring(f"<a xmlns='{SM}' h='{value}'/>")) == expected
