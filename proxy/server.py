"""The running proxy: listeners, a task per connection while it negotiates, orderly shutdown."""

from __future__ import annotations

import asyncio
from collections import Counter
import contextlib
import dataclasses
import functools
import gc
import ipaddress
import os
import secrets
import signal
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any

from .abuse import ConnectionLimiter, LoginThrottle, Refusal
from .admin import AdminServer, snapshot
from .admin_protocol import shown_state, socket_path
from .config import Config, ConfigError, Listener, load_config
from .features.blocking import BlockingFactory
from .features.carbons import CarbonsFactory
from .archive_store import ArchiveWriter, Prefs, Retention, archive_path
from .features.archive import ArchiveFactory, new_archive_id
from .features.csi import ClientStateFactory
from .features.dedupe import DedupeFactory
from .features.presence_settle import PresenceSettlingFactory
from .features.legacy_session import LegacySessionFactory
from .features.presence_memory import PresenceMemoryFactory
from .features.roster import RosterFactory
from .features.rules import RulesFactory
from .inspection import Inspector
from .metrics import Counters, MetricsServer, parse_listen, prometheus
from .preflight import Finding, errors, preflight
from .reload import ReloadPlan, plan_reload
from .rules import RuleError, RuleSet
from .journal import Journal, create_journal_file, parse_stored, recover
from .logsetup import LevelFilter, get_logger
from .loopcheck import OwnStreamIds
from .net.client_side import (
    AuthenticatedClient,
    ClientNegotiation,
    HandOverNeeded,
    NegotiationFailed,
)
from .net.worker_link import HandoffServer, RelayedStream, open_link, relay
from .net.hub import Hub
from .net.live import ClientOutcome, ClientPump, LiveSession
from .net.certificates import ServerCertificates, upstream_contexts
from .net import tls_transport, xmlstream
from .net.preamble import read_proxy_header, read_proxy_header_from, tls_failure_reason
from .net.xmlstream import ConnectionLost, XmlStream
from .features.disco import DiscoveryFactory
from .features.push import PushFactory, PushPolicy
from .proxyproto import BadProxyHeader
from .retention import PRUNE_EVERY, prune_transcripts
from .session import FeatureFactory
from .store import Store
from .workers import Handoff, WorkerRole
from .xmpp import codec, ns
from .xmpp import stanza as st


def _address_text(address: tuple[str, int] | None) -> str:
    if address is None:
        return "?"
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _trusted(address: tuple[str, int] | None, networks: list[str]) -> bool:
    if address is None:
        return False
    try:
        ip = ipaddress.ip_address(address[0])
    except ValueError:
        return False
    return any(ip in ipaddress.ip_network(n, strict=False) for n in networks)


def _drop(writer: asyncio.StreamWriter, sock: socket.socket | None) -> None:
    """A connection refused before its stream: its transport, or its socket taken from it."""
    writer.transport.abort()
    if sock is not None:
        sock.close()


def size_tls_buffers(read_buffer: int) -> None:
    """The largest TLS read (one buffer shared by every connection of the event loop's
    thread, ``tls_transport``). A TLS record carries at most 16 KiB, so a little more than
    that costs no throughput."""
    tls_transport.size_reads(read_buffer)


def upstream_addresses(config: Config) -> dict[str, tuple[str, int]]:
    """Each served domain's server, for /readyz."""
    return {served.name: (served.config.upstream.host, served.config.upstream.port)
            for served in config.served.values()}


class ReloadRefused(Exception):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class PreparedReload:
    """A reload that passed every check, ready to be taken on."""

    plan: ReloadPlan
    ruleset: RuleSet
    rule_paths: list[Path]
    upstream_tls: dict[str, ssl.SSLContext | None]
    domain_certificates: dict[str, ssl.SSLContext]  # each domain's own pair, loaded
    inspector: Inspector | None
    warnings: list[Finding]


def as_worker(config: Config, role: WorkerRole | None) -> Config:
    """A worker's view of the configuration: its admin socket is its own (the supervisor
    answers on the configured one and serves /metrics), no metrics listener of its own."""
    if role is None:
        return config
    return dataclasses.replace(
        config, metrics=dataclasses.replace(config.metrics, listen=None),
        admin=dataclasses.replace(config.admin, socket=str(role.paths.admin(role.index))))


