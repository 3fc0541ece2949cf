"""Load generators: many clients logged in at once, message pairs at full speed or at a fixed
rate, repeated logins. Everything bounded in count and time."""

from __future__ import annotations

import asyncio
import collections
import itertools
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .client import MESSAGE_END, NS_SM, BenchClient, collect_latencies, login
from .procs import cpu_seconds

_ECHO = re.compile(rb"<body>echo</body>")
# Stream management (XEP-0198) nonzas from the proxy: its <r/> to a receiver, its <a h/> to a
# sender's <r/>. Written by lxml as <r xmlns="urn:xmpp:sm:3"/> and <a xmlns=... h="N"/>.
_SM_R = re.compile(rb"<r[\s/]")
_SM_NONZA = re.compile(rb"<([ar])\s[^>]*/>")
SM_REQUEST = f"<r xmlns='{NS_SM}'/>".encode()

# A chat message of ordinary size: about 200 bytes on the wire with from/to/id.
BODY = "Benchmark message: the quick brown fox jumps over the lazy dog, 0123456789."

Progress = Callable[[str], None]
# Numbers a ``sample`` callback returns that are levels, not counters: the value at the end
# of the window is reported, not the difference.
GAUGES = frozenset(("wal_bytes", "in_flight"))


@dataclass
class Endpoint:
    """Where clients connect: a server, the proxy or a relay in front of one."""

    name: str
    host: str
    port: int
    direct_tls: bool = False
    # Processes whose CPU time is reported, by name; the first one is "the" one (the proxy).
    watch: dict[str, int] = field(default_factory=dict)
    domain: str = "localhost"


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


async def login_many(ep: Endpoint, accounts: Sequence[tuple[str, str]], *, resource: str,
                     concurrency: int = 32, progress: Progress | None = None,
                     every: int = 1000, timeout: float = 60.0) -> list[BenchClient]:
    """Log all accounts in (at most ``concurrency`` at a time); any failure raises."""
    sem = asyncio.Semaphore(concurrency)
    done = 0

    async def one(user: str, password: str) -> BenchClient:
        nonlocal done
        async with sem:
            client = await login(ep.host, ep.port, user, password, resource=resource,
                                 domain=ep.domain, direct_tls=ep.direct_tls, timeout=timeout)
        done += 1
        if progress is not None and done % every == 0:
            progress(f"{done}/{len(accounts)} more logged in via {ep.name}")
        return client

    tasks = [asyncio.ensure_future(one(u, p)) for u, p in accounts]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        for t in tasks:
            if t.done() and not t.cancelled() and t.exception() is None:
                t.result().abort()
        raise


async def login_some(ep: Endpoint, accounts: Sequence[tuple[str, str]], *, resource: str,
                     concurrency: int = 32, progress: Progress | None = None,
                     every: int = 1000, timeout: float = 60.0,
                     ) -> tuple[list[BenchClient], list[BaseException]]:
    """Like login_many, but goes on after failures: (the clients logged in, the errors)."""
    sem = asyncio.Semaphore(concurrency)
    done = 0

    async def one(user: str, password: str) -> BenchClient:
        nonlocal done
        async with sem:
            client = await login(ep.host, ep.port, user, password, resource=resource,
                                 domain=ep.domain, direct_tls=ep.direct_tls, timeout=timeout)
        done += 1
        if progress is not None and done % every == 0:
            progress(f"{done}/{len(accounts)} more logged in via {ep.name}")
        return client

    results = await asyncio.gather(*(one(u, p) for u, p in accounts), return_exceptions=True)
    clients = [r for r in results if isinstance(r, BenchClient)]
    errors = [r for r in results if isinstance(r, BaseException)]
    return clients, errors


def abort_all(clients: Sequence[BenchClient]) -> None:
    for c in clients:
        c.abort()


@dataclass
class _Pair:
    sender: BenchClient
    receiver: BenchClient
    sent: int = 0
    received: int = 0
    wake: asyncio.Event = field(default_factory=asyncio.Event)


def sm_ack(handled: int) -> bytes:
    return f"<a xmlns='{NS_SM}' h='{handled % 2**32}'/>".encode()


async def _receive(pair: _Pair, sm: bool = False) -> None:
    """Count ``</message>``; with ``sm``, answer each ``<r/>`` of the proxy with ``<a h/>``,
    h the messages received so far (never more than the proxy sent: anything else it sends
    this client is not counted, so h errs low and the proxy keeps a few stanzas queued)."""
    reader = pair.receiver.reader
    writer = pair.receiver.writer
    carry = bytes(pair.receiver.buf)
    keep = len(MESSAGE_END) - 1
    while True:
        data = await reader.read(1 << 18)
        if not data:
            return
        chunk = carry + data if carry else data
        pair.received += chunk.count(MESSAGE_END)
        # The carry is read twice: an <r/> in it is answered twice, which is harmless (an
        # unrequested <a/> with the same or a higher h); none is missed across reads.
        if sm and _SM_R.search(chunk) is not None:
            writer.write(sm_ack(pair.received))
        carry = chunk[-keep:]
        pair.wake.set()


