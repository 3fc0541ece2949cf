"""The server edge of a live session: it survives the legacy server going away.

Client stanzas go out through the Outbox and stay there until a barrier confirms the server
handled them. A dead server (TCP error, stream error, ``<system-shutdown/>``, or silence: no
answer to a liveness ping within ``ping_timeout`` after ``ping_idle`` of quiet) starts the
reconnect loop: jittered, truncated exponential backoff (RFC 6120 §3.3), then the session is
restored in order (SASL, the same resource, presence and rooms and the features' own
catch-up, then the unconfirmed stanzas with their ids), then new traffic flows again.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal


from lxml import etree

from ..backoff import Backoff
from ..config import Config
from ..features.stream_management import parse_h
from ..outbox import Outbox
from ..session import OWN_ID_PREFIX
from ..xmpp import codec, ns
from ..xmpp import stanza as st
from .upstream import (UpstreamAuthFailed, UpstreamBindFailed, UpstreamLink,
                       UpstreamUnavailable, connect_upstream, tls_session, tls_session_reused)
from .xmlstream import ConnectionLost
from ..xmpp.stanza import Element

if TYPE_CHECKING:
    from .live import LiveSession


_STREAM_ERROR = ns.qname(ns.STREAM, "error")
_PING = ns.qname(ns.PING, "ping")
# Stream errors after which the server may well be back soon: reconnect. Anything else
# (conflict, not-authorized, policy-violation, ...) is final and passed to the client.
TRANSIENT_STREAM_ERRORS = frozenset((
    "system-shutdown", "connection-timeout", "internal-server-error", "reset",
    "remote-connection-failed", "resource-constraint", "undefined-condition"))
BARRIER_FLUSH = 0.2  # seconds after a batch before a barrier confirms it
CLOSE_WAIT = 1.0  # seconds the reading task gets to stop when the session ends

UpstreamState = Literal["up", "down", "gone"]


class GiveUp(Exception):
    def __init__(self, reason: str, error: bytes) -> None:
        super().__init__(reason)
        self.reason = reason
        self.error = error


class UpstreamSide:
    def __init__(self, session: LiveSession, link: UpstreamLink, *, config: Config,
                 tls_context: ssl.SSLContext | None, username: str, password: str,
                 log: Any, rng: random.Random | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.session = session
        self.link = link
        self.config = config
        self.tls_context = tls_context
        self._username = username
        self._password = password  # kept in memory only, to log in again after an outage
        self.log = log
        self.clock = clock
        self.state: UpstreamState = "up"
        self.down_since: float | None = None
        up = config.upstream
        self.outbox = Outbox(domain=up.domain, max_buffer=up.max_buffer,
                             barrier_every=up.barrier_every,
                             new_id=lambda: session.core.new_id("barrier"), connected=True)
        rc = config.reconnect
        self.backoff = Backoff(rc.first_delay_max, rc.base, rc.cap, rng or random.Random())
        self.room = asyncio.Event()  # set while the outbox can take more client stanzas
        self.room.set()
        self._probe = False  # a liveness ping is unanswered
        self._sm_inbound = 0  # stanzas from the server since our <enable/> (XEP-0198)
        self._flush: asyncio.TimerHandle | None = None
        # The TLS session to offer when reconnecting; taken once the server has spoken on a
        # connection (a TLS 1.3 ticket arrives after the handshake).
        self._tls_session: ssl.SSLSession | None = None
        self._tls_fresh = True
        self._enable_sm(link)
        self._task = asyncio.create_task(self._run())

    # Writing ------------------------------------------------------------------------------------

    def send(self, el: Element) -> Element | None:
        """A stanza for the server (from the client or a feature). Returns an answer for the
        client when the proxy answers itself (a ping to the server while it is away)."""
        if self.state != "up" and self._is_server_ping(el):
            return st.iq_result(el)
        for out in self.outbox.submit(el):
            self.link.stream.send(out)
        self._update_room()
        if self.state == "up" and self.outbox.unbarriered and self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(BARRIER_FLUSH,
                                                                self._flush_barrier)
        return None

    def send_direct(self, el: Element) -> None:
        """Outside the outbox: restore stanzas and anything that must not be replayed."""
        if self.state == "up":
            self.link.stream.send(el)
            self.outbox.note_direct()

    def _enable_sm(self, link: UpstreamLink) -> None:
        """Real stream management upstream when the server offers it: its acks then confirm
        what it handled, and no barrier pings are needed."""
        if link.features.find(ns.qname(ns.SM, "sm")) is not None:
            self._sm_inbound = 0
            link.stream.send(self.outbox.sm_enable())

    def _sm_nonza(self, el: Element) -> None:
        local = etree.QName(el).localname
        if local == "a":
            h = parse_h(el)
            if h is not None:
                self.outbox.on_sm_ack(h)
                self._update_room()
        elif local == "r":
            self.link.stream.send(st.element("a", {"h": str(self._sm_inbound)},
                                             namespace=ns.SM))
        elif local == "enabled":
            self.log.info("upstream_sm_enabled")
        elif local == "failed":
            self.log.info("upstream_sm_refused")
            self.link.stream.send(self.outbox.sm_failed())

    def _is_server_ping(self, el: Element) -> bool:
        return (el.tag == st.IQ and el.get("type") == "get" and el.find(_PING) is not None
                and el.get("to") in (None, "", self.config.upstream.domain))

    def _flush_barrier(self) -> None:
        self._flush = None
        if self.state == "up" and self.outbox.unbarriered:
            self.link.stream.send(self.outbox.barrier())

    def _update_room(self) -> None:
        if self.outbox.full:
            self.room.clear()  # backpressure: the client pump waits, acks are not withheld
        else:
            self.room.set()

    @property
    def congested(self) -> bool:
        return self.state == "up" and self.link.stream.congested

    async def drain(self) -> None:
        if self.state == "up":
            await self.link.stream.drain()

    # Reading and liveness -----------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            while True:
                reason, error = await self._pump()
                if error is not None:
                    raise GiveUp(reason, error)
                self._went_down(reason)
                await self._reconnect()
        except GiveUp as give_up:
            self.state = "gone"
            await self._give_up(give_up)
        except asyncio.CancelledError:
            raise
        except Exception:
            self.log.exception("upstream_failed")
            self.state = "gone"
            await self.session.end("internal error", client_error=codec.stream_error(
                "internal-server-error"), upstream_dead=True)

    async def _pump(self) -> tuple[str, bytes | None]:
        """Relay from the server until it goes away. Returns why, and a stream error for
        the client when the end is final (no reconnect)."""
        up = self.config.upstream
        stream = self.link.stream
        while True:
            try:
                event = await stream.next_event(up.ping_timeout if self._probe else up.ping_idle)
            except TimeoutError:
                if self._probe:
                    return f"no answer to a ping within {up.ping_timeout}s", None
                self._probe = True
                stream.send(self.outbox.barrier())  # a liveness ping that also confirms
                continue
            except ConnectionLost as exc:
                return f"connection lost ({exc})", None
            self._probe = False  # anything at all from the server: it is alive
            if self._tls_fresh:
                self._tls_fresh = False
                self._tls_session = tls_session(stream) or self._tls_session
            if isinstance(event, codec.StanzaReceived):
                el = event.element
                if el.tag == _STREAM_ERROR:
                    condition = st.error_condition(el) or "undefined-condition"
                    if condition in TRANSIENT_STREAM_ERRORS:
                        return f"stream error: {condition}", None
                    return f"stream error: {condition}", codec.serialize(el)
                if etree.QName(el).namespace == ns.SM:
                    self._sm_nonza(el)
                    continue
                if st.is_stanza(el):
                    if self.outbox.sm:
                        self._sm_inbound = (self._sm_inbound + 1) % 2 ** 32
                    if self.outbox.on_reply(el):
                        self._update_room()
                        continue
                    self.session.from_server(el)
                    await self.session.client_drain()
            elif isinstance(event, codec.StreamClosed):
                return "the server closed the stream", None
            elif isinstance(event, codec.StreamViolation):
                stream.send_bytes(codec.stream_error(event.condition, event.text))
                return f"stream violation: {event.condition}", None

    def _went_down(self, reason: str) -> None:
        self.state = "down"
        self.down_since = self.clock()
        self._probe = False
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        self.link.stream.abort()
        for reply in self.outbox.connection_lost():
            self.session.proxy_to_client(reply)
        self._update_room()
        self.log.warning("upstream_down", reason=reason, buffered=self.outbox.size)

    # Reconnecting -------------------------------------------------------------------------------

    async def _reconnect(self) -> None:
        rc = self.config.reconnect
        self.backoff.reset()
        while True:
            assert self.down_since is not None
            delay = self.backoff.next_delay()
            left = rc.max_outage - (self.clock() - self.down_since)
            if delay >= left:
                await asyncio.sleep(max(0.0, left))
                raise GiveUp(f"the server was unreachable for {rc.max_outage:g}s",
                             codec.stream_error("remote-connection-failed",
                                                "the legacy server has been unreachable for "
                                                "too long"))
            self.log.info("upstream_reconnect_wait", attempt=self.backoff.attempts,
                          delay=round(delay, 3))
            await asyncio.sleep(delay)
            try:
                link = await connect_upstream(
                    self.config.upstream, self.tls_context, self._username, self._password,
                    max_stanza_bytes=self.config.limits.max_stanza_bytes,
                    resume_tls=self._tls_session, log=self.log)
            except UpstreamUnavailable as exc:
                self.log.info("upstream_reconnect_failed", attempt=self.backoff.attempts,
                              detail=str(exc))
                continue
            except UpstreamAuthFailed as exc:
                raise GiveUp(f"the server refused the credentials ({exc.condition})",
                             codec.stream_error("not-authorized",
                                                "the legacy server refused the login")) from exc
            await self._restore(link)
            return

    async def _restore(self, link: UpstreamLink) -> None:
        resource = self.session.core.jid.resource
        try:
            full = await link.bind(resource, self.config.upstream.connect_timeout)
        except (UpstreamBindFailed, UpstreamUnavailable) as exc:
            await link.stream.close()
            raise GiveUp(f"the server refused to bind {resource!r} again ({exc})",
                         codec.stream_error("conflict", "the legacy server would not bind "
                                                        "this resource again")) from exc
        if full != self.session.jid:
            await link.stream.close()
            # Never silently change the client's JID.
            raise GiveUp(f"the server bound {full} instead of {self.session.jid}",
                         codec.stream_error("conflict", "the legacy server bound another "
                                                        "resource after reconnecting"))
        outage = self.clock() - (self.down_since or self.clock())
        self.link = link
        self._tls_fresh = True
        self.state = "up"
        self.down_since = None
        self._enable_sm(link)
        restore = self.session.core.upstream_restored()
        for el in restore.to_upstream:  # presence, rooms, roster catch-up
            link.stream.send(el)
            self.outbox.note_direct()
        for el in restore.to_client:
            self.session.to_client(el)
        replay = self.outbox.reconnected()
        for el in replay:
            link.stream.send(el)
        self._update_room()
        self.log.info("upstream_restored", outage_seconds=round(outage, 3),
                      restore_stanzas=len(restore.to_upstream),
                      replayed=max(0, len(replay) - 1), attempts=self.backoff.attempts,
                      tls_resumed=tls_session_reused(link.stream))

    async def _give_up(self, give_up: GiveUp) -> None:
        """The session cannot be restored: whatever the client sent that the server never
        confirmed comes back to it as errors, then its stream ends saying why."""
        for el in self.outbox.drain():
            if el.get("id", "").startswith(OWN_ID_PREFIX):
                continue  # the proxy's own request: the client never sent it
            if st.kind(el) in ("message", "iq") and el.get("type") not in (
                    "error", "result"):
                self.session.proxy_to_client(st.error_reply(
                    el, "remote-server-timeout", error_type="wait",
                    text="the legacy server could not be reached"))
        self.room.set()
        self.log.warning("upstream_gave_up", reason=give_up.reason)
        await self.session.end(f"upstream gave up: {give_up.reason}",
                               client_error=give_up.error, upstream_dead=True)

    # The end ----------------------------------------------------------------------------------

    async def close(self, *, dead: bool) -> None:
        if self._flush is not None:
            self._flush.cancel()
        if asyncio.current_task() is not self._task:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=CLOSE_WAIT)
            if not self._task.done():
                # Still blocked in a read: closing the transport ends it.
                self.link.stream.abort()
                dead = True
                await asyncio.wait({self._task}, timeout=CLOSE_WAIT)
            if self._task.done() and not self._task.cancelled():
                with contextlib.suppress(Exception):
                    self._task.result()
        if self.state == "up" and not dead:
            await self.link.stream.close(wait_for_peer=2.0)
        else:
            self.link.stream.abort()
        self.state = "gone"
