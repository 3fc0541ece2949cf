"""A live session in the running proxy: one bound resource, its upstream stream, and the
client connection it has at the moment (if any).

It outlives its client connection: with stream management a dropped client leaves the
session hibernating, upstream still up and its presence intact, until the client resumes or
the granted time runs out. Protocol decisions are the cores' (SessionCore, StreamManagement);
this shell moves stanzas, runs the timers and closes connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, Protocol

from lxml import etree

from ..config import Config
from ..inspection import Inspector
from ..journal import Journal, parse_stored, replayable, storable
from ..ledger import Exit, Ledger
from ..features.stream_management import (HandledCountTooHigh, StreamManagement, Unacked,
                                           delay_stamp, failed, parse_h, sm_element)
from ..session import OWN_ID_PREFIX, Outputs, SessionCore
from ..xmpp import codec, ns
from ..xmpp import stanza as st
from .upstream import UpstreamLink
from .upstream_side import UpstreamSide
from .xmlstream import ConnectionLost, XmlStream
from ..xmpp.stanza import Element

if TYPE_CHECKING:
    from .hub import Hub


_STREAM_ERROR = ns.qname(ns.STREAM, "error")
_SM_R, _SM_A = ns.qname(ns.SM, "r"), ns.qname(ns.SM, "a")
_SM_ENABLE, _SM_RESUME = ns.qname(ns.SM, "enable"), ns.qname(ns.SM, "resume")
CLOSE_GRACE = 2.0  # seconds the other side gets to close its stream after ours

State = Literal["active", "hibernating", "ended"]


class OfflineStore(Protocol):
    def offline_put(self, account: str, stanza: bytes, expires_at: float) -> None: ...

    def offline_take(self, account: str, now: float) -> list[bytes]: ...


class PendingStore(Protocol):
    def put(self, account: str, stanzas: list[bytes], expires_at: float) -> None: ...

    def take(self, account: str) -> list[tuple[bytes, float]]: ...


class SessionStore(Protocol):
    """What a session keeps in the store: see proxy/store.py."""

    @property
    def offline(self) -> OfflineStore: ...

    @property
    def pending(self) -> PendingStore: ...


class ClientLeft(Exception):
    """How a client connection ended. ``clean``: it closed its stream (no hibernation).
    ``error``: what to write to it before closing, if anything."""

    def __init__(self, reason: str, *, clean: bool = False, error: bytes | None = None,
                 end_session: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.clean = clean
        self.error = error
        self.end_session = end_session or clean


class LiveSession:
    def __init__(self, hub: Hub, core: SessionCore, link: UpstreamLink, config: Config,
                 store: SessionStore | None, log: Any, *, password: str,
                 tls_context: ssl.SSLContext | None, inspector: Inspector | None = None,
                 journal: Journal | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.hub = hub
        self.core = core
        self.config = config
        self.store = store
        self.journal = journal
        self.ledger = Ledger()
        self._ledger_logged = False
        self._account = str(core.account)
        self.log = log.bind(session=core.id)
        self.clock = clock
        self.state: State = "active"
        self.client: XmlStream | None = None
        self.sm: StreamManagement | None = None
        self._hibernation: asyncio.TimerHandle | None = None
        self._ack_timer: asyncio.TimerHandle | None = None
        self._ack_timed_out = False
        self._offline_delivered = False
        self.conn_id: str | None = None  # the client connection's id in the log
        self.inspector = inspector
        self.transcript = (inspector.transcript(str(core.account), core.id)
                           if inspector is not None else None)
        self.upstream = UpstreamSide(self, link, config=config, tls_context=tls_context,
                                     username=core.jid.local, password=password, log=self.log)

    @property
    def jid(self) -> str:
        return str(self.core.jid)

    # Writing ------------------------------------------------------------------------------------

    def to_client(self, el: Element) -> None:
        """A stanza for the client: it enters the ledger (the SM queue holds it until the
        client acknowledges it; without SM it is delivered when written)."""
        lane = self.ledger.s2c
        if self.sm is not None:
            number = lane.enter()
            self.sm.track(el, written=self.client is not None)
            if self.journal is not None:
                self.journal.put(self.core.id, "s2c", number, self._account,
                                 etree.tostring(el), self.sm.unacked[-1].queued_at)
            if self.sm.overflowing:
                self.log.warning("sm_queue_overflow", queued=len(self.sm.unacked))
                asyncio.get_running_loop().call_soon(
                    self._end_soon, "stream management queue overflow")
            if self.client is not None:
                self.client.send(el)
        elif self.client is not None:
            lane.enter()
            lane.leave(1, "delivered")
            self.client.send(el)
        else:
            # No client and nothing to hold it: the session is ending (or ended).
            self.settle_from_server(el)

    # The ledger ---------------------------------------------------------------------------------

    def c2s_taken(self, el: Element) -> None:
        """A stanza for the server entered the outbox (and the ledger, and the journal)."""
        number = self.ledger.c2s.enter()
        if self.journal is not None:
            # After a crash this one may be sent twice: an origin-id lets receivers tell.
            ensure_origin_id(el)
            self.journal.put(self.core.id, "c2s", number, self._account, etree.tostring(el),
                             time.time())

    def c2s_left(self, count: int, exit: Exit) -> None:
        if count:
            left = self.ledger.c2s.leave(count, exit)
            if self.journal is not None:
                self.journal.cut(self.core.id, "c2s", left)

    def _s2c_left(self, count: int, exit: Exit) -> None:
        if count:
            left = self.ledger.s2c.leave(count, exit)
            if self.journal is not None:
                self.journal.cut(self.core.id, "s2c", left)

    def settle_from_server(self, el: Element) -> None:
        """A server stanza for a client that is gone for good: a message (or subscription
        request) is stored for the account's next login, an iq request is answered, the
        rest is discarded. Counted in the ledger either way."""
        lane = self.ledger.s2c
        lane.enter()
        if self.store is not None and storable(el):
            delay_stamp(el, time.time(), self.config.upstream.domain)
            self.store.offline.offline_put(self._account, etree.tostring(el),
                                           time.time() + self.config.stream_management.stored_ttl)
            lane.leave(1, "stored")
        elif (st.kind(el) == "iq" and el.get("type") in ("get", "set")
              and self.upstream.state == "up" and not self.upstream.link.stream.closing):
            self.upstream.send_direct(st.error_reply(el, "service-unavailable"))
            lane.leave(1, "bounced")
        else:
            lane.leave(1, "discarded")

    def bounce_to_sender(self, error: Element) -> bool:
        """An error for a stanza the client sent: to the client while it is here, else a
        message error is stored for the account's next login. False if it cannot go
        anywhere (an iq error for a session that is gone)."""
        if self.state != "ended" and self.client is not None:
            self.proxy_to_client(error)
            return True
        if self.store is not None and error.tag == st.MESSAGE:
            self.store.offline.offline_put(self._account, etree.tostring(error),
                                           time.time() + self.config.stream_management.stored_ttl)
            return True
        return False

    def settle_outbox(self, *, client_here: bool) -> None:
        """What the server never confirmed, when nothing more will: client stanzas worth
        sending go into the store's pending queue (sent first at the account's next login,
        original ids kept), iq requests are answered with an error while the client is here,
        the rest is discarded."""
        keep: list[bytes] = []
        bounced = discarded = 0
        for el in self.upstream.outbox.drain():
            if self.store is not None and replayable(el):
                keep.append(etree.tostring(el))
            elif (client_here and st.kind(el) == "iq" and el.get("type") in ("get", "set")
                  and not el.get("id", "").startswith(OWN_ID_PREFIX)
                  and self.client is not None):
                self.proxy_to_client(st.error_reply(
                    el, "remote-server-timeout", error_type="wait",
                    text="xmpp-front is stopping and the server did not answer"))
                bounced += 1
            else:
                discarded += 1
        if keep and self.store is not None:
            self.store.pending.put(self._account, keep,
                                   time.time() + self.config.durability.pending_ttl)
        self.c2s_left(len(keep), "stored")
        self.c2s_left(bounced, "bounced")
        self.c2s_left(discarded, "discarded")
        if keep or bounced or discarded:
            self.log.info("unconfirmed_settled", pending=len(keep), bounced=bounced,
                          discarded=discarded)

    def replay_pending(self) -> None:
        """Client stanzas left over from an earlier run of the proxy go to the server first,
        in order, with their ids; those past their expiry come back as errors."""
        if self.store is None:
            return
        sent = expired = 0
        now = time.time()
        for data, expires_at in self.store.pending.take(self._account):
            el = parse_stored(data)
            if expires_at <= now:
                expired += 1
                if el.tag == st.MESSAGE:
                    self.proxy_to_client(st.error_reply(
                        el, "remote-server-timeout", error_type="wait",
                        text="not delivered: the legacy server was unreachable for too long"))
                continue
            el.set("from", str(self.core.jid))
            self.to_upstream(el)
            sent += 1
        if sent or expired:
            self.log.info("pending_replayed", sent=sent, expired=expired)

    def to_upstream(self, el: Element) -> None:
        answer = self.upstream.send(el)
        if answer is not None:
            self.to_client(answer)

    def from_server(self, el: Element) -> None:
        """A stanza from the legacy server (the upstream side's reading task)."""
        started = time.perf_counter()
        out = self.core.from_upstream(el)
        self.write(out)
        self._ask_for_ack()
        self._after_pipeline("s2c", el, started, out, out.to_client)

    def _after_pipeline(self, direction: str, el: Element, started: float, out: Outputs,
                        onward: list[Element]) -> None:
        """What the rules asked to log, and the inspection log and transcript: the stanza
        that came in (forwarded or kept) and every stanza the features made of their own."""
        core = self.core
        for event in core.rule_events:
            # The stanza's context first; a rule's own fields of the same name win.
            self.log.info(event.get("event", "rule"), **{
                "direction": direction, "from": el.get("from"), "to": el.get("to"),
                "conn": self.conn_id, **{k: v for k, v in event.items() if k != "event"}})
        if self.inspector is not None:
            forwarded = any(x is el for x in onward)
            self.inspector.stanza(direction, el, started=started, conn=self.conn_id,
                                  session=core.id, account=str(core.account),
                                  forwarded=forwarded, matched=core.matched,
                                  transcript=self.transcript)
            for made, way in ((out.to_client, "s2c"), (out.to_upstream, "c2s")):
                for extra in made:
                    if extra is not el:
                        self.inspect_own(way, extra, started)
        core.matched, core.rule_events = (), ()

    def inspect_own(self, direction: str, el: Element, started: float | None = None) -> None:
        """A stanza the proxy made itself (an answer, a push, a bounce) for the inspection
        log and the transcript."""
        if self.inspector is not None:
            self.inspector.stanza(direction, el, started=started or time.perf_counter(),
                                  conn=self.conn_id, session=self.core.id,
                                  account=str(self.core.account), forwarded=True, matched=(),
                                  transcript=self.transcript, origin="proxy")

    def proxy_to_client(self, el: Element) -> None:
        """A stanza of the proxy's own for the client (error replies, stored messages)."""
        self.inspect_own("s2c", el)
        self.to_client(el)

    async def client_drain(self) -> None:
        """Backpressure toward the server's side: wait while the client's buffer is full.
        (Checked first: awaiting a drain per stanza would cost more than the relay.)"""
        if self.client is not None and self.client.congested:
            await self.client.drain()

    def write(self, out: Outputs) -> None:
        for el in out.to_upstream:
            self.to_upstream(el)
        for el in out.to_client:
            self.to_client(el)

    def _ask_for_ack(self, *, always: bool = False) -> None:
        if self.sm is not None and self.client is not None:
            request = self.sm.request_ack(self.clock(), always=always)
            if request is not None:
                self.client.send(request)
                self._ack_timer = asyncio.get_running_loop().call_later(
                    self.config.stream_management.ack_timeout, self._ack_deadline,
                    self.client)

    def _cancel_ack_timer(self) -> None:
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None

    # The client connection ----------------------------------------------------------------------

    async def serve_client(self, stream: XmlStream, first: list[Element] | None = None, *,
                           resumed: bool = False, conn_id: str | None = None) -> str:
        """Attach ``stream`` and relay for it until it leaves; returns why it left.

        ``first`` are elements to write before anything else (bind result, takeover queue,
        or ``<resumed/>`` and the resent stanzas, after which an ``<r/>`` follows).
        """
        if self.client is not None and self.client is not stream:
            self._evict_client("another connection took this session over")
        if self._hibernation is not None:
            self._hibernation.cancel()
            self._hibernation = None
        self.state = "active"
        self.client = stream
        self.conn_id = conn_id
        self._ack_timed_out = False
        for el in first or ():
            stream.send(el)
        if resumed:
            self._ask_for_ack(always=True)
        try:
            await self._pump_client(stream)
            reason = "?"  # unreachable: the pump only ends by raising
        except ClientLeft as left:
            reason = left.reason
            await self._client_gone(stream, left)
        except asyncio.CancelledError:
            stream.abort()
            raise
        finally:
            if self.client is stream:
                self.client = None
        return reason

    def _evict_client(self, why: str) -> None:
        """Close the current client connection with ``<conflict/>`` (resume or takeover)."""
        old = self.client
        if old is None:
            return
        self.log.info("client_evicted", reason=why)
        self.client = None
        self._cancel_ack_timer()
        if self.sm is not None:
            self.sm.detached()
        old.send_bytes(codec.stream_error("conflict", why) + codec.STREAM_CLOSE)
        old.closing = True
        old.abort()

    async def _client_gone(self, stream: XmlStream, left: ClientLeft) -> None:
        if self.client is not stream:
            return  # evicted: the session already belongs to another connection
        self.client = None
        self._cancel_ack_timer()
        if self.sm is not None:
            self.sm.detached()
        if left.end_session or self.sm is None or not self.sm.resumable:
            await asyncio.gather(stream.close(left.error, wait_for_peer=CLOSE_GRACE),
                                 self.end(left.reason))
            return
        stream.abort(hard=True)  # already lost: nothing more can reach it
        self.state = "hibernating"
        self.log.info("hibernating", reason=left.reason, seconds=self.sm.max_resume,
                      queued=len(self.sm.unacked))
        self._hibernation = asyncio.get_running_loop().call_later(
            self.sm.max_resume, self._end_soon, "resumption timed out")

    async def _next_client_event(self, stream: XmlStream) -> codec.StreamEvent:
        try:
            return await stream.next_event()
        except ConnectionLost as exc:
            if self._ack_timed_out:
                raise ClientLeft("no ack from the client within ack_timeout") from exc
            raise ClientLeft(f"client connection lost ({exc})") from exc

    def _ack_deadline(self, stream: XmlStream) -> None:
        """Our <r/> went unanswered for ack_timeout: the connection is dead. Closing it ends
        the client pump's read, and the session hibernates as after any drop."""
        self._ack_timer = None
        if self.client is stream and self.sm is not None and self.sm.ack_requested_at:
            self._ack_timed_out = True
            self.log.info("client_link_dead", reason="no ack within ack_timeout",
                          seconds=self.config.stream_management.ack_timeout)
            stream.abort(hard=True)  # a dead link would never finish a polite TLS close

    async def _pump_client(self, stream: XmlStream) -> None:
        while True:
            # Backpressure while the server is away and the buffer is full: stop reading
            # (stanzas already received were counted and are acked as usual).
            await self.upstream.room.wait()
            event = await self._next_client_event(stream)
            if isinstance(event, codec.StanzaReceived):
                el = event.element
                if st.is_stanza(el):
                    if self.sm is not None:
                        self.sm.count_inbound()
                    self._from_client(el)
                    if self.upstream.congested:
                        await self.upstream.drain()
                else:
                    self._client_nonza(stream, el)
                self._ask_for_ack()
            elif isinstance(event, codec.StreamClosed):
                raise ClientLeft("client closed the stream", clean=True)
            elif isinstance(event, codec.StreamViolation):
                raise ClientLeft(f"client stream violation: {event.condition}",
                                 error=codec.stream_error(event.condition, event.text),
                                 end_session=True)
            else:
                raise ClientLeft("client sent a second stream header", end_session=True,
                                 error=codec.stream_error("not-well-formed",
                                                          "unexpected stream header"))

    def _from_client(self, el: Element) -> None:
        started = time.perf_counter()
        out = self.core.from_client(el)
        self.write(out)
        self._after_pipeline("c2s", el, started, out, out.to_upstream)
        if (not self._offline_delivered and el.tag == st.PRESENCE and el.get("type") is None
                and el.get("to") is None):
            # Like a server's offline storage: stored messages follow initial presence.
            self._offline_delivered = True
            self._deliver_stored()

    def _answer_ack_request(self, stream: XmlStream, sm: StreamManagement) -> None:
        """``<a h/>`` for the client's ``<r/>``; with the journal, only once what it
        acknowledges is committed (an ack is a promise)."""
        answer = sm.answer()
        if self.journal is None:
            stream.send(answer)
            return

        def send() -> None:
            if self.client is stream and not stream.closing:
                stream.send(answer)
        self.journal.when_durable(send)

    def _client_nonza(self, stream: XmlStream, el: Element) -> None:
        tag = el.tag
        sm = self.sm
        if tag == _SM_R:
            if sm is not None:
                self._answer_ack_request(stream, sm)
            else:
                stream.send(failed("unexpected-request"))
        elif tag == _SM_A:
            h = parse_h(el)
            if sm is None or h is None:
                raise ClientLeft("bad <a/> from the client", end_session=True,
                                 error=codec.stream_error("undefined-condition",
                                                          "a bad or unexpected <a/>"))
            try:
                self._s2c_left(sm.acknowledge(h), "delivered")
                self._cancel_ack_timer()
            except HandledCountTooHigh as exc:
                self.log.warning("sm_h_too_high", h=exc.h, sent=exc.sent)
                raise ClientLeft("client acknowledged more than was sent", end_session=True,
                                 error=codec.stream_error(
                                     "undefined-condition", str(exc),
                                     app_condition=exc.app_condition())) from None
        elif tag == _SM_ENABLE:
            if sm is not None:
                stream.send(failed("unexpected-request", text="already enabled"))
                return
            smc = self.config.stream_management
            self.sm, enabled = StreamManagement.enable(
                el, sm_id=self.hub.new_sm_id(), resume_allowed=True,
                resume_timeout=smc.resume_timeout, max_resume_timeout=smc.max_resume_timeout,
                max_queue=smc.max_queue, counter_start=smc.debug_counter_start)
            self.hub.sm_enabled(self)
            stream.send(enabled)  # outbound counting starts after this write
            self.log.info("sm_enabled", resumable=self.sm.resumable, max=self.sm.max_resume)
        elif tag == _SM_RESUME:
            stream.send(failed("unexpected-request", text="this stream is bound already"))
        elif tag == _STREAM_ERROR:
            raise ClientLeft(f"client stream error: {st.error_condition(el)}",
                             end_session=True)
        else:
            raise ClientLeft(f"unsupported element from client: {tag}", end_session=True,
                             error=codec.stream_error(
                                 "unsupported-stanza-type",
                                 f"{etree.QName(el).localname} is not supported"))

    # Resumption and takeover --------------------------------------------------------------------

    def resume(self, h: int) -> list[Element]:
        """What a resuming connection gets first: ``<resumed/>`` and the unacked stanzas
        (serve_client adds the ``<r/>``). Raises HandledCountTooHigh when ``h`` is absurd."""
        assert self.sm is not None
        self._evict_client("the session was resumed from another connection")
        held = len(self.sm.unacked)
        resend = self.sm.resume(h, self.config.upstream.domain)
        self._s2c_left(held - len(self.sm.unacked), "delivered")
        resumed = sm_element("resumed", {"h": str(self.sm.inbound), "previd": self.sm.sm_id})
        self.log.info("resumed", h=h, resent=len(resend))
        return [resumed, *resend]

    def take_over(self) -> list[Element]:
        """A new connection bound this session's resource: it gets the whole queue; stream
        management starts afresh on it."""
        self._evict_client("the resource was bound from another connection")
        queue: list[Element] = []
        if self.sm is not None:
            for item in self.sm.take_all():
                delay_stamp(item.element, item.queued_at, self.config.upstream.domain)
                queue.append(item.element)
            # Written to the new connection first, without stream management on it.
            self._s2c_left(len(queue), "delivered")
            self.hub.sm_disabled(self)
            self.sm = None
        self.log.info("taken_over", delivered=len(queue))
        return queue

    # The end --------------------------------------------------------------------------------------

    def _end_soon(self, reason: str) -> None:
        if self.state != "ended":
            asyncio.get_running_loop().create_task(self.end(reason))

    async def end(self, reason: str, *, client_error: bytes | None = None,
                  upstream_dead: bool = False, stopping: bool = False,
                  deadline: float | None = None) -> None:
        """End the session for good; nothing in its ledger is lost: what the client never
        acknowledged is stored or bounced, and what the server has not confirmed is still
        worked on (``finishing``) or, when the proxy is ``stopping``, stored for the
        account's next login. ``deadline`` (loop time) bounds a stop's wait for the server."""
        if self.state == "ended":
            return
        self.state = "ended"
        if self._hibernation is not None:
            self._hibernation.cancel()
        self._cancel_ack_timer()
        self.hub.session_ended(self)
        self.log.info("session_ended", reason=reason)
        upstream = self.upstream
        upstream_up = upstream.state == "up" and not upstream_dead
        undelivered = self.sm.take_all() if self.sm is not None else []
        if undelivered:
            self._dispose(undelivered, upstream_up, store_all=stopping)
        if stopping and not upstream_up:
            self.settle_outbox(client_here=True)  # nothing will confirm it now
        self.core.closed()
        client, self.client = self.client, None
        if client is not None:
            # Its own task is reading it: closing the transport ends that read with EOF.
            client.send_bytes((client_error or b"") + codec.STREAM_CLOSE)
            client.closing = True
            client.abort()
        if stopping:
            loop = asyncio.get_running_loop()
            left = (deadline - loop.time()) if deadline is not None else 0.0
            await upstream.close(dead=not upstream_up, timeout=max(0.2, left))
            self.settle_outbox(client_here=False)
        elif upstream.outbox.size and upstream.state != "gone":
            upstream.orphan()
            self.hub.finishing(self)
            return  # its ledger is logged once the upstream side is done
        else:
            await upstream.close(dead=not upstream_up)
        self.log_ledger()

    def log_ledger(self) -> None:
        """The session's final account: how everything it took on left (once)."""
        if not self._ledger_logged:
            self._ledger_logged = True
            self.log.info("ledger", **self.ledger.summary(), empty=self.ledger.empty)

    async def finish(self, deadline: float) -> None:
        """The proxy is stopping while this ended session still waits for the server's
        confirmations: wait until ``deadline`` at most, then store what is left."""
        upstream = self.upstream
        loop = asyncio.get_running_loop()
        if upstream.state == "up":
            upstream.flush_now()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, deadline - loop.time())):
                await upstream.finished.wait()
        if not upstream.finished.is_set():
            await upstream.close(dead=upstream.state != "up",
                                 timeout=max(0.2, deadline - loop.time()))
        self.settle_outbox(client_here=False)
        self.log_ledger()

    async def shutdown(self, deadline: float, error: bytes) -> None:
        """A graceful stop of the proxy: the client gets a moment to acknowledge what it has
        (so it is not stored and delivered twice), the server to confirm what it was sent;
        then the session ends and what is left is stored."""
        loop = asyncio.get_running_loop()
        ack_until = min(deadline, loop.time() + self.config.shutdown.ack_wait)
        if self.client is not None and self.sm is not None and self.sm.written:
            self._ask_for_ack(always=True)
            await _wait_until(lambda: self.client is None or self.sm is None
                              or not self.sm.written, ack_until)
        if self.upstream.state == "up" and self.upstream.outbox.size:
            self.upstream.flush_now()
            await _wait_until(lambda: self.upstream.state != "up"
                              or not self.upstream.outbox.size, deadline)
        await self.end("proxy stopping", client_error=error, stopping=True, deadline=deadline)

    def _dispose(self, items: list[Unacked], upstream_up: bool, *,
                 store_all: bool = False) -> None:
        """Stanzas the client never acknowledged, at the end of the session (XEP-0198 §5:
        the server must not lose them): messages stored or bounced, iq requests answered
        with service-unavailable, presences discarded (subscription requests stored)."""
        smc = self.config.stream_management
        stored = bounced = answered = 0
        for item in items:
            el = item.element
            kind, typ = st.kind(el), el.get("type")
            if kind == "message":
                # With the server away a bounce cannot leave: store rather than lose it.
                # An error is never answered with an error (RFC 6120 §8.3.1): stored too.
                if self.store is not None and (smc.on_timeout == "store" or not upstream_up
                                               or store_all or typ == "error"):
                    delay_stamp(el, item.queued_at, self.config.upstream.domain)
                    # Stored with its namespace declaration, to be parsed back on its own.
                    self.store.offline.offline_put(self._account, etree.tostring(el),
                                                   time.time() + smc.stored_ttl)
                    stored += 1
                elif upstream_up and typ != "error":
                    self.upstream.send_direct(st.error_reply(el, "recipient-unavailable"))
                    bounced += 1
            elif self.store is not None and kind == "presence" and storable(el):
                self.store.offline.offline_put(self._account, etree.tostring(el),
                                               time.time() + smc.stored_ttl)
                stored += 1
            elif kind == "iq" and typ in ("get", "set") and upstream_up:
                self.upstream.send_direct(st.error_reply(el, "service-unavailable"))
                answered += 1
        discarded = len(items) - stored - bounced - answered
        self._s2c_left(stored, "stored")
        self._s2c_left(bounced + answered, "bounced")
        self._s2c_left(discarded, "discarded")
        self.log.info("undelivered", stored=stored, bounced=bounced, iq_errors=answered,
                      dropped=discarded)

    def _deliver_stored(self) -> None:
        if self.store is None:
            return
        stored = self.store.offline.offline_take(self._account, time.time())
        for data in stored:
            self.proxy_to_client(parse_stored(data))
        if stored:
            self.log.info("stored_delivered", count=len(stored))
            self._ask_for_ack()


_ORIGIN_ID = ns.qname(ns.SID, "origin-id")


def ensure_origin_id(el: Element) -> None:
    """Give a message with an id an XEP-0359 ``<origin-id/>`` of the same value unless it
    carries one already. A message without an id is left as it is (a rule may have removed
    it on purpose), and so are errors."""
    if el.tag != st.MESSAGE or el.get("type") == "error" or el.find(_ORIGIN_ID) is not None:
        return
    msg_id = el.get("id")
    if not msg_id:
        return
    origin = st.sub(el, "origin-id", {"id": msg_id}, namespace=ns.SID)
    origin.tail = None


async def _wait_until(condition: Callable[[], bool], until: float, step: float = 0.02) -> None:
    """Poll ``condition`` until it holds or the loop time ``until`` passes (shutdown only)."""
    loop = asyncio.get_running_loop()
    while not condition() and loop.time() < until:
        await asyncio.sleep(min(step, max(0.0, until - loop.time())))