class Proxy:
    def __init__(self, config: Config, *, source: Path | None = None,
                 log_level: LevelFilter | None = None, worker: WorkerRole | None = None
                 ) -> None:
        """``source``: the configuration file, read again on SIGHUP (without one a reload
        reads the rule, certificate and key files again). ``log_level``: the filter the
        log was set up with, so a reload can change the level. ``worker``: this process is
        one of ``workers: N`` (``proxy/supervisor.py``); None: the one process."""
        self.worker = worker
        config = as_worker(config, worker)
        self.config = config
        self.source = source
        self.log_level = log_level
        self.reloads: set[asyncio.Task[bool]] = set()
        self.reload_lock = asyncio.Lock()
        size_tls_buffers(config.limits.tls_read_buffer)
        self.log = get_logger()
        # The default certificate's context; SNI moves a handshake to a domain's own.
        self.certificates = ServerCertificates(config)
        self.server_tls = self.certificates.context
        self.upstream_tls = upstream_contexts(config)
        self.servers: list[asyncio.Server] = []
        self.connections: set[asyncio.Task[None]] = set()
        self.background: set[asyncio.Task[None]] = set()  # the proxy's own periodic work
        # Every client connection: None while it negotiates (its task), then the pump that
        # relays it into its session.
        self.clients: dict[XmlStream, ClientPump | None] = {}
        self.relays: set[asyncio.Task[None]] = set()  # connections relayed to their home
        self.stopping = False
        self.connection_limiter = ConnectionLimiter(config.abuse)
        self.login_throttle = LoginThrottle(config.abuse)
        self.own_stream_ids = OwnStreamIds()
        if worker is None:
            self.store = Store(str(config.path(config.store.path)), log=self.log)
        else:  # the supervisor owns the file's clean-stop mark
            self.store = Store(str(config.path(config.store.path)), log=self.log,
                               clean_start=worker.clean_start, mark_clean=False)
        if self.store.unclean:  # what the store's writer had not committed is gone: say so
            self.log.warning("store_unclean_start", lost="the last moments of roster, "
                             "blocklist and push registration changes, if any")
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
            in_roster=lambda account, jid: self.store.roster.item(account, jid) is not None,
            new_id=self.archive.new_id if self.archive is not None else new_archive_id)
        # Carbons sit on both sides of the rest: the tap (received copies) before rules,
        # so on the way in it copies what the client is given; the main part last, so on
        # the way out it copies what was sent after rules and blocking. Blocking is next to
        # the server edge: nothing from a blocked JID reaches the roster cache, dedupe,
        # push or the carbons tap, and nothing to one is copied.
        self.carbons = CarbonsFactory(config.features.carbons, config.carbons.bare_wait)
        self.blocking = BlockingFactory(self.store, config.features.blocking,
                                        config.blocking.max_items)
        pc = config.push
        push = PushFactory(config.features.push, PushPolicy(
            min_interval=pc.min_interval, include_body=pc.include_body, max_body=pc.max_body,
            max_registrations=pc.max_registrations, max_errors=pc.max_errors), self.store.push)
        factories: list[FeatureFactory] = [self.carbons.tap, self.rules,
                                           DiscoveryFactory(),
                                           push, archive, LegacySessionFactory(),
                                           PresenceMemoryFactory(), DedupeFactory(),
                                           self.roster, self.blocking, self.carbons]
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
                self.journal = Journal(self._journal_path(),
                                       synchronous=config.durability.fsync.upper(),
                                       log=self.log)
        self.counters = Counters()
        self.hub = Hub(config, factories, store=self.store, inspector=inspector, log=self.log,
                       journal=self.journal, counters=self.counters, archive=self.archive)
        self.metrics: MetricsServer | None = None
        if config.metrics.listen:
            host, port = parse_listen(config.metrics.listen)
            self.metrics = MetricsServer(host, port, gather=self.gather_metrics,
                                         healthy=self.healthy,
                                         upstreams=upstream_addresses(config),
                                         log=self.log)
        admin_path = socket_path(config)
        self.admin = (AdminServer(admin_path, self.hub, self.log,
                                  gather=self.gather_metrics if worker is not None else None)
                      if admin_path else None)
        self.handoffs = (HandoffServer(worker.paths.handoff(worker.index),
                                       self.serve_handed_off, self.log)
                         if worker is not None else None)

    def _journal_path(self) -> str:
        """The store's own tables, or a worker's file of its own (``workers: N``)."""
        if self.worker is None:
            return self.store.path
        path = str(self.worker.paths.journal(self.worker.index))
        create_journal_file(path)
        return path

    def _archive_writer(self, config: Config) -> ArchiveWriter | None:
        """The archive's writer thread, unless archiving is off altogether."""
        if config.features.archive == "off":
            return None
        a = config.archive
        return ArchiveWriter(archive_file(config), log=self.log, retention=Retention(
            max_age=a.max_age_days * 86400.0 if a.max_age_days > 0 else None,
            max_per_account=a.max_messages_per_account or None))

    def _save_archive_prefs(self, account: str, prefs: Prefs) -> None:
        with self.store.transaction():
            self.store.archive.set_prefs(account, prefs)

    def reload(self, why: str) -> None:
        """SIGHUP: read the whole configuration file again and take it on (see
        ``reload_config``); the work runs in a task, reloads one after another."""
        task = asyncio.ensure_future(self.reload_config(why))
        self.reloads.add(task)
        task.add_done_callback(self.reloads.discard)

    async def reload_config(self, why: str) -> bool:
        """The configuration file read, checked (as ``check`` does) and prepared off the
        event loop, then taken on at once: certificate and key for new handshakes, limits,
        log level, rules, abuse limits, stream management and upstream settings for new
        connections and sessions (live ones keep theirs). A file that does not load or
        check is refused whole and the old configuration stays. What needs a restart keeps
        its old value and is named in the ``config_reloaded`` event."""
        async with self.reload_lock:
            try:
                prepared = await asyncio.to_thread(self._prepare_reload)
                self._take_on(prepared)
            except ReloadRefused as exc:
                self.log.error("config_reload_refused", why=why, config=self._source_name,
                               problems=exc.problems, note="the configuration in force stays")
                return False
            plan = prepared.plan
            self.log.info("config_reloaded", why=why, config=self._source_name,
                          changed=plan.changed, applied=plan.applied,
                          needs_restart=plan.needs_restart,
                          cert=str(plan.config.path(plan.config.tls.cert)),
                          domain_certs={s.name: str(plan.config.path(s.tls.cert))
                                        for s in plan.config.served.values()
                                        if s.index is not None and s.own_tls},
                          rules=len(prepared.ruleset))
            for warning in prepared.warnings:
                self.log.warning(warning.event, key=warning.key, problem=warning.message,
                                 config=self._source_name)
            if self.log_level is not None:  # last: the event above is logged at the old one
                self.log_level.set(plan.config.log.level)
            return True

    @property
    def _source_name(self) -> str | None:
        return str(self.source) if self.source is not None else None

    def _prepare_reload(self) -> PreparedReload:
        """Everything that can fail, done before anything changes (in a thread: it reads
        files, resolves names and probes the upstream)."""
        try:
            fresh = (as_worker(load_config(self.source), self.worker)
                     if self.source is not None else self.config)
        except ConfigError as exc:
            raise ReloadRefused([str(exc)]) from exc
        findings = preflight(fresh, bind_ports=False)
        problems = errors(findings)
        if problems:
            raise ReloadRefused([str(f) for f in problems])
        plan = plan_reload(self.config, fresh)
        config = plan.config
        try:
            # Every pair loads together, into scratch contexts.
            domain_certificates = self.certificates.prepare(config)
            upstream_tls = upstream_contexts(config, self.config, self.upstream_tls)
        except (ssl.SSLError, OSError) as exc:
            raise ReloadRefused([f"tls: {exc}"]) from exc
        paths = [config.path(p) for p in config.rules]
        try:
            ruleset = RuleSet.load(paths) if paths else RuleSet.empty()
        except RuleError as exc:
            raise ReloadRefused([f"rules: {exc}"]) from exc
        capture = config.log.capture_dir
        inspector = (self.hub.inspector if not any(k.startswith("log.") for k in plan.applied)
                     else Inspector.from_config(config.log,
                                                config.path(capture) if capture else None,
                                                self.log))
        return PreparedReload(plan, ruleset, paths, upstream_tls, domain_certificates,
                              inspector, [f for f in findings if f.warning])

    def _take_on(self, prepared: PreparedReload) -> None:
        """Only the certificate can fail here, if its files changed again since they were
        checked a moment ago: then nothing is taken on and the old pair is loaded back."""
        config = prepared.plan.config
        try:
            # The live context, which every TLS handshake uses, and the domains' own.
            self.certificates.take_on(config, self.config, prepared.domain_certificates)
        except (ssl.SSLError, OSError) as exc:
            raise ReloadRefused([f"tls: {exc}"]) from exc
        self.rules.adopt(prepared.rule_paths, prepared.ruleset)
        self.config = config
        self.upstream_tls = prepared.upstream_tls
        self.hub.reconfigure(config, prepared.inspector)
        self.connection_limiter.config = config.abuse
        self.login_throttle.reconfigure(config.abuse)
        size_tls_buffers(config.limits.tls_read_buffer)
        if self.metrics is not None:  # /readyz probes the servers new sessions use
            self.metrics.upstreams = upstream_addresses(config)

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
            states[shown_state(snapshot(session))] += 1  # as the admin view shows it
            upstream[session.upstream.state] += 1
            for lane, counts in session.ledger.summary().items():
                held[lane] += counts["held"]
                for name, value in counts.items():
                    if name != "held":
                        ledger[(lane, name)] += value
        states["finishing"] += len(hub.finishing_sessions)
        lines = prometheus("xmpp_front_sessions", "gauge",
                           "bound sessions by state (inactive: XEP-0352; reconnecting: the "
                           "server is away; finishing: ended, upstream still owed)",
                           [({"state": k}, states[k]) for k in
                            ("active", "inactive", "hibernating", "reconnecting",
                             "finishing")])
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
        lines += self.counters.lines()
        if self.journal is not None:
            lines += prometheus("xmpp_front_journal_commits_total", "counter",
                                "journal transactions committed", [({}, self.journal.commits)])
        return lines

    async def _store_committed(self, timeout: float) -> None:
        """Until the store's writer committed everything handed to it, and the loop ran
        what waited for that; at most ``timeout`` (a failing disk: logged)."""
        committed = asyncio.Event()
        writer = self.store.writer

        def failed(error: str) -> None:
            asyncio.get_running_loop().call_soon(writer.when_committed, committed.set, failed)
        writer.when_committed(committed.set, failed)
        try:
            await asyncio.wait_for(committed.wait(), timeout)
        except TimeoutError:
            self.log.error("store_not_committed_at_stop", seconds=timeout,
                           submitted=writer.submitted, committed=writer.committed)
        await asyncio.sleep(0)  # the waiters settled with it (journal cuts) run first

    def recover(self) -> dict[str, int]:
        """Settle the ledgers an earlier run left in the journal (a crash, or anything a
        graceful stop could not settle itself)."""
        journal = None
        if self.worker is not None and self.store.path != ":memory:":
            journal = self._journal_path()
        return recover(self.store, now=time.time(),
                       stored_ttl=self.config.stream_management.stored_ttl,
                       domain=self.config.upstream.domain, log=self.log,
                       journal_path=journal)

    async def start(self) -> None:
        self.recover()  # before any client can log in and want what it holds
        if self.metrics is not None:
            await self.metrics.start()
        if self.admin is not None:
            await self.admin.start()
        if self.worker is not None:
            await self._start_worker()
            return
        for listener in self.config.listen:
            # Direct TLS is started per connection (_serve), not by asyncio's listener: a
            # PROXY header may come first, and a failed handshake is logged.
            server = await xmlstream.start_server(
                functools.partial(self._accept, listener=listener),
                listener.host, listener.port)
            self.servers.append(server)
            self.log.info("listening", host=listener.host,
                          port=server.sockets[0].getsockname()[1],
                          mode="direct_tls" if listener.direct_tls else "starttls",
                          proxy_protocol=listener.proxy_protocol)
        for served in self.config.served.values():
            upstream = served.config.upstream
            self.log.info("upstream", host=upstream.host, port=upstream.port,
                          domain=upstream.domain, tls=upstream.tls,
                          certificate=str(self.config.path(served.tls.cert)))
        # Always: a reload may name a capture folder later.
        self.background.add(asyncio.create_task(self._prune_transcripts()))

    async def _start_worker(self) -> None:
        """One of ``workers: N``: the handoff socket first (the others may hand this one
        connections as soon as they accept), then the supervisor's listening sockets."""
        role = self.worker
        assert role is not None and self.handoffs is not None
        await self.handoffs.start()
        for listener, fd in zip(self.config.listen, role.listen_fds, strict=True):
            sock = socket.socket(fileno=fd)
            server = await xmlstream.start_server(
                functools.partial(self._accept, listener=listener), sock=sock)
            self.servers.append(server)
        self.log.info("worker_accepting", worker=role.index, workers=role.count,
                      listeners=len(self.servers))
        self.background.add(asyncio.create_task(self._prune_transcripts()))

    def tell_supervisor_ready(self) -> None:
        """A worker tells its supervisor it accepts connections and handles signals (the
        supervisor forwards SIGHUP and SIGTERM from then on: before the handlers, a SIGHUP
        would end the worker)."""
        role = self.worker
        if role is not None and role.ready_fd is not None:
            os.write(role.ready_fd, b"r")
            os.close(role.ready_fd)

    async def _prune_transcripts(self) -> None:
        """Transcript retention, now and every PRUNE_EVERY seconds (off the event loop:
        the folder may hold many files)."""
        while True:
            log = self.config.log  # each pass: a reload may change the retention
            if log.capture_dir is None:  # a reload took capture off
                await asyncio.sleep(PRUNE_EVERY)
                continue
            folder = self.config.path(log.capture_dir)
            try:
                pruned = await asyncio.to_thread(
                    prune_transcripts, folder, max_age_days=log.capture_max_age_days,
                    max_total_bytes=log.capture_max_total_bytes, now=time.time())
            except OSError as exc:
                self.log.warning("transcripts_prune_failed", folder=str(folder),
                                 error=str(exc))
            else:
                if pruned.files:
                    self.log.info("transcripts_pruned", folder=str(folder),
                                  files=pruned.files, bytes=pruned.bytes, kept=pruned.kept)
            await asyncio.sleep(PRUNE_EVERY)

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                listener: Listener) -> None:
        if listener.direct_tls:
            # Called from connection_made, before the transport's first read: OpenSSL must
            # read the ClientHello from the socket itself, so nothing may be read before.
            writer.transport.pause_reading()  # type: ignore[attr-defined]
        task = asyncio.create_task(self._serve(reader, writer, listener))
        self.connections.add(task)
        task.add_done_callback(self.connections.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     listener: Listener) -> None:
        limits = self.config.limits
        conn_id = secrets.token_hex(4)
        peername = writer.get_extra_info("peername")
        remote = (str(peername[0]), int(peername[1])) if peername else None
        log = self.log.bind(conn=conn_id, peer=_address_text(remote))
        sock = None
        if listener.direct_tls:  # the connection leaves asyncio's plain transport unread
            try:
                sock = tls_transport.take_socket(writer.transport)
            except OSError as exc:
                self._tls_failed("direct_tls", exc, log)
                writer.transport.abort()
                return
        if listener.proxy_protocol:
            ok, client = await self._proxy_header(reader, writer, listener, remote, log, sock)
            if not ok:
                return
            if client is not None:  # the balancer's own address stays in the log
                log = self.log.bind(conn=conn_id, peer=_address_text(client),
                                    via=_address_text(remote))
                remote = client
        if sock is not None:
            try:
                await tls_transport.start_tls(reader, writer, self.server_tls,
                                              server_side=True, sock=sock,
                                              timeout=limits.negotiation_timeout)
            except (ssl.SSLError, OSError, TimeoutError, ConnectionError) as exc:
                self._tls_failed("direct_tls", exc, log)
                return
            self.counters.count(self.counters.tls_handshakes, ("direct_tls", "ok"))
        stream = XmlStream(reader, writer, max_stanza_bytes=limits.max_stanza_bytes,
                           max_depth=limits.max_depth, track_trailing=not listener.direct_tls,
                           output_soft=limits.output_soft_bytes,
                           output_hard=limits.output_hard_bytes,
                           error_header=codec.stream_header(from_=self.config.upstream.domain))
        stream.remote = remote
        stream.sent_bytes = self.counters.s2c_bytes
        stream.log = log
        address = stream.peer_host
        refusal = self.connection_limiter.admit(address)
        if refusal is not None:
            await self._refuse_connection(stream, refusal, log)
            return
        # Released when the connection ends, which may be long after this task.
        await self._serve_admitted(stream, listener, conn_id, log, closed=functools.partial(
            self.connection_limiter.release, address))

    def _tls_failed(self, kind: str, exc: BaseException, log: Any) -> None:
        self.counters.count(self.counters.tls_handshakes, (kind, "failed"))
        log.warning("tls_handshake_failed", listener=kind, reason=tls_failure_reason(exc))

    async def _proxy_header(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                            listener: Listener, remote: tuple[str, int] | None,
                            log: Any, sock: socket.socket | None = None
                            ) -> tuple[bool, tuple[str, int] | None]:
        """The PROXY header a listener behind a balancer requires: (True, the client's
        address it gives; None when it gives none and the connection's own stands), or
        (False, None) when the connection was closed (not from a trusted balancer, no
        header, a broken one, too slow). ``sock``: a direct-TLS connection, already taken
        from its transport: the header is read from it exactly."""
        counts = self.counters.proxy_headers
        if listener.proxy_protocol_from and not _trusted(remote, listener.proxy_protocol_from):
            self.counters.count(counts, "untrusted")
            log.warning("proxy_header_refused", reason="the peer is not in proxy_protocol_from")
            _drop(writer, sock)
            return False, None
        try:
            async with asyncio.timeout(self.config.limits.proxy_header_timeout):
                header = await (read_proxy_header(reader) if sock is None
                                else read_proxy_header_from(sock))
        except BadProxyHeader as exc:
            self.counters.count(counts, "malformed")
            log.warning("proxy_header_refused", reason=str(exc))
        except TimeoutError:
            self.counters.count(counts, "timeout")
            log.warning("proxy_header_refused", reason="no PROXY header within "
                        f"{self.config.limits.proxy_header_timeout:g} s")
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            self.counters.count(counts, "malformed")
            log.info("proxy_header_refused", reason="the connection ended within the header")
        else:
            self.counters.count(counts, "ok")
            log.debug("proxy_header", version=header.version,
                      source=_address_text(header.source),
                      destination=_address_text(header.destination))
            return True, header.source
        _drop(writer, sock)  # no XMPP answer: the peer did not speak XMPP to us yet
        return False, None

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
                              log: Any, handoff: Handoff | None = None,
                              closed: Callable[[], None] | None = None) -> None:
        """Negotiate and attach the connection to its session; the task ends there, and
        the session's pump relays it from then on. ``closed`` is called once the connection
        ended, whoever ends it. ``handoff``: the connection was accepted by another worker,
        which relays it here from the client's ``<auth/>`` on."""
        if handoff is None:
            log.info("accepted", listener_port=listener.port, direct_tls=listener.direct_tls,
                     **stream.tls_info, **self._worker_fields())
        self.clients[stream] = None
        pumped = False  # the session's pump has the connection: it ends it and calls closed
        auth: AuthenticatedClient | None = None
        session: LiveSession | None = None
        role = self.worker
        try:
            try:
                negotiation = ClientNegotiation(stream, listener, self.config, self.server_tls,
                                                self.upstream_tls, log,
                                                throttle=self.login_throttle,
                                                own_stream_ids=self.own_stream_ids,
                                                vouch=self.hub.vouch, counters=self.counters,
                                                home_of=role.home_of if role else None,
                                                worker=role.index if role else 0)
                try:
                    async with asyncio.timeout(negotiation.start()):
                        if handoff is not None:
                            await negotiation.take_over(
                                parse_stored(handoff.auth.encode()), handoff.failures,
                                handoff.domain or self.config.default_domain.name)
                        auth = await negotiation.run()
                        session, first, resumed = await self.hub.establish(
                            negotiation, auth, log)
                except TimeoutError:
                    raise negotiation.timed_out() from None
            except NegotiationFailed as exc:
                log.info("closed", reason=exc.reason, phase="negotiation")
                await stream.close(exc.error)
                return
            except HandOverNeeded as exc:
                self.clients.pop(stream, None)
                await self._hand_over(stream, negotiation, exc.command.home,
                                      exc.command.auth, exc.command.failures,
                                      listener, conn_id, log)
                return
            except (ConnectionLost, ssl.SSLError, OSError) as exc:
                log.info("closed", phase="negotiation", reason=f"connection lost: {exc!r}")
                await stream.close(None)
                return
            finally:
                # The upstream login that checked the password is kept only by a new
                # session; a resumed or taken-over session has its own.
                if auth is not None and auth.upstream is not None and (
                        session is None or session.upstream.link is not auth.upstream):
                    await auth.upstream.stream.close()
            if resumed:
                self.counters.count(self.counters.resumes, "ok")
            self.clients[stream] = session.serve_client(
                stream, first, resumed=resumed, conn_id=conn_id,
                on_end=functools.partial(self._relay_over, stream, log, session, closed))
            pumped = True
        except asyncio.CancelledError:
            stream.abort()
            raise
        except Exception:
            # One broken connection never takes down the process or another session.
            log.exception("connection_failed")
            await stream.close(codec.stream_error("internal-server-error"))
        finally:
            if not pumped:
                self.clients.pop(stream, None)
                if closed is not None:
                    closed()

    def _relay_over(self, stream: XmlStream, log: Any, session: LiveSession,
                    closed: Callable[[], None] | None, outcome: ClientOutcome) -> None:
        """The session's pump is done with a client connection (``ClientOutcome``)."""
        self.clients.pop(stream, None)
        try:
            # The connection's logger, with the session's strings (not copies): no second
            # bound logger is kept for as long as the connection lasts.
            fields = {"jid": session.jid, "session": session.core.id,
                      "account": session.account}
            if isinstance(outcome, str):
                log.info("closed", reason=outcome, phase="session", **fields)
            elif outcome is not None:
                # One broken connection never takes down the process or another session.
                log.error("connection_failed", exc_info=outcome, **fields)
                if not stream.closing:
                    stream.send_bytes(stream.framed(codec.stream_error("internal-server-error"))
                                      + codec.STREAM_CLOSE)
                stream.abort()
        finally:
            if closed is not None:
                closed()

    def _worker_fields(self) -> dict[str, int]:
        return {"worker": self.worker.index} if self.worker is not None else {}

    async def _hand_over(self, stream: XmlStream, negotiation: ClientNegotiation, home: int,
                         auth: st.Element, failures: int, listener: Listener, conn_id: str,
                         log: Any) -> None:
        """The account lives in worker ``home``: it gets the connection (the handoff) and
        this worker relays the decrypted bytes both ways until either side closes."""
        role = self.worker
        assert role is not None
        handoff = Handoff(
            conn=conn_id, accepted_by=role.index, listener=self.config.listen.index(listener),
            remote=stream.remote, local=stream.endpoints()[1], tls=stream.tls_info,
            header=negotiation.header, auth=codec.serialize(auth).decode(),
            domain=negotiation.domain.name, failures=failures,
            after="".join(codec.serialize(e.element).decode() for e in stream.take_events()
                          if isinstance(e, codec.StanzaReceived)))
        done: asyncio.Future[tuple[str, bool]] = asyncio.get_running_loop().create_future()
        try:
            link = await open_link(role.paths.handoff(home), handoff.encode(), done)
        except OSError as exc:
            log.warning("handoff_failed", worker=role.index, home=home, error=str(exc))
            failure = st.element("failure", namespace=ns.SASL)
            st.sub(failure, "temporary-auth-failure")
            stream.send(failure)
            await stream.close(None)
            return
        log.info("handoff_sent", worker=role.index, home=home)
        task = asyncio.current_task()
        assert task is not None
        self.relays.add(task)  # type: ignore[arg-type]
        try:
            why = await relay(stream, link, done)
        finally:
            self.relays.discard(task)  # type: ignore[arg-type]
        log.info("relay_closed", worker=role.index, home=home, reason=why)

    async def serve_handed_off(self, handoff: Handoff, reader: asyncio.StreamReader,
                               writer: asyncio.StreamWriter) -> None:
        """A connection another worker accepted, for an account that lives here."""
        limits = self.config.limits
        role = self.worker
        assert role is not None
        try:
            listener = self.config.listen[handoff.listener]
        except IndexError:
            self.log.warning("handoff_refused", reason=f"no listener {handoff.listener}")
            writer.transport.abort()
            return
        remote = handoff.remote
        log = self.log.bind(conn=handoff.conn, peer=_address_text(remote))
        stream = RelayedStream(reader, writer, handoff,
                               max_stanza_bytes=limits.max_stanza_bytes,
                               max_depth=limits.max_depth,
                               output_soft=limits.output_soft_bytes,
                               output_hard=limits.output_hard_bytes,
                               error_header=codec.stream_header(
                                   from_=self.config.upstream.domain))
        stream.sent_bytes = self.counters.s2c_bytes
        stream.log = log
        log.info("handoff_received", worker=role.index, accepted_by=handoff.accepted_by,
                 listener_port=listener.port, direct_tls=listener.direct_tls, **stream.tls_info)
        task = asyncio.current_task()
        if task is not None:
            self.connections.add(task)  # type: ignore[arg-type]
            task.add_done_callback(self.connections.discard)  # type: ignore[arg-type]
        await self._serve_admitted(stream, listener, handoff.conn, log, handoff=handoff)

    async def stop(self) -> None:
        """Graceful stop: no new connections; every client gets ``<system-shutdown/>``."""
        if self.stopping:
            return
        self.stopping = True
        started = time.monotonic()
        self.log.info("stopping", connections=len(self.clients),
                      sessions=len(self.hub.by_jid) + len(self.hub.finishing_sessions))
        # No cyclic collection while stopping: with thousands of sessions one full pass over
        # their objects takes a second or more, and the stop frees what it ends by reference
        # counting anyway (issue 16: the collector was a large part of a slow stop).
        collecting = gc.isenabled()
        gc.disable()
        try:
            await self._stop(started)
        finally:
            if collecting:
                gc.enable()

    async def _stop(self, started: float) -> None:
        for server in self.servers:
            server.close()
        if self.handoffs is not None:
            await self.handoffs.stop()
        if self.admin is not None:
            await self.admin.stop()
        for reload in list(self.reloads):
            reload.cancel()
        for task in self.background:
            task.cancel()
        totals = await self.hub.stop()
        self.log.info("sessions_settled", **totals)
        shutdown = codec.stream_error("system-shutdown", "xmpp-front is stopping")
        for stream in list(self.clients):
            stream.send_bytes(stream.framed(shutdown) + codec.STREAM_CLOSE)
            stream.closing = True
        await asyncio.sleep(0.2)  # let those writes go out before tearing down
        if self.relays:  # the homes stop too: their last words pass through here
            await asyncio.wait(list(self.relays),
                               timeout=self.config.shutdown.drain_timeout + 2.0)
        for task in list(self.connections):
            task.cancel()
        for pump in list(self.clients.values()):
            if pump is not None:
                pump.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self.connections, return_exceptions=True)
        for _ in range(50):  # each pump ends within a turn or two: 1 s at most
            if not self.clients:
                break
            await asyncio.sleep(0.02)
        for stream in list(self.clients):  # a pump that did not end: its connection goes
            stream.abort(hard=True)
        self.clients.clear()
        for server in self.servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2)
        if self.journal is not None:
            # The sessions' journal cuts of what they stored wait for the store's commit
            # (LiveSession._after_stored): let them run before the journal closes, else its
            # recovery below would store those stanzas a second time.
            await self._store_committed(self.config.shutdown.drain_timeout)
            await self.journal.close()
        if self.archive is not None:
            await self.archive.close()
        self.recover()
        if self.metrics is not None:
            await self.metrics.stop()
        self.store.close()
        # For the operator: how long the whole stop took, and how many sessions it settled.
        self.log.info("stopped", seconds=round(time.monotonic() - started, 3),
                      sessions=totals["sessions"])


