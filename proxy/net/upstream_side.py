"""The server edge of a live session, the shell part: it survives the legacy server going away.

Client stanzas go out through the outbox and stay there until the server surely handled them.
A dead server (TCP error, stream error, ``<system-shutdown/>``, or silence: no answer to a
liveness ping within ``ping_timeout`` after ``ping_idle`` of quiet) starts the reconnect loop
(jittered, truncated exponential backoff, RFC 6120 §3.3), then the session is restored in
order (SASL, the same resource, presence and rooms and the features' own catch-up, then the
unconfirmed stanzas with their ids), then new traffic flows again.

Every decision is the core's (``proxy/server_edge.py``); this shell connects, reads, writes,
sleeps and carries out what the core returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from lxml import etree

from ..commands import Log, ToClient
from ..config import Config
from ..metrics import Counters
from ..server_edge import (Confirmed, Finished, GiveUp, ServerCommand, ServerEdge, ServerLost,
                           ServerPolicy, ServerState, ToServer)
from ..session import Outputs
from ..xmpp import codec, ns
from ..xmpp import stanza as st
from .upstream import (UpstreamAuthFailed, UpstreamBindFailed, UpstreamLink,
                       UpstreamUnavailable, connect_upstream, tls_session, tls_session_reused)
from .ports import SessionForUpstream
from .xmlstream import ConnectionLost, OutputFull
from ..xmpp.stanza import Element


_STREAM_ERROR = ns.qname(ns.STREAM, "error")
_SM_PREFIX = "{" + ns.SM + "}"
BARRIER_FLUSH = 0.2  # seconds after a batch before a barrier confirms it
CLOSE_WAIT = 1.0  # seconds a reconnect or restore under way gets to stop when the session ends
CLOSE_READ = 2.0  # seconds the server gets to close its stream after ours (RFC 6120 §4.4)


class Flag:
    """``asyncio.Event``'s ``set``/``clear``/``is_set``/``wait``, with nothing allocated for
    waiters until one waits: an Event's empty deque of waiters is 760 bytes, and every
    session has two that are nearly never waited on."""

    __slots__ = ("_set", "_waiter")

    def __init__(self, value: bool = False) -> None:
        self._set = value
        self._waiter: asyncio.Future[None] | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        if not self._set:
            self._set = True
            waiter, self._waiter = self._waiter, None
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> None:
        """Return once set (at once if it is): like Event.wait, a set() wakes every waiter
        even if a clear() follows."""
        if self._set:
            return
        if self._waiter is None:
            self._waiter = asyncio.get_running_loop().create_future()
        # Shielded: one waiter's cancellation must not cancel the others' wait.
        await asyncio.shield(self._waiter)


class _Stop(Exception):
    """The core said the server is gone (reconnect), finished, or given up."""

    def __init__(self, command: ServerLost | Finished | GiveUp) -> None:
        super().__init__(type(command).__name__)
        self.command = command


class UpstreamSide:
    __slots__ = (
        "_closed", "_flush", "_password", "_task", "_tls_fresh", "_tls_session", "_username",
        "config", "counters", "edge", "finished", "finished_callback", "link", "log", "outbox",
        "room", "session", "tls_context",
    )

    def __init__(self, session: SessionForUpstream, link: UpstreamLink, *, config: Config,
                 tls_context: ssl.SSLContext | None, username: str, password: str,
                 log: Any, rng: random.Random | None = None,
                 counters: Counters | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.session = session
        self.link = link
        self.counters = counters  # for /metrics: restores and outage seconds
        self.config = config
        self.tls_context = tls_context
        self._username = username
        self._password = password  # kept in memory only, to log in again after an outage
        self.log = log
        up, rc = config.upstream, config.reconnect
        self.edge = ServerEdge(ServerPolicy(
            domain=up.domain, max_buffer=up.max_buffer, barrier_every=up.barrier_every,
            ping_idle=up.ping_idle, ping_timeout=up.ping_timeout,
            first_delay_max=rc.first_delay_max, base=rc.base, cap=rc.cap,
            max_outage=rc.max_outage), new_id=lambda: session.core.new_id("barrier"),
            rng=rng, clock=clock)
        self.outbox = self.edge.outbox
        self.room = Flag(True)  # set while the outbox can take more client stanzas
        self._flush: asyncio.TimerHandle | None = None
        # The TLS session to offer when reconnecting; taken once the server has spoken on a
        # connection (a TLS 1.3 ticket arrives after the handshake).
        self._tls_session: ssl.SSLSession | None = None
        self._tls_fresh = True
        self.finished = Flag()  # set once this side is gone for good
        self.finished_callback: Callable[[], None] | None = None
        self._run_commands(self.edge.connected(link.features))
        link.features_read()
        # No task reads the server: the pump is called back when bytes arrive. A task runs
        # only while the link is down (reconnect, restore) or ends (the last confirmations).
        self._task: asyncio.Task[None] | None = None
        self._closed = False  # close() was called: the pump stops
        asyncio.get_running_loop().call_soon(self._pump)

    def password_is(self, password: str) -> bool:
        return hmac.compare_digest(self._password.encode(), password.encode())

    @property
    def state(self) -> ServerState:
        return self.edge.state

    @property
    def orphaned(self) -> bool:
        return self.edge.finishing

    # Carrying out the core's commands -----------------------------------------------------------

    def _run_commands(self, commands: Sequence[ServerCommand], submitted: Element | None = None,
                      document: bytes | None = None) -> None:
        """Do what the core asked; the end of the connection (lost, finished, given up)
        stops the reading loop (raised as _Stop). ``document``: ``submitted`` as the journal
        serialized it (written as it is)."""
        for c in commands:
            if isinstance(c, ToServer):
                el = c.element
                self.link.stream.send(el, document if el is submitted else None)
            elif isinstance(c, Confirmed):
                # The server handled these: they leave the ledger as delivered.
                self.session.c2s_left(c.left - self.session.ledger.c2s.left, "delivered")
                self._update_room()
            elif isinstance(c, ToClient):
                self.session.proxy_to_client(c.element)
            elif isinstance(c, Log):
                getattr(self.log, c.level)(c.event, **c.fields)
            elif isinstance(c, ServerLost | Finished | GiveUp):
                raise _Stop(c)

    # Writing ------------------------------------------------------------------------------------

    def send(self, el: Element) -> Element | None:
        """A stanza for the server (from the client or a feature). Returns an answer for the
        client when the proxy answers itself (a ping to the server while it is away)."""
        outcome = self.edge.submit(el)
        if not isinstance(outcome, list):
            return outcome
        document = self.session.c2s_taken(el)
        self._run_commands(outcome, el, document)
        self._update_room()
        if self._flush is None and self.edge.state == "up" and self.outbox.unbarriered:
            self._flush = asyncio.get_running_loop().call_later(BARRIER_FLUSH,
                                                                self._flush_barrier)
        return None

    def send_direct(self, el: Element) -> None:
        """Outside the outbox: restore stanzas and anything that must not be replayed."""
        if self.state == "up":
            self.link.stream.send(el)
            self.outbox.note_direct()

    def _flush_barrier(self) -> None:
        self._flush = None
        self._run_commands(self.edge.barrier_due())

    def flush_now(self) -> None:
        """A barrier for whatever is unconfirmed, now (an ending or stopping session)."""
        if self._flush is not None:
            self._flush.cancel()
        self._flush_barrier()

    def _update_room(self) -> None:
        room = self.room
        if self.outbox.full:
            if room.is_set():
                room.clear()  # backpressure: the client pump waits, acks are not withheld
        elif not room.is_set():
            room.set()

    @property
    def congested(self) -> bool:
        return self.edge.state == "up" and self.link.stream.congested

    async def drain(self) -> None:
        if self.state == "up":
            await self.link.stream.drain()

    def orphan(self) -> None:
        """The session ended with stanzas the server has not confirmed: keep working for
        them (the credentials are still in memory) until confirmed, or bounce them after
        ``max_outage``. Whatever the server sends meanwhile is settled by the session."""
        commands = self.edge.finish()
        if self.state == "up":
            self._run_commands(commands)
        else:
            self._run_commands([c for c in commands if isinstance(c, Log)])

    # Reading and liveness -----------------------------------------------------------------------

    def _pump(self, drained: bool = False) -> None:
        """Relay what the server sent that is here now, then wait to be called back when
        more arrives (or nothing did for the core's read timeout: ``_silent``).
        ``drained``: the client's buffer was just drained; read on even if it is full."""
        if self._closed:
            return
        stream = self.link.stream
        edge = self.edge
        session = self.session
        try:
            while True:
                event = stream.ready_event()  # the rest of a read: one call per stanza
                if event is None:
                    # Backpressure toward the server: no more reading while the client's
                    # buffer is full (it only grows when a loop turn flushes, so once before
                    # each read is as often as it can change).
                    if not drained and session.client_congested():
                        self._wait(session.client_drain(), drained=True)
                        return
                    drained = False
                    try:
                        polled = stream.poll_event()  # nothing is parsed: a read
                    except ConnectionLost as exc:
                        self._stopped(ServerLost(f"connection lost ({exc})"))
                        return
                    if polled is None:
                        stream.when_readable(self._pump, edge.read_timeout(), self._silent)
                        return
                    assert not isinstance(polled, OutputFull)  # no output limits toward the server
                    event = polled
                    edge.heard()  # what a read brought in: nothing else arrives meanwhile
                    if self._tls_fresh:
                        self._tls_fresh = False
                        self._tls_session = tls_session(stream) or self._tls_session
                if type(event) is codec.StanzaReceived:
                    el = event.element
                    tag = el.tag
                    if tag == _STREAM_ERROR:
                        self._run_commands(edge.stream_error(el))
                    elif tag.startswith(_SM_PREFIX):  # not QName(el): one lookup per stanza
                        self._run_commands(edge.server_nonza(el))
                    elif tag in st.STANZA_TAGS:
                        absorbed = edge.server_stanza(el)
                        if absorbed is not None:
                            self._run_commands(absorbed)
                        elif edge.finishing:
                            session.settle_from_server(el)
                        else:
                            session.from_server(el)
                        del absorbed
                    # Nothing read is kept while waiting: an element keeps its parser alive.
                    del el, event
                elif isinstance(event, codec.StreamClosed):
                    self._stopped(ServerLost("the server closed the stream"))
                    return
                elif isinstance(event, codec.StreamViolation):
                    error, lost = edge.stream_violation(event)
                    stream.send_bytes(error)
                    self._stopped(lost)
                    return
        except _Stop as stop:
            self._stopped(stop.command)
        except Exception as exc:  # a bug: this session ends, the others go on
            self._stopped(exc)

    def _silent(self) -> None:
        """Nothing came from the server within the read timeout: the core pings it, or
        declares it gone."""
        if self._closed:
            return
        try:
            self._run_commands(self.edge.silence())
        except _Stop as stop:
            self._stopped(stop.command)
            return
        except Exception as exc:
            self._stopped(exc)
            return
        self._pump()

    def _wait(self, waiting: Awaitable[None], *, drained: bool) -> None:
        self._task = asyncio.ensure_future(self._pump_after(waiting, drained))

    async def _pump_after(self, waiting: Awaitable[None], drained: bool) -> None:
        await waiting
        self._task = None
        self._pump(drained)

    def _stopped(self, stop: ServerLost | Finished | GiveUp | Exception) -> None:
        """The pump stopped: what follows (the last reads, a reconnect, the end) waits, so
        it runs in a task of its own."""
        self._task = asyncio.ensure_future(self._after_pump(stop))

    async def _after_pump(self, stop: ServerLost | Finished | GiveUp | Exception) -> None:
        try:
            if isinstance(stop, Exception):
                raise stop
            if isinstance(stop, Finished):
                await self._close_reading(CLOSE_READ)
                self.edge.state = "gone"
                self.log.info("upstream_finished", reason="the server confirmed everything")
                return
            if isinstance(stop, GiveUp):
                raise _Stop(stop)
            self._went_down(stop.reason)
            await self._reconnect()
        except _Stop as given_up:
            assert isinstance(given_up.command, GiveUp)
            await self._give_up(given_up.command)
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            self.log.exception("upstream_failed")
            self._return_unconfirmed("internal error")  # the core is "gone" from here on
            await self.session.end("internal error", client_error=codec.stream_error(
                "internal-server-error"), upstream_dead=True)
            return
        finally:
            if self.state == "gone":
                self._set_finished()
        self._task = None  # restored: the pump reads the new link
        self._pump()

    def _set_finished(self) -> None:
        self.finished.set()
        if self.finished_callback is not None:
            self.finished_callback()

    def _went_down(self, reason: str) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        self.link.stream.abort()
        self._run_commands(self.edge.lost(reason))
        self._update_room()
        self.session.write(self.session.core.upstream_lost())

    # Reconnecting -------------------------------------------------------------------------------

    async def _reconnect(self) -> None:
        edge = self.edge
        while True:
            delay = edge.next_attempt()
            if isinstance(delay, GiveUp):
                await asyncio.sleep(edge.outage_left())
                raise _Stop(delay)
            self.log.info("upstream_reconnect_wait", attempt=edge.backoff.attempts,
                          delay=round(delay, 3))
            await asyncio.sleep(delay)
            try:
                link = await connect_upstream(
                    self.config.upstream, self.tls_context, self._username, self._password,
                    max_stanza_bytes=self.config.limits.max_stanza_bytes,
                    resume_tls=self._tls_session, client=self.session.client_endpoints,
                    log=self.log)
            except UpstreamUnavailable as exc:
                self.log.info("upstream_reconnect_failed", attempt=edge.backoff.attempts,
                              detail=str(exc))
                continue
            except UpstreamAuthFailed as exc:
                raise _Stop(edge.login_refused(exc.condition)) from exc
            await self._restore(link)
            return

    async def _restore(self, link: UpstreamLink) -> None:
        resource = self.session.core.jid.resource
        try:
            full = await link.bind(resource)
        except (UpstreamBindFailed, UpstreamUnavailable) as exc:
            await link.stream.close()
            raise _Stop(self.edge.bind_refused(resource, str(exc))) from exc
        refused = self.edge.bound_check(full, self.session.jid)
        if refused is not None:
            await link.stream.close()
            raise _Stop(refused)
        link.stream.sent_bytes = self.link.stream.sent_bytes  # the byte counts go on
        self.link = link
        self._tls_fresh = True
        outage = self.edge.restored()
        if self.counters is not None:
            self.counters.upstream_restores += 1
            self.counters.outage_seconds += outage
        self._run_commands(self.edge.connected(link.features))
        link.features_read()
        # A finishing session's client is gone: nothing of its state is restored (its
        # contacts must not see it come back online), only what it sent is replayed.
        restore = (self.session.core.upstream_restored() if not self.edge.finishing
                   else Outputs())
        for el in restore.to_upstream:  # presence, rooms, roster catch-up
            link.stream.send(el)
            self.outbox.note_direct()
        self.session.write(Outputs(to_client=restore.to_client, commands=restore.commands))
        replay = self.edge.replay()
        for el in replay:
            link.stream.send(el)
        self._update_room()
        self.log.info("upstream_restored", outage_seconds=round(outage, 3),
                      restore_stanzas=len(restore.to_upstream),
                      replayed=max(0, len(replay) - 1), attempts=self.edge.backoff.attempts,
                      tls_resumed=tls_session_reused(link.stream))

    async def _give_up(self, give_up: GiveUp) -> None:
        """The session cannot be restored: whatever the client sent that the server never
        confirmed comes back to its sender as errors (stored for the account's next login
        when the client is gone), then the client's stream ends saying why."""
        self._return_unconfirmed(give_up.reason)
        self.room.set()
        self.log.warning("upstream_gave_up", reason=give_up.reason, orphaned=self.orphaned)
        await self.session.end(f"upstream gave up: {give_up.reason}",
                               client_error=give_up.error, upstream_dead=True)

    def _return_unconfirmed(self, reason: str) -> None:
        errors, discarded = self.edge.give_up()
        bounced = 0
        for error in errors:
            if self.session.bounce_to_sender(error):
                bounced += 1
            else:
                discarded += 1
        self.session.c2s_left(bounced, "bounced")
        self.session.c2s_left(discarded, "discarded")
        if bounced or discarded:
            self.log.info("unconfirmed_returned", reason=reason, bounced=bounced,
                          discarded=discarded)

    # The end ----------------------------------------------------------------------------------

    async def _close_reading(self, timeout: float) -> None:
        """Close our stream and read the server's until it closes it too (RFC 6120 §4.4):
        stanzas it sent before its close are the session's to settle, not to lose."""
        stream = self.link.stream
        stream.send_bytes(codec.STREAM_CLOSE)
        stream.closing = True
        try:
            async with asyncio.timeout(timeout):
                while True:
                    event = await stream.next_event()
                    if isinstance(event, codec.StanzaReceived):
                        el = event.element
                        if etree.QName(el).namespace == ns.SM:
                            self._confirmations(self.edge.server_nonza(el))
                        elif st.is_stanza(el):
                            absorbed = self.edge.server_stanza(el)
                            if absorbed is None:
                                self.session.settle_from_server(el)
                            else:
                                self._confirmations(absorbed)
                    elif not isinstance(event, codec.StreamOpened):
                        break
        except (TimeoutError, ConnectionLost):
            pass
        stream.abort()

    def _confirmations(self, commands: Sequence[ServerCommand]) -> None:
        """While our stream is closing: the server's confirmations still count (they leave
        the ledger as delivered); nothing more may be written after our close."""
        self._run_commands([c for c in commands if isinstance(c, Confirmed)])

    async def close(self, *, dead: bool, timeout: float = CLOSE_READ) -> None:
        if self._flush is not None:
            self._flush.cancel()
        self._closed = True
        self.link.stream.stop_listening()
        task = self._task
        if task is not None and asyncio.current_task() is not task:
            task.cancel()
            await asyncio.wait({task}, timeout=CLOSE_WAIT)
            if not task.done():
                # Still blocked in a read: closing the transport ends it.
                self.link.stream.abort()
                dead = True
                await asyncio.wait({task}, timeout=CLOSE_WAIT)
            if task.done() and not task.cancelled():
                with contextlib.suppress(Exception):
                    task.result()
        if self.state == "up" and not dead:
            await self._close_reading(timeout)
        else:
            self.link.stream.abort()
        self.edge.state = "gone"
        self._set_finished()
