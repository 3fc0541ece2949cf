"""An XML stream over an asyncio connection: bytes from the socket become codec events.

This is shell code: it reads, writes, upgrades to TLS and closes. What the events mean is
decided by the callers and the pure cores.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from lxml import etree

from ..xmpp import codec, ns
from ..xmpp.stanza import Element
from . import tls_transport


READ_CHUNK = 65536
# A polite close (what is queued, then TLS close_notify) can be held up by a peer that reads
# nothing; after this long the transport is dropped instead.
CLOSE_GRACE = 2.0
CLOSE_DRAIN_TIMEOUT = 5.0  # seconds a closing stream waits for its last bytes to leave
# Over the hard output limit a stream is checked this often; it is cut when its buffer has
# not shrunk since the last check (the peer reads nothing), not merely for being large: a
# resumed session's resend or a big roster may pass the limit for a client that reads.
OVERFLOW_CHECK = 1.0
OUTPUT_CHECK_EVERY = 8  # events between two looks at a client's pending output
OVERFLOW_GRACE = 2.0  # seconds the policy-violation gets to go out before the cut
# A stream that read nothing for this long drops its parser between stanzas (the codec's
# release: ~13 KiB of libxml2 each) and gets a fresh one with its next bytes. Checked by one
# timer per stream, re-armed at most once per period, so a busy stream pays nothing per read.
PARSER_IDLE = 2.0
# What streams free while idle leaves holes in the C heap, which stay resident: the heap is
# trimmed (glibc's malloc_trim: its free pages go back to the system) once releases have
# stopped for HEAP_TRIM_QUIET seconds, and at least every HEAP_TRIM_EVERY while they go on
# (a trim of a large heap takes tens of milliseconds, so never more often).
HEAP_TRIM_QUIET = 1.0
HEAP_TRIM_EVERY = 30.0


_NO_EVENTS: tuple[codec.StreamEvent, ...] = ()


class OutputFull:
    """What ``poll_event`` returns while too much waits for the peer (see ``output_room``)."""

    def __repr__(self) -> str:
        return "OUTPUT_FULL"


OUTPUT_FULL = OutputFull()


class PushReader(asyncio.StreamReader):
    """asyncio's StreamReader, which can also call back instead of being awaited.

    An idle connection that is read by ``await reader.read()`` holds a task, its coroutine
    frames and a future for as long as it is idle (about 5 KiB for the two legs of a
    session). With ``listen`` it holds one callback: the relay pumps are called when bytes,
    the end or an error arrive, then take what is there with ``read_nowait``.
    """

    # StreamReader's own state, which this subclass reads (typeshed does not declare it).
    _buffer: bytearray
    _eof: bool
    _exception: BaseException | None
    _paused: bool
    _transport: Any
    _loop: asyncio.AbstractEventLoop

    def __init__(self, limit: int = 2 ** 16,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(limit=limit, loop=loop)
        self._listener: Callable[[], None] | None = None

    def listen(self, callback: Callable[[], None]) -> None:
        """Have ``callback`` called once, on a later turn of the loop, when there is
        something to read (bytes, the end, an error): at once if there is already."""
        if self._buffer or self._eof or self._exception is not None:
            self._loop.call_soon(callback)
            return
        self._listener = callback
        if self._paused:  # as read() does before it waits: a paused reader would never hear
            self._paused = False
            self._transport.resume_reading()

    def unlisten(self) -> None:
        self._listener = None

    def _wakeup_waiter(self) -> None:  # feed_data and feed_eof call it
        super()._wakeup_waiter()  # type: ignore[misc]
        self._tell_listener()

    def set_exception(self, exc: Exception) -> None:  # a reset: it wakes no waiter
        super().set_exception(exc)
        self._tell_listener()

    def _tell_listener(self) -> None:
        listener = self._listener
        if listener is not None:
            self._listener = None
            self._loop.call_soon(listener)

    def read_nowait(self, n: int) -> bytes | None:
        """Up to ``n`` bytes that are here now; b"" at the end; None: nothing yet.
        Raises what the connection failed with, as ``read`` does."""
        if self._exception is not None:
            raise self._exception
        buffer = self._buffer
        if not buffer:
            return b"" if self._eof else None
        data = bytes(buffer[:n])
        del buffer[:n]
        self._maybe_resume_transport()  # type: ignore[attr-defined]
        return data


def _push_protocol(client_connected_cb: Any, limit: int,
                   loop: asyncio.AbstractEventLoop) -> asyncio.StreamReaderProtocol:
    return asyncio.StreamReaderProtocol(PushReader(limit=limit, loop=loop),
                                        client_connected_cb, loop=loop)


async def start_server(client_connected_cb: Any, host: str | None = None,
                       port: int | None = None, *, limit: int = 2 ** 16,
                       **kwargs: Any) -> asyncio.Server:
    """``asyncio.start_server`` whose connections are read by a PushReader."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        functools.partial(_push_protocol, client_connected_cb, limit, loop),
        host, port, **kwargs)


