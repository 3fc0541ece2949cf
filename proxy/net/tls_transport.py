"""TLS over a non-blocking ``ssl.SSLSocket``, driven by the event loop's readers and writers.

Shell code. asyncio's own TLS (``sslproto.SSLProtocol``) keeps two memory BIOs, an
``SSLObject``, a state machine with Python-level read and write loops and a second transport
object per connection, and copies every byte between the socket and OpenSSL in Python. Here
OpenSSL reads and writes the socket itself (its socket BIO): one ``recv_into`` or ``send``
does the syscall and the crypto in C, and a connection is one ``SSLSocket`` and one small
transport.

``TlsTransport`` is an ``asyncio.Transport`` for ``asyncio.StreamReaderProtocol`` (and the
workers' relay, ``worker_link.py``). ``handshake`` wraps a connected socket and runs the
handshake; ``start_tls`` upgrades an open plain stream pair (STARTTLS on either leg, direct
TLS after the accept or the connect) in place. ``take_socket`` takes a plain transport's
socket away from it: the upgrade then owns the only descriptor.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import os
import socket
import ssl
import termios
import threading
from collections.abc import Iterable
from typing import Any

DEFAULT_READ_SIZE = 16896  # a TLS record (16 KiB) and its overhead: one read, one record
# A close waits this long for its last bytes and the close_notify to leave; a peer that reads
# nothing is dropped then (XmlStream gives up sooner: CLOSE_GRACE).
CLOSE_TIMEOUT = 10.0
HIGH_WATER = 64 * 1024  # asyncio's defaults for a socket transport
# A read callback hands at most this many records to the protocol before it lets the loop run
# the other connections (what OpenSSL still holds decrypted is handed out anyway).
READS_PER_TURN = 16


class _ReadBuffer(threading.local):
    """The read buffer every TLS connection of this thread's event loop shares: a read is
    copied out of it (``data_received`` gets bytes) before the next connection reads."""

    size = DEFAULT_READ_SIZE
    view: memoryview | None = None

    def get(self) -> memoryview:
        view = self.view
        if view is None or len(view) != self.size:
            view = self.view = memoryview(bytearray(self.size))
        return view


_read_buffer = _ReadBuffer()  # one per thread: each event loop reads into its own


class _Waiting(threading.local):
    def __init__(self) -> None:
        self.count = array.array("i", [0])  # FIONREAD's answer, one per thread


_waiting_count = _Waiting()


def _waiting(fd: int) -> int:
    """Bytes the kernel holds for the socket, not yet read (FIONREAD)."""
    count = _waiting_count.count
    try:
        fcntl.ioctl(fd, termios.FIONREAD, count)
    except OSError:
        return 1  # let the read find out what is wrong
    return count[0]


def size_reads(size: int) -> None:
    """The largest read of a TLS connection (``limits.tls_read_buffer``) on this thread."""
    _read_buffer.size = size


class _Detached(asyncio.Protocol):
    """What a plain transport talks to once its socket was taken: nothing."""


def take_socket(transport: asyncio.BaseTransport) -> socket.socket:
    """The connection of a plain socket transport, as a non-blocking socket of its own: the
    transport stops reading, gets a do-nothing protocol and is aborted (it closes only its
    own descriptor; the connection lives on in the duplicate). Its write buffer must be
    empty: what is in it would be lost. ConnectionError (an OSError) when it is gone."""
    transport.pause_reading()  # type: ignore[attr-defined]
    raw = transport.get_extra_info("socket")
    if raw is None or transport.is_closing():
        raise ConnectionResetError("the connection ended before TLS")
    sock = socket.socket(fileno=os.dup(raw.fileno()))
    sock.setblocking(False)
    transport.set_protocol(_Detached())
    transport.abort()  # type: ignore[attr-defined]
    return sock


async def _ready(loop: asyncio.AbstractEventLoop, fd: int, *, write: bool) -> None:
    waiter = loop.create_future()
    if write:
        loop.add_writer(fd, _wake, waiter)
    else:
        loop.add_reader(fd, _wake, waiter)
    try:
        await waiter
    finally:
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


async def wait_readable(sock: socket.socket) -> None:
    """Until ``sock`` has something to read (or its peer closed)."""
    await _ready(asyncio.get_running_loop(), sock.fileno(), write=False)


async def handshake(sock: socket.socket, context: ssl.SSLContext, *, server_side: bool,
                    server_hostname: str | None = None, session: ssl.SSLSession | None = None,
                    timeout: float) -> ssl.SSLSocket:
    """Wrap the connected ``sock`` (its ownership passes here) and run the TLS handshake
    within ``timeout``. ``session``: a TLS session of an earlier connection with the same
    context, offered for resumption (one that does not fit gets a full handshake). The
    server contexts' ``sni_callback`` sees the ``SSLSocket``. Raises ``ssl.SSLError``,
    ``OSError`` or ``TimeoutError``; the socket is closed then."""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    try:
        tls = context.wrap_socket(sock, server_side=server_side,
                                  server_hostname=server_hostname,
                                  do_handshake_on_connect=False)
    except BaseException:
        sock.close()
        raise
    try:
        if session is not None and not server_side:
            # Another context's session or a stale one: a full handshake instead.
            with contextlib.suppress(ValueError, ssl.SSLError):
                tls.session = session
        fd = tls.fileno()
        async with asyncio.timeout(timeout):
            while True:
                try:
                    tls.do_handshake()
                    return tls
                except ssl.SSLWantReadError:
                    await _ready(loop, fd, write=False)
                except ssl.SSLWantWriteError:
                    await _ready(loop, fd, write=True)
    except BaseException:
        tls.close()
        raise


async def start_tls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    context: ssl.SSLContext, *, server_side: bool,
                    server_hostname: str | None = None, session: ssl.SSLSession | None = None,
                    timeout: float, sock: socket.socket | None = None) -> TlsTransport:
    """Upgrade an open plain stream pair to TLS: the writer, the reader and their protocol
    go on over a ``TlsTransport`` of the same connection. ``sock``: the connection already
    taken from the plain transport (``take_socket``); otherwise it is taken here, at once
    (before anything else can be read in the clear), once what was written has left.
    Nothing the reader already holds is used: the caller makes sure there is nothing."""
    protocol: Any = writer._protocol  # type: ignore[attr-defined]  # the transport's may be gone
    if sock is None:
        plain: Any = writer.transport
        plain.pause_reading()
        if plain.get_write_buffer_size():
            # Our last plaintext (the stream header, <proceed/>) first: a high-water mark
            # of 0 makes the drain wait until the buffer is empty.
            plain.set_write_buffer_limits(high=0)
            async with asyncio.timeout(timeout):
                await writer.drain()
        sock = take_socket(plain)
    tls = await handshake(sock, context, server_side=server_side,
                          server_hostname=server_hostname, session=session, timeout=timeout)
    transport = TlsTransport(asyncio.get_running_loop(), tls, protocol)
    # What StreamWriter.start_tls does with its new transport; the reader pauses and
    # resumes the transport it was given, which is this one now.
    writer._transport = transport  # type: ignore[attr-defined]
    reader._transport = transport  # type: ignore[attr-defined]
    protocol._replace_writer(writer)
    return transport


class TlsTransport(asyncio.Transport):
    """A TLS connection over a non-blocking ``SSLSocket`` whose handshake is done.

    Reads: when the socket is readable, records are decrypted into this thread's shared
    buffer, each handed to the protocol as bytes, until the kernel holds nothing more for
    the socket (or READS_PER_TURN records). Writes: one ``SSL_write`` at once; what the
    socket does not take waits, in order, for it to be
    writable (a write OpenSSL began is retried with the same bytes, as it requires). A TLS
    1.3 key update can make a read want the socket writable, or a write want it readable:
    each waits for what it wants and retries.
    """

    __slots__ = ("_buffered", "_chunks", "_close_timer", "_closed", "_closing", "_fd",
                 "_head_begun", "_high", "_loop", "_low", "_protocol",
                 "_protocol_paused", "_read_wants_write", "_reader_on", "_reading",
                 "_shutdown_sent", "_sock", "_tls", "_write_wants_read", "_writer_on")

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: ssl.SSLSocket,
                 protocol: asyncio.BaseProtocol, *, call_connection_made: bool = False) -> None:
        self._extra: Any = None  # get_extra_info answers from the socket
        self._loop: Any = loop
        self._sock = sock
        # The SSLSocket's OpenSSL connection itself: its read and write are what
        # SSLSocket.recv_into and send call, after two Python frames of checks that cost
        # more than the rest of a small read (callgrind: bench.tls_records).
        self._tls: Any = sock._sslobj  # type: ignore[attr-defined]
        self._fd = sock.fileno()
        self._protocol: Any = protocol
        self._reading = True  # not paused by the protocol
        self._reader_on = False  # registered with the loop
        self._writer_on = False
        self._read_wants_write = False
        self._write_wants_read = False
        self._chunks: list[bytes | memoryview] = []  # waiting to be sent, in order
        self._buffered = 0
        self._head_begun = False  # OpenSSL began writing the first chunk: retry it as is
        self._high = HIGH_WATER
        self._low = HIGH_WATER // 4
        self._protocol_paused = False
        self._closing = False
        self._closed = False
        self._close_timer: asyncio.TimerHandle | None = None
        self._shutdown_sent = False
        if call_connection_made:
            protocol.connection_made(self)
        self._update()
        if sock.pending():  # decrypted during the handshake, not yet handed out
            loop.call_soon(self._read_ready)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "closing" if self._closing else "open"
        return f"<TlsTransport fd={self._fd} {state}>"

    # Registration with the loop ------------------------------------------------------------

    def _update(self) -> None:
        """Register for what the connection waits for now, and for nothing else."""
        closed = self._closed
        reader = not closed and (self._write_wants_read
                                 or (self._reading and not self._closing))
        writer = not closed and (self._read_wants_write
                                 or (bool(self._chunks) and not self._write_wants_read)
                                 or (self._closing and not self._shutdown_sent
                                     and not self._chunks))
        if reader != self._reader_on:
            self._reader_on = reader
            if reader:
                self._loop._add_reader(self._fd, self._read_ready)
            else:
                self._loop._remove_reader(self._fd)
        if writer != self._writer_on:
            self._writer_on = writer
            if writer:
                self._loop._add_writer(self._fd, self._write_ready)
            else:
                self._loop._remove_writer(self._fd)

    # Reading --------------------------------------------------------------------------------

    def _read_ready(self) -> None:
        if self._closed:
            return
        if self._write_wants_read:
            self._write_wants_read = False
            self._write_ready()
            if self._closed:
                return
        if not self._reading or self._closing:
            self._update()
            return
        self._read_wants_write = False
        sslobj = self._tls
        view = _read_buffer.get()
        length = len(view)
        turns = 0
        while True:
            try:
                size = sslobj.read(length, view)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLWantWriteError:
                self._read_wants_write = True
                break
            except ssl.SSLEOFError:
                size = 0  # the TCP connection ended without close_notify
            except (OSError, ssl.SSLError) as exc:
                self._fatal(exc)
                return
            if not size:
                self._eof()
                return
            self._protocol.data_received(bytes(view[:size]))
            turns += 1
            if not self._reading or self._closing:
                break
            if sslobj.pending():
                continue  # the rest of a record larger than the buffer
            # Everything the socket holds is read now, so that the stream parses it in one
            # go and answers it in one write; but another read would find out that there
            # is nothing more by raising SSLWantReadError, which costs more than the read.
            # The kernel says how much is waiting without one.
            if turns >= READS_PER_TURN or not _waiting(self._fd):
                break
        self._update()

    def _eof(self) -> None:
        """The peer closed (close_notify or TCP FIN): the protocol hears it, and the
        connection is closed from our side too (TLS has no half-close)."""
        try:
            self._protocol.eof_received()
        except Exception as exc:
            self._fatal(exc)
            return
        self._reading = False
        self.close()

    def pause_reading(self) -> None:
        if self._reading:
            self._reading = False
            if not self._closed:
                self._update()

    def resume_reading(self) -> None:
        if not self._reading and not self._closing:
            self._reading = True
            self._update()
            # OpenSSL may hold decrypted bytes the socket will not announce.
            self._loop.call_soon(self._read_ready)

    def is_reading(self) -> bool:
        return self._reading and not self._closing

    # Writing --------------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or not data:
            return
        if not self._chunks and not self._write_wants_read:
            try:
                self._tls.write(data)
                return
            except ssl.SSLWantWriteError:
                pass
            except ssl.SSLWantReadError:
                self._write_wants_read = True
            except (OSError, ssl.SSLError) as exc:
                self._fatal(exc)
                return
            self._head_begun = True  # OpenSSL may have sent some of its records already
        self._chunks.append(bytes(data) if not isinstance(data, bytes) else data)
        self._buffered += len(data)
        self._update()
        self._maybe_pause_protocol()

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        self.write(b"".join(list_of_data))

    def _write_ready(self) -> None:
        if self._closed:
            return
        if self._read_wants_write:
            self._read_wants_write = False
            self._read_ready()
            if self._closed:
                return
        chunks = self._chunks
        tls = self._tls
        while chunks:
            if not self._head_begun and len(chunks) > 1:
                # Not begun: the waiting chunks can go as one write (fewer records).
                chunks[:] = [b"".join(chunks)]
            head = chunks[0]
            try:
                tls.write(head)
            except ssl.SSLWantWriteError:
                self._head_begun = True
                break
            except ssl.SSLWantReadError:
                self._head_begun = True
                self._write_wants_read = True
                break
            except (OSError, ssl.SSLError) as exc:
                self._fatal(exc)
                return
            del chunks[0]
            self._head_begun = False
            self._buffered -= len(head)
        self._maybe_resume_protocol()
        if self._closing and not chunks:
            self._shutdown()
            return
        self._update()

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        raise NotImplementedError("TLS has no half-close")

    def get_write_buffer_size(self) -> int:
        return self._buffered

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = HIGH_WATER if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high, self._low = high, low
        self._maybe_pause_protocol()

    def _maybe_pause_protocol(self) -> None:
        if self._buffered > self._high and not self._protocol_paused:
            self._protocol_paused = True
            self._tell_protocol("pause_writing")

    def _maybe_resume_protocol(self) -> None:
        if self._protocol_paused and self._buffered <= self._low:
            self._protocol_paused = False
            self._tell_protocol("resume_writing")

    def _tell_protocol(self, method: str) -> None:
        """Flow control news for the protocol; its failure is the loop's to report."""
        try:
            getattr(self._protocol, method)()
        except Exception as exc:
            self._loop.call_exception_handler({
                "message": f"protocol.{method}() failed", "exception": exc,
                "transport": self, "protocol": self._protocol})

    # Closing --------------------------------------------------------------------------------

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """What is queued goes out, then our close_notify (the peer's is not waited for),
        then the socket is closed; after CLOSE_TIMEOUT the connection is dropped anyway."""
        if self._closing:
            return
        self._closing = True
        if self._chunks:
            self._close_timer = self._loop.call_later(CLOSE_TIMEOUT, self.abort)
            self._update()
        else:
            self._shutdown()

    def _shutdown(self) -> None:
        try:
            self._sock.unwrap()  # sends close_notify; then wants the peer's: not waited for
        except ssl.SSLWantWriteError:
            if self._close_timer is None:
                self._close_timer = self._loop.call_later(CLOSE_TIMEOUT, self.abort)
            self._update()  # the socket is full: again when it is writable
            return
        except (ssl.SSLWantReadError, OSError, ValueError, ssl.SSLError):
            pass  # sent (or the connection is gone): nothing more to do either way
        self._shutdown_sent = True
        self._finish(None)

    def abort(self) -> None:
        """Drop the connection now, unsent bytes and all."""
        self._closing = True
        self._finish(None)

    def _fatal(self, exc: BaseException) -> None:
        self._closing = True
        self._finish(exc)

    def _finish(self, exc: BaseException | None) -> None:
        if self._closed:
            return
        self._closed = True
        self._chunks.clear()
        self._buffered = 0
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        self._update()  # off the loop's selector before the descriptor goes
        self._sock.close()
        self._loop.call_soon(self._call_connection_lost, exc)

    def _call_connection_lost(self, exc: BaseException | None) -> None:
        protocol, self._protocol = self._protocol, None
        if protocol is not None:
            protocol.connection_lost(exc)

    # The rest of a transport ------------------------------------------------------------------

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol  # type: ignore[no-any-return]

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        sock = self._sock
        if name in ("ssl_object", "socket"):
            return sock
        if name == "sslcontext":
            return sock.context
        if self._closed:
            return default
        # Asked for, not kept: two tuples per connection that hardly anyone reads.
        if name == "peername":
            return _address(sock.getpeername, default)
        if name == "sockname":
            return _address(sock.getsockname, default)
        if name == "peercert":
            return sock.getpeercert()
        if name == "cipher":
            return sock.cipher()
        if name == "compression":
            return sock.compression()
        return default


def _address(get: Any, default: Any) -> Any:
    try:
        return get()
    except OSError:
        return default
