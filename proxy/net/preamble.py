"""What comes before a client's XML stream: a PROXY protocol header from the load balancer
in front (when the listener asks for one) and, on a direct-TLS listener, the TLS handshake.

Shell code. The handshake is the proxy's own (``tls_transport``) rather than asyncio's
listener-level TLS so that its failures are seen and logged (asyncio drops them silently)
and so that it can follow a PROXY header. OpenSSL reads the socket itself, so nothing of
the ClientHello may be read before it: on a direct-TLS listener the header is read from the
socket exactly (``read_proxy_header_from``), never a byte past it.
"""

from __future__ import annotations

import asyncio
import socket
import ssl

from ..proxyproto import ProxyHeader, more_needed, parse
from .tls_transport import wait_readable

PEEK_SIZE = 65536 + 16  # the largest PROXY v2 header


async def read_proxy_header(reader: asyncio.StreamReader) -> ProxyHeader:
    """Read exactly one PROXY header (nothing after it). BadProxyHeader when the bytes
    are not one; asyncio.IncompleteReadError when the connection ends first."""
    data = b""
    while (n := more_needed(data)) > 0:
        data += await reader.readexactly(n)
    return parse(data)


def _header_end(data: bytes) -> int | None:
    """Where the PROXY header at the start of ``data`` ends; None when ``data`` holds only
    part of it. BadProxyHeader when it cannot be one."""
    size = 0
    while (n := more_needed(data[:size])) > 0:
        if size + n > len(data):
            return None
        size += n
    return size


async def read_proxy_header_from(sock: socket.socket) -> ProxyHeader:
    """Read exactly one PROXY header from the non-blocking ``sock``: what is there is
    peeked at (MSG_PEEK) and only the header's own bytes are taken, so the ClientHello
    behind it, even in the same segment, stays for TLS. The same errors as
    ``read_proxy_header``."""
    taken = b""
    while True:
        await wait_readable(sock)
        try:
            peeked = sock.recv(PEEK_SIZE, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            continue
        if not peeked:
            raise asyncio.IncompleteReadError(taken, None)
        end = _header_end(taken + peeked)
        # Part of the header only: all of it is the header's (more_needed never asks
        # past its end), and taking it keeps the socket from staying readable.
        want = len(peeked) if end is None else end - len(taken)
        taken += _recv_exactly(sock, want)
        if end is not None:
            return parse(taken)


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    """``size`` bytes that were just peeked at (they are in the socket's buffer)."""
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise asyncio.IncompleteReadError(data, size)
        data += chunk
    return data


def tls_failure_reason(exc: BaseException) -> str:
    """What a failed handshake says, for the log: OpenSSL's reason, or how it ended."""
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or exc.strerror or exc)
    if isinstance(exc, TimeoutError):
        return "timeout"
    return f"connection lost ({type(exc).__name__})"