def archive_file(config: Config) -> str:
    """The archive's file for ``config``: ``archive.path``, else beside the store."""
    a = config.archive
    return archive_path(str(config.path(config.store.path)),
                        str(config.path(a.path)) if a.path else None)


RULES_POLL_SECONDS = 2.0  # how often rule files are checked for changes


async def _watch_rules(rules: RulesFactory) -> None:
    while True:
        await asyncio.sleep(RULES_POLL_SECONDS)
        if rules.changed_on_disk():
            rules.reload("a rule file changed")


# The cyclic collector's thresholds for a running proxy (Python's are 700, 10, 10). With
# Python's, a login burst promoted its temporaries into the oldest generation fast enough to
# start a full pass every 3-4 s, each over every session's objects: 15 passes while 5,000
# sessions logged in, the last ones 1-3.5 s each with the event loop stopped for every
# session (docs/performance.md, "The collector during a login burst"). A larger youngest
# generation lets the temporaries die there; the rest is what Python does.
COLLECTOR_THRESHOLDS = (20_000, 20, 10)


def tune_collector() -> None:
    """After the start: what the start made is kept out of every later pass (``freeze``),
    and the thresholds above."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*COLLECTOR_THRESHOLDS)


async def serve(config: Config, ready: Any = None, *, source: Path | None = None,
                log_level: LevelFilter | None = None, worker: WorkerRole | None = None) -> None:
    """Run until SIGTERM or SIGINT; SIGHUP reloads the configuration (``source``)."""
    proxy = Proxy(config, source=source, log_level=log_level, worker=worker)
    await proxy.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    with contextlib.suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGHUP, proxy.reload, "SIGHUP")
    if worker is not None and worker.lifeline_fd is not None:
        lifeline = worker.lifeline_fd

        def supervisor_gone() -> None:
            with contextlib.suppress(OSError):
                if os.read(lifeline, 1):
                    return
            loop.remove_reader(lifeline)
            proxy.log.error("supervisor_gone", note="stopping this worker")
            stop.set()

        loop.add_reader(lifeline, supervisor_gone)
    watcher = asyncio.create_task(_watch_rules(proxy.rules))  # a reload may add rules
    tune_collector()
    proxy.tell_supervisor_ready()  # only now: the signals' handlers are in place
    if ready is not None:
        ready(proxy)
    await stop.wait()
    watcher.cancel()
    await proxy.stop()
    # The process exits next: what the sessions left is not worth a collection pass (at
    # 5,000 sessions the interpreter's last collections took seconds after "stopped").
    gc.freeze()
