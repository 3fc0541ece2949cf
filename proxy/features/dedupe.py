"""No message delivered twice: a replay after an upstream reconnect can make the legacy
server route a second copy of a message it had already handled. A message the client has
already been given (same sender and id, or same XEP-0359 origin-id) within a window is
dropped."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable


from ..session import Feature, FeatureFactory, Outputs, SessionCore
from ..xmpp import stanza as st
from ..xmpp.stanza import Element


_ORIGIN_ID = "{urn:xmpp:sid:0}origin-id"


class Dedupe(Feature):
    def __init__(self, window: float, max_entries: int, clock: Callable[[], float]) -> None:
        self.window = window
        self.max_entries = max_entries
        self.clock = clock
        self.seen: OrderedDict[tuple[str, str, str], float] = OrderedDict()

    @staticmethod
    def key(el: Element) -> tuple[str, str, str] | None:
        # The sender is part of the key: nobody can suppress another's message by reusing
        # its id or origin-id.
        origin = el.find(_ORIGIN_ID)
        if origin is not None and origin.get("id"):
            return ("origin-id", el.get("from", ""), origin.get("id", ""))
        if el.get("id"):
            return ("id", el.get("from", ""), el.get("id", ""))
        return None

    def from_store(self, session: SessionCore, el: Element) -> Element | None:
        # Stored copies count too: the server may hold its own copy of the same message
        # (its offline storage after a replay) and deliver it right after ours.
        return self.from_upstream(session, el, Outputs())

    def from_upstream(self, session: SessionCore, el: Element, out: Outputs) -> Element | None:
        if el.tag != st.MESSAGE or el.get("type") == "error":
            return el
        key = self.key(el)
        if key is None:
            return el
        now = self.clock()
        while self.seen and (len(self.seen) >= self.max_entries
                             or next(iter(self.seen.values())) < now - self.window):
            self.seen.popitem(last=False)
        if key in self.seen:
            return None
        self.seen[key] = now
        return el


class DedupeFactory(FeatureFactory):
    def __init__(self, window: float = 600.0, max_entries: int = 2000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.window, self.max_entries, self.clock = window, max_entries, clock

    def create(self, session: SessionCore) -> Feature:
        return Dedupe(self.window, self.max_entries, self.clock)
