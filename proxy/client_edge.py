"""The client edge of a session, socket-free: stream management toward the client (XEP-0198),
the session's lifecycle (active, hibernating, ended) and its ledger. Events in, commands out.

The shell (``proxy/net/live.py``) tells it what happened: a stanza for the client, a stanza
or a nonza from it, a timer that fired, the connection gone, a resumption, the end. It returns
:mod:`proxy.commands` for the shell to carry out. Every decision at this edge lives here:
when to ask for and answer acks, when a link is dead, whether a lost client hibernates or
ends the session, what of the unacknowledged queue is stored, bounced or discarded, and how
each stanza leaves the ledger (with the journal's puts and cuts).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from lxml import etree

from .commands import (AbortClient, AckWhenDurable, CancelTimer, ClientLeaves, CloseClient,
                       Command, EndSession, JournalCut, JournalPut, Log, MoreStored,
                       SmRegister, StartTimer, StoreOffline, StorePending, ToClient,
                       ToServerDirect)
from .features.stream_management import (HandledCountTooHigh, StreamManagement, Unacked,
                                         delay_stamp, failed, parse_h, sm_element)
from .journal import origin_id_template, parse_stored, replayable, storable
from .ledger import Exit, Ledger
from .session import OWN_ID_PREFIX
from .xmpp import codec, counters, ns
from .xmpp import stanza as st
from .xmpp.stanza import Element

State = Literal["active", "hibernating", "ended"]

ACK_TIMER, HIBERNATION_TIMER = "ack", "hibernation"
CLOSE_GRACE = 2.0  # seconds a client gets to close its stream after ours

_STREAM_ERROR = ns.qname(ns.STREAM, "error")
_SM_R, _SM_A = ns.qname(ns.SM, "r"), ns.qname(ns.SM, "a")
_SM_ENABLE, _SM_RESUME = ns.qname(ns.SM, "enable"), ns.qname(ns.SM, "resume")
_ORIGIN_ID = ns.qname(ns.SID, "origin-id")


@dataclass(frozen=True, slots=True)
class EdgePolicy:
    """The settings the edge decides by (from ``stream_management`` and ``durability``)."""

    domain: str
    ack_timeout: float = 60.0
    resume_timeout: int = 300
    max_resume_timeout: int = 600
    max_queue: int = 1000
    on_timeout: Literal["store", "bounce"] = "store"
    stored_ttl: float = 604800
    pending_ttl: float = 86400
    counter_start: int = 0
    journal: bool = False  # acks wait for the journal, ledger changes are journaled
    store: bool = True  # there is a store to keep messages in
    # What ensure_origin_id copies into each journaled client message: the journal's (one
    # element per proxy, never changed); None: no origin-id is added (durability.origin_id).
    origin_id: Element | None = field(default=None, compare=False, repr=False)


class ClientEdge:
    __slots__ = (
        "_ack_timed_out", "_offline_delivered", "_stored_backlog", "attached", "clock", "holding",
        "ledger", "new_sm_id", "policy", "sm", "state", "wall_clock",
    )

    def __init__(self, policy: EdgePolicy, *, new_sm_id: Callable[[], str],
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.policy = policy
        self.new_sm_id = new_sm_id
        self.clock = clock
        self.wall_clock = wall_clock
        self.state: State = "active"
        self.sm: StreamManagement | None = None
        self.ledger = Ledger()
        self.attached = False  # a client connection is there to write to
        self._ack_timed_out = False
        self._offline_delivered = False
        self._stored_backlog = False  # stored messages wait for room in the SM queue
        # A graceful stop began: stanzas for a stream-management client are no longer
        # written, only queued (and stored at the end), so nothing the client never gets to
        # acknowledge is both delivered and stored.
        self.holding = False

    # Stanzas for the client ---------------------------------------------------------------------

    def for_client(self, el: Element, *, upstream_up: bool, own: bool = False) -> list[Command]:
        """A stanza for the client enters the ledger: the SM queue holds it until acked;
        without SM it is delivered when written; with no client at all it is settled."""
        lane = self.ledger.s2c
        sm = self.sm
        if sm is not None:
            number = lane.enter()
            write = self.attached and (not self.holding or self._may_write_while_holding(el, own))
            sm.track(el, written=write)
            out: list[Command] = []
            document = None
            if self.policy.journal:
                document = codec.document(el)
                out.append(JournalPut("s2c", number, document, sm.unacked[-1].queued_at))
            if write:
                out.append(ToClient(el, own, document))
            if sm.overflowing:
                out += [Log("sm_queue_overflow", {"queued": len(sm.unacked)}, "warning"),
                        EndSession("stream management queue overflow")]
            return out
        if self.attached:
            lane.passed("delivered")
            return [ToClient(el, own)]
        # No client and nothing to hold it: the session is ending (or ended).
        return self.settle_from_server(el, upstream_up=upstream_up)

    def hold_for_stop(self) -> None:
        """The proxy is stopping: from now on the client's last acks settle what it was
        written, and what comes for it after is queued unwritten, to be stored at the end."""
        self.holding = True

    def _may_write_while_holding(self, el: Element, own: bool) -> bool:
        """The proxy's own iq answers (the ``remote-server-timeout`` of a stop while the
        server is away) still go out while nothing waits unwritten before them (the queue's
        written part stays its front): an iq error is discarded at the end, never stored,
        so it cannot come twice."""
        sm = self.sm
        return (own and st.kind(el) == "iq" and sm is not None
                and sm.written == len(sm.unacked))

    def settle_from_server(self, el: Element, *, upstream_up: bool) -> list[Command]:
        """A server stanza for a client that is gone for good: a message (or subscription
        request) is stored for the account's next login, an iq request is answered, the
        rest is discarded. Counted in the ledger either way."""
        lane = self.ledger.s2c
        lane.enter()
        now = self.wall_clock()
        if self.policy.store and storable(el):
            delay_stamp(el, now, self.policy.domain)
            lane.leave(1, "stored")
            return [StoreOffline(etree.tostring(el), now + self.policy.stored_ttl)]
        if st.kind(el) == "iq" and el.get("type") in ("get", "set") and upstream_up:
            lane.leave(1, "bounced")
            return [ToServerDirect(st.error_reply(el, "service-unavailable"))]
        lane.leave(1, "discarded")
        return []

    def request_ack(self, *, always: bool = False) -> list[Command]:
        """Ask the client for an ack when written stanzas await one (``always``: whatever is
        outstanding, as after resumption); no answer within ack_timeout: a dead link."""
        if self.sm is None or not self.attached:
            return []
        request = self.sm.request_ack(self.clock(), always=always)
        if request is None:
            return []
        return [ToClient(request), StartTimer(ACK_TIMER, self.policy.ack_timeout)]

    def stored_ready(self, el: Element) -> bool:
        """Initial presence from the client: time for stored messages (like a server's
        offline storage, they follow it). True once."""
        if (self._offline_delivered or el.tag != st.PRESENCE or el.get("type") is not None
                or el.get("to") is not None):
            return False
        self._offline_delivered = True
        return True

    def stored_room(self) -> int | None:
        """How many stored stanzas may go out now: with stream management, what half the
        queue has room for (acks make room for the rest); without, all of them."""
        if self.sm is None:
            return None
        return max(1, self.policy.max_queue // 2 - len(self.sm.unacked))

    def deliver_stored(self, stored: list[Element], *, upstream_up: bool,
                       dropped: int = 0, more: bool = False) -> list[Command]:
        """Stored stanzas for the client (already past the features' ``from_store``;
        ``dropped`` of them were copies it had; ``more``: the store holds further ones,
        sent when acks have made room)."""
        self._stored_backlog = more
        out: list[Command] = []
        for el in stored:
            out += self.for_client(el, upstream_up=upstream_up, own=True)
        if stored or dropped:
            out.append(Log("stored_delivered", {"count": len(stored), "duplicates": dropped,
                                                "more": more}))
            out += self.request_ack(always=more)
        return out

    # What the client sends ----------------------------------------------------------------------

    def client_stanza(self) -> None:
        if self.sm is not None:
            self.sm.count_inbound()

    def client_nonza(self, el: Element) -> list[Command]:
        tag = el.tag
        sm = self.sm
        if tag == _SM_R:
            if sm is None:
                return [ToClient(failed("unexpected-request"))]
            answer = sm.answer()
            return [AckWhenDurable(answer) if self.policy.journal else ToClient(answer)]
        if tag == _SM_A:
            h = parse_h(el)
            if sm is None or h is None:
                return [ClientLeaves("bad <a/> from the client",
                                     codec.stream_error("undefined-condition",
                                                        "a bad or unexpected <a/>"))]
            try:
                acked = sm.acknowledge(h)
            except HandledCountTooHigh as exc:
                return [Log("sm_h_too_high", {"h": exc.h, "sent": exc.sent}, "warning"),
                        ClientLeaves("client acknowledged more than was sent",
                                     codec.stream_error("undefined-condition", str(exc),
                                                        app_condition=exc.app_condition()))]
            out = [*self._s2c_left(acked, "delivered"), CancelTimer(ACK_TIMER)]
            if self._stored_backlog and len(sm.unacked) < self.policy.max_queue // 2:
                self._stored_backlog = False
                out.append(MoreStored())
            return out
        if tag == _SM_ENABLE:
            if sm is not None:
                return [ToClient(failed("unexpected-request", text="already enabled"))]
            p = self.policy
            self.sm, enabled = StreamManagement.enable(
                el, sm_id=self.new_sm_id(), resume_allowed=True,
                resume_timeout=p.resume_timeout, max_resume_timeout=p.max_resume_timeout,
                max_queue=p.max_queue, counter_start=p.counter_start,
                wall_clock=self.wall_clock)
            # Outbound counting starts after this write.
            return [SmRegister(self.sm.sm_id if self.sm.resumable else None),
                    ToClient(enabled),
                    Log("sm_enabled", {"resumable": self.sm.resumable,
                                       "max": self.sm.max_resume})]
        if tag == _SM_RESUME:
            return [ToClient(failed("unexpected-request", text="this stream is bound already"))]
        if tag == _STREAM_ERROR:
            return [ClientLeaves(f"client stream error: {st.error_condition(el)}")]
        return [ClientLeaves(f"unsupported element from client: {tag}",
                             codec.stream_error("unsupported-stanza-type",
                                                f"{etree.QName(el).localname} is not supported"))]

    def stream_event(self, event: codec.StreamEvent) -> ClientLeaves:
        """The client's stream ended or broke (anything but a stanza or nonza)."""
        if isinstance(event, codec.StreamClosed):
            return ClientLeaves("client closed the stream")
        if isinstance(event, codec.StreamViolation):
            return ClientLeaves(f"client stream violation: {event.condition}",
                                codec.stream_error(event.condition, event.text))
        # Not reached in practice: the codec reports a header inside the stream as a
        # violation; kept so no event is ever ignored.
        return ClientLeaves("client sent a second stream header",
                            codec.stream_error("unsupported-stanza-type",
                                               "unexpected stream header"))

    # The connection -----------------------------------------------------------------------------

    def attach(self, *, resumed: bool) -> list[Command]:
        """A connection is (again) the session's; after a resumption an ``<r/>`` follows."""
        self.state = "active"
        self.attached = True
        self._ack_timed_out = False
        out: list[Command] = [CancelTimer(HIBERNATION_TIMER)]
        if resumed:
            out += self.request_ack(always=True)
        return out

    def _detach(self) -> list[Command]:
        self.attached = False
        if self.sm is not None:
            self.sm.detached()
        return [CancelTimer(ACK_TIMER)]

    def timer_fired(self, name: str) -> list[Command]:
        if name == ACK_TIMER:
            if self.attached and self.sm is not None and self.sm.ack_requested_at:
                self._ack_timed_out = True
                # A dead link would never finish a polite TLS close: drop it at once.
                return [Log("client_link_dead", {"reason": "no ack within ack_timeout",
                                                 "seconds": self.policy.ack_timeout}),
                        AbortClient("no ack from the client within ack_timeout")]
            return []
        if name == HIBERNATION_TIMER and self.state == "hibernating":
            return [EndSession("resumption timed out")]
        return []

    def connection_lost(self, detail: str) -> str:
        """Why the connection went, as the session's log will say."""
        if self._ack_timed_out:
            return "no ack from the client within ack_timeout"
        return f"client connection lost ({detail})"

    def client_left(self, reason: str, *, end_session: bool,
                    error: bytes | None = None) -> list[Command]:
        """The connection is gone or going: the session hibernates when it can be resumed,
        else it ends (a clean close always ends it)."""
        out = self._detach()
        sm = self.sm
        if end_session or sm is None or not sm.resumable:
            return [*out, CloseClient(error, grace=CLOSE_GRACE), EndSession(reason)]
        self.state = "hibernating"
        return [*out, CloseClient(hard=True),  # already lost: nothing more can reach it
                Log("hibernating", {"reason": reason, "seconds": sm.max_resume,
                                    "queued": len(sm.unacked)}),
                StartTimer(HIBERNATION_TIMER, sm.max_resume)]

    def evict(self, why: str) -> list[Command]:
        """Another connection takes the session: the current one gets ``<conflict/>``."""
        if not self.attached:
            return []
        return [Log("client_evicted", {"reason": why}), *self._detach(),
                CloseClient(codec.stream_error("conflict", why))]

    def resume(self, h: int) -> tuple[list[Element], list[Command]]:
        """``<resumed/>`` and the unacknowledged stanzas for a resuming connection (the
        ``<r/>`` follows when it attaches). Raises HandledCountTooHigh when ``h`` is absurd."""
        assert self.sm is not None
        out = self.evict("the session was resumed from another connection")
        held = len(self.sm.unacked)
        resend = self.sm.resume(h, self.policy.domain)
        out += self._s2c_left(held - len(self.sm.unacked), "delivered")
        resumed = sm_element("resumed", {"h": str(self.sm.inbound), "previd": self.sm.sm_id})
        out.append(Log("resumed", {"h": h, "resent": len(resend)}))
        return [resumed, *resend], out

    def resume_problem(self, h: int) -> HandledCountTooHigh | None:
        """Whether ``h`` on a ``<resume/>`` acknowledges more than was ever written."""
        sm = self.sm
        if sm is not None and counters.since(h, sm.acked) > sm.written:
            return HandledCountTooHigh(h, sm.sent)
        return None

    def take_over(self) -> tuple[list[Element], list[Command]]:
        """A new connection bound this session's resource: it gets the whole queue, written
        first without stream management; SM starts afresh on it."""
        out = self.evict("the resource was bound from another connection")
        queue: list[Element] = []
        if self.sm is not None:
            for item in self.sm.take_all():
                delay_stamp(item.element, item.queued_at, self.policy.domain)
                queue.append(item.element)
            out += self._s2c_left(len(queue), "delivered")
            out.append(SmRegister(None, self.sm.inbound))
            self.sm = None
        out.append(Log("taken_over", {"delivered": len(queue)}))
        return queue, out

    # The end ------------------------------------------------------------------------------------

    def end(self, *, upstream_up: bool, stopping: bool) -> list[Command]:
        """The session ends: what the client never acknowledged is settled (XEP-0198 §5:
        never lost)."""
        self.state = "ended"
        out = [*self._detach(), CancelTimer(HIBERNATION_TIMER)]
        if self.sm is not None:
            out.append(SmRegister(None, self.sm.inbound))
        items = self.sm.take_all() if self.sm is not None else []
        if items:
            out += self._dispose(items, upstream_up, store_all=stopping)
        return out

    def _dispose(self, items: list[Unacked], upstream_up: bool, *,
                 store_all: bool) -> list[Command]:
        """Messages stored or bounced, iq requests answered with service-unavailable,
        subscription requests stored, other presences discarded."""
        p = self.policy
        out: list[Command] = []
        stored = bounced = answered = 0
        expires = self.wall_clock() + p.stored_ttl
        for item in items:
            el = item.element
            kind, typ = st.kind(el), el.get("type")
            if kind == "message":
                # With the server away a bounce cannot leave: store rather than lose it.
                # An error is never answered with an error (RFC 6120 §8.3.1): stored too.
                if p.store and (p.on_timeout == "store" or not upstream_up or store_all
                                or typ == "error"):
                    delay_stamp(el, item.queued_at, p.domain)
                    out.append(StoreOffline(etree.tostring(el), expires))
                    stored += 1
                elif upstream_up and typ != "error":
                    out.append(ToServerDirect(st.error_reply(el, "recipient-unavailable")))
                    bounced += 1
            elif p.store and kind == "presence" and storable(el):
                out.append(StoreOffline(etree.tostring(el), expires))
                stored += 1
            elif kind == "iq" and typ in ("get", "set") and upstream_up:
                out.append(ToServerDirect(st.error_reply(el, "service-unavailable")))
                answered += 1
        discarded = len(items) - stored - bounced - answered
        out += self._s2c_left(stored, "stored")
        out += self._s2c_left(bounced + answered, "bounced")
        out += self._s2c_left(discarded, "discarded")
        out.append(Log("undelivered", {"stored": stored, "bounced": bounced,
                                       "iq_errors": answered, "dropped": discarded}))
        return out

    # The client-to-server lane --------------------------------------------------------------------

    def c2s_taken(self, el: Element) -> list[Command]:
        """A stanza for the server entered the outbox (and the ledger, and the journal)."""
        lane = self.ledger.c2s
        number = lane.entered  # Lane.enter() inline: a call less per stanza
        lane.entered = number + 1
        if not self.policy.journal:
            return []
        # After a crash this one may be sent twice: its id (and, if the operator asks for
        # one, an origin-id) lets receivers tell.
        origin = self.policy.origin_id
        if origin is not None:
            ensure_origin_id(el, origin)
        return [JournalPut("c2s", number, codec.document(el), self.wall_clock())]

    def c2s_left(self, count: int, exit: Exit) -> list[Command]:
        if not count:
            return []
        left = self.ledger.c2s.leave(count, exit)
        return [JournalCut("c2s", left)] if self.policy.journal else []

    def _s2c_left(self, count: int, exit: Exit) -> list[Command]:
        if not count:
            return []
        left = self.ledger.s2c.leave(count, exit)
        return [JournalCut("s2c", left)] if self.policy.journal else []

    def bounce_to_sender(self, error: Element, *, upstream_up: bool) -> list[Command] | None:
        """An error for a stanza the client sent: to the client while it is here, else a
        message error is stored for the account's next login. None if it cannot go
        anywhere (an iq error for a session that is gone)."""
        if self.state != "ended" and self.attached:
            return self.for_client(error, upstream_up=upstream_up, own=True)
        if self.policy.store and error.tag == st.MESSAGE:
            return [StoreOffline(etree.tostring(error),
                                 self.wall_clock() + self.policy.stored_ttl)]
        return None

    def settle_outbox(self, held: list[Element], *, client_here: bool,
                      upstream_up: bool) -> list[Command]:
        """What the server never confirmed, when nothing more will: client stanzas worth
        sending go to the store's pending queue (sent first at the account's next login,
        original ids kept), iq requests are answered with an error while the client is here,
        the rest is discarded."""
        keep: list[bytes] = []
        out: list[Command] = []
        bounced = discarded = 0
        for el in held:
            if self.policy.store and replayable(el):
                keep.append(etree.tostring(el))
            elif (client_here and self.attached and st.kind(el) == "iq"
                  and el.get("type") in ("get", "set")
                  and not el.get("id", "").startswith(OWN_ID_PREFIX)):
                out += self.for_client(st.error_reply(
                    el, "remote-server-timeout", error_type="wait",
                    text="xmpp-front is stopping and the server did not answer"),
                    upstream_up=upstream_up, own=True)
                bounced += 1
            else:
                discarded += 1
        if keep:
            out.append(StorePending(tuple(keep), self.wall_clock() + self.policy.pending_ttl))
        out += self.c2s_left(len(keep), "stored")
        out += self.c2s_left(bounced, "bounced")
        out += self.c2s_left(discarded, "discarded")
        if held:
            out.append(Log("unconfirmed_settled", {"pending": len(keep), "bounced": bounced,
                                                   "discarded": discarded}))
        return out

    def pending_replay(self, rows: list[tuple[bytes, float]], jid: str,
                       *, upstream_up: bool) -> tuple[list[Element], list[Command]]:
        """Client stanzas an earlier run of the proxy left: those still current go to the
        server first, in order, with their ids; expired messages come back as errors."""
        now = self.wall_clock()
        send: list[Element] = []
        out: list[Command] = []
        expired = 0
        for data, expires_at in rows:
            el = parse_stored(data)
            if expires_at <= now:
                expired += 1
                if el.tag == st.MESSAGE:
                    out += self.for_client(st.error_reply(
                        el, "remote-server-timeout", error_type="wait",
                        text="not delivered: the legacy server was unreachable for too long"),
                        upstream_up=upstream_up, own=True)
                continue
            el.set("from", jid)
            send.append(el)
        if send or expired:
            out.append(Log("pending_replayed", {"sent": len(send), "expired": expired}))
        return send, out


def ensure_origin_id(el: Element, template: Element | None = None) -> None:
    """Give a message with an id an XEP-0359 ``<origin-id/>`` of the same value unless it
    carries one already. A message without an id is left as it is (a rule may have removed
    it on purpose), and so are errors. ``template``: an ``origin_id_template()`` to copy
    (``Journal.origin_id``), a third of the cost of making the element (``SubElement``
    with its namespace declaration validates names and URI each time); the bytes
    serialized are the same."""
    if el.tag != st.MESSAGE:
        return
    msg_id = el.get("id")
    if not msg_id or el.get("type") == "error":
        return
    for child in el:  # not find(): it parses its path on every call
        if child.tag == _ORIGIN_ID:
            return
    origin = (origin_id_template() if template is None else template).__copy__()
    origin.set("id", msg_id)
    el.append(origin)
