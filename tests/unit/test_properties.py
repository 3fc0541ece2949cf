"""Property tests (hypothesis) of the pure cores a peer can feed: JIDs, SASL, stream
management counters, the ledger and the outbox. Kept to a few seconds in the suite; a longer
run: ``HYPOTHESIS_PROFILE=long python3 -m pytest tests/unit/test_properties.py``."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as s

from proxy.features.stream_management import HandledCountTooHigh, StreamManagement
from proxy.ledger import EXITS, Ledger, LedgerError
from proxy.outbox import Outbox
from proxy.xmpp import counters, sasl
from proxy.xmpp import stanza as st
from proxy.xmpp.jid import InvalidJid, Jid

settings.register_profile("suite", max_examples=100, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=20000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "suite"))

MOD = 2 ** 32
jid_text = s.text(alphabet=s.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)


# JIDs ------------------------------------------------------------------------------------------


@given(jid_text)
def test_jid_parse_fails_only_with_invalid_jid_and_round_trips(text: str) -> None:
    try:
        jid = Jid.parse(text)
    except InvalidJid:
        return
    again = Jid.parse(str(jid))
    assert again == jid
    assert jid.bare.is_bare and jid.bare == Jid.parse(str(jid.bare))
    assert jid.with_resource("r").bare == jid.bare


@given(s.from_regex(r"[a-z][a-z0-9]{0,8}", fullmatch=True),
       s.from_regex(r"[a-z]{1,8}\.[a-z]{2,3}", fullmatch=True), s.booleans())
def test_jid_comparison_ignores_case_of_local_and_domain(local: str, domain: str,
                                                         upper: bool) -> None:
    text = f"{local}@{domain}/Res"
    other = text.upper().replace("/RES", "/Res") if upper else text
    assert Jid.parse(text) == Jid.parse(other)
    assert Jid.parse(text) != Jid.parse(f"{local}@{domain}/res")  # resources are exact


# SASL ------------------------------------------------------------------------------------------


@given(s.binary(max_size=200))
def test_plain_parsing_of_any_bytes_fails_only_with_sasl_error(data: bytes) -> None:
    try:
        authzid, authcid, password = sasl.parse_plain(data)
    except sasl.SaslError:
        return
    assert authcid and password
    assert data == b"\0".join(x.encode() for x in (authzid, authcid, password))


@given(s.text(alphabet=s.characters(min_codepoint=0x21, max_codepoint=0x7e), min_size=1,
              max_size=20),
       s.text(alphabet=s.characters(min_codepoint=0x21, max_codepoint=0x7e), min_size=1,
              max_size=30))
def test_plain_round_trips_what_a_client_sends(user: str, password: str) -> None:
    message = sasl.PlainClient(user, password).initial_response()
    assert sasl.parse_plain(message) == ("", user, password)


@pytest.mark.parametrize("name", ["SCRAM-SHA-1", "SCRAM-SHA-256", "DIGEST-MD5"])
@given(challenge=s.binary(max_size=300), success=s.binary(max_size=100))
def test_a_hostile_server_gets_only_sasl_errors(name: str, challenge: bytes,
                                                success: bytes) -> None:
    mechanism = sasl.client_mechanism(name, "user", "pencil", domain="localhost",
                                      nonce=lambda: "fyko+d2lbbFgONRv9qkxdawL")
    mechanism.initial_response()
    try:
        mechanism.respond(challenge)
        mechanism.verify_success(success or None)
    except sasl.SaslError:
        return


# Stream management counters ---------------------------------------------------------------------


@given(s.integers(0, MOD - 1), s.integers(0, MOD - 1))
def test_counter_distance_is_the_increment_across_the_wrap(start: int, step: int) -> None:
    assert counters.since(counters.increment(start, step), start) == step
    assert counters.valid(counters.increment(start, step))


@given(s.integers(0, MOD - 1), s.lists(s.integers(0, 5), min_size=1, max_size=20),
       s.integers(1, 3))
def test_acks_across_the_wrap_drop_exactly_what_they_acknowledge(
        start: int, batches: list[int], too_many: int) -> None:
    enable = st.element("enable", {"resume": "true"}, namespace="urn:xmpp:sm:3")
    sm, _ = StreamManagement.enable(enable, sm_id="x", resume_allowed=True,
                                    resume_timeout=60, max_resume_timeout=60,
                                    max_queue=10_000, counter_start=start)
    sent = 0
    for batch in batches:
        for _ in range(batch):
            sm.track(st.element("message"), written=True)
        sent += batch
        h = counters.increment(start, sent)
        assert sm.acknowledge(h) == batch
        assert not sm.unacked and sm.sent == h
    with pytest.raises(HandledCountTooHigh):
        sm.acknowledge(counters.increment(start, sent + too_many))


# The ledger and the outbox ----------------------------------------------------------------------


@given(s.lists(s.tuples(s.booleans(), s.integers(0, 4), s.sampled_from(EXITS)), max_size=60))
def test_a_lane_never_lets_out_more_than_it_took_in(ops: list[tuple[bool, int, str]]) -> None:
    lane = Ledger().c2s
    for enters, count, exit in ops:
        if enters:
            for _ in range(count):
                lane.enter()
        elif count <= lane.held:
            lane.leave(count, exit)  # type: ignore[arg-type]
        else:
            with pytest.raises(LedgerError):
                lane.leave(count, exit)  # type: ignore[arg-type]
        assert lane.held >= 0 and lane.entered == lane.left + lane.held
        assert sum(lane.exits.values()) == lane.left


OUTBOX_OP = s.sampled_from(["submit", "submit", "submit", "reply", "lost", "reconnect"])


@given(s.lists(OUTBOX_OP, max_size=80), s.integers(1, 5))
def test_the_outbox_loses_nothing_and_keeps_the_order(ops: list[str], every: int) -> None:
    ids = iter(range(10 ** 6))
    box = Outbox(domain="localhost", max_buffer=10 ** 6, barrier_every=every,
                 new_id=lambda: f"xf-b-{next(ids)}", connected=True)
    submitted: list[str] = []
    confirmed: list[str] = []
    barriers: list[str] = []
    for n, op in enumerate(ops):
        if op == "submit":
            el = st.element("message", {"id": f"m{n}"})
            submitted.append(f"m{n}")
            for out in box.submit(el):
                if out.get("id", "").startswith("xf-b-"):
                    barriers.append(out.get("id", ""))
        elif op == "reply" and box.connected and barriers:
            held_before = [x.get("id") for x in box.held()]
            left_before = box.left
            box.on_reply(st.element("iq", {"type": "result", "id": barriers.pop(0)}))
            confirmed += held_before[:box.left - left_before]
        elif op == "lost" and box.connected:
            box.connection_lost()
            barriers.clear()
        elif op == "reconnect" and not box.connected:
            replay = box.reconnected()
            if replay:
                barriers.append(replay[-1].get("id", ""))
        held = [x.get("id") for x in box.held()]
        assert confirmed + held == submitted  # in order, each exactly once
        assert box.left == len(confirmed)
