"""The local link between two workers (``workers: N``): a client connection handed from the
worker that accepted it to its account's home, and the relay of its decrypted bytes.

Shell code. A TLS session cannot move between processes, so the accepting worker keeps the
client's TLS and becomes a byte pipe: after the ``Handoff`` message (``proxy/workers.py``)
everything the client sends goes to the home over a Unix socket, everything the home sends
goes back, until either side closes. The relay is two small protocols joined (``_Pipe``),
no task and no stream buffer of its own: what one transport receives is written to the
other, and a full write buffer pauses the reading of the other side. The home reads that
socket as a ``RelayedStream``: an
``XmlStream`` whose parser is primed with the client's stream header and whose peer address
and TLS facts are the ones the handoff names.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

from ..workers import HANDOFF_HEADER, BadHandoff, Handoff
from ..xmpp import ns
from .xmlstream import XmlStream, start_unix_server

RELAY_CHUNK = 65536
HANDOFF_READ_TIMEOUT = 10.0  # seconds for the handoff message once the link is open
# A home that is being restarted (it crashed) comes back within this long.
HANDOFF_CONNECT_WAIT = 5.0
RELAY_CLOSE_GRACE = 2.0  # a client that does not answer our TLS close is dropped after this

_XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"


def primed_header(attrs: dict[str, str] | Any) -> bytes:
    """The client's stream header again, for the home's parser: the stream it reads
    continues inside the document the client opened at the accepting worker."""
    parts = [f"xmlns={quoteattr(ns.CLIENT)}", f"xmlns:stream={quoteattr(ns.STREAM)}"]
    for key, value in attrs.items():
        if key == _XML_LANG:
            parts.append(f"xml:lang={quoteattr(value)}")
        elif not key.startswith("{") and ":" not in key and key != "xmlns":
            parts.append(f"{key}={quoteattr(value)}")
    return f"<stream:stream {' '.join(parts)}>".encode()


class RelayedStream(XmlStream):
    """The home's side of a handed-over client connection: the client's TLS is at the
    accepting worker, so the TLS facts and addresses are the handoff's."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 handoff: Handoff, **kwargs: Any) -> None:
        super().__init__(reader, writer, **kwargs)
        self.handoff = handoff
        self.remote = handoff.remote
        self.header_sent = True  # the accepting worker answered the client's header
        self.parser.track_trailing = False  # TLS is on: no STARTTLS boundary to watch
        self.parser.feed(primed_header(handoff.header))  # its StreamOpened is old news
        if handoff.after:
            self.put_back(self.parser.feed(handoff.after.encode()))

    @property
    def tls_info(self) -> dict[str, str | None]:
        return dict(self.handoff.tls)

    def endpoints(self) -> tuple[tuple[str, int] | None, tuple[str, int] | None]:
        return self.handoff.remote, self.handoff.local


