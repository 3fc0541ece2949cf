"""What waits while a client is inactive (XEP-0352), decided without sockets."""

from __future__ import annotations

from lxml import etree

from proxy.features.csi import ClientState, hold_key
from proxy.session import Outputs, SessionCore
from proxy.xmpp.jid import Jid


def el(xml: str) -> etree._Element:
    return etree.fromstring(xml.replace("<message", "<message xmlns='jabber:client'", 1)
                            .replace("<presence", "<presence xmlns='jabber:client'", 1)
                            .replace("<iq", "<iq xmlns='jabber:client'", 1))


def test_what_is_urgent_and_what_waits() -> None:
    assert hold_key(el("<presence from='a@x/r'/>")) == ("presence", "a@x/r")
    assert hold_key(el("<presence from='a@x/r' type='unavailable'/>")) == ("presence", "a@x/r")
    for typ in ("subscribe", "subscribed", "unsubscribe", "unsubscribed", "error", "probe"):
        assert hold_key(el(f"<presence from='a@x' type='{typ}'/>")) is None
    assert hold_key(el("<message from='a@x/r'><body>hi</body></message>")) is None
    assert hold_key(el("<message from='a@x/r'><composing xmlns="
                       "'http://jabber.org/protocol/chatstates'/></message>")) == \
        ("chatstate", "a@x/r")
    # A chat state beside a body is a message a user must see.
    assert hold_key(el("<message from='a@x/r'><body>hi</body><active xmlns="
                       "'http://jabber.org/protocol/chatstates'/></message>")) is None
    assert hold_key(el("<message from='a@x'><event xmlns="
                       "'http://jabber.org/protocol/pubsub#event'/></message>")) == ("", "")
    assert hold_key(el("<message from='a@x' type='error'><event xmlns="
                       "'http://jabber.org/protocol/pubsub#event'/></message>")) is None
    assert hold_key(el("<iq type='get' id='1'/>")) is None
    assert hold_key(el("<message from='a@x'/>")) is None  # empty: nothing to judge by


def test_latest_per_sender_in_order_and_the_end_discards() -> None:
    core = SessionCore(Jid.parse("me@x/phone"))
    csi = ClientState(max_held=10)
    csi.client_nonza(core, el("<inactive xmlns='urn:xmpp:csi:0'/>"), Outputs())
    out = Outputs()
    for xml in ("<presence from='a@x/1'/>", "<presence from='b@x/1'/>",
                "<presence from='a@x/1'><show>away</show></presence>"):
        assert csi.from_upstream(core, el(xml), out) is None
    assert out.to_client == [] and [p.get("from") for p in csi.held] == ["b@x/1", "a@x/1"]
    assert csi.discarded == 1  # the superseded presence
    urgent = el("<message from='c@x/1'><body>now</body></message>")
    assert csi.from_upstream(core, urgent, out) is urgent
    assert [p.get("from") for p in out.to_client] == ["b@x/1", "a@x/1"]
    csi.from_upstream(core, el("<presence from='d@x/1'/>"), Outputs())
    csi.closed(core)
    assert csi.discarded == 2 and csi.held == []


def test_dedupe_counts_stored_copies_and_keys_by_sender() -> None:
    from proxy.features.dedupe import Dedupe

    core = SessionCore(Jid.parse("me@x/phone"))
    dedupe = Dedupe(window=60, max_entries=100, clock=lambda: 0.0)
    stored = el("<message from='a@x/1' id='m1'><body>hi</body></message>")
    assert dedupe.from_store(core, stored) is stored
    again = el("<message from='a@x/1' id='m1'><body>hi</body></message>")
    assert dedupe.from_upstream(core, again, Outputs()) is None  # the server's own copy
    spoof = el("<message from='evil@x/1' id='m1'><body>hi</body></message>")
    assert dedupe.from_upstream(core, spoof, Outputs()) is spoof  # another sender's id
    origin = ("<message from='{f}' id='{i}'><body>x</body>"
              "<origin-id xmlns='urn:xmpp:sid:0' id='o1'/></message>")
    first = el(origin.format(f="a@x/1", i="p1"))
    assert dedupe.from_upstream(core, first, Outputs()) is first
    assert dedupe.from_upstream(core, el(origin.format(f="a@x/1", i="p2")), Outputs()) is None
    other = el(origin.format(f="b@x/1", i="p3"))
    assert dedupe.from_upstream(core, other, Outputs()) is other


def test_dedupe_forgets_a_message_once_its_window_has_passed() -> None:
    """Entries are swept only every few messages; a stale one must still let the message
    through (its time is checked on the hit)."""
    from proxy.features.dedupe import PRUNE_EVERY, Dedupe

    now = [0.0]
    core = SessionCore(Jid.parse("me@x/phone"))
    dedupe = Dedupe(window=60, max_entries=100, clock=lambda: now[0])

    def message(i: str) -> etree._Element:
        return el(f"<message from='a@x/1' id='{i}'><body>hi</body></message>")

    assert dedupe.from_upstream(core, message("m1"), Outputs()) is not None
    now[0] = 59.0
    assert dedupe.from_upstream(core, message("m1"), Outputs()) is None  # within the window
    now[0] = 61.0
    late = message("m1")
    assert dedupe.from_upstream(core, late, Outputs()) is late  # past it: a new message
    assert dedupe.from_upstream(core, message("m1"), Outputs()) is None  # and counted anew
    for i in range(300):  # one a second: the sweeps keep about the window's worth
        now[0] = 200.0 + i
        dedupe.from_upstream(core, message(f"n{i}"), Outputs())
    stale = [t for t in dedupe.seen.values() if t < now[0] - 60]
    assert len(stale) < PRUNE_EVERY
    assert len(dedupe.seen) <= 61 + PRUNE_EVERY


def test_dedupe_holds_at_most_max_entries_oldest_forgotten_first() -> None:
    from proxy.features.dedupe import Dedupe

    core = SessionCore(Jid.parse("me@x/phone"))
    dedupe = Dedupe(window=600, max_entries=10, clock=lambda: 0.0)
    for i in range(25):
        dedupe.from_upstream(core, el(f"<message from='a@x/1' id='m{i}'/>"), Outputs())
    assert len(dedupe.seen) <= 10
    newest = el("<message from='a@x/1' id='m24'/>")
    assert dedupe.from_upstream(core, newest, Outputs()) is None
    oldest = el("<message from='a@x/1' id='m0'/>")
    assert dedupe.from_upstream(core, oldest, Outputs()) is oldest
