"""What an operator needs to see: Prometheus text at ``/metrics``, ``/healthz`` (the process
and its listeners are up) and ``/readyz`` (the legacy server is reachable), over plain HTTP on
``metrics.listen`` (keep it on loopback or a management network).

A scrape reads the proxy's state as it is (sessions, connections, the ledgers of live and of
ended sessions, the store's queues); nothing is counted on the hot path for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable
from typing import Any

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
    def __init__(self, host: str, port: int, *, gather: Callable[[], Iterable[str]],
                 healthy: Callable[[], bool], upstream: tuple[str, int], log: Any) -> None:
        self.host, self.port = host, port
        self.gather = gather
        self.healthy = healthy
        self.upstream = upstream
        self.log = log
        self._server: asyncio.Server | None = None
        self._ready: tuple[float, bool, str] | None = None  # (checked at, ready, detail)

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
            status, body = "200 OK", "".join(f"{x}\n" for x in self.gather())
        elif path == "/healthz":
            ok = self.healthy()
            status, body = ("200 OK", "ok\n") if ok else ("503 Service Unavailable",
                                                          "listeners down\n")
        elif path == "/readyz":
            ready, detail = await self._upstream_ready()
            status, body = (("200 OK", "ready\n") if ready else
                            ("503 Service Unavailable", f"not ready: {detail}\n"))
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
        now = time.monotonic()
        if self._ready is not None and now - self._ready[0] < READY_CACHE:
            return self._ready[1], self._ready[2]
        host, port = self.upstream
        try:
            async with asyncio.timeout(2.0):
                _, writer = await asyncio.open_connection(host, port)
            writer.close()
            ready, detail = True, ""
        except (OSError, TimeoutError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else \
                type(exc).__name__
            ready, detail = False, f"the legacy server at {host}:{port}: {why}"
        self._ready = (now, ready, detail)
        return ready, detail


def prometheus(name: str, kind: str, help_text: str,
               samples: Iterable[tuple[dict[str, str], float]]) -> list[str]:
    """One metric family in the Prometheus text format."""
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for labels, value in samples:
        label_text = ",".join(f'{k}="{v}"' for k, v in labels.items())
        lines.append(f"{name}{{{label_text}}} {value:g}" if label_text else f"{name} {value:g}")
    return lines