async def start_unix_server(client_connected_cb: Any, path: str | None = None, *,
                            limit: int = 2 ** 16, **kwargs: Any) -> asyncio.Server:
    """``asyncio.start_unix_server`` whose connections are read by a PushReader."""
    loop = asyncio.get_running_loop()
    return await loop.create_unix_server(
        functools.partial(_push_protocol, client_connected_cb, limit, loop),
        path, **kwargs)


async def open_connection(host: str, port: int, *, limit: int = 2 ** 16,
                          **kwargs: Any) -> tuple[PushReader, asyncio.StreamWriter]:
    """``asyncio.open_connection`` with a PushReader."""
    loop = asyncio.get_running_loop()
    reader = PushReader(limit=limit, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport, _ = await loop.create_connection(lambda: protocol, host, port, **kwargs)
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


class _HeapTrim(threading.local):
    """The trim this thread's event loop has scheduled, and since when one is owed."""

    handle: asyncio.TimerHandle | None = None
    owed_since: float | None = None


_heap_trim = _HeapTrim()


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none (musl, other systems)."""
    try:
        return ctypes.CDLL(None).malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


def trim_heap_soon() -> None:
    """Memory was freed: trim the heap once things are quiet (HEAP_TRIM_QUIET), or after
    HEAP_TRIM_EVERY at the latest."""
    if _malloc_trim() is None:
        return
    loop = asyncio.get_running_loop()
    state = _heap_trim
    now = loop.time()
    if state.owed_since is None:
        state.owed_since = now
    if state.handle is not None:
        state.handle.cancel()
    state.handle = loop.call_at(min(now + HEAP_TRIM_QUIET, state.owed_since + HEAP_TRIM_EVERY),
                                _trim_heap)


def _trim_heap() -> None:
    _heap_trim.handle = None
    _heap_trim.owed_since = None
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class ConnectionLost(Exception):
    """The TCP connection ended (EOF, reset or timeout) without a clean stream close."""


class PlaintextInjection(Exception):
    """Bytes arrived after ``<starttls/>`` (or ``<proceed/>``) and before the TLS handshake:
    they were sent in the clear and must never be taken as if they came over TLS."""

    def __init__(self, *, buffered: int, parsed: int, events: int) -> None:
        super().__init__(f"{buffered + parsed} plaintext bytes and {events} elements "
                         "after the STARTTLS boundary")
        self.buffered = buffered  # unread bytes in the socket reader
        self.parsed = parsed  # bytes the parser had after the boundary element
        self.events = events  # complete elements after it, not yet handled


class XmlStream:
    """One side of a connection: parse what the peer sends, serialize what we send.

    ``track_trailing``: the connection is still plaintext and will be upgraded with
    STARTTLS, so the parser must know exactly what follows the boundary element.
    ``output_soft``/``output_hard``: bytes waiting to go to the peer (ours and the
    transport's) above which reading from it stops, and at which it is cut off.
    ``error_header``: our stream header, sent before a stream error when we have not sent
    one yet (RFC 6120 §4.9.1.2).
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                 max_stanza_bytes: int = codec.DEFAULT_MAX_STANZA_BYTES,
                 max_depth: int = codec.DEFAULT_MAX_DEPTH, track_trailing: bool = False,
                 output_soft: int | None = None, output_hard: int | None = None,
                 error_header: bytes | None = None, log: Any = None) -> None:
        self.reader = reader
        self.writer = writer
        self.parser = codec.XmlStreamParser(max_stanza_bytes=max_stanza_bytes,
                                            max_depth=max_depth,
                                            track_trailing=track_trailing)
        # Events parsed and not yet handed out: self._events[self._next:]. The list a read
        # produced is dropped once handed out, so an idle stream holds none.
        self._events: Sequence[codec.StreamEvent] = _NO_EVENTS
        self._next = 0
        self.closing = False
        self.dead = False  # the connection ended under us (EOF, reset)
        self.overflowed = False  # cut off past output_hard
        self._pending_out: list[bytes] = []
        self._since_output_check = 0
        self._pending_size = 0
        self.output_soft = output_soft
        self.output_hard = output_hard
        self.header_sent = False  # our header for the current stream (since the restart)
        self.error_header = error_header or codec.stream_header()
        self.log = log
        self._overflow_check: asyncio.TimerHandle | None = None
        self._idle_check: asyncio.TimerHandle | None = None
        self._read_timer: asyncio.TimerHandle | None = None  # when_readable's timeout
        self._room_waited = False  # output_room just returned: poll_event reads once
        # The peer's address: the socket's, or what a PROXY protocol header said.
        peer = writer.get_extra_info("peername")
        self.remote: tuple[str, int] | None = (str(peer[0]), int(peer[1])) if peer else None
        self.read_at = 0.0  # perf_counter() of the last read from the socket
        # Bytes of what is sent, by element tag, for /metrics (proxy/metrics.py Counters).
        self.sent_bytes: dict[str, int] | None = None
        self._fit_write_buffer()
        _lighten(writer)

    def _fit_write_buffer(self) -> None:
        """The transport must pause (so that a drain waits) before output_soft is passed."""
        if self.output_soft is None:
            return
        with contextlib.suppress(Exception):
            transport = self.writer.transport
            low, high = transport.get_write_buffer_limits()
            if high > self.output_soft:
                transport.set_write_buffer_limits(high=self.output_soft,
                                                  low=min(low, self.output_soft // 4))

    @property
    def output_bytes(self) -> int:
        """Bytes written but not yet handed to the kernel: ours and the transport's."""
        return self._pending_size + self._transport_buffered()

    @property
    def peer(self) -> str:
        addr = self.remote
        if addr is None:
            return "?"
        return f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"

    def endpoints(self) -> tuple[tuple[str, int] | None, tuple[str, int] | None]:
        """The peer's address and ours (the one it connected to), for a PROXY header."""
        local = self.writer.get_extra_info("sockname")
        return self.remote, ((str(local[0]), int(local[1]))
                             if isinstance(local, tuple) and len(local) >= 2 else None)

    @property
    def peer_host(self) -> str:
        return self.remote[0] if self.remote is not None else "?"

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
        if self.output_soft is not None and self._output_full():
            await self.output_room()
        while self._next >= len(self._events):
            deadline = None
            if self.overflowed:
                raise ConnectionLost("output overflow")
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
            self._take(data)
        return self._pop()

    def _output_full(self) -> bool:
        """Before each read, and every few events between: the answers to at most
        OUTPUT_CHECK_EVERY elements can pass the soft limit, and a batch of stanzas does
        not pay for a look at the transport per stanza."""
        self._since_output_check += 1
        if self._next >= len(self._events) or \
                self._since_output_check >= OUTPUT_CHECK_EVERY:
            self._since_output_check = 0
            assert self.output_soft is not None
            return self.output_bytes > self.output_soft
        return False

    def _pop(self) -> codec.StreamEvent:
        """The next parsed event (there is one); the list is dropped with its last."""
        events, at = self._events, self._next
        self._next = at + 1
        if self._next == len(events):
            self._events, self._next = _NO_EVENTS, 0
        return events[at]

    def _take(self, data: bytes) -> None:
        """What a read brought (b"": the end) goes to the parser."""
        if not data:
            self.dead = True
            raise ConnectionLost("eof")
        self.read_at = time.perf_counter()
        self._events, self._next = self.parser.feed(data), 0
        if self._idle_check is None:
            self._idle_check = asyncio.get_running_loop().call_later(
                PARSER_IDLE, self._release_when_idle)

    # Read by callbacks (the relay pumps), with no task: poll_event, when_readable -----------

    def poll_event(self) -> codec.StreamEvent | OutputFull | None:
        """The next event if there is one now, parsed or in the reader's buffer (the reader
        must be a PushReader); None: nothing yet (``when_readable``); OUTPUT_FULL: more than
        ``output_soft`` waits for the peer, await ``output_room`` before reading on.
        ConnectionLost as ``next_event`` raises it."""
        if self.output_soft is not None:
            if self._room_waited:
                self._room_waited = False  # output_room gave up on the peer: read on
            elif self._output_full():
                return OUTPUT_FULL
        while self._next >= len(self._events):
            if self.overflowed:
                raise ConnectionLost("output overflow")
            reader: PushReader = self.reader  # type: ignore[assignment]
            try:
                data = reader.read_nowait(READ_CHUNK)
            except (OSError, ssl.SSLError, TimeoutError) as exc:
                self.dead = True  # a TimeoutError here is the transport's (a TLS shutdown)
                raise ConnectionLost(type(exc).__name__) from exc
            if data is None:
                return None
            self._take(data)
        return self._pop()

    def when_readable(self, callback: Callable[[], None], timeout: float | None = None,
                      on_timeout: Callable[[], None] | None = None) -> None:
        """Call ``callback`` once there is something to read (then ``poll_event``);
        ``on_timeout`` instead when nothing came within ``timeout`` seconds."""
        reader: PushReader = self.reader  # type: ignore[assignment]
        if timeout is None:
            reader.listen(callback)
            return
        assert on_timeout is not None
        self._read_timer = asyncio.get_running_loop().call_later(
            timeout, self._read_timed_out, on_timeout)
        reader.listen(functools.partial(self._readable, callback))

    def _readable(self, callback: Callable[[], None]) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None
        callback()

    def _read_timed_out(self, on_timeout: Callable[[], None]) -> None:
        self._read_timer = None
        self.reader.unlisten()  # type: ignore[attr-defined]
        on_timeout()

    def stop_listening(self) -> None:
        """No callback for this stream's reads any more (its pump is stopping)."""
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None
        unlisten = getattr(self.reader, "unlisten", None)
        if unlisten is not None:
            unlisten()

    def _release_when_idle(self) -> None:
        """Drop the parser of a stream that has read nothing for PARSER_IDLE; look again
        later while it reads or is inside a stanza."""
        self._idle_check = None
        if self.closing or self.dead:
            return
        quiet = time.perf_counter() - self.read_at
        if quiet >= PARSER_IDLE and self.parser.release():
            trim_heap_soon()
            return  # the next read arms the check again
        self._idle_check = asyncio.get_running_loop().call_later(
            max(PARSER_IDLE - quiet, 0.0) or PARSER_IDLE, self._release_when_idle)

    def ready_event(self) -> codec.StreamEvent | None:
        """The next event if it is already parsed and nothing is due before it (a look at
        the pending output: ``poll_event`` and ``next_event`` do that); None: call one of
        them. The relay pumps take a read's stanzas this way, one cheap call per stanza."""
        events, at = self._events, self._next
        if at >= len(events):
            return None
        if self.output_soft is not None:
            if self._since_output_check + 1 >= OUTPUT_CHECK_EVERY:
                return None
            self._since_output_check += 1
        self._next = at + 1
        if at + 1 == len(events):
            self._events, self._next = _NO_EVENTS, 0
        return events[at]

    def take_events(self) -> list[codec.StreamEvent]:
        """The events parsed but not yet read (a connection handed to another worker)."""
        events = list(self._events[self._next:])
        self._events, self._next = _NO_EVENTS, 0
        return events

    def relayed(self) -> None:
        """The connection's bytes go to another worker from now on (``worker_link.relay``):
        this stream parses nothing more, so it holds no parser nor idle check meanwhile."""
        if self._idle_check is not None:
            self._idle_check.cancel()
            self._idle_check = None
        self._events, self._next = _NO_EVENTS, 0
        self.parser.reset()  # ends lxml's document: nothing it made keeps the parser

    def put_back(self, events: list[codec.StreamEvent]) -> None:
        """Events read ahead (while waiting for one answer) go first to the next reader."""
        self._events, self._next = [*events, *self._events[self._next:]], 0

    async def next_element(self, timeout: float | None = None) -> Element:
        """The next top-level element; anything else (close, violation) is raised."""
        event = await self.next_event(timeout)
        if isinstance(event, codec.StanzaReceived):
            return event.element
        raise UnexpectedEvent(event)

    def _transport_buffered(self) -> int:
        try:
            return int(self.writer.transport.get_write_buffer_size())
        except Exception:
            return 0

    async def output_room(self) -> None:
        """Back-pressure on a peer that does not read: while more than ``output_soft``
        bytes wait for it, nothing more is read from it (and so nothing more answered)."""
        soft = self.output_soft
        assert soft is not None
        self._room_waited = True
        if self.log is not None:
            self.log.debug("output_backpressure", pending=self.output_bytes, soft=soft)
        while self.output_bytes > soft and not (self.dead or self.overflowed
                                                or self.writer.is_closing()):
            self.flush()
            try:
                await self.writer.drain()
            except (OSError, ssl.SSLError):
                return  # the read that follows reports the loss
            if self.output_bytes > soft:
                await asyncio.sleep(0.05)  # drain returns at once if the transport never paused

    def send(self, el: Element, document: bytes | None = None) -> None:
        """``document``: ``el`` as ``codec.document`` made it (not serialized again)."""
        data = codec.serialize(el, document=document)
        counts = self.sent_bytes
        if counts is not None:
            tag = el.tag
            counts[tag] = counts.get(tag, 0) + len(data)
        self.send_bytes(data)

    def send_header(self, header: bytes) -> None:
        """Our stream header for the current stream (initial or after a restart)."""
        self.header_sent = True
        self.send_bytes(header)

    def framed(self, error: bytes) -> bytes:
        """A stream error as it must go out: after our header if we have not sent one, or
        the peer gets an unbound ``stream:`` prefix outside any document."""
        return error if self.header_sent else self.error_header + error

    def send_bytes(self, data: bytes) -> None:
        """Queue ``data``; everything queued in one turn of the event loop goes out as one
        write (one TLS record, one syscall) instead of one per stanza."""
        if not self._pending_out:
            asyncio.get_running_loop().call_soon(self.flush)
        self._pending_out.append(data)
        self._pending_size += len(data)

    def flush(self) -> None:
        if not self._pending_out:
            return
        data = b"".join(self._pending_out)
        self._pending_out.clear()
        self._pending_size = 0
        # Nothing for a peer that is gone: asyncio would only log a warning per write.
        if not self.dead and not self.writer.is_closing():
            self.writer.write(data)
            if self.output_hard is not None and self._overflow_check is None and \
                    not self.overflowed and self._transport_buffered() > self.output_hard:
                self._watch_overflow(self._transport_buffered())

    def _watch_overflow(self, last: int) -> None:
        self._overflow_check = asyncio.get_running_loop().call_later(
            OVERFLOW_CHECK, self._check_overflow, last)

    def _check_overflow(self, last: int) -> None:
        self._overflow_check = None
        if self.dead or self.overflowed or self.writer.is_closing():
            return
        now = self._transport_buffered()
        assert self.output_hard is not None
        if now <= self.output_hard:
            return
        if now >= last:
            self._overflow()
        else:
            self._watch_overflow(now)  # it reads, slowly: look again

    def _overflow(self) -> None:
        """Past the hard limit without reading: a policy-violation goes behind what is
        queued, the stream is closed, and the connection is cut if the peer still reads
        nothing."""
        self.overflowed = True
        self.closing = True
        pending = self._transport_buffered()
        if self.log is not None:
            self.log.warning("output_overflow", pending=pending, hard=self.output_hard)
        self.writer.write(self.framed(codec.stream_error(
            "policy-violation", "the client does not read what it is sent"))
            + codec.STREAM_CLOSE)
        transport = self.writer.transport
        with contextlib.suppress(Exception):
            transport.close()  # stops reading; the buffer still goes out if it can
        asyncio.get_running_loop().call_later(OVERFLOW_GRACE, transport.abort)

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
        self._events, self._next = _NO_EVENTS, 0
        self.header_sent = False

    def _plaintext_after_boundary(self) -> PlaintextInjection | None:
        # asyncio's StreamReader has no peek: its buffer is the only place to look.
        buffer: bytearray | None = getattr(self.reader, "_buffer", None)
        buffered = len(bytes(buffer).strip()) if buffer else 0
        if buffer and not buffered:
            buffer.clear()  # only whitespace: dropping it is safe
        parsed, events = self.parser.trailing_bytes, len(self._events) - self._next
        if buffered or parsed or events:
            return PlaintextInjection(buffered=buffered, parsed=parsed, events=events)
        return None

    async def start_tls(self, context: ssl.SSLContext, *, server_side: bool = True,
                        server_hostname: str | None = None,
                        session: ssl.SSLSession | None = None, timeout: float = 10.0) -> None:
        """Upgrade to TLS (``tls_transport``; ``session``: one to resume, client side).
        RFC 6120 §5.4.3.3: nothing received in the clear may be used once TLS is on;
        anything already received past the ``<starttls/>``/``<proceed/>`` element (read,
        parsed or queued) raises PlaintextInjection and TLS is not started.
        """
        async with asyncio.timeout(timeout):
            await self.drain()
        # From here until the plain transport stops reading (the first thing start_tls
        # does) nothing yields to the event loop, so no byte can slip in between the check
        # and the switch; what arrives later is the handshake's (and fails it if not TLS).
        injected = self._plaintext_after_boundary()
        if injected is not None:
            raise injected
        await tls_transport.start_tls(self.reader, self.writer, context,
                                      server_side=server_side,
                                      server_hostname=server_hostname, session=session,
                                      timeout=timeout)
        self.parser.track_trailing = False  # only one STARTTLS per connection
        self.restart()
        self._fit_write_buffer()

    async def close(self, error: bytes | None = None, *, wait_for_peer: float = 0.0) -> None:
        """Close the stream: an optional stream error, then ``</stream:stream>``.

        With ``wait_for_peer`` the peer gets that long to close its side first (RFC 6120
        §4.4), so stanzas it sent before its close are not cut off.
        """
        if self.closing:
            return
        self.closing = True
        self.send_bytes((self.framed(error) if error else b"") + codec.STREAM_CLOSE)
        # A peer that reads nothing must not keep this task (and the buffer) forever.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_DRAIN_TIMEOUT):
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
        if self._overflow_check is not None:
            self._overflow_check.cancel()
            self._overflow_check = None
        if self._idle_check is not None:
            self._idle_check.cancel()
            self._idle_check = None
        if self._read_timer is not None:  # the pump hears the end from the reader
            self._read_timer.cancel()
            self._read_timer = None
        transport = self.writer.transport
        if hard:
            self._pending_out.clear()
            self._pending_size = 0
            self.dead = True
            with contextlib.suppress(Exception):
                transport.abort()
            return
        self.flush()
        with contextlib.suppress(Exception):
            self.writer.close()
            asyncio.get_running_loop().call_later(CLOSE_GRACE, _force_close, transport)


def _lighten(writer: asyncio.StreamWriter) -> None:
    """asyncio's stream protocol keeps its drain waiters in a deque, 760 bytes while empty,
    which it nearly always is; it only appends, iterates and removes: a list does the same."""
    protocol = writer.transport.get_protocol()
    waiters = getattr(protocol, "_drain_waiters", None)
    if isinstance(waiters, deque) and not waiters:
        protocol._drain_waiters = []  # type: ignore[attr-defined]


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
