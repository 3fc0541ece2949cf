"""Remembers what an upstream session must get back after a reconnect: the client's last
broadcast presence and the group chat rooms it is in (XEP-0045), and restores them.

Rooms are joined again with a directed presence asking for no history (no flood of old
messages the client has already seen).
"""

from __future__ import annotations

import copy

from ..session import Feature, FeatureFactory, Outputs, SessionCore
from ..xmpp import ns
from ..xmpp import codec
from ..xmpp import stanza as st
from ..xmpp.jid import InvalidJid, Jid
from ..xmpp.stanza import Element


_MUC_X = ns.qname(ns.MUC, "x")


class PresenceMemory(Feature):
    __slots__ = ("broadcast", "rooms")

    client_tags = frozenset((st.PRESENCE,))
    upstream_tags = frozenset((st.PRESENCE,))

    def __init__(self) -> None:
        self.broadcast: Element | None = None  # last available broadcast presence
        self.rooms: dict[str, Element] = {}  # room bare JID -> the join presence

    def from_client(self, session: SessionCore, el: Element, out: Outputs) -> Element | None:
        if el.tag != st.PRESENCE:
            return el
        to, typ = el.get("to"), el.get("type")
        if to is None:
            if typ is None:
                # Kept for the session's life: a copy with no stream parser behind it (a
                # deep copy would keep the client stream's parser alive, 3 to 11 KiB).
                self.broadcast = codec.detached(el)
            elif typ == "unavailable":
                self.broadcast = None
                self.rooms.clear()  # going offline leaves every room too
            return el
        try:
            room = str(Jid.parse(to).bare)
        except InvalidJid:
            return el
        if typ == "unavailable":
            self.rooms.pop(room, None)
        elif typ is None and (el.find(_MUC_X) is not None or room in self.rooms):
            self.rooms[room] = codec.detached(el)  # a join, or a nick or status change
        return el

    def from_upstream(self, session: SessionCore, el: Element, out: Outputs) -> Element | None:
        # Kicked, banned or the room went away: forget it (error or unavailable from it).
        if el.tag == st.PRESENCE and el.get("type") in ("unavailable", "error"):
            sender = el.get("from", "")
            room = sender.split("/", 1)[0]
            join = self.rooms.get(room)
            if join is not None and (el.get("type") == "error" or sender == join.get("to")):
                self.rooms.pop(room, None)
        return el

    def upstream_restored(self, session: SessionCore, out: Outputs) -> None:
        if self.broadcast is not None:
            out.to_upstream.append(copy.deepcopy(self.broadcast))
        for join in self.rooms.values():
            presence = copy.deepcopy(join)
            x = presence.find(_MUC_X)
            if x is None:
                x = st.sub(presence, "x", namespace=ns.MUC)
            for old in x.findall(ns.qname(ns.MUC, "history")):
                x.remove(old)
            st.sub(x, "history", {"maxstanzas": "0"})
            out.to_upstream.append(presence)


class PresenceMemoryFactory(FeatureFactory):
    def create(self, session: SessionCore) -> Feature:
        return PresenceMemory()
