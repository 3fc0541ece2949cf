"""A fault-injecting TCP relay (proxy ⇄ relay ⇄ server) for outage tests.

It runs its own event loop in its own thread, so both sync tests and async tests (on
their own loop) can flip its mode at any time; every switch is applied on the relay's
loop and has taken effect when the call returns.

Modes (they apply to current and new connections):
- pass_through(): relay bytes as they come;
- delay(seconds): relay every chunk `seconds` late (latency, not a throughput cap);
- blackhole(): accept/keep connections but silently drop bytes (and FINs) both ways;
  a TLS stream that lost bytes is corrupt for good (the peer's next record fails);
- stall(): hold bytes (and FINs) both ways, deliver them all when the mode changes
  back (a network outage TCP survives by retransmitting);
- refuse(): close the listening socket, so new connections get ECONNREFUSED
  (established ones are left alone; the next pass_through/delay/blackhole re-listens
  on the same port).
Actions: reset() aborts all current connections with a TCP RST on both sides;
blackhole_existing() blackholes the current connections for good while new ones pass.

If the target refuses while the relay accepts (server down, relay up), the accepted
connection is closed at once: what a proxy sees as "connected, then EOF".
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import socket
import struct
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self, TypeVar

from .util import LOCALHOST

T = TypeVar("T")

_CHUNK = 65536
_EOF = None


class Mode(enum.Enum):
    PASS = "pass"
    DELAY = "delay"
    BLACKHOLE = "blackhole"
    STALL = "stall"
    REFUSE = "refuse"


def _rst_abort(writer: asyncio.StreamWriter) -> None:
    """Close with RST, not FIN: SO_LINGER on, timeout 0, then close."""
    transport = writer.transport
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


@dataclass(eq=False)
class _Conn:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    blackholed: bool = False  # this connection only, whatever the relay's mode

    def reset(self) -> None:
        _rst_abort(self.client)
        _rst_abort(self.upstream)
        for task in self.tasks:
            task.cancel()


class FaultRelay:
    """TCP relay on 127.0.0.1:`port` → target_host:target_port, with injectable faults."""

    def __init__(
        self, target_host: str, target_port: int, *, host: str = LOCALHOST, port: int = 0,
        connect_timeout: float = 5.0,
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.host = host
        self._port = port
        self.connect_timeout = connect_timeout
        self.connections_total = 0  # accepted client connections, ever
        self._mode = Mode.PASS
        self._delay = 0.0
        self._conns: set[_Conn] = set()
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._flowing: asyncio.Event | None = None  # clear while stalled (relay loop only)
        self._handlers: set[asyncio.Task[Any]] = set()  # every connection's task

    # -- public, thread-safe ---------------------------------------------------------------

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError("FaultRelay.port is known only after start()")
        return self._port

    @property
    def mode(self) -> Mode:
        return self._mode

    @property
    def connections_active(self) -> int:
        return len(self._conns)

    def start(self) -> Self:
        if self._thread is not None:
            return self
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=self._run_loop, name="FaultRelay", daemon=True)
        self._thread.start()
        try:
            self._call(self._listen())
        except BaseException:
            self.stop()  # e.g. a fixed `port` in use: do not leave the thread behind
            raise
        return self

    def stop(self) -> None:
        """Close the listener and all connections, end the thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        with contextlib.suppress(Exception):
            self._call(self._shutdown())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5.0)
        if not thread.is_alive():
            loop.close()
        self._loop = None
        self._thread = None

    def pass_through(self) -> None:
        self._set_mode(Mode.PASS, 0.0)

    def delay(self, seconds: float) -> None:
        self._set_mode(Mode.DELAY, float(seconds))

    def blackhole(self) -> None:
        self._set_mode(Mode.BLACKHOLE, 0.0)

    def blackhole_existing(self) -> None:
        """Blackhole the connections open now, for good; new ones pass through (a path
        that died under a connection the server never saw end)."""
        self._call(self._blackhole_existing())

    async def _blackhole_existing(self) -> None:
        for conn in self._conns:
            conn.blackholed = True

    def stall(self) -> None:
        self._set_mode(Mode.STALL, 0.0)

    def refuse(self) -> None:
        self._set_mode(Mode.REFUSE, 0.0)

    def reset(self) -> None:
        """RST every current connection (both sides); the mode stays as it is."""
        self._call(self._reset_all())

    def wait_connections(self, total: int, timeout: float = 10.0) -> None:
        """Block until `connections_total` reaches `total` (sync tests)."""
        deadline = time.monotonic() + timeout
        while self.connections_total < total:
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"relay saw {self.connections_total} connections, wanted {total}"
                )
            time.sleep(0.02)

    async def wait_connections_async(self, total: int, timeout: float = 10.0) -> None:
        """Same as wait_connections, from a test's own event loop."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.connections_total < total:
            if loop.time() >= deadline:
                raise TimeoutError(
                    f"relay saw {self.connections_total} connections, wanted {total}"
                )
            await asyncio.sleep(0.02)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (f"FaultRelay({self.host}:{self._port} -> {self.target_host}:"
                f"{self.target_port}, mode={self._mode.value}, delay={self._delay})")

    # -- plumbing ------------------------------------------------------------------------

    def _run_loop(self) -> None:
        assert self._loop is not None
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        """Run `coro` on the relay's loop and wait for it (never from the relay thread)."""
        if self._loop is None:
            coro.close()
            raise RuntimeError("FaultRelay not started")
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("FaultRelay methods must not be called from its own thread")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _set_mode(self, mode: Mode, delay: float) -> None:
        with self._lock:  # serialise switches from several threads
            self._call(self._apply_mode(mode, delay))

    async def _apply_mode(self, mode: Mode, delay: float) -> None:
        self._mode, self._delay = mode, delay
        assert self._flowing is not None
        if mode is Mode.STALL:
            self._flowing.clear()
        else:
            self._flowing.set()
        if mode is Mode.REFUSE:
            if self._server is not None:
                # Not wait_closed(): from 3.12 on it also waits for the connections.
                self._server.close()
                self._server = None
        elif self._server is None:
            await self._listen()

    async def _listen(self) -> None:
        if self._flowing is None:
            self._flowing = asyncio.Event()
            self._flowing.set()
        self._server = await asyncio.start_server(
            self._handle, self.host, self._port, reuse_address=True
        )
        self._port = int(self._server.sockets[0].getsockname()[1])

    async def _reset_all(self) -> None:
        for conn in list(self._conns):
            conn.reset()
        self._conns.clear()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        await self._reset_all()
        # Let every connection task finish before the loop stops (no pending-task noise).
        for task in self._handlers:
            task.cancel()
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=2.0)

    async def _handle(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        self.connections_total += 1
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)
        if self._mode is Mode.REFUSE:  # raced with refuse(): close at once
            c_writer.transport.abort()
            return
        try:
            u_reader, u_writer = await asyncio.wait_for(
                asyncio.open_connection(self.target_host, self.target_port),
                self.connect_timeout,
            )
        except (TimeoutError, OSError):
            c_writer.transport.abort()  # target down: accepted, then closed at once
            return
        conn = _Conn(c_writer, u_writer)
        self._conns.add(conn)
        conn.tasks = [task]
        try:
            await asyncio.gather(
                self._direction(c_reader, u_writer, conn),
                self._direction(u_reader, c_writer, conn),
            )
        except asyncio.CancelledError:
            pass
        finally:
            self._conns.discard(conn)
            for writer in (c_writer, u_writer):
                writer.transport.abort()

    async def _direction(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: _Conn
    ) -> None:
        """One direction: a reader stamps chunks, a writer delivers them when due."""
        queue: asyncio.Queue[tuple[float, bytes | None]] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        async def read_side() -> None:
            while True:
                try:
                    data = await reader.read(_CHUNK)
                except (ConnectionError, OSError):
                    conn.reset()  # pass a reset on as a reset
                    return
                if self._mode is Mode.BLACKHOLE or conn.blackholed:
                    if not data:
                        return  # a blackhole swallows the FIN as well
                    continue
                queue.put_nowait((loop.time() + self._delay, data or _EOF))
                if not data:
                    return

        async def write_side() -> None:
            while True:
                due, data = await queue.get()
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                assert self._flowing is not None
                await self._flowing.wait()  # held here while stalled
                if data is _EOF:
                    with contextlib.suppress(OSError, RuntimeError):
                        if writer.can_write_eof():
                            writer.write_eof()
                        else:
                            writer.close()
                    return
                if self._mode is Mode.BLACKHOLE or conn.blackholed:
                    continue
                try:
                    writer.write(data)
                    await writer.drain()
                except (ConnectionError, OSError):
                    conn.reset()
                    return

        await asyncio.gather(read_side(), write_side())
