"""The running proxy: listeners, one task per client connection, orderly shutdown."""

from __future__ import annotations

import asyncio
from collections import Counter
import contextlib
from asyncio import sslproto
import functools
import secrets
import signal
import ssl
import time
from typing import Any

from .abuse import ConnectionLimiter, LoginThrottle, Refusal
from .archive_store import ArchiveWriter, Prefs, Retention
from .config import Config, Listener
from .features.archive import ArchiveFactory
from .features.csi import ClientStateFactory
from .features.dedupe import DedupeFactory
from .features.presence_settle import PresenceSettlingFactory
from .features.legacy_session import LegacySessionFactory
from .features.presence_memory import PresenceMemoryFactory
from .features.roster import RosterFactory
from .features.rules import RulesFactory
from .inspection import Inspector
from .metrics import MetricsServer, parse_listen, prometheus
from .preflight import check_tls
from .journal import Journal, recover
from .logsetup import get_logger
from .loopcheck import OwnStreamIds
from .net.client_side import AuthenticatedClient, ClientNegotiation, NegotiationFailed
from .net.hub import Hub
from .net.live import LiveSession
from .net.upstream import client_tls_context
from .net.xmlstream import ConnectionLost, XmlStream
from .features.disco import DiscoveryFactory
from .session import FeatureFactory
from .store import Store
from .xmpp import codec


def server_tls_context(config: Config) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.path(config.tls.cert), config.path(config.tls.key))
    return context


def size_tls_buffers(read_buffer: int) -> None:
    """asyncio gives every TLS connection a read buffer of ``SSLProtocol.max_size`` bytes
    (256 KiB in 3.11) and offers no setting for it: a class attribute it is. A TLS record
    carries at most 16 KiB, so a little more than that costs no throughput and saves
    ~240 KiB on each of a session's two TLS legs."""
    sslproto.SSLProtocol.max_size = read_buffer


