"""A live session in the running proxy: one bound resource, its upstream stream, and the
client connection it has at the moment (if any).

It outlives its client connection: with stream management a dropped client leaves the
session hibernating, upstream still up and its presence intact, until the client resumes or
the granted time runs out. Every protocol decision is a core's: the client edge
(``proxy/client_edge.py``: stream management, hibernation, the ledger, what is stored, bounced
or discarded) and the feature pipeline (``SessionCore``). This shell feeds them events and
carries out the commands they return (``execute``): it writes, runs the timers, stores and
closes connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

from ..archive_store import ArchiveFailed, ArchiveResult, ArchiveWriter
from ..client_edge import ClientEdge, EdgePolicy
from ..commands import (AbortClient, AckWhenDurable, ArchivePut, ArchiveQuery, CancelTimer,
                        CatchUp, ClientLeaves, CloseClient,
                        Command, EndSession, JournalCut, JournalPut, Log, RulesMatched,
                        MoreStored, SmRegister, StartTimer, StoreOffline, StorePending,
                        ToAccount, ToClient, ToServerDirect, WhenStored)
from ..config import Config
from ..features.stream_management import StreamManagement
from ..inspection import Inspector
from ..journal import Journal, parse_stored
from ..metrics import Counters
from ..ledger import Exit, Ledger
from ..session import Outputs, SessionCore
from ..xmpp import codec
from ..xmpp import stanza as st
from .upstream import Endpoints, UpstreamLink
from .ports import SessionRegistry
from .upstream_side import UpstreamSide
from .xmlstream import ConnectionLost, OutputFull, XmlStream
from ..xmpp.stanza import Element






class OfflineStore(Protocol):
    def offline_put(self, account: str, stanza: bytes, expires_at: float) -> int: ...

    def unwritten(self, account: str) -> bool: ...

    def offline_take(self, account: str, now: float,
                     limit: int | None = None) -> list[bytes]: ...


class PendingStore(Protocol):
    def put(self, account: str, stanzas: list[bytes], expires_at: float) -> int: ...

    def take(self, account: str) -> list[tuple[bytes, float]]: ...


class CommitWaiter(Protocol):
    committed: int  # the ticket of the last batch on disk

    def when_committed(self, done: Callable[[], None],
                       failed: Callable[[str], None]) -> None: ...


class SessionStore(Protocol):
    """What a session keeps in the store: see proxy/store.py."""

    @property
    def offline(self) -> OfflineStore: ...

    @property
    def pending(self) -> PendingStore: ...

    @property
    def writer(self) -> CommitWaiter: ...


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
    __slots__ = (
        "_account", "_archiving", "_jid", "_ledger_logged", "_serialized", "_store_ticket",
        "_timers", "archive", "client", "client_address", "client_endpoints", "config",
        "conn_id", "core", "counters", "edge", "hub", "inspector", "journal", "log", "since",
        "sm_key", "store", "transcript", "upstream",
    )

    def __init__(self, hub: SessionRegistry, core: SessionCore, link: UpstreamLink, config: Config,
                 store: SessionStore | None, log: Any, *, password: str,
                 tls_context: ssl.SSLContext | None, inspector: Inspector | None = None,
                 journal: Journal | None = None, counters: Counters | None = None,
                 archive: ArchiveWriter | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.hub = hub
        self.archive = archive
        self.core = core
        self.config = config
        self.store = store
        self.journal = journal
        # The JID strings, kept as attributes: read for every stanza (the from stamp), and
        # the same objects the logger and the hub's index hold.
        self._account = str(core.account)
        self._jid = str(core.jid)
        # jid, session, account and (once a client is attached) conn on every event; each
        # attach rebinds conn, so no logger without it is kept (one bound logger fewer).
        self.log = log.bind(jid=self._jid, session=core.id, account=self._account)
        self.counters = counters
        if counters is not None:
            link.stream.sent_bytes = counters.c2s_bytes
        smc = config.stream_management
        self.edge = ClientEdge(EdgePolicy(
            domain=config.upstream.domain, ack_timeout=smc.ack_timeout,
            resume_timeout=smc.resume_timeout, max_resume_timeout=smc.max_resume_timeout,
            max_queue=smc.max_queue, on_timeout=smc.on_timeout, stored_ttl=smc.stored_ttl,
            pending_ttl=config.durability.pending_ttl, counter_start=smc.debug_counter_start,
            journal=journal is not None, store=store is not None,
            origin_id=journal.origin_id if journal is not None and config.durability.origin_id
            else None),
            new_sm_id=hub.new_sm_id, clock=clock)
        self._timers: dict[str, asyncio.TimerHandle] = {}
        # The message an ArchivePut of the outputs being written wants stored, and its bytes
        # once the write serialized it (the archive then stores those: serialized once).
        self._archiving: Element | None = None
        self._serialized: tuple[Element, bytes] | None = None
        self._ledger_logged = False
        # The writer's ticket of this session's last offline or pending put: until it is
        # committed, the journal's cuts (and drop) wait, so no crash in between loses it.
        self._store_ticket = 0
        self.sm_key: tuple[str, str] | None = None  # where the hub has it for resumption
        self.client: XmlStream | None = None
        self.conn_id: str | None = None  # the client connection's id in the log
        # host:port of the client connection it has or had last (a PROXY header's client
        # behind a load balancer), for the admin view
        self.client_address: str | None = None
        self.client_endpoints: Endpoints = (None, None)
        self.since = time.time()  # when the session was bound (the admin view shows it)
        self.inspector = inspector
        self.transcript = (inspector.transcript(self._account, core.id)
                           if inspector is not None else None)
        self.upstream = UpstreamSide(self, link, config=config, tls_context=tls_context,
                                     username=core.jid.local, password=password, log=self.log,
                                     counters=counters, rng=hub.rng)

    @property
    def jid(self) -> str:
        return self._jid

    @property
    def account(self) -> str:
        return self._account

    @property
    def state(self) -> str:
        return self.edge.state

    @property
    def sm(self) -> StreamManagement | None:
        return self.edge.sm

    @property
    def ledger(self) -> Ledger:
        return self.edge.ledger

    def _upstream_up(self) -> bool:
        up = self.upstream
        return up.edge.state == "up" and not up.link.stream.closing

    # Carrying out commands ----------------------------------------------------------------------

    def execute(self, commands: list[Command]) -> list[Awaitable[Any]]:
        """Do what the cores asked, in order; returns what is still running (a polite close,
        the end of the session) for callers that wait for it."""
        if not commands:  # the common case on the relay path: nothing to do
            return []
        running: list[Awaitable[Any]] = []
        for c in commands:
            if isinstance(c, ToClient):
                if self.client is not None:
                    if c.own:
                        self.inspect_own("s2c", c.element)
                    document = c.document
                    if c.element is self._archiving:
                        if document is None:
                            document = codec.document(c.element)
                        self._serialized = (c.element, document)
                    self.client.send(c.element, document)
            elif isinstance(c, JournalPut):
                assert self.journal is not None
                self.journal.put(self.core.id, c.lane, c.number, self._account, c.stanza,
                                 c.queued_at)
            elif isinstance(c, JournalCut):
                assert self.journal is not None
                if self.store is None or self._store_ticket <= self.store.writer.committed:
                    self.journal.cut(self.core.id, c.lane, c.left)
                else:  # what it cuts may be stored and not yet committed
                    self._after_store_commit(functools.partial(
                        self.journal.cut, self.core.id, c.lane, c.left))
            elif isinstance(c, AckWhenDurable):
                self._ack_when_durable(c.element)
            elif isinstance(c, StartTimer):
                self._start_timer(c.name, c.seconds)
            elif isinstance(c, CancelTimer):
                timer = self._timers.pop(c.name, None)
                if timer is not None:
                    timer.cancel()
            elif isinstance(c, Log):
                getattr(self.log, c.level)(c.event, **c.fields)
            elif isinstance(c, ToServerDirect):
                self.upstream.send_direct(c.element)
            elif isinstance(c, StoreOffline):  # on the writer's thread (the cut waits)
                if self.store is not None:
                    self._store_ticket = self.store.offline.offline_put(
                        self._account, c.stanza, c.expires_at)
                    self._stored(c.stanza)
            elif isinstance(c, StorePending):
                if self.store is not None:
                    self._store_ticket = self.store.pending.put(
                        self._account, list(c.stanzas), c.expires_at)
            elif isinstance(c, CloseClient):
                running += self._close_client(c)
            elif isinstance(c, AbortClient):
                if self.client is not None:
                    self.client.abort(hard=True)  # its reader then reports the loss
            elif isinstance(c, EndSession):
                ending = self._end_soon(c.reason, c.client_error)
                if ending is not None:
                    running.append(ending)
            elif isinstance(c, SmRegister):
                self.hub.sm_registered(self, c.sm_id, c.inbound)
            elif isinstance(c, ClientLeaves):
                raise ClientLeft(c.reason, error=c.error, end_session=True)
            elif isinstance(c, MoreStored):
                self._deliver_stored()
        return running

    def _after_stored(self, action: Callable[[], None]) -> None:
        """``action`` (a journal cut or drop) now, or once the store committed this
        session's last put: the journal must never forget a stanza the store does not hold
        yet. Tickets commit in order and a cut keeps the furthest, so cuts stay in order."""
        store = self.store
        if store is None or self._store_ticket <= store.writer.committed:
            action()
        else:
            self._after_store_commit(action)

    def _close_client(self, c: CloseClient) -> list[Awaitable[Any]]:
        stream, self.client = self.client, None
        if stream is None:
            return []
        if c.hard:
            stream.abort(hard=True)
            return []
        if c.grace:
            return [asyncio.ensure_future(stream.close(c.error, wait_for_peer=c.grace))]
        stream.send_bytes((c.error or b"") + codec.STREAM_CLOSE)
        stream.closing = True
        stream.abort()
        return []

    def _stored(self, data: bytes) -> None:
        """The features hear of a stanza stored for the account (push notifications)."""
        out = self.core.offline_stored(parse_stored(data), upstream_usable=self._upstream_up())
        if out.commands:
            self.write(Outputs(commands=out.commands))

    def _ack_when_durable(self, answer: Element) -> None:
        stream = self.client
        if stream is None or self.journal is None:
            return

        def send() -> None:
            if self.client is stream and not stream.closing:
                stream.send(answer)
        self.journal.when_durable(send)

    def _start_timer(self, name: str, seconds: float) -> None:
        old = self._timers.pop(name, None)
        if old is not None:
            old.cancel()
        self._timers[name] = asyncio.get_running_loop().call_later(
            seconds, self._timer_fired, name)

    def _timer_fired(self, name: str) -> None:
        self._timers.pop(name, None)
        if name.startswith(_FEATURE_TIMER):
            if self.state != "ended":
                self.write(self.core.timer_fired(name[len(_FEATURE_TIMER):]))
            return
        self.execute(self.edge.timer_fired(name))

    # Writing ------------------------------------------------------------------------------------

    def to_client(self, el: Element) -> None:
        self.execute(self.edge.for_client(el, upstream_up=self._upstream_up()))

    def proxy_to_client(self, el: Element) -> None:
        """A stanza of the proxy's own for the client (error replies, stored messages)."""
        self.inspect_own("s2c", el)
        self.to_client(el)

    def to_upstream(self, el: Element) -> None:
        answer = self.upstream.send(el)
        if answer is not None:
            self.to_client(answer)

    def write(self, out: Outputs) -> None:
        commands = out.commands
        if commands and self.archive is not None:
            self._archiving = _archived_element(commands)
        for el in out.to_upstream:
            self.to_upstream(el)
        for el in out.to_client:
            self.to_client(el)
        if not commands:
            return
        for command in commands:
            if isinstance(command, CatchUp):
                self.hub.wake(command.session_id)
            elif isinstance(command, ToAccount):
                self.hub.to_account(self, command.kind, command.payload)
            elif isinstance(command, StartTimer):  # a feature's, told when it fires
                self._start_timer(_FEATURE_TIMER + command.name, command.seconds)
            elif isinstance(command, ToServerDirect):  # a feature's own request
                self.inspect_own("c2s", command.element)
                self.execute([command])
            elif isinstance(command, Log):
                self.execute([command])
            elif isinstance(command, ArchivePut):
                if self.archive is not None:  # always this session's own account
                    el = command.element
                    self.archive.put(self._account, command.row,
                                     None if el is None else self._serialized_as(el))
            elif isinstance(command, ArchiveQuery):
                self._archive_query(command)
            elif isinstance(command, WhenStored):
                self._when_stored(command)

    def _serialized_as(self, el: Element) -> bytes:
        """``el`` as the write just serialized it (a document of its own, as the journal
        keeps); serialized here if it was not written (an outbox waiting, no client)."""
        serialized, self._serialized = self._serialized, None
        self._archiving = None
        if serialized is not None and serialized[0] is el:
            return serialized[1]
        return codec.document(el)

    def _when_stored(self, command: WhenStored) -> None:
        """Hold a feature's reply until the store's writer committed what it wrote."""
        def done() -> None:
            self._write_held(command.then)

        def failed(error: str) -> None:
            out = command.failed
            commands = [Log(c.event, {**c.fields, "error": error}, c.level)
                        if isinstance(c, Log) else c for c in out.commands]
            self._write_held(Outputs(list(out.to_client), list(out.to_upstream), commands))
        if self.store is None:  # nothing is written, so nothing to wait for
            done()
        else:
            self.store.writer.when_committed(done, failed)

    def _write_held(self, out: Outputs) -> None:
        if self.state == "ended":
            # No client to answer; the account's other sessions (a blocklist push) still
            # hear of it.
            self.write(Outputs(commands=out.commands))
            return
        for el in out.to_client:  # the proxy's own answers, as the pipeline's are
            self.inspect_own("s2c", el)
        self.write(out)

    def _archive_query(self, command: ArchiveQuery) -> None:
        token = command.token

        def done(result: ArchiveResult) -> None:
            if self.state != "ended":
                self.write(self.core.store_result(token, result))
        if self.archive is None:
            self.write(self.core.store_result(token, ArchiveFailed("no archive")))
        else:
            self.archive.query(self._account, command.request, done)

    def from_account(self, kind: str, payload: Element) -> None:
        """Another session of the account sent this one something (``ToAccount``)."""
        if self.state != "ended":
            self.write(self.core.from_account(kind, payload))

    def catch_up(self) -> None:
        """Another session left this one's client behind (shared roster cache)."""
        if self.state != "ended":
            self.write(self.core.catch_up())

    def from_server(self, el: Element) -> None:
        """A stanza from the legacy server (the upstream side's reading task)."""
        # The clock and the inspection pass only when there is something to inspect or log.
        inspecting = self.inspector is not None
        started = time.perf_counter() if inspecting else 0.0
        out = self.core.from_upstream(el)
        self.write(out)
        commands = self.edge.request_ack()
        if commands:
            self.execute(commands)
        counters = self.counters
        if counters is not None:  # every stanza, whatever the pipeline did with it
            counters.relayed(counters.s2c_stanzas, el.tag, self.upstream.link.stream.read_at)
        if inspecting or out.commands:
            self._after_pipeline("s2c", el, started, out, out.to_client)

    def client_congested(self) -> bool:
        """More waits for the client than its transport's high-water mark: the server's
        side stops reading until it drained (``client_drain``)."""
        client = self.client
        return client is not None and client.congested

    async def client_drain(self) -> None:
        client = self.client
        if client is not None:
            await client.drain()

    # Inspection ---------------------------------------------------------------------------------

    def _after_pipeline(self, direction: str, el: Element, started: float, out: Outputs,
                        onward: list[Element]) -> None:
        """What the rules asked to log, and the inspection log and transcript: the stanza
        that came in (forwarded or kept) and every stanza the features made of their own."""
        core = self.core
        counters = self.counters
        matched: tuple[str, ...] = ()
        for command in out.commands:
            if isinstance(command, RulesMatched):
                matched = command.names
                if counters is not None:
                    for name in matched:
                        counters.count(counters.rule_hits, name)
                for event in command.events:
                    # The stanza's context first; a rule's own fields of the same name win.
                    self.log.info(event.get("event", "rule"), **{
                        "direction": direction, "from": el.get("from"), "to": el.get("to"),
                        "conn": self.conn_id,
                        **{k: v for k, v in event.items() if k != "event"}})
        if self.inspector is not None:
            forwarded = any(x is el for x in onward)
            self.inspector.stanza(direction, el, started=started, conn=self.conn_id,
                                  session=core.id, account=str(core.account),
                                  forwarded=forwarded, matched=matched,
                                  transcript=self.transcript)
            for made, way in ((out.to_client, "s2c"), (out.to_upstream, "c2s")):
                for extra in made:
                    if extra is not el:
                        self.inspect_own(way, extra, started)

    def inspect_own(self, direction: str, el: Element, started: float | None = None) -> None:
        """A stanza the proxy made itself (an answer, a push, a bounce) for the inspection
        log and the transcript."""
        if self.inspector is not None:
            self.inspector.stanza(direction, el, started=started or time.perf_counter(),
                                  conn=self.conn_id, session=self.core.id,
                                  account=str(self.core.account), forwarded=True, matched=(),
                                  transcript=self.transcript, origin="proxy")

    # The ledger, for the upstream side ---------------------------------------------------------

    def c2s_taken(self, el: Element) -> bytes | None:
        """``el`` entered the outbox; returns it as the journal just serialized it, if it
        did (the write to the server then uses those bytes)."""
        commands = self.edge.c2s_taken(el)
        document = None
        if commands:
            self.execute(commands)
            for c in commands:
                if isinstance(c, JournalPut):
                    document = c.stanza
                    break
        if el is self._archiving:
            if document is None:  # no journal: serialized here for the wire and the archive
                document = codec.document(el)
            self._serialized = (el, document)
        return document

    def c2s_left(self, count: int, exit: Exit) -> None:
        self.execute(self.edge.c2s_left(count, exit))

    def settle_from_server(self, el: Element) -> None:
        self.execute(self.edge.settle_from_server(el, upstream_up=self._upstream_up()))

    def bounce_to_sender(self, error: Element) -> bool:
        commands = self.edge.bounce_to_sender(error, upstream_up=self._upstream_up())
        if commands is None:
            return False
        self.execute(commands)
        return True

    def settle_outbox(self, *, client_here: bool) -> None:
        self.execute(self.edge.settle_outbox(self.upstream.outbox.drain(),
                                             client_here=client_here,
                                             upstream_up=self._upstream_up()))

    def replay_pending(self) -> None:
        """Client stanzas left over from an earlier run of the proxy go to the server first."""
        if self.store is None:
            return
        rows = self.store.pending.take(self._account)
        if not rows:
            return
        send, commands = self.edge.pending_replay(rows, self.jid, upstream_up=self._upstream_up())
        for el in send:
            self.to_upstream(el)
        self.execute(commands)

    # The client connection ----------------------------------------------------------------------

    def serve_client(self, stream: XmlStream, first: list[Element] | None = None, *,
                     resumed: bool = False, conn_id: str | None = None,
                     on_end: Callable[[ClientOutcome], None]) -> ClientPump:
        """Attach ``stream`` and relay for it until it leaves (its ``ClientPump``, which
        calls ``on_end`` with why it left).

        ``first`` are elements to write before anything else (bind result, takeover queue,
        or ``<resumed/>`` and the resent stanzas, after which an ``<r/>`` follows); the list
        is emptied once they are written.
        """
        if self.client is not None and self.client is not stream:
            self.execute(self.edge.evict("another connection took this session over"))
        self.client = stream
        self.conn_id = conn_id
        self.client_address = stream.peer
        self.client_endpoints = stream.endpoints()  # for the PROXY header of a reconnection
        self.log = self.log.bind(conn=conn_id)  # replaces the last connection's
        self.upstream.log = self.log
        if first:
            _send_all(stream, first)
            # Emptied once written: a stanza kept by the caller keeps its stream parser alive.
            first.clear()
        self.execute(self.edge.attach(resumed=resumed))
        self.write(self.core.client_attached())  # a stream starts active (CSI)
        pump = ClientPump(self, stream, on_end)
        pump.run()
        return pump

    async def _client_gone(self, stream: XmlStream, left: ClientLeft) -> None:
        if self.client is not stream:
            return  # evicted: the session already belongs to another connection
        running = self.execute(self.edge.client_left(left.reason, end_session=left.end_session,
                                                     error=left.error))
        if self.edge.state == "hibernating" and self.sm is not None:
            self.write(self.core.client_detached([u.element for u in self.sm.unacked]))
        if running:
            await asyncio.gather(*running)

    def client_event(self, event: codec.StreamEvent) -> None:
        """One event of the client's stream (its pump's); raises ClientLeft when the event
        ends the connection."""
        edge = self.edge
        if type(event) is codec.StanzaReceived:
            el = event.element
            if el.tag in st.STANZA_TAGS:
                edge.client_stanza()
                self._from_client(el)
            else:
                handled = self.core.client_nonza(el)  # a feature's (CSI) or the edge's
                if handled is not None:
                    self.write(handled)
                else:
                    self.execute(edge.client_nonza(el))  # ClientLeaves raises ClientLeft
            commands = edge.request_ack()
            if commands:
                self.execute(commands)
        else:
            leaves = edge.stream_event(event)
            raise ClientLeft(leaves.reason, error=leaves.error, end_session=True,
                             clean=isinstance(event, codec.StreamClosed))

    def _from_client(self, el: Element) -> None:
        inspecting = self.inspector is not None
        started = time.perf_counter() if inspecting else 0.0
        out = self.core.from_client(el)
        self.write(out)
        counters = self.counters
        if counters is not None:
            client = self.client
            counters.relayed(counters.c2s_stanzas, el.tag,
                             client.read_at if client is not None else time.perf_counter())
        if inspecting or out.commands:
            self._after_pipeline("c2s", el, started, out, out.to_upstream)
        if self.edge.stored_ready(el):
            self._deliver_stored()

    def _deliver_stored(self) -> None:
        """The next stored messages for the client, as many as its stream management queue
        has room for (the rest follow its acks: a backlog never overflows the queue)."""
        if self.store is None:
            return
        if self.store.offline.unwritten(self._account):
            # A put of the account (its last session's end) is still with the writer: the
            # take waits for its commit rather than the loop for the disk.
            self._after_store_commit(self._deliver_stored_if_here)
            return
        room = self.edge.stored_room()
        taken = self.store.offline.offline_take(self._account, time.time(), limit=room)
        stored = [self.core.from_store(parse_stored(data)) for data in taken]
        kept = [x for x in stored if x is not None]
        self.execute(self.edge.deliver_stored(kept, upstream_up=self._upstream_up(),
                                              dropped=len(stored) - len(kept),
                                              more=room is not None and len(taken) == room))

    def _deliver_stored_if_here(self) -> None:
        if self.state == "active" and self.client is not None:
            self._deliver_stored()

    def _after_store_commit(self, action: Callable[[], None]) -> None:
        """``action`` once the writer committed everything handed to it so far."""
        assert self.store is not None
        writer = self.store.writer

        def failed(error: str) -> None:
            # The writer tries the batch again; so does this wait (on a later turn: the
            # writer's failure is still being told to every waiter of the ticket).
            asyncio.get_running_loop().call_soon(writer.when_committed, action, failed)
        writer.when_committed(action, failed)

    # Resumption and takeover --------------------------------------------------------------------

    def resume(self, h: int) -> list[Element]:
        """What a resuming connection gets first: ``<resumed/>`` and the unacked stanzas
        (serve_client adds the ``<r/>``). Raises HandledCountTooHigh when ``h`` is absurd."""
        first, commands = self.edge.resume(h)
        self.execute(commands)
        return first

    def take_over(self) -> list[Element]:
        """A new connection bound this session's resource: it gets the whole queue; stream
        management starts afresh on it."""
        queue, commands = self.edge.take_over()
        self.execute(commands)
        return queue

    # The end --------------------------------------------------------------------------------------

    def _end_soon(self, reason: str,
                  client_error: bytes | None = None) -> asyncio.Task[None] | None:
        if self.state == "ended":
            return None
        return asyncio.ensure_future(self.end(reason, client_error=client_error))

    async def end(self, reason: str, *, client_error: bytes | None = None,
                  upstream_dead: bool = False, stopping: bool = False,
                  deadline: float | None = None) -> None:
        """End the session for good; nothing in its ledger is lost: what the client never
        acknowledged is stored or bounced, and what the server has not confirmed is still
        worked on (``finishing``) or, when the proxy is ``stopping``, stored for the
        account's next login. ``deadline`` (loop time) bounds a stop's wait for the server."""
        if self.state == "ended":
            return
        upstream = self.upstream
        upstream_up = upstream.state == "up" and not upstream_dead
        if stopping and not upstream_up:
            self.settle_outbox(client_here=True)  # nothing will confirm it now
        self.execute(self.edge.end(upstream_up=upstream_up, stopping=stopping))
        self.hub.session_ended(self)
        try:
            await self._end(reason, client_error, upstream_up, stopping, deadline)
        finally:
            self.hub.session_gone(self)

    async def _end(self, reason: str, client_error: bytes | None, upstream_up: bool,
                   stopping: bool, deadline: float | None) -> None:
        upstream = self.upstream
        self.log.info("session_ended", reason=reason)
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
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

    async def hand_over(self) -> list[Element]:
        """A new session binds this ended session's resource while it still waits for the
        server: what it owes goes to the new one (replayed first there), and its upstream
        stream closes, so the two never conflict at the server."""
        held = self.upstream.outbox.drain()
        self.c2s_left(len(held), "stored")
        self.log.info("handed_over", stanzas=len(held))
        await self.upstream.close(dead=self.upstream.state != "up")
        return held

    def replay(self, held: list[Element], why: str) -> None:
        """Client stanzas another session of this resource owed the server: sent first."""
        for el in held:
            el.set("from", self.jid)
            self.to_upstream(el)
        if held:
            self.log.info("owed_replayed", count=len(held), why=why)

    def when_upstream_finished(self, callback: Callable[[], None]) -> None:
        self.upstream.finished_callback = callback

    def log_ledger(self) -> None:
        """The session's final account: how everything it took on left (once)."""
        if not self._ledger_logged:
            self._ledger_logged = True
            summary = self.ledger.summary()
            self.log.info("ledger", **summary, empty=self.ledger.empty)
            self.hub.ledger_settled(summary)
            if self.journal is not None and self.ledger.empty:
                # nothing of it is left to recover, once the store holds what it stored
                self._after_stored(functools.partial(self.journal.drop, self.core.id))

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
        finished = None
        if not upstream.finished.is_set():
            # The hub's callback logs the ledger: only once what is left is settled.
            finished, upstream.finished_callback = upstream.finished_callback, None
            await upstream.close(dead=upstream.state != "up",
                                 timeout=max(0.2, deadline - loop.time()))
        self.settle_outbox(client_here=False)
        if finished is not None:
            finished()
        self.log_ledger()

    async def shutdown(self, deadline: float, error: bytes) -> None:
        """A graceful stop of the proxy: the client gets a moment to acknowledge what it has
        (so it is not stored and delivered twice; nothing more is written to it meanwhile),
        the server to confirm what it was sent; then the session ends and what is left is
        stored."""
        loop = asyncio.get_running_loop()
        ack_until = min(deadline, loop.time() + self.config.shutdown.ack_wait)
        # What the client acks from now on is what it was written; what comes for it after
        # the <r/> stays queued and is stored (else delivered now and again at next login).
        self.edge.hold_for_stop()
        sm = self.sm
        if self.client is not None and sm is not None and sm.written:
            self.execute(self.edge.request_ack(always=True))
            await _wait_until(lambda: self.client is None or self.sm is None
                              or not self.sm.written, ack_until)
        if self.upstream.state == "up" and self.upstream.outbox.size:
            self.upstream.flush_now()
            await _wait_until(lambda: self.upstream.state != "up"
                              or not self.upstream.outbox.size, deadline)
        await self.end("proxy stopping", client_error=error, stopping=True, deadline=deadline)


