"""A live session in the running proxy: one bound resource, its upstream stream, and the
client connection it has at the moment (if any).

It outlives its client connection: with stream management a dropped client leaves the
session hibernating, upstream still up and its presence intact, until the client resumes or
the granted time runs out. Protocol decisions are the cores' (SessionCore, StreamManagement);
this shell moves stanzas, runs the timers and closes connections.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, Protocol

from lxml import etree

from ..config import Config
from ..inspection import Inspector
from ..features.stream_management import (HandledCountTooHigh, StreamManagement, Unacked,
                                           delay_stamp, failed, parse_h, sm_element)
from ..session import Outputs, SessionCore
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
                 store: OfflineStore | None, log: Any, *, password: str,
                 tls_context: ssl.SSLContext | None, inspector: Inspector | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.hub = hub
        self.core = core
        self.config = config
        self.store = store
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
        if self.sm is not None:
            self.sm.track(el, written=self.client is not None)
            if self.sm.overflowing:
                self.log.warning("sm_queue_overflow", queued=len(self.sm.unacked))
                asyncio.get_running_loop().call_soon(
                    self._end_soon, "stream management queue overflow")
        if self.client is not None:
            self.client.send(el)

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
        stream.abort()
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
            stream.abort()

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
                # Not reached: the codec reports a header inside the stream as a
                # violation (unsupported-stanza-type); kept so no event is ever ignored.
                raise ClientLeft("client sent a second stream header", end_session=True,
                                 error=codec.stream_error("unsupported-stanza-type",
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

    def _client_nonza(self, stream: XmlStream, el: Element) -> None:
        tag = el.tag
        sm = self.sm
        if tag == _SM_R:
            stream.send(sm.answer() if sm is not None else failed("unexpected-request"))
        elif tag == _SM_A:
            h = parse_h(el)
            if sm is None or h is None:
                raise ClientLeft("bad <a/> from the client", end_session=True,
                                 error=codec.stream_error("undefined-condition",
                                                          "a bad or unexpected <a/>"))
            try:
                sm.acknowledge(h)
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
        resend = self.sm.resume(h, self.config.upstream.domain)
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
            self.hub.sm_disabled(self)
            self.sm = None
        self.log.info("taken_over", delivered=len(queue))
        return queue

    # The end --------------------------------------------------------------------------------------

    def _end_soon(self, reason: str) -> None:
        if self.state != "ended":
            asyncio.get_running_loop().create_task(self.end(reason))

    async def end(self, reason: str, *, client_error: bytes | None = None,
                  upstream_dead: bool = False) -> None:
        """End the session for good: undelivered stanzas are stored or bounced (never
        lost), the client and the server streams are closed."""
        if self.state == "ended":
            return
        self.state = "ended"
        if self._hibernation is not None:
            self._hibernation.cancel()
        self._cancel_ack_timer()
        self.hub.session_ended(self)
        self.log.info("session_ended", reason=reason)
        upstream_up = self.upstream.state == "up" and not upstream_dead
        undelivered = self.sm.take_all() if self.sm is not None else []
        if undelivered:
            self._dispose(undelivered, upstream_up)
        self.core.closed()
        client, self.client = self.client, None
        if client is not None:
            # Its own task is reading it: closing the transport ends that read with EOF.
            client.send_bytes((client_error or b"") + codec.STREAM_CLOSE)
            client.closing = True
            client.abort()
        await self.upstream.close(dead=not upstream_up)

    def _dispose(self, items: list[Unacked], upstream_up: bool) -> None:
        """Stanzas the client never acknowledged, at the end of the session (XEP-0198 §5:
        the server must not lose them): messages stored or bounced, iq requests answered
        with service-unavailable, presences dropped."""
        smc = self.config.stream_management
        stored = bounced = answered = 0
        for item in items:
            el = item.element
            kind, typ = st.kind(el), el.get("type")
            if kind == "message" and typ != "error":
                # With the server away a bounce cannot leave: store rather than lose it.
                if self.store is not None and (smc.on_timeout == "store" or not upstream_up):
                    delay_stamp(el, item.queued_at, self.config.upstream.domain)
                    # Stored with its namespace declaration, to be parsed back on its own.
                    self.store.offline_put(str(self.core.account), etree.tostring(el),
                                           time.time() + smc.stored_ttl)
                    stored += 1
                elif upstream_up:
                    self.upstream.send_direct(st.error_reply(el, "recipient-unavailable"))
                    bounced += 1
            elif kind == "iq" and typ in ("get", "set") and upstream_up:
                self.upstream.send_direct(st.error_reply(el, "service-unavailable"))
                answered += 1
        self.log.info("undelivered", stored=stored, bounced=bounced, iq_errors=answered,
                      dropped=len(items) - stored - bounced - answered)

    def _deliver_stored(self) -> None:
        if self.store is None:
            return
        stored = self.store.offline_take(str(self.core.account), time.time())
        for data in stored:
            self.proxy_to_client(etree.fromstring(data, _SAFE_PARSER))
        if stored:
            self.log.info("stored_delivered", count=len(stored))
            self._ask_for_ack()


# Stored stanzas were serialized by the proxy itself; parse them back with nothing expanded.
_SAFE_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)