def private_folder(folder: Path) -> None:
    """The workers' sockets and journals live in a folder only the proxy's user can use."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(folder, 0o700)


class HandoffServer:
    """A worker's end of the links: each connection brings one handed-over client."""

    def __init__(self, path: Path,
                 serve: Callable[[Handoff, asyncio.StreamReader, asyncio.StreamWriter],
                                 Awaitable[None]], log: Any) -> None:
        self.path = path
        self.serve = serve
        self.log = log
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        private_folder(self.path.parent)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # this worker's index is ours: an earlier run's socket
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(self.path))
        os.chmod(self.path, 0o600)
        self.server = await start_unix_server(self._accept, sock=sock,
                                                      limit=RELAY_CHUNK)

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(self._handle(reader, writer))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(HANDOFF_READ_TIMEOUT):
                size = Handoff.length(await reader.readexactly(HANDOFF_HEADER.size))
                handoff = Handoff.decode(await reader.readexactly(size))
        except (BadHandoff, TimeoutError, asyncio.IncompleteReadError, ConnectionError) as exc:
            self.log.warning("handoff_refused", reason=str(exc) or type(exc).__name__)
            writer.transport.abort()
            return
        await self.serve(handoff, reader, writer)

    async def stop(self) -> None:
        """No new handoffs; the connections already handed over are the proxy's to end."""
        server, self.server = self.server, None
        if server is None:
            return
        server.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class _Pipe(asyncio.Protocol):
    """One side of a relay: what its transport receives is written to the other side's.
    Back-pressure without a task: when our transport's write buffer passes its high-water
    mark we stop reading the other side, and read it again once ours has drained."""

    def __init__(self, side: str, done: asyncio.Future[tuple[str, bool]]) -> None:
        self.side = side
        self.done = done
        self.transport: Any = None
        self.other: _Pipe | None = None
        self.early: list[bytes] = []  # what came before the other side was joined

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def join(self, other: _Pipe) -> None:
        self.other = other
        for data in self.early:
            self.data_received(data)
        self.early.clear()

    def data_received(self, data: bytes) -> None:
        other = self.other
        if other is None:
            self.early.append(data)
        elif not other.transport.is_closing():
            other.transport.write(data)

    def eof_received(self) -> bool:
        self._finish("eof", broken=False)
        return False  # our transport closes itself; the relay closes the other

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish("closed" if exc is None else type(exc).__name__, broken=exc is not None)

    def pause_writing(self) -> None:
        if self.other is not None:
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.other is not None and not self.other.transport.is_closing():
            self.other.transport.resume_reading()

    def _finish(self, why: str, *, broken: bool) -> None:
        if not self.done.done():
            self.done.set_result((f"{self.side} {why}", broken))


async def open_link(path: Path, handoff: bytes, done: asyncio.Future[tuple[str, bool]],
                    wait: float = HANDOFF_CONNECT_WAIT) -> _Pipe:
    """Connect to a home worker's handoff socket (waiting a little for one restarting) and
    send the handoff; the link's end of the relay."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while True:
        try:
            _, link = await loop.create_unix_connection(lambda: _Pipe("home", done), str(path))
            break
        except (FileNotFoundError, ConnectionRefusedError):
            if loop.time() >= deadline:
                raise
            await asyncio.sleep(0.1)
    link.transport.write(handoff)
    return link


async def relay(client: XmlStream, link: _Pipe,
                done: asyncio.Future[tuple[str, bool]]) -> str:
    """The client's decrypted bytes to the home and the home's back, until one side is
    done: then the other is closed too (politely: what is in flight goes out first; a
    client connection that broke gets the link dropped). Returns why it ended."""
    client.flush()
    client.relayed()  # its parser would idle for as long as the relay lasts
    transport: Any = client.writer.transport
    mine = _Pipe("client", done)
    mine.transport, mine.other = transport, link
    # Bytes TLS already decrypted that the stream had not read yet go first.
    held: bytearray | None = getattr(client.reader, "_buffer", None)
    if held:
        link.transport.write(bytes(held))
        held.clear()
    link.join(mine)
    if client.reader.at_eof():
        mine.eof_received()
    else:
        transport.set_protocol(mine)
        transport.resume_reading()  # the stream reader may have paused it
    try:
        why, broken = await done
    except asyncio.CancelledError:
        link.transport.abort()
        transport.abort()
        raise
    if broken and why.startswith("client"):
        link.transport.abort()
        transport.abort()
    else:  # also a link the home reset (it closed with our bytes unread): its last
        # words (a stream error, the close) are on their way to the client, so no abort
        link.transport.close()  # the home reads EOF: the client is gone (or the home closed)
        transport.close()  # TLS close_notify after what is queued; dropped after a grace
        asyncio.get_running_loop().call_later(RELAY_CLOSE_GRACE, _drop, transport)
    return why


def _drop(transport: Any) -> None:
    with contextlib.suppress(Exception):
        transport.abort()