# How a client connection ended, for ``serve_client``'s ``on_end``: why it left; the error
# that ended it (a bug: logged, the connection closed); None: the proxy stopped its pump.
ClientOutcome = str | BaseException | None


class ClientPump:
    """Relays one client connection into its session, with no task of its own: the stream
    calls it back when bytes arrive, and it takes every event that is there. A task runs
    only while it waits (room in the server's buffer, the client reading what it was sent)
    and when the connection ends (the session settles what the client left behind)."""

    __slots__ = ("on_end", "session", "stream", "waiting")

    def __init__(self, session: LiveSession, stream: XmlStream,
                 on_end: Callable[[ClientOutcome], None]) -> None:
        self.session = session
        self.stream = stream
        self.on_end: Callable[[ClientOutcome], None] | None = on_end
        self.waiting: asyncio.Task[None] | None = None

    def run(self, drained: bool = False) -> None:
        """Relay what is here now, then wait to be called back. ``drained``: the server's
        buffer was just drained; read on even if it is still full."""
        session = self.session
        stream = self.stream
        upstream = session.upstream
        room = upstream.room
        try:
            while True:
                # Backpressure while the server is away and the buffer is full: stop reading
                # (stanzas already received were counted and are acked as usual).
                if not room.is_set():
                    self._wait(room.wait())
                    return
                event = stream.ready_event()  # the rest of a read: one call per stanza
                if event is None:
                    # The server's buffer only grows when a loop turn flushes it: once before
                    # each read is as often as it can change.
                    if not drained and upstream.congested:
                        self._wait(upstream.drain(), drained=True)
                        return
                    drained = False
                    polled = stream.poll_event()  # the look at our output, then a read
                    if polled is None:
                        stream.when_readable(self.run)
                        return
                    if isinstance(polled, OutputFull):
                        self._wait(stream.output_room())
                        return
                    event = polled
                session.client_event(event)
        except ConnectionLost as exc:
            self._ended(ClientLeft(session.edge.connection_lost(str(exc))))
        except ClientLeft as left:
            self._ended(left)
        except Exception as exc:  # a bug: this connection ends, the others go on
            self._ended(exc)

    def _wait(self, waiting: Awaitable[None], drained: bool = False) -> None:
        self.waiting = asyncio.ensure_future(self._run_after(waiting, drained))

    async def _run_after(self, waiting: Awaitable[None], drained: bool) -> None:
        try:
            await waiting
        except Exception as exc:
            self._ended(exc)
            return
        self.waiting = None
        self.run(drained)

    def _ended(self, outcome: ClientLeft | Exception) -> None:
        self.stream.stop_listening()
        self.waiting = asyncio.ensure_future(self._finish(outcome))

    async def _finish(self, outcome: ClientLeft | Exception) -> None:
        result: ClientOutcome = outcome if isinstance(outcome, Exception) else None
        if isinstance(outcome, ClientLeft):
            try:
                await self.session._client_gone(self.stream, outcome)
                result = outcome.reason
            except Exception as exc:
                result = exc
        self._over(result)

    def _over(self, outcome: ClientOutcome) -> None:
        self.waiting = None
        session = self.session
        if session.client is self.stream:
            session.client = None
        on_end, self.on_end = self.on_end, None
        if on_end is not None:
            on_end(outcome)

    def cancel(self) -> None:
        """The proxy is stopping: the connection is dropped (what the session must settle,
        its shutdown did), and ``on_end`` hears None."""
        waiting = self.waiting
        if waiting is not None:
            waiting.cancel()
        self.stream.stop_listening()
        self.stream.abort()
        self._over(None)


_FEATURE_TIMER = "feature:"  # the features' timers, apart from the client edge's


def _send_all(stream: XmlStream, elements: Iterable[Element]) -> None:
    for el in elements:
        stream.send(el)


async def _wait_until(condition: Callable[[], bool], until: float, step: float = 0.02) -> None:
    """Poll ``condition`` until it holds or the loop time ``until`` passes (shutdown only)."""
    loop = asyncio.get_running_loop()
    while not condition() and loop.time() < until:
        await asyncio.sleep(min(step, max(0.0, until - loop.time())))


def _archived_element(commands: list[Command]) -> Element | None:
    """The message an ArchivePut among a feature's commands wants stored as it is written."""
    for c in commands:
        if isinstance(c, ArchivePut):
            return c.element
    return None
