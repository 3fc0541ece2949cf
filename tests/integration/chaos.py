"""A bounded chaos soak of xmpp-front (issue 11): numbered messages between raw SM clients
while their connections are cut and resumed, the legacy server is killed and restarted, the
proxy-server link is reset, one client never reads, and a canary pings the server's domain.

Used by tests/integration/test_chaos.py (short) and bench/soak.py (long, from the command
line). Everything listens on 127.0.0.1; every wait is bounded; everything started is stopped
by PID (Prosody, the proxy) or by its own handle (the relay thread).

Randomness: one ``random.Random`` per actor, each seeded from ``f"{seed}:{actor}"``, so a
seed replays the same decisions (targets, cut and fault schedule, durations); the
interleaving with the proxy's and the server's own timing is of course not replayed.

Bookkeeping is XEP-0198-honest: a client's message counts as *acknowledged* only when an
``<a h/>`` (or ``<resumed h/>``, or ``<failed h/>``) from the proxy covers it; after a cut the
client resumes with the number of stanzas it really handled, and resends what the proxy's
``h`` does not cover, as XEP-0198 says. Bounces are recognised by the id of the error message
(each message's id is its label; Prosody's error replies carry no body).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import socket
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from lxml import etree

from tests.integration.proxyproc import ProxyProcess
from tests.peers.certs import make_cert
from tests.peers.faultrelay import FaultRelay
from tests.peers.prosody import LegacyProsody
from tests.peers.rawclient import RawClient, raw_login
from tests.peers.smpeer import SM, SmPeer

CLIENT = "jabber:client"
PING = "urn:xmpp:ping"
DELAY = "urn:xmpp:delay"
PAD_NS = "urn:xmpp-front:chaos:pad"

FAST_RECONNECT = {"first_delay_max": 0.3, "base": 0.2, "cap": 1.0, "max_outage": 60}


@dataclass
class SoakConfig:
    seconds: float = 30.0  # the chaos phase
    clients: int = 4  # talking clients (plus the non-reader and the canary)
    seed: int = 1
    settle: float = 25.0  # the most the quiet phase may take to account for everything
    rate: float = 10.0  # messages per second per client (Poisson)
    cut_every: tuple[float, float] = (1.0, 4.0)  # between client cuts
    away: tuple[float, float] = (0.1, 2.0)  # a cut client's time away
    fault_every: tuple[float, float] = (4.0, 9.0)  # between server-side faults
    down: tuple[float, float] = (0.3, 2.5)  # a killed server's time down
    to_sink: float = 0.2  # share of messages sent to the client that never reads
    sink_pad: int = 2048  # bytes of padding on those (to fill its socket sooner)
    sink_every: tuple[float, float] = (8.0, 20.0)  # the non-reader's cuts
    ack_timeout: float = 10.0  # the proxy's: a connected non-reader is dead after this
    resume_max: int = 120
    max_queue: int | None = None  # the proxy's stream_management.max_queue (None: default)
    short_lived: int = 1  # of the talkers, how many ask for a short hibernation (max=2 s),
    short_max: int = 2  # and stay away up to `short_away` at times, so their session ends
    short_away: tuple[float, float] = (2.5, 4.5)  # and their next login is a fresh one
    log_level: str = "info"
    verbose: bool = False


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class ChaosPeer(SmPeer):
    """An SmPeer that survives its connections: one object per logical client, its books
    kept across cuts, resumptions and fresh logins."""

    def __init__(self, raw: RawClient, name: str) -> None:
        super().__init__(raw)
        self.name = name
        self.xml: list[str] = []  # the stanza of each label in ``sent`` (for resending)
        self.acked_before: list[str] = []  # labels acked on earlier SM streams
        # (body, SM stream no, <delay stamp/> or None, position on that stream: our handled)
        # ... and whether it came on the first connection of a fresh login (not a resume)
        self.body_stream: list[tuple[str, int, str | None, int, bool]] = []
        self.fresh_conn = True
        self.client_acked: dict[int, int] = {}  # SM stream no -> the last h we reported
        self.ack_log: list[tuple[int, float, int]] = []  # (stream, when, h) of each we sent
        self.cut_at: dict[int, float] = {}  # SM stream no -> when we last cut it
        self.streams = 1  # SM streams so far (a fresh login starts a new one)
        self.fresh_logins = 0
        self.resumes = 0
        self.failed_resumes = 0
        self.connected = True
        self.pings: dict[str, float] = {}  # canary: id -> sent at
        self.rtts: list[tuple[float, float, str]] = []  # canary: (sent at, rtt, type)
        self.first_seen: dict[str, float] = {}  # body -> when it first arrived
        self._carried: list[tuple[str, str]] = []
        self.reading = True  # False: the non-reader, which never reads after negotiation

    # -- books ----------------------------------------------------------------------------

    @property
    def acked_all(self) -> list[str]:
        return self.acked_before + self.acked

    def _send(self, xml: str, label: str) -> None:
        self.raw.send(xml)
        self.sent.append(label)
        self.xml.append(xml)

    def message_padded(self, to: str, body: str, pad: int) -> None:
        extra = f"<x xmlns='{PAD_NS}'>{'p' * pad}</x>" if pad else ""
        self._send(f"<message to={quoteattr(to)} type='chat' id={quoteattr(body)}>"
                   f"<body>{escape(body)}</body>{extra}</message>", body)

    def ping(self, domain: str, ping_id: str) -> None:
        """The canary's ping: an iq counts as a stanza for SM (label = its id)."""
        self.pings[ping_id] = time.monotonic()
        self._send(f"<iq type='get' id={quoteattr(ping_id)} to={quoteattr(domain)}>"
                   f"<ping xmlns='{PING}'/></iq>", ping_id)

    def _handle(self, el: etree._Element) -> None:
        if el.tag == f"{{{SM}}}r":
            self.client_acked[self.streams] = self.handled  # the <a h/> SmPeer answers
            self.ack_log.append((self.streams, time.monotonic(), self.handled))
        if el.tag == f"{{{CLIENT}}}iq" and el.get("id") in self.pings \
                and el.get("type") in ("result", "error"):
            sent_at = self.pings.pop(el.get("id"))
            self.rtts.append((sent_at, time.monotonic() - sent_at, el.get("type")))
        if el.tag == f"{{{CLIENT}}}message" and el.get("type") != "error":
            body = el.findtext(f"{{{CLIENT}}}body")
            if body is not None:
                delay = el.find(f"{{{DELAY}}}delay")
                stamp = None if delay is None else delay.get("stamp", "")
                self.body_stream.append((body, self.streams, stamp, self.handled + 1,
                                         self.fresh_conn))
                self.first_seen.setdefault(body, time.monotonic())
        super()._handle(el)

    # -- connections ------------------------------------------------------------------------

    def cut(self) -> None:
        """The network drops (an abort: no stream close)."""
        self.connected = False
        self.cut_at[self.streams] = time.monotonic()
        self.abort()

    async def _enable(self, timeout: float, resume_max: int) -> None:
        self.raw.send(f"<enable xmlns='{SM}' resume='true' max='{resume_max}'/>")
        while True:
            el = await self.raw.read_element(timeout)
            if el.tag == f"{{{SM}}}enabled":
                self.sm, self.sm_id = True, el.get("id")
                return
            self._handle(el)

    def _new_stream(self, carried: list[tuple[str, str]]) -> None:
        """A fresh SM stream: earlier acks archived, counters reset, ``carried`` stanzas
        (unacknowledged on the old stream) to be sent again on this one."""
        self.acked_before += self.acked
        self.sent, self.xml, self.acked_h, self.handled = [], [], 0, 0
        self.streams += 1
        self._carried = carried

    async def login_fresh(self, host: str, port: int, user: str, password: str,
                          resource: str, *, timeout: float, resume_max: int,
                          raw: RawClient | None = None) -> None:
        """Bind (on ``raw`` if given: a stream whose resume failed), enable SM, send presence,
        then whatever the old stream left unacknowledged."""
        if raw is None:
            raw = await raw_login(host, port, user, password, direct_tls=False,
                                  resource=resource, timeout=timeout)
        else:
            await raw.bind(resource, timeout)
        self.raw = raw
        carried = self._carried
        self._carried = []
        try:
            await self._enable(timeout, resume_max)
            self._send("<presence/>", "presence")
            for label, xml in carried:
                self._send(xml, label)
        except BaseException:
            raw.abort()
            raise
        self.fresh_logins += 1
        self.fresh_conn = True
        self.connected = True
        if self.reading:
            self._reader = asyncio.create_task(self._read())

    async def resume(self, host: str, port: int, user: str, password: str, resource: str, *,
                     timeout: float, resume_max: int) -> str:
        """Log in, ``<resume previd h/>``; on ``<resumed h/>`` resend what ``h`` does not
        cover; on ``<failed/>`` bind afresh on the same stream. Returns "resumed" or
        "fresh"."""
        raw = await RawClient.connect(host, port, direct_tls=False, timeout=timeout)
        try:
            await raw.login_plain(user, password, timeout=timeout)
            raw.send(f"<resume xmlns='{SM}' previd={quoteattr(self.sm_id or '')}"
                     f" h='{self.handled}'/>")
            self.client_acked[self.streams] = self.handled
            self.ack_log.append((self.streams, time.monotonic(), self.handled))
            while True:
                el = await raw.read_element(timeout)
                if el.tag in (f"{{{SM}}}resumed", f"{{{SM}}}failed"):
                    break
                self.other.append(el)
        except BaseException:
            raw.abort()
            raise
        h = el.get("h")
        if el.tag == f"{{{SM}}}failed":
            self.failed_resumes += 1
            if h is not None:
                self.acked_h = max(self.acked_h, int(h))
            carried = [(label, xml) for label, xml in
                       zip(self.sent[self.acked_h:], self.xml[self.acked_h:], strict=True)
                       if label != "presence"]
            self._new_stream(carried)
            await self.login_fresh(host, port, user, password, resource, timeout=timeout,
                                   resume_max=resume_max, raw=raw)
            return "fresh"
        self.raw = raw
        self.acked_h = int(h or 0)
        self._acked.set()
        for xml in self.xml[self.acked_h:]:
            raw.send(xml)  # the same stanzas, in order: the counter goes on from h
        self.resumes += 1
        self.fresh_conn = False
        self.connected = True
        if self.reading:
            self._reader = asyncio.create_task(self._read())
        return "resumed"

    async def _read(self) -> None:
        try:
            await super()._read()
        finally:
            self.connected = False
            self.cut_at.setdefault(self.streams, time.monotonic())


