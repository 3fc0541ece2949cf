"""Client state indication (XEP-0352) for a server that has none: while a client says it is
inactive (a phone in a pocket), what it does not need at once waits in the session.

Held: broadcast presence (only the latest per sender: a contact going away and back is one
update), chat-state notifications (only the latest per sender) and other body-less
notifications (PEP events). Everything else is urgent (a message with a body, an error, a
subscription request, any iq) and goes out at once, after what was held, so order holds.
``<active/>``, a held buffer of ``max_held`` stanzas, and every new connection (a stream
starts active; the state is not kept across a resumption, XEP-0352 §5.2) flush it.

Held stanzas are not in the session's ledger yet: they enter it (and the stream management
queue) when released. What a session still holds when it ends is discarded and counted
(presence is state the next session receives afresh; chat states are ephemeral).
First in the pipeline, so it sees the stanzas as the client would get them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from lxml import etree

from ..session import Feature, FeatureFactory, Outputs, SessionCore
from ..xmpp import ns
from ..xmpp import stanza as st
from ..xmpp.stanza import Element

CHATSTATES = "http://jabber.org/protocol/chatstates"
PUBSUB_EVENT = "http://jabber.org/protocol/pubsub#event"
# Children that say nothing a user must see now: a message made only of these can wait.
_QUIET_NAMESPACES = frozenset((CHATSTATES, PUBSUB_EVENT, ns.DELAY, ns.SID,
                               "urn:xmpp:hints", "http://jabber.org/protocol/address"))
_INACTIVE, _ACTIVE = ns.qname(ns.CSI, "inactive"), ns.qname(ns.CSI, "active")

DEFAULT_MAX_HELD = 100


def hold_key(el: Element) -> tuple[str, str] | None:
    """How a stanza waits while the client is inactive: None if it is urgent, else a key;
    a newer stanza with the same key replaces the held one (``("", "")`` never does)."""
    if el.tag == st.PRESENCE:
        if el.get("type") in (None, "unavailable"):
            return ("presence", el.get("from", ""))
        return None  # subscription requests and answers, errors, probes
    if el.tag == st.MESSAGE and el.get("type") != "error":
        children = [etree.QName(c).namespace for c in el if isinstance(c.tag, str)]
        if children and all(n in _QUIET_NAMESPACES for n in children):
            if CHATSTATES in children:
                return ("chatstate", el.get("from", ""))
            return ("", "")  # a PEP event and the like: held, never replaced
    return None


class ClientState(Feature):
    __slots__ = ("_held", "_serial", "discarded", "inactive", "max_held")

    def __init__(self, max_held: int) -> None:
        self.max_held = max_held
        self.inactive = False
        self._held: OrderedDict[object, Element] = OrderedDict()
        self._serial = 0
        self.discarded = 0

    def client_nonza(self, session: SessionCore, el: Element, out: Outputs) -> bool:
        if el.tag == _INACTIVE:
            self.inactive = session.client_inactive = True
            return True
        if el.tag == _ACTIVE:
            self.inactive = session.client_inactive = False
            self._release(out)
            return True
        return False

    def client_attached(self, session: SessionCore, out: Outputs) -> None:
        self.inactive = session.client_inactive = False
        self._release(out)

    def from_upstream(self, session: SessionCore, el: Element, out: Outputs) -> Element | None:
        if not self.inactive:
            return el
        key = hold_key(el)
        if key is None:
            self._release(out)  # what waited goes first: order holds
            return el
        if key == ("", ""):
            self._serial += 1
            slot: object = self._serial
        else:
            slot = key
            if self._held.pop(slot, None) is not None:
                self.discarded += 1  # superseded by the newer one
        self._held[slot] = el
        if len(self._held) >= self.max_held:
            self._release(out)
        return None

    def _release(self, out: Outputs) -> None:
        out.to_client.extend(self._held.values())
        self._held.clear()

    @property
    def held(self) -> list[Element]:
        return list(self._held.values())

    def closed(self, session: SessionCore) -> None:
        self.discarded += len(self._held)
        self._held.clear()


class ClientStateFactory(FeatureFactory):
    def __init__(self, max_held: int = DEFAULT_MAX_HELD) -> None:
        self.max_held = max_held

    def stream_features(self) -> Iterable[Element]:
        return [st.element("csi", namespace=ns.CSI)]

    def create(self, session: SessionCore) -> Feature:
        return ClientState(self.max_held)