class Proxy:
    def __init__(self, config: Config) -> None:
        self.config = config
        size_tls_buffers(config.limits.tls_read_buffer)
        self.log = get_logger()
        self.server_tls = server_tls_context(config)
        self.upstream_tls = (client_tls_context(
            config.upstream, str(config.path(config.upstream.ca)) if config.upstream.ca else None)
            if config.upstream.tls != "none" else None)
        self.servers: list[asyncio.Server] = []
        self.connections: set[asyncio.Task[None]] = set()
        self.clients: set[XmlStream] = set()
        self.stopping = False
        self.connection_limiter = ConnectionLimiter(config.abuse)
        self.login_throttle = LoginThrottle(config.abuse)
        self.own_stream_ids = OwnStreamIds()
        self.store = Store(str(config.path(config.store.path)))
        self.roster = RosterFactory(self.store, max_changes=config.roster.max_changes)
        # Client edge first, server edge last: rules see what the client sent and what it
        # will get; the roster cache sees the server's stanzas before anything else and the
        # client's after every rewrite.
        self.rules = RulesFactory([config.path(p) for p in config.rules], self.log)
        # After the rules: a sent message is archived as it goes upstream, a received one
        # as the server delivered it (and after dedupe, which drops replayed copies).
        self.archive = self._archive_writer(config)
        archive = ArchiveFactory(
            config.features.archive, config.archive, config.upstream.domain,
            load_prefs=self.store.archive.prefs, save_prefs=self._save_archive_prefs,
            in_roster=lambda account, jid: self.store.roster.item(account, jid) is not None)
        factories: list[FeatureFactory] = [self.rules, DiscoveryFactory(config.upstream.domain),
                                           archive, LegacySessionFactory(),
                                           PresenceMemoryFactory(), DedupeFactory(),
                                           self.roster]
        rc = config.reconnect
        settle = (rc.settle_presence if rc.settle_presence is not None
                  else rc.first_delay_max + 5.0)
        factories.insert(0, PresenceSettlingFactory(settle))
        if config.csi.enabled:  # at the client's edge: it holds what the client would get
            factories.insert(0, ClientStateFactory(config.csi.max_held))
        capture = config.log.capture_dir
        inspector = Inspector.from_config(config.log, config.path(capture) if capture else None,
                                          self.log)
        self.journal: Journal | None = None
        if config.durability.mode == "journal":
            if self.store.path == ":memory:":
                self.log.warning("journal_disabled", reason="store.path is :memory:")
            else:
                self.journal = Journal(self.store.path,
                                       synchronous=config.durability.fsync.upper(),
                                       log=self.log)
        self.hub = Hub(config, factories, store=self.store,
                       upstream_tls=self.upstream_tls, inspector=inspector, log=self.log,
                       journal=self.journal, archive=self.archive)
        self.metrics: MetricsServer | None = None
        if config.metrics.listen:
            host, port = parse_listen(config.metrics.listen)
            self.metrics = MetricsServer(host, port, gather=self.gather_metrics,
                                         healthy=self.healthy,
                                         upstream=(config.upstream.host, config.upstream.port),
                                         log=self.log)

    def _archive_writer(self, config: Config) -> ArchiveWriter | None:
        """The archive's writer thread, unless archiving is off altogether."""
        if config.features.archive == "off":
            return None
        a = config.archive
        return ArchiveWriter(self.store.path, log=self.log, retention=Retention(
            max_age=a.max_age_days * 86400.0 if a.max_age_days > 0 else None,
            max_per_account=a.max_messages_per_account or None))

    def _save_archive_prefs(self, account: str, prefs: Prefs) -> None:
        with self.store.transaction():
            self.store.archive.set_prefs(account, prefs)

    def reload(self, why: str) -> None:
        """SIGHUP: the rules, and the certificate and key clients see, read again from their
        files (a renewal); new handshakes use the new pair, live sessions keep theirs. A bad
        pair is refused and the old one stays in force."""
        self.rules.reload(why)
        problems = [f for f in check_tls(self.config) if not f.warning]
        if problems:
            self.log.error("tls_reload_refused", why=why,
                           problems=[f"{f.key}: {f.message}" for f in problems])
            return
        cert, key = self.config.path(self.config.tls.cert), self.config.path(self.config.tls.key)
        try:
            # The live context, so direct-TLS listeners (which hold it) pick it up too.
            self.server_tls.load_cert_chain(cert, key)
        except (ssl.SSLError, OSError) as exc:
            self.log.error("tls_reload_refused", why=why, problems=[str(exc)])
            return
        self.log.info("tls_reloaded", why=why, cert=str(cert),
                      note="other settings are read at start: a change to them needs a restart")

    def healthy(self) -> bool:
        return bool(self.servers) and all(s.is_serving() for s in self.servers)

    def gather_metrics(self) -> list[str]:
        """The Prometheus text of a scrape (see proxy/metrics.py)."""
        hub = self.hub
        states: Counter[str] = Counter()
        upstream: Counter[str] = Counter()
        held: Counter[str] = Counter()
        ledger = Counter(hub.settled)
        for session in hub.sessions:
            states[session.state] += 1
            upstream[session.upstream.state] += 1
            for lane, counts in session.ledger.summary().items():
                held[lane] += counts["held"]
                for name, value in counts.items():
                    if name != "held":
                        ledger[(lane, name)] += value
        states["finishing"] = len(hub.finishing_sessions)
        lines = prometheus("xmpp_front_sessions", "gauge",
                           "bound sessions by state (finishing: ended, upstream still owed)",
                           [({"state": k}, states[k]) for k in
                            ("active", "hibernating", "finishing")])
        lines += prometheus("xmpp_front_upstream_links", "gauge",
                            "live sessions' links to the legacy server by state",
                            [({"state": k}, upstream[k]) for k in ("up", "down")])
        lines += prometheus("xmpp_front_client_connections", "gauge",
                            "client connections open (negotiating or bound)",
                            [({}, len(self.clients))])
        lines += prometheus("xmpp_front_ledger_stanzas_total", "counter",
                            "stanzas taken on (entered) and how they left, per lane",
                            [({"lane": lane, "exit": name}, ledger[(lane, name)])
                             for lane in ("c2s", "s2c") for name in
                             ("entered", "delivered", "stored", "bounced", "discarded")])
        lines += prometheus("xmpp_front_ledger_held", "gauge",
                            "stanzas live sessions are responsible for now, per lane",
                            [({"lane": lane}, held[lane]) for lane in ("c2s", "s2c")])
        conn = self.store.conn
        lines += prometheus("xmpp_front_stored_messages", "gauge",
                            "messages in the store waiting for their account's next login",
                            [({}, conn.execute("SELECT count(*) FROM offline_messages")
                              .fetchone()[0])])
        lines += prometheus("xmpp_front_pending_outbound", "gauge",
                            "client stanzas in the store waiting to be sent to the server",
                            [({}, self.store.pending.count())])
        if self.archive is not None:
            lines += prometheus("xmpp_front_archived_messages_total", "counter",
                                "messages written to the archive (XEP-0313) by this run",
                                [({}, self.archive.written)])
        if self.journal is not None:
            lines += prometheus("xmpp_front_journal_commits_total", "counter",
                                "journal transactions committed", [({}, self.journal.commits)])
        return lines

    def recover(self) -> dict[str, int]:
        """Settle the ledgers an earlier run left in the journal (a crash, or anything a
        graceful stop could not settle itself)."""
        return recover(self.store, now=time.time(),
                       stored_ttl=self.config.stream_management.stored_ttl,
                       domain=self.config.upstream.domain, log=self.log)

    async def start(self) -> None:
        self.recover()  # before any client can log in and want what it holds
        if self.metrics is not None:
            await self.metrics.start()
        for listener in self.config.listen:
            tls: dict[str, Any] = ({"ssl": self.server_tls, "ssl_handshake_timeout":
                                    self.config.limits.negotiation_timeout}
                                   if listener.direct_tls else {})
            server = await asyncio.start_server(
                functools.partial(self._accept, listener=listener),
                listener.host, listener.port, **tls)
            self.servers.append(server)
            self.log.info("listening", host=listener.host,
                          port=server.sockets[0].getsockname()[1],
                          mode="direct_tls" if listener.direct_tls else "starttls")
        self.log.info("upstream", host=self.config.upstream.host, port=self.config.upstream.port,
                      domain=self.config.upstream.domain, tls=self.config.upstream.tls)

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                listener: Listener) -> None:
        task = asyncio.create_task(self._serve(reader, writer, listener))
        self.connections.add(task)
        task.add_done_callback(self.connections.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     listener: Listener) -> None:
        limits = self.config.limits
        stream = XmlStream(reader, writer, max_stanza_bytes=limits.max_stanza_bytes,
                           max_depth=limits.max_depth, track_trailing=not listener.direct_tls,
                           output_soft=limits.output_soft_bytes,
                           output_hard=limits.output_hard_bytes,
                           error_header=codec.stream_header(from_=self.config.upstream.domain))
        conn_id = secrets.token_hex(4)
        log = self.log.bind(conn=conn_id, peer=stream.peer)
        stream.log = log
        peername = writer.get_extra_info("peername")
        address = str(peername[0]) if peername else "?"
        refusal = self.connection_limiter.admit(address)
        if refusal is not None:
            await self._refuse_connection(stream, refusal, log)
            return
        try:
            await self._serve_admitted(stream, listener, conn_id, log)
        finally:
            self.connection_limiter.release(address)

    async def _refuse_connection(self, stream: XmlStream, refusal: Refusal, log: Any) -> None:
        """Over a connection limit: our header first, so the stream error is well-formed
        XML (RFC 6120 §4.9.1.1), then the error and the close."""
        log.warning("connection_refused", condition=refusal.condition, limit=refusal.limit,
                    connections=self.connection_limiter.total)
        stream.send_header(codec.stream_header(from_=self.config.upstream.domain,
                                               stream_id=secrets.token_urlsafe(12)))
        with contextlib.suppress(ConnectionLost, OSError, ssl.SSLError):
            await asyncio.wait_for(stream.close(codec.stream_error(
                refusal.condition, refusal.text)), 5)
        stream.abort()

    async def _serve_admitted(self, stream: XmlStream, listener: Listener, conn_id: str,
                              log: Any) -> None:
        log.info("accepted", listener_port=listener.port, direct_tls=listener.direct_tls,
                 **stream.tls_info)
        self.clients.add(stream)
        auth: AuthenticatedClient | None = None
        session: LiveSession | None = None
        try:
            try:
                negotiation = ClientNegotiation(stream, listener, self.config, self.server_tls,
                                                self.upstream_tls, log,
                                                throttle=self.login_throttle,
                                                own_stream_ids=self.own_stream_ids,
                                                vouch=self.hub.vouch)
                async with asyncio.timeout(self.config.limits.negotiation_timeout):
                    auth = await negotiation.run()
                    session, first, resumed = await self.hub.establish(negotiation, auth, log)
            except NegotiationFailed as exc:
                log.info("closed", reason=exc.reason, phase="negotiation")
                await stream.close(exc.error)
                return
            except (ConnectionLost, TimeoutError, ssl.SSLError, OSError) as exc:
                timed_out = isinstance(exc, TimeoutError)
                log.info("closed", phase="negotiation", reason="negotiation timeout"
                         if timed_out else f"connection lost: {exc!r}")
                await stream.close(codec.stream_error("connection-timeout") if timed_out
                                   else None)
                return
            finally:
                # The upstream login that checked the password is kept only by a new
                # session; a resumed or taken-over session has its own.
                if auth is not None and auth.upstream is not None and (
                        session is None or session.upstream.link is not auth.upstream):
                    await auth.upstream.stream.close()
            log = log.bind(jid=session.jid)
            reason = await session.serve_client(stream, first, resumed=resumed,
                                                conn_id=conn_id)
            log.info("closed", reason=reason, phase="session")
        except asyncio.CancelledError:
            stream.abort()
            raise
        except Exception:
            # One broken connection never takes down the process or another session.
            log.exception("connection_failed")
            await stream.close(codec.stream_error("internal-server-error"))
        finally:
            self.clients.discard(stream)

    async def stop(self) -> None:
        """Graceful stop: no new connections; every client gets ``<system-shutdown/>``."""
        if self.stopping:
            return
        self.stopping = True
        self.log.info("stopping", connections=len(self.connections))
        for server in self.servers:
            server.close()
        totals = await self.hub.stop()
        self.log.info("sessions_settled", **totals)
        shutdown = codec.stream_error("system-shutdown", "xmpp-front is stopping")
        for stream in list(self.clients):
            stream.send_bytes(stream.framed(shutdown) + codec.STREAM_CLOSE)
            stream.closing = True
        await asyncio.sleep(0.2)  # let those writes go out before tearing down
        for task in list(self.connections):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self.connections, return_exceptions=True)
        for server in self.servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2)
        if self.journal is not None:
            await self.journal.close()
        if self.archive is not None:
            await self.archive.close()
        self.recover()
        if self.metrics is not None:
            await self.metrics.stop()
        self.store.close()
        self.log.info("stopped")


RULES_POLL_SECONDS = 2.0  # how often rule files are checked for changes


async def _watch_rules(rules: RulesFactory) -> None:
    while True:
        await asyncio.sleep(RULES_POLL_SECONDS)
        if rules.changed_on_disk():
            rules.reload("a rule file changed")


async def serve(config: Config, ready: Any = None) -> None:
    """Run until SIGTERM or SIGINT; SIGHUP reloads the rules and the TLS certificate."""
    proxy = Proxy(config)
    await proxy.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    with contextlib.suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGHUP, proxy.reload, "SIGHUP")
    watcher = asyncio.create_task(_watch_rules(proxy.rules)) if config.rules else None
    if ready is not None:
        ready(proxy)
    await stop.wait()
    if watcher is not None:
        watcher.cancel()
    await proxy.stop()