@dataclass
class Meta:
    sender: str
    to: str
    n: int
    sent_at: float


@dataclass
class SoakResult:
    seed: int
    seconds: float
    clients: int
    wall: float = 0.0
    sent: int = 0
    acked: int = 0
    unacked: int = 0
    delivered: int = 0
    delivered_after_relogin: int = 0
    duplicated: dict[str, int] = field(default_factory=dict)
    duplicated_at: Counter[str] = field(default_factory=Counter)  # per recipient
    lost: list[str] = field(default_factory=list)
    lost_unacked: int = 0
    misrouted: list[str] = field(default_factory=list)  # at a client it was not sent to
    bounced: int = 0
    bounced_acked_and_delivered: list[str] = field(default_factory=list)
    out_of_order: list[str] = field(default_factory=list)  # not explained below
    # came late from the legacy server's own offline store (a restore race, see the report)
    out_of_order_offline: list[str] = field(default_factory=list)
    # came late from the proxy's store at a fresh login (also delivered at the presence)
    out_of_order_store: list[str] = field(default_factory=list)
    # the client's ack of the earlier copy never left, or left just before a cut
    duplicated_unacked: dict[str, int] = field(default_factory=dict)
    duplicated_acked: dict[str, int] = field(default_factory=dict)  # a copy after an ack: bug
    # a copy from the proxy's store and another from the server (live or from its offline
    # store) in the same session: a known bug (DEDUPE_BUG)
    duplicated_store_and_offline: dict[str, int] = field(default_factory=dict)
    out_of_order_at: Counter[str] = field(default_factory=Counter)  # per recipient
    faults: Counter[str] = field(default_factory=Counter)
    resumes: int = 0
    failed_resumes: int = 0
    auth_retries: int = 0
    closed_by_proxy: int = 0
    rss_baseline_kib: int = 0
    rss_peak_kib: int = 0
    rss_final_kib: int = 0
    canary_pings: int = 0
    canary_unanswered: int = 0
    canary_max_rtt: float = 0.0  # every answered ping
    canary_max_rtt_clear: float = 0.0  # pings not in flight at a kill or a reset
    canary_over_1s_clear: int = 0
    canary_straddling: int = 0  # pings in flight at a kill or a reset
    canary_max_rtt_straddling: float = 0.0
    canary_max_rtt_server_down: float = 0.0  # sent while the server process was down
    latency_p50: float = 0.0
    latency_p99: float = 0.0
    latency_max: float = 0.0
    proxy_events: Counter[str] = field(default_factory=Counter)
    sink_bodies: int = 0
    notes: list[str] = field(default_factory=list)
    lost_detail: list[str] = field(default_factory=list)

    def summary(self) -> str:
        mib = lambda k: f"{k / 1024:.1f} MiB"  # noqa: E731
        lines = [
            f"chaos soak: seed={self.seed} chaos={self.seconds:g}s clients={self.clients}"
            f" (+ non-reader + canary) wall={self.wall:.1f}s",
            f"messages: sent={self.sent} acked={self.acked} unacked-at-end={self.unacked}"
            f" delivered={self.delivered} (after a fresh login: {self.delivered_after_relogin};"
            f" to the non-reader: {self.sink_bodies})",
            f"  lost(acked)={len(self.lost)} lost(unacked)={self.lost_unacked}"
            f" duplicated={sum(n - 1 for n in self.duplicated.values())}"
            f" ({len(self.duplicated)} messages: {len(self.duplicated_store_and_offline)} from"
            " the proxy's store and again from the server in that session,"
            f" {len(self.duplicated_acked)} other after the client's ack,"
            f" {len(self.duplicated_unacked)} not surely acked by it before a cut)"
            f" bounced={self.bounced} misrouted={len(self.misrouted)}",
            f"  out-of-order={len(self.out_of_order)} (plus overtaken between a bind and its"
            f" initial presence: {len(self.out_of_order_offline)} from the server's offline"
            " store, at a login or an upstream restore;"
            f" {len(self.out_of_order_store)} from the proxy's store, at a fresh login)",
            f"faults: {dict(sorted(self.faults.items()))}; resumes={self.resumes}"
            f" failed-resumes={self.failed_resumes} logins refused while the server was down:"
            f" {self.auth_retries}; streams closed by the proxy: {self.closed_by_proxy}",
            f"proxy RSS: baseline={mib(self.rss_baseline_kib)} peak={mib(self.rss_peak_kib)}"
            f" final={mib(self.rss_final_kib)}",
            f"canary: pings={self.canary_pings} unanswered={self.canary_unanswered}"
            f" max-rtt={self.canary_max_rtt:.3f}s; not in flight at a fault:"
            f" max={self.canary_max_rtt_clear:.3f}s over-1s={self.canary_over_1s_clear};"
            f" sent while the server was down (the proxy answers):"
            f" max={self.canary_max_rtt_server_down:.3f}s;"
            f" in flight at a kill/reset: {self.canary_straddling}"
            f" max={self.canary_max_rtt_straddling:.3f}s",
            f"delivery latency (not to the non-reader): p50={self.latency_p50:.3f}s"
            f" p99={self.latency_p99:.3f}s"
            f" max={self.latency_max:.3f}s",
            f"proxy events: {dict(sorted(self.proxy_events.items()))}",
        ]
        if self.lost:
            lines.append(f"LOST (acked): {self.lost_detail[:20]}")
        if self.duplicated:
            both = dict(list(self.duplicated_store_and_offline.items())[:10])
            lines.append(f"DUPLICATED (per recipient: {dict(self.duplicated_at)}):"
                         f" stored+server: {both}"
                         f" other after an ack: {dict(list(self.duplicated_acked.items())[:10])}"
                         f" not surely acked: {dict(list(self.duplicated_unacked.items())[:10])}")
        if self.out_of_order:
            lines.append(f"OUT OF ORDER (per recipient: {dict(self.out_of_order_at)}):"
                         f" {self.out_of_order[:20]}")
        if self.out_of_order_store:
            lines.append(f"LATE FROM THE PROXY'S STORE: {self.out_of_order_store[:8]}")
        if self.out_of_order_offline:
            lines.append(f"LATE FROM THE SERVER'S OFFLINE STORE: {self.out_of_order_offline[:8]}")
        if self.bounced_acked_and_delivered:
            lines.append(f"BOUNCED AND DELIVERED: {self.bounced_acked_and_delivered[:20]}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


class Soak:
    def __init__(self, workdir: Path, cfg: SoakConfig, certs: tuple[Path, Path] | None = None,
                 *, log: Any = None) -> None:
        self.workdir = workdir
        self.cfg = cfg
        self.certs = certs or make_cert(workdir / "proxy-certs", "localhost")
        self.log = log or (lambda msg: None)
        self.server: LegacyProsody | None = None
        self.relay: FaultRelay | None = None
        self.proxy: ProxyProcess | None = None
        self.peers: dict[str, ChaosPeer] = {}
        self.accounts: dict[str, tuple[str, str]] = {}  # name -> (user, password)
        self.meta: dict[str, Meta] = {}
        self.faults: Counter[str] = Counter()
        self.fault_instants: list[float] = []  # monotonic times of kills and resets
        self.down_windows: list[tuple[float, float]] = []  # server process down
        self.rss: list[int] = []
        self.rss_trace: list[tuple[float, int]] = []
        self.background: set[asyncio.Task[None]] = set()
        self.away: set[str] = set()  # cut by us, coming back later
        self.closed_by_proxy = 0  # talkers found disconnected without a cut of ours
        self.locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self.auth_retries = 0  # logins refused (temporary-auth-failure) while the server was down
        self.stop = asyncio.Event()
        self.t0 = 0.0

    # -- set-up ---------------------------------------------------------------------------

    def start(self) -> None:
        self.server = LegacyProsody(self.workdir / "prosody")
        self.server.start()
        self.relay = FaultRelay("127.0.0.1", self.server.c2s_port).start()
        self.proxy = ProxyProcess(
            self.workdir / "proxy", self.server, *self.certs, upstream_port=self.relay.port,
            reconnect=FAST_RECONNECT,
            store={"path": str(self.workdir / "front.sqlite3")},
            stream_management={"ack_timeout": self.cfg.ack_timeout, "max_resume_timeout": 600,
                               **({"max_queue": self.cfg.max_queue} if self.cfg.max_queue
                                  else {})},
            abuse={"max_connections_per_address": 0},
            log={"format": "json", "level": self.cfg.log_level})
        self.proxy.start()
        names = [f"c{i}" for i in range(self.cfg.clients)] + ["sink", "canary"]
        for name in names:
            user = f"{name}x{self.cfg.seed}"
            self.server.register(user, f"{name}-pw")
            self.accounts[name] = (user, f"{name}-pw")

    def stop_all(self) -> None:
        for peer in self.peers.values():
            with contextlib.suppress(Exception):
                peer.abort()
        if self.proxy is not None:
            self.proxy.stop()
        if self.relay is not None:
            self.relay.stop()
        if self.server is not None:
            self.server.stop()

    def short(self, name: str) -> bool:
        return name in [f"c{i}" for i in range(min(self.cfg.short_lived, self.cfg.clients))]

    def resume_max(self, name: str) -> int:
        return self.cfg.short_max if self.short(name) else self.cfg.resume_max

    def jid(self, name: str) -> str:
        return f"{self.accounts[name][0]}@localhost/{name}"

    async def login(self, name: str) -> ChaosPeer:
        user, password = self.accounts[name]
        assert self.proxy is not None
        raw = await raw_login(self.proxy.host, self.proxy.port, user, password,
                              direct_tls=False, resource=name, timeout=10)
        peer = ChaosPeer(raw, name)
        peer.streams = 0
        peer._new_stream([])
        await peer._enable(10, self.resume_max(name))
        if name == "sink":
            # never reads: shrink its receive buffer so it fills soon
            sock = raw.writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        peer._send("<presence/>", "presence")
        peer.fresh_logins = 1
        peer.connected = True
        peer.reading = name != "sink"
        if peer.reading:
            peer._reader = asyncio.create_task(peer._read())
        self.peers[name] = peer
        return peer

    async def reconnect(self, peer: ChaosPeer) -> str:
        """Resume (or log in afresh); one attempt at a time per client."""
        user, password = self.accounts[peer.name]
        assert self.proxy is not None
        async with self.locks[peer.name]:
            if peer.connected:
                return "already connected"
            return await peer.resume(self.proxy.host, self.proxy.port, user, password,
                                     peer.name, timeout=10, resume_max=self.resume_max(peer.name))

    # -- actors ---------------------------------------------------------------------------

    def rng(self, actor: str) -> random.Random:
        return random.Random(f"{self.cfg.seed}:{actor}")

    async def sender(self, name: str) -> None:
        rng = self.rng(f"send:{name}")
        peer = self.peers[name]
        others = [n for n in self.peers if n not in (name, "canary", "sink")]
        n = 0
        while not self.stop.is_set():
            await asyncio.sleep(rng.expovariate(self.cfg.rate))
            if not peer.connected:
                continue
            to = "sink" if rng.random() < self.cfg.to_sink else rng.choice(others)
            label = f"{name}.{n}"
            self.meta[label] = Meta(name, to, n, time.monotonic())
            peer.message_padded(self.jid(to), label, self.cfg.sink_pad if to == "sink" else 0)
            n += 1
            if n % 10 == 0:
                peer.request_ack()

    async def cutter(self) -> None:
        rng = self.rng("cutter")
        names = [n for n in self.peers if n not in ("canary", "sink")]
        while not self.stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), rng.uniform(*self.cfg.cut_every))
            if self.stop.is_set():
                return
            peer = self.peers[rng.choice(names)]
            if not peer.connected:
                continue
            peer.cut()
            self.away.add(peer.name)
            self.faults["client_cut"] += 1
            away = rng.uniform(*self.cfg.away)
            if self.short(peer.name) and rng.random() < 0.4:
                away = rng.uniform(*self.cfg.short_away)
            self.background.add(asyncio.create_task(self.come_back(peer, away)))

    async def come_back(self, peer: ChaosPeer, after: float = 0.0) -> None:
        self.away.add(peer.name)
        try:
            await asyncio.sleep(after)
            for _attempt in range(10):
                try:
                    how = await asyncio.wait_for(self.reconnect(peer), 20)
                    self.log(f"{peer.name}: {how}")
                    return
                except Exception as exc:  # a chaos actor retries
                    self.auth_retries += "temporary-auth-failure" in repr(exc)
                    self.log(f"{peer.name}: reconnect failed: {exc!r}")
                    await asyncio.sleep(0.5)
        finally:
            self.away.discard(peer.name)

    async def faulter(self) -> None:
        rng = self.rng("faults")
        assert self.server is not None and self.relay is not None
        kinds = ["server_kill", "server_stop", "link_reset"]
        first = rng.sample(kinds, len(kinds))  # each kind early, then at random
        while not self.stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), rng.uniform(*self.cfg.fault_every))
            if self.stop.is_set():
                return
            kind = first.pop(0) if first else rng.choice(kinds)
            now = time.monotonic()
            self.fault_instants.append(now)
            self.faults[kind] += 1
            if kind == "link_reset":
                await asyncio.to_thread(self.relay.reset)
                self.log("link reset")
            else:
                stop = self.server.kill if kind == "server_kill" else self.server.stop
                await asyncio.to_thread(stop)
                down = rng.uniform(*self.cfg.down)
                self.log(f"{kind}, down {down:.2f}s")
                await asyncio.sleep(down)
                await asyncio.to_thread(self.server.start)
                self.down_windows.append((now, time.monotonic()))

    async def keeper(self) -> None:
        """A talker whose stream the proxy closed (not a cut of ours) comes back too."""
        while not self.stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), 1.0)
            if self.stop.is_set():
                return
            for peer in self.peers.values():
                if peer.reading and not peer.connected and not self.locks[peer.name].locked() \
                        and peer.name not in self.away:
                    self.closed_by_proxy += 1
                    self.log(f"{peer.name}: found disconnected, reconnecting")
                    self.background.add(asyncio.create_task(self.come_back(peer)))

    async def sink(self) -> None:
        """The non-reader now and then drops its connection and resumes, still never reading
        (so the proxy resends its whole queue into a socket nobody drains)."""
        rng = self.rng("sink")
        peer = self.peers["sink"]
        while not self.stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), rng.uniform(*self.cfg.sink_every))
            if self.stop.is_set():
                return
            peer.cut()
            self.faults["non_reader_cut"] += 1
            await self.come_back(peer)

    async def canary(self) -> None:
        peer = self.peers["canary"]
        n = 0
        while not self.stop.is_set():
            peer.ping("localhost", f"ping-{n}")
            n += 1
            await asyncio.sleep(0.5)

    async def sampler(self) -> None:
        assert self.proxy is not None and self.proxy.proc is not None
        pid = self.proxy.proc.pid
        while True:
            kib = rss_kib(pid)
            if kib is not None:
                self.rss.append(kib)
                self.rss_trace.append((round(time.monotonic() - self.t0, 2), kib))
            await asyncio.sleep(0.25)

    # -- the run --------------------------------------------------------------------------

    async def run(self) -> SoakResult:
        cfg = self.cfg
        res = SoakResult(cfg.seed, cfg.seconds, cfg.clients)
        self.t0 = time.monotonic()
        for name in self.accounts:
            await self.login(name)
        await asyncio.sleep(1.0)
        assert self.proxy is not None and self.proxy.proc is not None
        res.rss_baseline_kib = rss_kib(self.proxy.proc.pid) or 0
        sampler = asyncio.create_task(self.sampler())
        talkers = [n for n in self.peers if n not in ("canary", "sink")]
        actors = [asyncio.create_task(self.sender(n)) for n in talkers]
        actors += [asyncio.create_task(a())
                   for a in (self.cutter, self.faulter, self.sink, self.keeper)]
        canary = asyncio.create_task(self.canary())
        await asyncio.sleep(cfg.seconds)
        self.stop.set()
        await asyncio.wait_for(asyncio.gather(*actors), 30)
        # Quiet: everything back up, everyone connected, the non-reader drained.
        assert self.server is not None and self.relay is not None
        if not self.server.running:
            await asyncio.to_thread(self.server.start)
        await asyncio.to_thread(self.relay.pass_through)
        loop = asyncio.get_running_loop()
        settle_end = loop.time() + cfg.settle
        await self.reconnect_everyone(settle_end)
        await self.settle(settle_end)
        for task in [canary, *self.background]:
            task.cancel()
        await asyncio.gather(canary, *self.background, return_exceptions=True)
        await asyncio.sleep(1.0)  # late duplicates have a chance to show
        res.rss_final_kib = rss_kib(self.proxy.proc.pid) or 0
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        self.account_for(res)
        res.wall = time.monotonic() - self.t0
        return res

    async def reconnect_everyone(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        sink = self.peers["sink"]
        sink.cut()  # the non-reader leaves; it resumes as a reader
        sink.reading = True
        for _ in range(200):
            down = [p for p in self.peers.values() if not p.connected]
            if not down or loop.time() > deadline:
                return
            for peer in down:
                with contextlib.suppress(Exception):
                    how = await asyncio.wait_for(self.reconnect(peer),
                                                 max(0.5, min(20, deadline - loop.time())))
                    self.log(f"settle: {peer.name}: {how}")
            await asyncio.sleep(0.2)

    def outstanding(self) -> list[str]:
        """Acked messages not yet delivered or bounced, and unacked ones."""
        got = self.delivered_counts()
        bounced = self.bounced_ids()
        out = []
        for peer in self.peers.values():
            for label in peer.sent:
                if label in self.meta and label not in peer.acked:
                    out.append(label)
            for label in peer.acked_all:
                if label in self.meta and not got[label] and label not in bounced:
                    out.append(label)
        return out

    async def settle(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        while loop.time() < deadline:
            for peer in self.peers.values():
                if peer.connected:
                    peer.request_ack()
            if not self.outstanding():
                return
            await asyncio.sleep(0.3)
            if any(not p.connected for p in self.peers.values()):
                await self.reconnect_everyone(deadline)

    def delivered_counts(self) -> Counter[str]:
        """Copies of each message at its own recipient (elsewhere: ``misrouted``)."""
        c: Counter[str] = Counter()
        for peer in self.peers.values():
            c.update(b for b in peer.bodies if b in self.meta and self.meta[b].to == peer.name)
        return c

    def misrouted(self) -> list[str]:
        return [f"{b} at {p.name}" for p in self.peers.values() for b in p.bodies
                if b in self.meta and self.meta[b].to != p.name]

    def bounced_ids(self) -> set[str]:
        out = set()
        for peer in self.peers.values():
            for el in peer.errors:
                out.add(el.get("id") or el.findtext(f"{{{CLIENT}}}body") or "")
        return out

    def account_for(self, res: SoakResult) -> None:
        got = self.delivered_counts()
        bounced = self.bounced_ids()
        acked = {label for p in self.peers.values() for label in p.acked_all if label in self.meta}
        res.sent = len(self.meta)
        res.misrouted = self.misrouted()
        res.acked = len(acked)
        res.unacked = res.sent - res.acked
        res.delivered = sum(1 for label in self.meta if got[label])
        res.duplicated = {label: n for label, n in got.items() if n > 1}
        res.duplicated_at = Counter(self.meta[label].to for label in res.duplicated)
        res.bounced = len(bounced & set(self.meta))
        res.bounced_acked_and_delivered = sorted(bounced & {k for k in got if got[k]})
        res.lost = sorted(label for label in acked if not got[label] and label not in bounced)
        res.lost_unacked = sum(1 for label in self.meta
                               if label not in acked and not got[label] and label not in bounced)
        for label in res.lost:
            m = self.meta[label]
            near = [round(m.sent_at - f, 2) for f in self.fault_instants
                    if -1 < m.sent_at - f < 5]
            res.lost_detail.append(f"{label}->{m.to} t={m.sent_at - self.t0:.2f}s"
                                   f" after-fault={near}")
        # order per sender at each recipient, first copies only (later ones are duplicates)
        for peer in self.peers.values():
            last: dict[str, int] = {}
            seen: set[str] = set()
            for body, _stream, stamp, _pos, fresh in peer.body_stream:
                if body not in self.meta or body in seen:
                    continue
                seen.add(body)
                m = self.meta[body]
                if m.n < last.get(m.sender, -1):
                    # Prosody's offline store stamps whole seconds, the proxy microseconds;
                    # both deliver at the initial presence, so a message routed to the full
                    # JID between bind and presence overtakes them.
                    via_server = stamp is not None and "." not in stamp
                    via_store = stamp is not None and "." in stamp and fresh
                    where = (res.out_of_order_offline if via_server else
                             res.out_of_order_store if via_store else res.out_of_order)
                    where.append(f"{body} at {peer.name} after {m.sender}.{last[m.sender]}"
                                 f" (delay {stamp})")
                    if not (via_server or via_store):
                        res.out_of_order_at[peer.name] += 1
                last[m.sender] = max(last.get(m.sender, -1), m.n)
            res.delivered_after_relogin += sum(1 for body, stream, *_ in peer.body_stream
                                               if stream > 1 and body in self.meta)
            # duplicates: "unacked" when the client had not surely acknowledged each earlier
            # copy before that SM stream was cut, and the next copy came on a later stream (a
            # fresh login: XEP-0198 redelivers what it never saw acknowledged); else a bug
            copies: defaultdict[str, list[tuple[int, int]]] = defaultdict(list)
            stored_on: defaultdict[str, set[int]] = defaultdict(set)  # streams
            for body, stream, stamp, pos, fresh in peer.body_stream:
                if body in self.meta and self.meta[body].to == peer.name:
                    copies[body].append((stream, pos))
                    if stamp is not None and "." in stamp and fresh:
                        stored_on[body].add(stream)  # the proxy's stored delivery
            for body, where_ in copies.items():
                if len(where_) < 2:
                    continue
                if any(sum(1 for st, _ in where_ if st == s) > 1 for s in stored_on[body]):
                    # a stored copy and another from the server on the same stream: the
                    # dedupe bug test_chaos.py pins down (DEDUPE_BUG)
                    res.duplicated_store_and_offline[body] = len(where_)
                    continue
                unacked = all(nxt[0] > stream and not self.surely_acked(peer, stream, pos)
                              for (stream, pos), nxt in itertools.pairwise(where_))
                (res.duplicated_unacked if unacked else res.duplicated_acked)[body] = \
                    len(where_)
        res.sink_bodies = sum(1 for b in self.peers["sink"].bodies if b in self.meta)
        res.faults = Counter(self.faults)
        res.faults["client_cut"] += 0
        res.resumes = sum(p.resumes for p in self.peers.values())
        res.failed_resumes = sum(p.failed_resumes for p in self.peers.values())
        res.auth_retries = self.auth_retries
        res.closed_by_proxy = self.closed_by_proxy
        res.rss_peak_kib = max(self.rss, default=0)
        # the canary
        canary = self.peers["canary"]
        res.canary_pings = len(canary.rtts) + len(canary.pings)
        res.canary_unanswered = len(canary.pings)
        for sent_at, rtt, _type in canary.rtts:
            res.canary_max_rtt = max(res.canary_max_rtt, rtt)
            straddles = any(sent_at <= f <= sent_at + rtt for f in self.fault_instants)
            if straddles:
                res.canary_straddling += 1
                res.canary_max_rtt_straddling = max(res.canary_max_rtt_straddling, rtt)
                continue
            res.canary_max_rtt_clear = max(res.canary_max_rtt_clear, rtt)
            if rtt > 1.0:
                res.canary_over_1s_clear += 1
            if any(a <= sent_at <= b for a, b in self.down_windows):
                res.canary_max_rtt_server_down = max(res.canary_max_rtt_server_down, rtt)
        # delivery latency of first deliveries
        lat = sorted(t for t in self._latencies())
        if lat:
            res.latency_p50 = lat[len(lat) // 2]
            res.latency_p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
            res.latency_max = lat[-1]
        assert self.proxy is not None
        res.proxy_events = Counter(str(e.get("event")) for e in self.proxy.events()
                                   if e.get("event") in INTERESTING)

    @staticmethod
    def surely_acked(peer: ChaosPeer, stream: int, pos: int) -> bool:
        """Whether our ack of the ``pos``-th stanza on ``stream`` left at least 0.3 s before
        that stream's last connection was cut (so the proxy had it, on loopback); an ack
        sent just before a cut may never arrive, and XEP-0198 then redelivers."""
        end = peer.cut_at.get(stream, float("inf"))
        return any(st == stream and h >= pos and t < end - 0.3 for st, t, h in peer.ack_log)

    def dump(self, path: Path) -> None:
        """Every book as JSON (times relative to the start), to look into a failure."""
        rel = lambda t: round(t - self.t0, 3)  # noqa: E731
        data = {
            "seed": self.cfg.seed,
            "faults": [rel(t) for t in self.fault_instants],
            "down": [(rel(a), rel(b)) for a, b in self.down_windows],
            "rss": self.rss_trace,
            "canary": [(rel(t), round(rtt, 4), typ) for t, rtt, typ in self.peers["canary"].rtts],
            "meta": {k: [m.sender, m.to, m.n, rel(m.sent_at)] for k, m in self.meta.items()},
            "peers": {
                name: {
                    "bodies": [list(x) for x in p.body_stream],
                    "client_acked": p.client_acked,
                    "first_seen": {b: rel(t) for b, t in p.first_seen.items()},
                    "acked": p.acked_all,
                    "errors": [e.get("id") for e in p.errors],
                    "resumes": p.resumes, "failed_resumes": p.failed_resumes,
                    "streams": p.streams,
                } for name, p in self.peers.items()},
        }
        path.write_text(json.dumps(data))

    def _latencies(self) -> list[float]:
        return [t - self.meta[b].sent_at for p in self.peers.values() if p.name != "sink"
                for b, t in p.first_seen.items() if b in self.meta]


INTERESTING = {
    "upstream_down", "upstream_restored", "upstream_gave_up", "hibernating", "resumed",
    "resume_failed", "session_ended", "undelivered", "stored_delivered", "client_link_dead",
    "sm_queue_overflow", "connection_failed", "unconfirmed_returned", "taken_over",
    "upstream_reconnect_failed", "journal_write_failed",
}


async def run_soak(workdir: Path, cfg: SoakConfig, certs: tuple[Path, Path] | None = None,
                   log: Any = None) -> tuple[SoakResult, Soak]:
    soak = Soak(workdir, cfg, certs, log=log)
    try:
        await asyncio.to_thread(soak.start)
        result = await soak.run()
    finally:
        await asyncio.to_thread(soak.stop_all)
    return result, soak
