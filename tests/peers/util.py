"""Small helpers shared by the real-peer test harness: event loop runner and ports."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

LOCALHOST = "127.0.0.1"


def run(coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
    """Run an async scenario from a sync test, bounded in time (no pytest-asyncio)."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        return int(sock.getsockname()[1])


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


async def wait_port(host: str, port: int, timeout: float = 10.0) -> None:
    """Wait until host:port accepts TCP connections; TimeoutError otherwise."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1.0)
        except (TimeoutError, OSError):
            if loop.time() >= deadline:
                raise TimeoutError(f"{host}:{port} not accepting after {timeout}s") from None
            await asyncio.sleep(0.05)
            continue
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), 1.0)
        except (TimeoutError, OSError):
            pass
        return


def wait_port_sync(
    host: str, port: int, timeout: float = 10.0, *, alive: Any = None
) -> None:
    """Sync twin of wait_port. `alive`, if given, is polled so a dead process fails fast."""
    deadline = time.monotonic() + timeout
    while not _port_open(host, port):
        if alive is not None and not alive():
            raise RuntimeError(f"process died before {host}:{port} accepted connections")
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{host}:{port} not accepting after {timeout}s")
        time.sleep(0.05)
