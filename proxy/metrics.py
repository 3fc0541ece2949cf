"""What an operator needs to see: Prometheus text at ``/metrics``, ``/healthz`` (the process
and its listeners are up) and ``/readyz`` (the legacy server is reachable), over plain HTTP on
``metrics.listen`` (keep it on loopback or a management network).

A scrape reads the proxy's state as it is (sessions, connections, the ledgers of live and of
ended sessions, the store's queues); what cannot be read from the state (logins, TLS
handshakes, stanzas and bytes relayed, the time a stanza spends inside) is counted as it
happens in :class:`Counters`: a dict increment, nothing allocated per stanza.
"""

from __future__ import annotations

import asyncio
import inspect
import contextlib
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from .xmpp import ns

REQUEST_TIMEOUT = 5.0  # seconds a scraper gets to send its request
MAX_REQUEST_BYTES = 8192
READY_CACHE = 5.0  # seconds a reachability answer is reused (a scraper may poll often)


def parse_listen(value: str) -> tuple[str, int]:
    """``"127.0.0.1:9105"`` (or ``"[::1]:9105"``) → (host, port); ValueError if not."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535 or not host:
        raise ValueError(f"{value!r} is not host:port")
    return host.strip("[]"), int(port)


class MetricsServer:
    def __init__(self, host: str, port: int, *,
                 gather: Callable[[], Iterable[str] | Awaitable[list[str]]],
                 healthy: Callable[[], bool], upstreams: Mapping[str, tuple[str, int]],
                 log: Any) -> None:
        """``upstreams``: each served domain's server (host, port), by the domain.
        ``gather`` may be a coroutine function (a supervisor asks its workers)."""
        self.host, self.port = host, port
        self.gather = gather
        self.healthy = healthy
        self.upstreams = dict(upstreams)
        self.log = log
        self._server: asyncio.Server | None = None
        self._ready: tuple[float, bool, str] | None = None  # (checked at, ready, body)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        self.log.info("metrics_listening", host=self.host, port=self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError):
            writer.close()
            return
        line = head[:MAX_REQUEST_BYTES].split(b"\r\n", 1)[0].decode("latin-1").split()
        path = line[1].split("?", 1)[0] if len(line) >= 2 else ""
        if len(line) < 2 or line[0] not in ("GET", "HEAD"):
            status, body = "405 Method Not Allowed", "only GET\n"
        elif path == "/metrics":
            lines = self.gather()
            if inspect.isawaitable(lines):  # a supervisor asks its workers
                lines = await lines
            status, body = "200 OK", "".join(f"{x}\n" for x in lines)
        elif path == "/healthz":
            ok = self.healthy()
            status, body = ("200 OK", "ok\n") if ok else ("503 Service Unavailable",
                                                          "listeners down\n")
        elif path == "/readyz":
            ready, body = await self._upstream_ready()
            status = "200 OK" if ready else "503 Service Unavailable"
        else:
            status, body = "404 Not Found", "try /metrics, /healthz or /readyz\n"
        payload = body.encode()
        writer.write(f"HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; "
                     f"charset=utf-8\r\nContent-Length: {len(payload)}\r\n"
                     "Connection: close\r\n\r\n".encode()
                     + (payload if line and line[0] != "HEAD" else b""))
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    async def _upstream_ready(self) -> tuple[bool, str]:
        """Ready only while every served domain's server is reachable; the body's first
        line says ``ready`` or ``not ready: ...`` (the unreachable ones), then one line
        per domain: ``DOMAIN HOST:PORT ok`` or the reason."""
        now = time.monotonic()
        if self._ready is not None and now - self._ready[0] < READY_CACHE:
            return self._ready[1], self._ready[2]
        domains = list(self.upstreams.items())
        reasons = await asyncio.gather(*(_reachable(host, port) for _, (host, port) in domains))
        lines = [f"{domain} {host}:{port} {why or 'ok'}"
                 for (domain, (host, port)), why in zip(domains, reasons, strict=True)]
        down = [f"the legacy server of {domain} at {host}:{port}: {why}"
                for (domain, (host, port)), why in zip(domains, reasons, strict=True) if why]
        ready = not down
        body = "".join(f"{line}\n" for line in [
            "ready" if ready else "not ready: " + "; ".join(down), *lines])
        self._ready = (now, ready, body)
        return ready, body


async def _reachable(host: str, port: int) -> str | None:
    """Why a TCP connection to host:port fails now, or None when it opens."""
    try:
        async with asyncio.timeout(2.0):
            _, writer = await asyncio.open_connection(host, port)
        writer.close()
    except (OSError, TimeoutError) as exc:
        return exc.strerror if isinstance(exc, OSError) and exc.strerror else \
            type(exc).__name__
    return None


def prometheus(name: str, kind: str, help_text: str,
               samples: Iterable[tuple[dict[str, str], float]]) -> list[str]:
    """One metric family in the Prometheus text format."""
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for labels, value in samples:
        label_text = ",".join(f'{k}="{_label_value(v)}"' for k, v in labels.items())
        # An int stays exact (":g" would print a counter past a million as 1e+06).
        shown = str(value) if isinstance(value, int) else repr(float(value))
        lines.append(f"{name}{{{label_text}}} {shown}" if label_text else f"{name} {shown}")
    return lines


def _label_value(value: object) -> str:
    """Escaped as the text format asks (a rule's name may hold anything)."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# Seconds a stanza spends in the proxy: from the read that brought its bytes in to its
# being queued for the other side's socket (or held: buffered while the server is away).
RELAY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                 0.25, 0.5, 1.0)
STANZA_KINDS = {ns.qname(ns.CLIENT, k): k for k in ("message", "presence", "iq")}


