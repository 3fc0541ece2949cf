"""What comes before a client's XML stream: a PROXY protocol header from the load balancer
in front (when the listener asks for one) and, on a direct-TLS listener, the TLS handshake.

Shell code. The handshake is the proxy's own rather than asyncio's listener-level TLS so
that its failures are seen and logged (asyncio drops them silently) and so that it can
follow a PROXY header: bytes the stream reader already holds when TLS starts (the
ClientHello sent right behind the header, or right on connect) are handed to TLS first.
"""

from __future__ import annotations

import asyncio
import ssl
from asyncio import sslproto
from typing import Any

from ..proxyproto import ProxyHeader, more_needed, parse


async def read_proxy_header(reader: asyncio.StreamReader) -> ProxyHeader:
    """Read exactly one PROXY header (nothing after it). BadProxyHeader when the bytes
    are not one; asyncio.IncompleteReadError when the connection ends first."""
    data = b""
    while (n := more_needed(data)) > 0:
        data += await reader.readexactly(n)
    return parse(data)


async def start_server_tls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                           context: ssl.SSLContext, timeout: float) -> None:
    """The server side of a TLS handshake on an accepted connection, as
    ``StreamWriter.start_tls`` does it but with what the reader already buffered fed to
    TLS first (``loop.start_tls`` would leave those bytes behind and wait forever)."""
    loop = asyncio.get_running_loop()
    transport: Any = writer.transport  # a socket transport: it pauses and resumes reading
    protocol: Any = transport.get_protocol()
    buffer: bytearray = reader._buffer  # type: ignore[attr-defined]
    held = bytes(buffer)
    buffer.clear()
    waiter = loop.create_future()
    tls: Any = sslproto.SSLProtocol(loop, protocol, context, waiter, server_side=True,
                                    ssl_handshake_timeout=timeout,  # type: ignore[arg-type]
                                    call_connection_made=False)
    transport.pause_reading()
    transport.set_protocol(tls)
    tls.connection_made(transport)
    while held:  # as if they had just arrived
        room = tls.get_buffer(len(held))
        size = min(len(room), len(held))
        room[:size] = held[:size]
        held = held[size:]
        tls.buffer_updated(size)
    transport.resume_reading()
    try:
        await waiter
    except BaseException:
        transport.close()
        raise
    # What StreamWriter.start_tls does with its new transport.
    writer._transport = tls._app_transport  # type: ignore[attr-defined]
    protocol._replace_writer(writer)


def tls_failure_reason(exc: BaseException) -> str:
    """What a failed handshake says, for the log: OpenSSL's reason, or how it ended."""
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or exc.strerror or exc)
    if isinstance(exc, TimeoutError):
        return "timeout"
    return f"connection lost ({type(exc).__name__})"
