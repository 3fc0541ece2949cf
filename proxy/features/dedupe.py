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


PRUNE_EVERY = 64  # messages between two sweeps of what fell out of the window


class Dedupe(Feature):
    __slots__ = ("_until_prune", "clock", "max_entries", "seen", "window")

    upstream_tags = frozenset((st.MESSAGE,))

    def __init__(self, window: float, max_entries: int, clock: Callable[[], float]) -> None:
        self.window = window
        self.max_entries = max_entries
        self.clock = clock
        # key -> when the client was given it, oldest first
        self.seen: OrderedDict[tuple[str, str, str], float] = OrderedDict()
        self._until_prune = PRUNE_EVERY

    @staticmethod
    def key(el: Element) -> tuple[str, str, str] | None:
        # The sender is part of the key: nobody can suppress another's message by reusing
        # its id or origin-id.
        for child in el:  # the first origin-id, as find() would give, without its path parser
            if child.tag == _ORIGIN_ID:
                origin = child.get("id")
                if origin:
                    return ("origin-id", el.get("from", ""), origin)
                break
        msg_id = el.get("id")
        if msg_id:
            return ("id", el.get("from", ""), msg_id)
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
        seen = self.seen
        given = seen.get(key)
        if given is not None:
            if given >= now - self.window:
                return None
            del seen[key]  # out of the window: a new message after all
        # Full (as it stays under steady load): the oldest goes, one per message. What fell
        # out of the window is swept every PRUNE_EVERY messages, not on each one (a stale
        # entry never drops anything: its time is checked above).
        while len(seen) >= self.max_entries:
            seen.popitem(last=False)
        self._until_prune -= 1
        if self._until_prune <= 0:
            self._until_prune = PRUNE_EVERY
            oldest = now - self.window
            while seen and next(iter(seen.values())) < oldest:
                seen.popitem(last=False)
        seen[key] = now
        return el


class DedupeFactory(FeatureFactory):
    def __init__(self, window: float = 600.0, max_entries: int = 2000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.window, self.max_entries, self.clock = window, max_entries, clock

    def create(self, session: SessionCore) -> Feature:
        return Dedupe(self.window, self.max_entries, self.clock)