class AckTimes:
    """A sender's ``<r/>`` requests to the proxy and the ``<a h/>`` answers: the round trip of
    each, in ms (the proxy answers in order; with the journal, only after its commit)."""

    def __init__(self) -> None:
        self.pending: collections.deque[int] = collections.deque()
        self.rtts: list[tuple[int, float]] = []  # (sent at, ns; round trip, ms)

    def requested(self) -> None:
        self.pending.append(time.perf_counter_ns())

    async def read_answers(self, client: BenchClient) -> None:
        """Read the sender's connection: time each ``<a/>``; answer the proxy's ``<r/>``
        (h=0: a sender receives no stanzas)."""
        pending = bytes(client.buf)
        while True:
            data = await client.reader.read(1 << 16)
            now = time.perf_counter_ns()
            if not data:
                return
            pending += data
            end = 0
            for m in _SM_NONZA.finditer(pending):
                end = m.end()
                if m.group(1) == b"a":
                    if self.pending:
                        sent = self.pending.popleft()
                        self.rtts.append((sent, (now - sent) / 1e6))
                else:
                    client.writer.write(sm_ack(0))
            pending = pending[end:]
            if len(pending) > 1 << 16:
                pending = pending[-256:]

    def window(self, since_ns: int, until_ns: int | None = None) -> list[float]:
        return [ms for sent, ms in self.rtts
                if sent >= since_ns and (until_ns is None or sent < until_ns)]


async def _send(pair: _Pair, stop: asyncio.Event, window: int, batch: int,
                acks: AckTimes | None = None) -> None:
    """Batches as fast as the window allows; with ``acks`` (SM), each batch is followed by
    an ``<r/>``, as a client clearing its own queue of unacknowledged stanzas would."""
    prefix = f"<message to='{pair.receiver.jid}' type='chat' id='t".encode()
    suffix = f"'><body>{BODY}</body></message>".encode()
    writer = pair.sender.writer
    n = 0
    while not stop.is_set():
        while pair.sent - pair.received > window - batch and not stop.is_set():
            pair.wake.clear()
            try:
                await asyncio.wait_for(pair.wake.wait(), 0.5)
            except TimeoutError:
                pass
        if stop.is_set():
            return
        data = b"".join([prefix + b"%x" % i + suffix for i in range(n, n + batch)])
        if acks is not None:
            writer.write(data + SM_REQUEST)
            acks.requested()
        else:
            writer.write(data)
        n += batch
        pair.sent += batch
        await writer.drain()


@dataclass
class ThroughputResult:
    messages_per_s: float
    delivered: int
    seconds: float
    # CPU time / wall time over the measured window (1.0 = one core busy), by process name;
    # "harness" is the load generator itself.
    cpu: dict[str, float]
    main: str | None = None  # the watched process of interest (the proxy, a relay)
    sm: bool = False
    ack_ms: list[float] = field(default_factory=list)  # SM: <r/> to <a/> round trips
    # What ``sample`` returned at the end of the window minus at its start (numbers only).
    sampled: dict[str, float] = field(default_factory=dict)

    @property
    def cpu_share(self) -> float | None:
        return self.cpu.get(self.main) if self.main else None

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "messages_per_s": round(self.messages_per_s, 1), "delivered": self.delivered,
            "seconds": round(self.seconds, 3),
            "cpu_share": {k: round(v, 3) for k, v in self.cpu.items()}, "sm": self.sm}
        if self.ack_ms:
            out["ack_rtt_ms"] = {"p50": round(percentile(self.ack_ms, 50), 3),
                                 "p99": round(percentile(self.ack_ms, 99), 3),
                                 "max": round(max(self.ack_ms), 3), "n": len(self.ack_ms)}
        if self.sampled:
            out["sampled"] = self.sampled
        return out


def _cpu_now(watch: dict[str, int]) -> dict[str, float]:
    now = {"harness": time.process_time()}
    for name, pid in watch.items():
        try:
            now[name] = cpu_seconds(pid)
        except OSError:
            pass
    return now


