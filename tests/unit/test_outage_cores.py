"""The pure cores behind upstream-outage survival: backoff, outbox, presence memory, dedupe."""

from __future__ import annotations

import random
from itertools import count

from lxml import etree

from proxy.backoff import Backoff
from proxy.features.dedupe import Dedupe
from proxy.features.presence_memory import PresenceMemory
from proxy.outbox import Outbox
from proxy.session import Outputs, SessionCore
from proxy.xmpp import stanza
from proxy.xmpp.jid import Jid

C = "jabber:client"


def parse(xml: str) -> etree._Element:
    return etree.fromstring(xml.replace("<message", f"<message xmlns='{C}'", 1)
                            .replace("<iq", f"<iq xmlns='{C}'", 1)
                            .replace("<presence", f"<presence xmlns='{C}'", 1))


class FixedRandom(random.Random):
    """uniform(a, b) returns b: the largest delay the schedule allows."""

    def uniform(self, a: float, b: float) -> float:
        return b


def test_backoff_first_delay_then_truncated_exponential() -> None:
    b = Backoff(first_delay_max=60, base=1, cap=60, rng=FixedRandom())
    assert [b.next_delay() for _ in range(9)] == [60, 1, 2, 4, 8, 16, 32, 60, 60]
    b.reset()
    assert b.next_delay() == 60


def test_backoff_full_jitter_stays_within_bounds() -> None:
    rng = random.Random(7)
    delays = [Backoff(10, 1, 8, rng).next_delay() for _ in range(500)]
    assert all(0 <= d <= 10 for d in delays)
    assert max(delays) > 9 and min(delays) < 1  # spread over the whole window


def make_outbox(barrier_every: int = 3, max_buffer: int = 5) -> Outbox:
    ids = count(1)
    return Outbox(domain="localhost", max_buffer=max_buffer, barrier_every=barrier_every,
                  new_id=lambda: f"b{next(ids)}", connected=True)


def msg(n: int) -> etree._Element:
    return stanza.element("message", {"to": "x@localhost", "id": f"m{n}"})


def reply(iq_id: str) -> etree._Element:
    return parse(f"<iq type='result' id='{iq_id}'/>")


def test_barrier_confirms_everything_before_it() -> None:
    box = make_outbox()
    assert [e.get("id") for e in box.submit(msg(1))] == ["m1"]
    box.submit(msg(2))
    out = box.submit(msg(3))  # every 3rd stanza brings a barrier
    assert [e.get("id") for e in out] == ["m3", "b1"]
    box.submit(msg(4))
    assert box.on_reply(reply("b1"))
    assert [e.get("id") for _, e in box.unconfirmed] == ["m4"]
    assert not box.on_reply(reply("someone-elses"))


def test_a_later_barrier_reply_confirms_older_barriers_too() -> None:
    box = make_outbox(barrier_every=100)
    box.submit(msg(1))
    first = box.barrier()
    box.submit(msg(2))
    second = box.barrier()
    assert box.on_reply(reply(second.get("id")))
    assert not box.unconfirmed and not box.barriers
    assert not box.on_reply(reply(first.get("id")))  # already settled


def test_lost_connection_replays_in_order_and_answers_confirmed_requests() -> None:
    box = make_outbox(barrier_every=100, max_buffer=10)
    ping = parse("<iq type='get' id='q1' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>")
    ping.set("from", "a@localhost/r")
    box.submit(ping)
    b = box.barrier()
    assert box.on_reply(reply(b.get("id")))  # q1 confirmed, never answered
    box.submit(msg(1))
    errors = box.connection_lost()
    assert [(e.get("id"), stanza.error_condition(e)) for e in errors] == [
        ("q1", "remote-server-timeout")]
    assert errors[0].get("to") == "a@localhost/r"
    assert box.submit(msg(2)) == []  # while down: held
    replay = box.reconnected()
    assert [e.get("id") for e in replay[:-1]] == ["m1", "m2"]
    assert replay[-1].find("{urn:xmpp:ping}ping") is not None


def test_full_and_drain() -> None:
    box = make_outbox(max_buffer=2)
    box.connection_lost()
    box.submit(msg(1))
    assert not box.full
    box.submit(msg(2))
    assert box.full
    assert [e.get("id") for e in box.drain()] == ["m1", "m2"]
    assert not box.full


def core() -> SessionCore:
    return SessionCore(Jid.parse("alice@localhost/phone"))


def test_presence_memory_restores_last_presence_and_rooms_without_history() -> None:
    mem, s, out = PresenceMemory(), core(), Outputs()
    mem.from_client(s, parse("<presence><show>away</show></presence>"), out)
    mem.from_client(s, parse("<presence to='room@conference.localhost/alice'>"
                             "<x xmlns='http://jabber.org/protocol/muc'>"
                             "<history maxstanzas='20'/></x></presence>"), out)
    mem.from_client(s, parse("<presence to='gone@conference.localhost/alice'>"
                             "<x xmlns='http://jabber.org/protocol/muc'/></presence>"), out)
    mem.from_client(s, parse("<presence to='gone@conference.localhost/alice' "
                             "type='unavailable'/>"), out)
    restored = Outputs()
    mem.upstream_restored(s, restored)
    assert [e.get("to") for e in restored.to_upstream] == [None,
                                                           "room@conference.localhost/alice"]
    assert restored.to_upstream[0].findtext(f"{{{C}}}show") == "away"
    history = restored.to_upstream[1].findall(
        "{http://jabber.org/protocol/muc}x/{http://jabber.org/protocol/muc}history")
    assert [h.get("maxstanzas") for h in history] == ["0"]


