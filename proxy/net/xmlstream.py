"""An XML stream over an asyncio connection: bytes from the socket become codec events.

This is shell code: it reads, writes, upgrades to TLS and closes. What the events mean is
decided by the callers and the pure cores.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque

from lxml import etree

from ..xmpp import codec, ns
from ..xmpp.stanza import Element


READ_CHUNK = 65536
# A polite close (TLS close_notify) waits for the peer; a dead peer never answers, and
# asyncio's own TLS shutdown timeout (30 s) then surfaces as an error in the reader. After
# this long the transport is dropped instead.
CLOSE_GRACE = 2.0


class ConnectionLost(Exception):
    """The TCP connection ended (EOF, reset or timeout) without a clean stream close."""


class XmlStream:
    """One side of a connection: parse what the peer sends, serialize what we send."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                 max_stanza_bytes: int = codec.DEFAULT_MAX_STANZA_BYTES) -> None:
        self.reader = reader
        self.writer = writer
        self.parser = codec.XmlStreamParser(max_stanza_bytes=max_stanza_bytes)
        self._events: deque[codec.StreamEvent] = deque()
        self.closing = False
        self.dead = False  # the connection ended under us (EOF, reset)
        self._pending_out: list[bytes] = []

    @property
    def peer(self) -> str:
        addr = self.writer.get_extra_info("peername")
        return f"{addr[0]}:{addr[1]}" if addr else "?"

    @property
    def tls_info(self) -> dict[str, str | None]:
        sslobj = self.writer.get_extra_info("ssl_object")
        if sslobj is None:
            return {}
        cipher = sslobj.cipher()
        return {"tls_version": sslobj.version(), "cipher": cipher[0] if cipher else None}

    async def next_event(self, timeout: float | None = None) -> codec.StreamEvent:
        """The next stream event; ConnectionLost on EOF or a socket error, TimeoutError when
        nothing arrives within ``timeout``."""
        while not self._events:
            deadline = None
            try:
                if timeout is None:
                    data = await self.reader.read(READ_CHUNK)
                else:
                    # asyncio.timeout, not wait_for: in 3.11 wait_for can swallow a
                    # cancellation that races with a completed read.
                    async with asyncio.timeout(timeout) as deadline:
                        data = await self.reader.read(READ_CHUNK)
            except TimeoutError as exc:
                if deadline is not None and deadline.expired():
                    raise  # our own timeout: nothing arrived, the connection may be fine
                # The transport's (a TLS shutdown that timed out): the connection is gone.
                self.dead = True
                raise ConnectionLost(type(exc).__name__) from exc
            except (OSError, ssl.SSLError) as exc:
                self.dead = True
                raise ConnectionLost(type(exc).__name__) from exc
            if not data:
                self.dead = True
                raise ConnectionLost("eof")
            self._events.extend(self.parser.feed(data))
        return self._events.popleft()

    async def next_element(self, timeout: float | None = None) -> Element:
        """The next top-level element; anything else (close, violation) is raised."""
        event = await self.next_event(timeout)
        if isinstance(event, codec.StanzaReceived):
            return event.element
        raise UnexpectedEvent(event)

    def send(self, el: Element) -> None:
        self.send_bytes(codec.serialize(el))

    def send_bytes(self, data: bytes) -> None:
        """Queue ``data``; everything queued in one turn of the event loop goes out as one
        write (one TLS record, one syscall) instead of one per stanza."""
        if not self._pending_out:
            asyncio.get_running_loop().call_soon(self.flush)
        self._pending_out.append(data)

    def flush(self) -> None:
        if not self._pending_out:
            return
        data = b"".join(self._pending_out)
        self._pending_out.clear()
        # Nothing for a peer that is gone: asyncio would only log a warning per write.
        if not self.dead and not self.writer.is_closing():
            self.writer.write(data)

    @property
    def congested(self) -> bool:
        """More is buffered for the peer than asyncio's high-water mark: time to wait."""
        transport = self.writer.transport
        return transport.get_write_buffer_size() > transport.get_write_buffer_limits()[1]

    async def drain(self) -> None:
        self.flush()
        with contextlib.suppress(OSError, ssl.SSLError):
            await self.writer.drain()

    def restart(self) -> None:
        """Stream restart (after TLS or SASL): a fresh parser for the new header."""
        self.parser.reset()
        self._events.clear()

    async def start_tls(self, context: ssl.SSLContext, *, server_hostname: str | None = None,
                        timeout: float = 10.0) -> None:
        await asyncio.wait_for(
            self.writer.start_tls(context, server_hostname=server_hostname), timeout)
        self.restart()

    async def close(self, error: bytes | None = None, *, wait_for_peer: float = 0.0) -> None:
        """Close the stream: an optional stream error, then ``</stream:stream>``.

        With ``wait_for_peer`` the peer gets that long to close its side first (RFC 6120
        §4.4), so stanzas it sent before its close are not cut off.
        """
        if self.closing:
            return
        self.closing = True
        self.send_bytes((error or b"") + codec.STREAM_CLOSE)
        await self.drain()
        if wait_for_peer > 0:
            with contextlib.suppress(ConnectionLost, asyncio.TimeoutError, UnexpectedEvent):
                async with asyncio.timeout(wait_for_peer):
                    while not isinstance(await self.next_event(), codec.StreamClosed):
                        pass
        self.abort()

    def abort(self, *, hard: bool = False) -> None:
        """Close the connection without waiting for the peer's stream close.

        ``hard``: drop it at once, unsent bytes and all (a peer declared dead must not hold
        a TLS shutdown open). Otherwise what is queued is written and TLS is shut down
        politely, but never for longer than CLOSE_GRACE.
        """
        self.closing = True
        transport = self.writer.transport
        if hard:
            self._pending_out.clear()
            self.dead = True
            with contextlib.suppress(Exception):
                transport.abort()
            return
        self.flush()
        with contextlib.suppress(Exception):
            self.writer.close()
            asyncio.get_running_loop().call_later(CLOSE_GRACE, _force_close, transport)


def _force_close(transport: asyncio.BaseTransport) -> None:
    with contextlib.suppress(Exception):
        transport.abort()  # type: ignore[attr-defined]


class UnexpectedEvent(Exception):
    """A stream event arrived where a specific element was required."""

    def __init__(self, event: codec.StreamEvent) -> None:
        super().__init__(type(event).__name__)
        self.event = event


def features_element(*children: Element) -> Element:
    features = etree.Element(ns.qname(ns.STREAM, "features"), nsmap={"stream": ns.STREAM})
    for c in children:
        features.append(c)
    return features