async def throughput(ep: Endpoint, accounts: Sequence[tuple[str, str]], *, seconds: float,
                     warmup: float = 1.0, window: int = 2000, batch: int = 25,
                     progress: Progress | None = None,
                     on_window: Callable[[float], object] | None = None,
                     sm: bool = False,
                     sample: Callable[[], dict[str, float]] | None = None,
                     ) -> ThroughputResult:
    """Pairs (accounts[0]->accounts[1], [2]->[3], ...) send chat messages as fast as a window
    of ``window`` undelivered messages per pair allows; count deliveries over ``seconds``
    after ``warmup``. ``on_window(seconds)`` is called when the measured window starts.

    ``sm``: every client enables stream management (resumable) after binding; receivers
    answer the proxy's ``<r/>``, senders follow each batch with an ``<r/>`` and the round
    trips to the proxy's ``<a h/>`` are timed. ``sample()`` is called at the start and the
    end of the window; the difference of its numbers is reported."""
    clients = await login_many(ep, accounts, resource="bench", concurrency=8)
    pairs = [_Pair(clients[i], clients[i + 1]) for i in range(0, len(clients) - 1, 2)]
    stop = asyncio.Event()
    acks = [AckTimes() for _ in pairs] if sm else []
    tasks: list[asyncio.Future[None]] = []
    try:
        if sm:
            await asyncio.gather(*(c.enable_sm() for c in clients))
            tasks += [asyncio.ensure_future(a.read_answers(p.sender))
                      for a, p in zip(acks, pairs, strict=True)]
        tasks += [asyncio.ensure_future(_receive(p, sm)) for p in pairs]
        tasks += [asyncio.ensure_future(_send(p, stop, window, batch,
                                              acks[k] if sm else None))
                  for k, p in enumerate(pairs)]
        if progress:
            progress(f"{len(pairs)} pairs sending via {ep.name}{' with SM' if sm else ''} "
                     f"for {warmup:g}+{seconds:g} s")
        await asyncio.sleep(warmup)
        for t in tasks:
            if t.done():
                t.result()  # a failed sender or receiver: raise now
        s0 = sample() if sample is not None else {}
        c0, t0 = sum(p.received for p in pairs), time.perf_counter()
        ns0 = time.perf_counter_ns()
        cpu0 = _cpu_now(ep.watch)
        if on_window is not None:
            on_window(seconds)
        await asyncio.sleep(seconds)
        c1, t1 = sum(p.received for p in pairs), time.perf_counter()
        ns1 = time.perf_counter_ns()
        cpu1 = _cpu_now(ep.watch)
        s1 = sample() if sample is not None else {}
        for t in tasks:
            if t.done():
                t.result()
    finally:
        stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        abort_all(clients)
    elapsed = t1 - t0
    cpu = {k: (cpu1[k] - cpu0[k]) / elapsed for k in cpu0 if k in cpu1}
    ack_ms = [ms for a in acks for ms in a.window(ns0, ns1)]
    sampled = {k: s1[k] if k in GAUGES else s1[k] - s0[k] for k in s0 if k in s1}
    return ThroughputResult((c1 - c0) / elapsed, c1 - c0, elapsed, cpu,
                            next(iter(ep.watch), None), sm, ack_ms, sampled)


@dataclass
class LatencyResult:
    p50_ms: float
    p99_ms: float
    max_ms: float
    samples: int
    rate: float
    sm: bool = False
    ack_ms: list[float] = field(default_factory=list)  # SM: <r/> to <a/> round trips

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "p50_ms": round(self.p50_ms, 3), "p99_ms": round(self.p99_ms, 3),
            "max_ms": round(self.max_ms, 3), "samples": self.samples, "rate": self.rate,
            "sm": self.sm}
        if self.ack_ms:
            out["ack_rtt_ms"] = {"p50": round(percentile(self.ack_ms, 50), 3),
                                 "p99": round(percentile(self.ack_ms, 99), 3),
                                 "max": round(max(self.ack_ms), 3), "n": len(self.ack_ms)}
        return out