class Histogram:
    """A Prometheus histogram with fixed buckets: one bisect and two adds per sample."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound (+Inf only)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # le: a value equal to a bound is in it
        self.sum += value

    def lines(self, name: str, help_text: str) -> list[str]:
        out = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        running = 0
        for bound, count in zip(self.bounds, self.counts[:-1], strict=True):
            running += count
            out.append(f'{name}_bucket{{le="{bound:g}"}} {running}')
        running += self.counts[-1]
        out += [f'{name}_bucket{{le="+Inf"}} {running}', f"{name}_sum {self.sum:.6f}",
                f"{name}_count {running}"]
        return out


class Counters:
    """What is counted as it happens, for /metrics: plain dicts a relay path increments
    (no object made per stanza); the scrape turns them into Prometheus text."""

    def __init__(self) -> None:
        self.logins: dict[str, int] = {}  # result: ok, not-authorized, throttled, ...
        self.resumes: dict[str, int] = {"ok": 0, "failed": 0}
        # (listener kind, result): direct_tls|starttls, ok|failed
        self.tls_handshakes: dict[tuple[str, str], int] = {}
        self.proxy_headers: dict[str, int] = {}  # ok, missing or malformed, timeout, refused
        # Stanzas read, by element tag (kinds are told apart at the scrape), per direction.
        self.c2s_stanzas: dict[str, int] = {}
        self.s2c_stanzas: dict[str, int] = {}
        # Bytes written, by element tag: to the server (c2s) and to clients (s2c).
        self.c2s_bytes: dict[str, int] = {}
        self.s2c_bytes: dict[str, int] = {}
        self.relay_seconds = Histogram(RELAY_BUCKETS)
        self.rule_hits: dict[str, int] = {}  # rule name -> stanzas it matched
        self.upstream_restores = 0  # sessions restored after an outage
        self.outage_seconds = 0.0  # summed over those restores

    def count(self, table: dict[Any, int], key: Any) -> None:
        table[key] = table.get(key, 0) + 1

    def relayed(self, stanzas: dict[str, int], tag: str, read_at: float) -> None:
        """One stanza through the pipeline (the relay path: keep it this small)."""
        stanzas[tag] = stanzas.get(tag, 0) + 1
        # Histogram.observe, inline: two calls less per stanza
        histogram = self.relay_seconds
        seconds = time.perf_counter() - read_at
        histogram.counts[bisect_left(histogram.bounds, seconds)] += 1
        histogram.sum += seconds

    def lines(self) -> list[str]:
        lines = prometheus("xmpp_front_logins_total", "counter",
                           "client logins (SASL) by result: ok or the SASL condition sent",
                           [({"result": k}, v) for k, v in sorted(self.logins.items())])
        lines += prometheus("xmpp_front_resumes_total", "counter",
                            "XEP-0198 resumptions by result",
                            [({"result": k}, v) for k, v in sorted(self.resumes.items())])
        lines += prometheus("xmpp_front_upstream_restores_total", "counter",
                            "sessions re-established upstream after an outage",
                            [({}, self.upstream_restores)])
        lines += prometheus("xmpp_front_upstream_outage_seconds_total", "counter",
                            "seconds those sessions were without the server, summed",
                            [({}, round(self.outage_seconds, 3))])
        if self.rule_hits:
            lines += prometheus("xmpp_front_rule_hits_total", "counter",
                                "stanzas each rule matched",
                                [({"rule": k}, v) for k, v in sorted(self.rule_hits.items())])
        lines += prometheus("xmpp_front_tls_handshakes_total", "counter",
                            "client TLS handshakes by listener kind and result",
                            [({"listener": kind, "result": result},
                              self.tls_handshakes.get((kind, result), 0))
                             for kind in ("direct_tls", "starttls")
                             for result in ("ok", "failed")])
        if self.proxy_headers:
            lines += prometheus("xmpp_front_proxy_headers_total", "counter",
                                "PROXY protocol headers read on listeners that require one",
                                [({"result": k}, v)
                                 for k, v in sorted(self.proxy_headers.items())])
        for family, help_text, tables in (
                ("xmpp_front_stanzas_total", "stanzas read, by direction and kind",
                 (("c2s", self.c2s_stanzas), ("s2c", self.s2c_stanzas))),
                ("xmpp_front_stanza_bytes_total",
                 "bytes of stanzas written, by direction and kind (other: stream "
                 "negotiation and nonzas such as XEP-0198 acks)",
                 (("c2s", self.c2s_bytes), ("s2c", self.s2c_bytes)))):
            samples = []
            for direction, table in tables:
                by_kind = dict.fromkeys(("message", "presence", "iq", "other"), 0)
                for tag, value in list(table.items()):
                    by_kind[STANZA_KINDS.get(tag, "other")] += value
                if "stanzas" in family:
                    del by_kind["other"]
                samples += [({"direction": direction, "kind": k}, v)
                            for k, v in by_kind.items()]
            lines += prometheus(family, "counter", help_text, samples)
        lines += self.relay_seconds.lines(
            "xmpp_front_relay_seconds",
            "time a stanza spends in the proxy: from the read that brought it to its "
            "being queued for the other side")
        return lines
