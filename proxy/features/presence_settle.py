"""Presence settles after an outage: no contact flaps to offline because the server was
restarted.

When the legacy server comes back, a restored session's presence makes the server probe its
contacts; contacts whose own sessions the proxy has not restored yet are answered as
``unavailable``, and a client would show them offline until they are back a few seconds
later. For ``settle`` seconds after a restore, an ``unavailable`` from a contact is held
(latest per full JID); an available presence from the same address within the window
replaces it, so the client never sees the flap. When the window closes, whatever is still
held is delivered: those contacts really are offline.
"""

from __future__ import annotations

from ..commands import StartTimer
from ..session import Feature, FeatureFactory, Outputs, SessionCore
from ..xmpp import stanza as st
from ..xmpp.stanza import Element

TIMER = "presence-settle"


class PresenceSettling(Feature):
    __slots__ = ("flaps_hidden", "held", "settle", "settling")

    upstream_tags = frozenset((st.PRESENCE,))

    def __init__(self, settle: float) -> None:
        self.settle = settle
        self.settling = False
        self.held: dict[str, Element] = {}
        self.flaps_hidden = 0

    def upstream_restored(self, session: SessionCore, out: Outputs) -> None:
        if self.settle > 0:
            self.settling = True
            out.commands.append(StartTimer(TIMER, self.settle))

    def from_upstream(self, session: SessionCore, el: Element, out: Outputs) -> Element | None:
        if not self.settling or el.tag != st.PRESENCE or el.get("to", "").split("/")[0] \
                != str(session.account):
            return el
        typ, sender = el.get("type"), el.get("from", "")
        if typ == "unavailable" and "/" in sender:
            self.held[sender] = el
            return None
        if typ is None and self.held.pop(sender, None) is not None:
            self.flaps_hidden += 1  # back within the window: the client never saw it go
        return el

    def timer_fired(self, session: SessionCore, name: str, out: Outputs) -> None:
        if name == TIMER:
            self.settling = False
            out.to_client.extend(self.held.values())
            self.held.clear()


class PresenceSettlingFactory(FeatureFactory):
    def __init__(self, settle: float) -> None:
        self.settle = settle

    def create(self, session: SessionCore) -> Feature:
        return PresenceSettling(self.settle)