async def latency(ep: Endpoint, accounts: Sequence[tuple[str, str]], *, rate: float,
                  seconds: float, warmup: float = 1.0,
                  progress: Progress | None = None, sm: bool = False) -> LatencyResult:
    """Pairs send messages stamped with the send time at ``rate`` messages/s in total, one
    write per message; the receiver notes the time each arrived. ``sm``: every client
    enables stream management, each message is followed by an ``<r/>`` and the round trip
    to the proxy's ``<a h/>`` is timed; receivers answer the proxy's ``<r/>``."""
    clients = await login_many(ep, accounts, resource="bench", concurrency=8)
    pairs = [(clients[i], clients[i + 1]) for i in range(0, len(clients) - 1, 2)]
    samples: list[tuple[int, int]] = []
    acks = [AckTimes() for _ in pairs] if sm else []
    readers: list[asyncio.Future[None]] = []
    if sm:
        try:
            await asyncio.gather(*(c.enable_sm() for c in clients))
        except BaseException:
            abort_all(clients)
            raise
        readers = [asyncio.ensure_future(a.read_answers(s))
                   for a, (s, _) in zip(acks, pairs, strict=True)]
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.1
    measure_from = time.perf_counter_ns() + int((0.1 + warmup) * 1e9)
    end = start + warmup + seconds
    interval = len(pairs) / rate

    async def send(k: int, sender: BenchClient, receiver: BenchClient) -> None:
        head = f"<message to='{receiver.jid}' type='chat' id='L".encode()
        tail = f"'><body>{BODY}</body></message>".encode()
        due = start + k * interval / len(pairs)
        while due < end:
            await asyncio.sleep(max(0.0, due - loop.time()))
            data = head + str(time.perf_counter_ns()).encode() + tail
            if sm:
                sender.writer.write(data + SM_REQUEST)
                acks[k].requested()
            else:
                sender.writer.write(data)
            due += interval

    receivers: list[asyncio.Future[None]] = [asyncio.ensure_future(collect_latencies(
        r.reader, samples, sm_writer=r.writer if sm else None)) for _, r in pairs]
    receivers += readers
    try:
        if progress:
            progress(f"{len(pairs)} pairs at {rate:g} msg/s via {ep.name} for "
                     f"{warmup:g}+{seconds:g} s")
        await asyncio.gather(*(send(k, s, r) for k, (s, r) in enumerate(pairs)))
        await asyncio.sleep(0.5)  # the last ones in flight
    finally:
        for t in receivers:
            t.cancel()
        await asyncio.gather(*receivers, return_exceptions=True)
        abort_all(clients)
    lat = [lat_ns / 1e6 for sent_ns, lat_ns in samples if sent_ns >= measure_from]
    if not lat:
        raise RuntimeError(f"no message arrived via {ep.name}")
    ack_ms = [ms for a in acks for ms in a.window(measure_from)]
    return LatencyResult(percentile(lat, 50), percentile(lat, 99), max(lat), len(lat), rate,
                         sm, ack_ms)


@dataclass
class LoginResult:
    logins_per_s: float
    logins: int
    p50_ms: float
    p99_ms: float

    def as_dict(self) -> dict[str, float | int]:
        return {"logins_per_s": round(self.logins_per_s, 2), "logins": self.logins,
                "p50_ms": round(self.p50_ms, 2), "p99_ms": round(self.p99_ms, 2)}


async def login_rate(ep: Endpoint, accounts: Sequence[tuple[str, str]], *, seconds: float,
                     progress: Progress | None = None) -> LoginResult:
    """One logger per account, each logging in (TLS, SASL, bind) and closing again in a loop;
    logins completed within ``seconds`` (after one warm-up login each)."""
    loop = asyncio.get_running_loop()
    durations: list[float] = []
    counted = 0
    end = 0.0

    async def logger(k: int, user: str, password: str) -> None:
        nonlocal counted
        n = 0
        while True:
            t = loop.time()
            if end and t >= end:
                return
            client = await login(ep.host, ep.port, user, password, resource=f"l{k}-{n}",
                                 domain=ep.domain, direct_tls=ep.direct_tls)
            done = loop.time()
            await client.close()
            n += 1
            if end and done <= end:
                counted += 1
                durations.append(done - t)
            if not end:
                return  # the warm-up login

    await asyncio.gather(*(logger(k, u, p) for k, (u, p) in enumerate(accounts)))
    if progress:
        progress(f"{len(accounts)} loggers via {ep.name} for {seconds:g} s")
    end = loop.time() + seconds
    await asyncio.wait_for(asyncio.gather(*(logger(k, u, p)
                                            for k, (u, p) in enumerate(accounts))),
                           seconds + 60)
    ms = [d * 1000 for d in durations] or [float("nan")]
    return LoginResult(counted / seconds, counted, percentile(ms, 50), percentile(ms, 99))


_echo_round = itertools.count(1)


async def echo_check(clients: Sequence[BenchClient], timeout: float = 60.0) -> int:
    """Every client sends a message to its own full JID; how many got theirs back. (A fresh
    id each round: the proxy drops a message it already delivered, by sender and id.)"""
    echo_id = f"echo{next(_echo_round)}"

    async def one(c: BenchClient) -> bool:
        c.buf.clear()
        c.write(f"<message to='{c.jid}' type='chat' id='{echo_id}'><body>echo</body>"
                "</message>")
        try:
            await c.read_until(_ECHO, timeout)
            return True
        except Exception:
            return False

    results = await asyncio.gather(*(one(c) for c in clients))
    return sum(results)

