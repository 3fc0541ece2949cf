"""The outbox: client stanzas on their way to the legacy server, kept until the server has
surely handled them. Socket-free.

A legacy server sends no acks and a TCP write proves nothing. But RFC 6120 §10.1 makes a
server handle one stream's stanzas in order, so the reply to an iq the proxy sends after a
batch (a barrier: a ping to the server's domain) confirms every stanza written before it.
Unconfirmed stanzas are replayed, in order and with their ids, after a reconnect.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass, field

from .session import OWN_ID_PREFIX
from .xmpp import counters, ns
from .xmpp import stanza as st
from .xmpp.stanza import Element

MAX_BARRIERS_IN_FLIGHT = 2


def _sequence(entry: tuple[int, Element]) -> int:
    return entry[0]


# Lists, not deques: an idle session's outbox is empty, and an empty deque is 760 bytes
# (its first block), an empty list 56. Taking from the front is a slice deletion, of at
# most ``max_buffer`` pointers, once per confirmation, not per stanza.
@dataclass(slots=True)
class Outbox:
    domain: str
    max_buffer: int
    barrier_every: int
    new_id: Callable[[], str]
    connected: bool = False
    # Written but not yet confirmed, in order, with their write sequence numbers.
    unconfirmed: list[tuple[int, Element]] = field(default_factory=list)
    # Not yet written (while the server is away).
    pending: list[Element] = field(default_factory=list)
    # Outstanding barriers, oldest first: (iq id, the sequence number they confirm up to).
    barriers: list[tuple[str, int]] = field(default_factory=list)
    written: int = 0  # sequence number of the next write
    unbarriered: int = 0  # written since the last barrier
    # The client's iq requests still waiting for the server's answer, by id.
    awaiting: dict[str, Element] = field(default_factory=dict)
    # When the server offers XEP-0198, its acks confirm instead of barriers: ``sm_base`` is
    # the sequence number of the first stanza it counts, ``sm_h`` its last ``h``.
    sm: bool = False
    sm_base: int = 0
    sm_h: int = 0
    # Submitted stanzas that left from the front (confirmed or drained): the ledger's count.
    left: int = 0

    @property
    def size(self) -> int:
        return len(self.unconfirmed) + len(self.pending)

    @property
    def full(self) -> bool:
        return self.size >= self.max_buffer

    def _write(self, el: Element) -> None:
        self.unconfirmed.append((self.written, el))
        self.written += 1
        self.unbarriered += 1

    def submit(self, el: Element) -> list[Element]:
        """A client stanza for the server; returns what to write now."""
        if el.tag == st.IQ and el.get("type") in ("get", "set"):
            iq_id = el.get("id", "")
            if iq_id and not iq_id.startswith(OWN_ID_PREFIX):
                self.awaiting[iq_id] = el  # a client request: it must not hang on an outage
        if not self.connected:
            self.pending.append(el)
            return []
        self._write(el)
        # At most two barriers in flight: under load the server's next reply confirms more
        # at once, and it is not made to answer a ping per few stanzas.
        if self.unbarriered >= self.barrier_every and len(self.barriers) < MAX_BARRIERS_IN_FLIGHT:
            return [el, self.barrier()]
        return [el]

    def barrier(self) -> Element:
        """A barrier covering everything written so far (also sent when a batch is done):
        a ping iq, or with stream management upstream an ``<r/>``."""
        self.unbarriered = 0
        if self.sm:
            return st.element("r", namespace=ns.SM)
        iq_id = self.new_id()
        self.barriers.append((iq_id, self.written))
        self.written += 1  # the ping is a stanza too
        iq = st.element("iq", {"type": "get", "id": iq_id, "to": self.domain})
        st.sub(iq, "ping", namespace=ns.PING)
        return iq

    def note_direct(self) -> None:
        """A stanza went to the server outside the outbox (restore, bounces): the server's
        stream-management count includes it."""
        self.written += 1

    def sm_enable(self) -> Element:
        """Switch to the server's acks; the returned ``<enable/>`` must be written next."""
        self.sm, self.sm_base, self.sm_h = True, self.written, 0
        self.barriers.clear()
        return st.element("enable", namespace=ns.SM)

    def sm_failed(self) -> Element:
        """The server refused ``<enable/>``: back to barriers, one covering all so far."""
        self.sm = False
        return self.barrier()

    def on_sm_ack(self, h: int) -> None:
        """``<a h/>`` from the server: everything it counted is handled."""
        self.sm_base += counters.since(h, self.sm_h)
        self.sm_h = h
        self._confirm_below(self.sm_base)

    def on_reply(self, el: Element) -> bool:
        """True when ``el`` answers one of our barriers (it must not reach the client)."""
        if el.tag != st.IQ or el.get("type") not in ("result", "error"):
            return False
        reply_id = el.get("id", "")
        if self.awaiting:
            self.awaiting.pop(reply_id, None)
        if not self.barriers:
            return False
        for index, (iq_id, upto) in enumerate(self.barriers):
            if iq_id == reply_id:
                # In-order handling: this reply confirms the older barriers' stanzas too.
                del self.barriers[:index + 1]
                self._confirm_below(upto)
                return True
        return False

    def _confirm_below(self, upto: int) -> None:
        """Everything written before sequence number ``upto`` is confirmed. The numbers
        of ``unconfirmed`` only grow, so how many go follows from a binary search, not a
        comparison per stanza."""
        count = bisect_left(self.unconfirmed, upto, key=_sequence)
        if count:
            del self.unconfirmed[:count]
        self.left += count

    def connection_lost(self) -> list[Element]:
        """Nothing written is confirmed any more: all of it waits for the next connection.

        Returns error replies for the client's iq requests that the server had confirmed
        but not answered: they will not be replayed, and no request may hang.
        """
        lost = [req for req in self.awaiting.values() if not self.holds(req)]
        for req in lost:
            del self.awaiting[req.get("id", "")]
        self.connected = False
        self.sm = False
        self.pending[:0] = [el for _, el in self.unconfirmed]
        self.unconfirmed.clear()
        self.barriers.clear()
        self.unbarriered = 0
        return [st.error_reply(req, "remote-server-timeout", error_type="wait",
                               text="the legacy server went away before answering")
                for req in lost]

    def reconnected(self) -> list[Element]:
        """What to replay on the new connection, in the original order, plus a barrier."""
        self.connected = True
        replay = list(self.pending)
        self.pending.clear()
        for el in replay:
            self._write(el)
        return [*replay, self.barrier()] if replay else []

    def drain(self) -> list[Element]:
        """Giving up: everything never confirmed, for the caller to bounce."""
        items = [el for _, el in self.unconfirmed] + list(self.pending)
        self.left += len(items)
        self.unconfirmed.clear()
        self.pending.clear()
        self.barriers.clear()
        self.awaiting.clear()
        return items

    def held(self) -> list[Element]:
        """Everything not yet confirmed, oldest first (without taking it out)."""
        return [el for _, el in self.unconfirmed] + list(self.pending)

    def holds(self, el: Element) -> bool:
        """Is ``el`` still waiting to be confirmed (so it will be replayed)?"""
        return any(x is el for _, x in self.unconfirmed) or any(x is el for x in self.pending)
