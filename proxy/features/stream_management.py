"""XEP-0198 stream management toward clients (``urn:xmpp:sm:3``), socket-free.

It sits at the client edge of a session, outside the feature pipeline: it counts what the
client sent, keeps what was sent to the client until acknowledged, and knows what to resend on
resumption. The session shell owns connections and timers and asks it what to do.

Counter arithmetic (modulo 2^32) is proxy/xmpp/counters.py's, the one home for it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime


from ..xmpp import counters, ns
from ..xmpp import stanza as st
from ..xmpp.stanza import Element


MOD = counters.MOD
_DELAY = ns.qname(ns.DELAY, "delay")


def sm_element(local: str, attrib: dict[str, str] | None = None) -> Element:
    return st.element(local, attrib, namespace=ns.SM)


def failed(condition: str, *, h: int | None = None, text: str | None = None) -> Element:
    """``<failed/>`` with a stanza error condition as a direct child (XEP-0198 §3, §5)."""
    el = sm_element("failed")
    if h is not None:
        el.set("h", str(h))
    st.sub(el, condition, namespace=ns.STANZA_ERRORS)
    if text:
        st.sub(el, "text", namespace=ns.STANZA_ERRORS, text=text)
    return el


def parse_h(el: Element) -> int | None:
    """The ``h`` attribute as a counter value, or None when missing or out of range."""
    try:
        h = int(el.get("h", ""))
    except ValueError:
        return None
    return h if counters.valid(h) else None


def delay_stamp(el: Element, when: float, from_: str) -> None:
    """Stamp a message with XEP-0203 ``<delay/>`` unless it already carries one."""
    if el.tag != st.MESSAGE or el.find(_DELAY) is not None:
        return
    stamp = datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    delay = st.sub(el, "delay", {"from": from_, "stamp": stamp}, namespace=ns.DELAY)
    delay.tail = None


class HandledCountTooHigh(Exception):
    """The client acknowledged more stanzas than were sent to it."""

    def __init__(self, h: int, sent: int) -> None:
        super().__init__(f"h={h} but only {sent} sent")
        self.h = h
        self.sent = sent

    def app_condition(self) -> Element:
        return sm_element("handled-count-too-high", {"h": str(self.h),
                                                     "send-count": str(self.sent)})


@dataclass(slots=True)
class Unacked:
    element: Element
    queued_at: float  # wall-clock time the proxy took it on (for <delay/> on resend)


@dataclass(slots=True)
class StreamManagement:
    """One session's SM state; it survives the client connection when resumable.

    ``unacked`` holds every stanza for the client after the last one it acknowledged; the
    first ``written`` of them went out on its connection, the rest wait (hibernation).
    """

    sm_id: str
    resumable: bool
    max_resume: int  # seconds granted in <enabled max=.../>
    max_queue: int
    wall_clock: Callable[[], float] = time.time
    inbound: int = 0  # h: client stanzas handled since <enable/>
    acked: int = 0  # the last h the client sent us
    written: int = 0
    unacked: deque[Unacked] = field(default_factory=deque)
    ack_requested_at: float | None = None  # monotonic time of our outstanding <r/>

    @classmethod
    def enable(cls, request: Element, *, sm_id: str, resume_allowed: bool, resume_timeout: int,
               max_resume_timeout: int, max_queue: int, counter_start: int = 0,
               wall_clock: Callable[[], float] = time.time) -> tuple[StreamManagement, Element]:
        """Accept ``<enable/>``; returns the state and the ``<enabled/>`` to send."""
        wants_resume = request.get("resume", "false") in ("true", "1") and resume_allowed
        asked = request.get("max", "")
        granted = int(asked) if asked.isdigit() and int(asked) > 0 else resume_timeout
        granted = min(granted, max_resume_timeout)
        state = cls(sm_id=sm_id, resumable=wants_resume, max_resume=granted,
                    max_queue=max_queue, wall_clock=wall_clock,
                    inbound=counters.wrap(counter_start), acked=counters.wrap(counter_start))
        enabled = sm_element("enabled")
        if wants_resume:
            enabled.attrib.update({"id": sm_id, "resume": "true", "max": str(granted)})
        return state, enabled

    # What the client sent -------------------------------------------------------------------

    def count_inbound(self) -> None:
        self.inbound = counters.increment(self.inbound)

    def answer(self) -> Element:
        """The ``<a h/>`` for a client's ``<r/>``."""
        return sm_element("a", {"h": str(self.inbound)})

    # What the client is sent ------------------------------------------------------------------

    @property
    def sent(self) -> int:
        return counters.increment(self.acked, self.written)

    @property
    def overflowing(self) -> bool:
        return len(self.unacked) > self.max_queue

    def track(self, el: Element, *, written: bool) -> None:
        """``el`` goes to the client: written now, or kept until it comes back."""
        self.unacked.append(Unacked(el, self.wall_clock()))
        if written:
            self.written += 1

    def acknowledge(self, h: int) -> int:
        """Drop what ``h`` acknowledges; returns how many. HandledCountTooHigh if it
        acknowledges more than was written."""
        newly = counters.since(h, self.acked)
        if newly > self.written:
            raise HandledCountTooHigh(h, self.sent)
        for _ in range(newly):
            self.unacked.popleft()
        self.acked = h
        self.written -= newly
        self.ack_requested_at = None
        return newly

    def request_ack(self, now: float, *, always: bool = False) -> Element | None:
        """An ``<r/>`` when written stanzas await acknowledgement and none is outstanding
        (``always``: whatever is outstanding, as after resumption)."""
        if not always and (not self.written or self.ack_requested_at is not None):
            return None
        self.ack_requested_at = now
        return sm_element("r")

    # Connections --------------------------------------------------------------------------------

    def detached(self) -> None:
        """The client's connection is gone; an outstanding request died with it."""
        self.ack_requested_at = None

    def resume(self, h: int, from_: str) -> list[Element]:
        """Resumption with the client's ``h``: everything not acknowledged, in order, to be
        written on the new connection (messages stamped with their original time)."""
        self.acknowledge(h)
        resend = []
        for item in self.unacked:
            delay_stamp(item.element, item.queued_at, from_)
            resend.append(item.element)
        self.written = len(self.unacked)
        return resend

    def take_all(self) -> list[Unacked]:
        """Everything not acknowledged (the session is ending or being taken over)."""
        items = list(self.unacked)
        self.unacked.clear()
        self.written = 0
        return items