def test_presence_memory_forgets_a_room_that_kicked_us() -> None:
    mem, s, out = PresenceMemory(), core(), Outputs()
    mem.from_client(s, parse("<presence to='room@conference.localhost/alice'>"
                             "<x xmlns='http://jabber.org/protocol/muc'/></presence>"), out)
    mem.from_upstream(s, parse("<presence from='room@conference.localhost/alice' "
                               "type='unavailable'/>"), out)
    restored = Outputs()
    mem.upstream_restored(s, restored)
    assert restored.to_upstream == []


def test_presence_memory_keeps_no_stream_parser_alive_and_resends_the_same_bytes() -> None:
    """The kept presence outlives the stanza as parsed: it must not pin the client
    stream's lxml parser, and after an outage it goes upstream as the client sent it."""
    import gc

    from proxy.xmpp.codec import StanzaReceived, XmlStreamParser, serialize

    def lxml_parsers() -> int:
        gc.collect()
        return sum(isinstance(o, etree.XMLPullParser) for o in gc.get_objects())

    before = lxml_parsers()
    mem, s, out = PresenceMemory(), core(), Outputs()
    parser = XmlStreamParser()
    parser.feed(b"<stream:stream xmlns='jabber:client' "
                b"xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>")
    sent = (b"<presence xml:lang='en'><show>away</show><status>out &amp; about</status>"
            b"<c xmlns='http://jabber.org/protocol/caps' hash='sha-1' node='n' ver='v'/>"
            b"</presence>")
    (event,) = parser.feed(sent)
    assert isinstance(event, StanzaReceived)
    wire = serialize(event.element)
    mem.from_client(s, event.element, out)
    assert parser.release()
    del event, parser
    assert lxml_parsers() == before  # the kept copy holds no parser
    restored = Outputs()
    mem.upstream_restored(s, restored)
    assert [serialize(e) for e in restored.to_upstream] == [wire]


def test_dedupe_drops_a_second_copy_within_the_window() -> None:
    now = [0.0]
    d, s, out = Dedupe(window=10, max_entries=100, clock=lambda: now[0]), core(), Outputs()
    first = parse("<message from='b@localhost/x' id='1'><body>hi</body></message>")
    assert d.from_upstream(s, first, out) is first
    assert d.from_upstream(s, parse("<message from='b@localhost/x' id='1'/>"), out) is None
    assert d.from_upstream(s, parse("<message from='c@localhost/x' id='1'/>"), out) is not None
    origin = ("<message from='b@localhost/y' id='{0}'><origin-id xmlns='urn:xmpp:sid:0' "
              "id='o1'/></message>")
    assert d.from_upstream(s, parse(origin.format("2")), out) is not None
    assert d.from_upstream(s, parse(origin.format("3")), out) is None  # same origin-id
    now[0] = 11.0
    assert d.from_upstream(s, parse("<message from='b@localhost/x' id='1'/>"), out) is not None


def test_with_stream_management_upstream_acks_confirm_instead_of_barriers() -> None:
    box = make_outbox(barrier_every=2, max_buffer=10)
    enable = box.sm_enable()
    assert enable.tag == "{urn:xmpp:sm:3}enable"
    box.note_direct()  # a restore presence the server counts too
    box.submit(msg(1))
    out = box.submit(msg(2))
    assert [e.tag for e in out][-1] == "{urn:xmpp:sm:3}r"  # the barrier is an <r/> now
    box.on_sm_ack(2)  # the presence and m1
    assert [e.get("id") for _, e in box.unconfirmed] == ["m2"]
    box.on_sm_ack(3)
    assert not box.unconfirmed
    box.submit(msg(3))
    ping_barrier = box.sm_failed()  # refused after all: back to a ping covering m3
    assert ping_barrier.find("{urn:xmpp:ping}ping") is not None
    assert box.on_reply(reply(ping_barrier.get("id")))
    assert not box.unconfirmed


def test_at_most_two_barriers_in_flight_then_the_flush_covers_the_rest() -> None:
    box = make_outbox(barrier_every=2, max_buffer=100)
    sent = [e for n in range(10) for e in box.submit(msg(n))]
    barriers = [e.get("id") for e in sent if e.tag == "{jabber:client}iq"]
    assert barriers == ["b1", "b2"]  # not one per two stanzas while unanswered
    assert box.on_reply(reply("b2"))  # confirms m0..m3
    assert box.unconfirmed[0][1].get("id") == "m4"
    more = box.submit(msg(10))  # room again: the backlog gets its barrier
    assert more[-1].get("id") == "b3"
    assert box.on_reply(reply("b3"))
    assert not box.unconfirmed
