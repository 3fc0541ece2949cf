"""The local link between two workers (``workers: N``): a client connection handed from the
worker that accepted it to its account's home, and the relay of its decrypted bytes.

Shell code. A TLS session cannot move between processes, so the accepting worker keeps the
client's TLS and becomes a byte pipe: after the ``Handoff`` message (``proxy/workers.py``)
everything the client sends goes to the home over a Unix socket, everything the home sends
goes back, until either side closes. The home reads that socket as a ``RelayedStream``: an
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
from .xmlstream import XmlStream

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
        self.server = await asyncio.start_unix_server(self._accept, sock=sock,
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


async def open_link(path: Path, wait: float = HANDOFF_CONNECT_WAIT
                    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to a home worker's handoff socket, waiting a little for one restarting."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while True:
        try:
            return await asyncio.open_unix_connection(str(path), limit=RELAY_CHUNK)
        except (FileNotFoundError, ConnectionRefusedError):
            if loop.time() >= deadline:
                raise
            await asyncio.sleep(0.1)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str:
    """Copy until EOF; the writer's drain holds the reading back while the other side is
    slow, so neither buffer grows past its transport's high-water mark."""
    while True:
        data = await reader.read(RELAY_CHUNK)
        if not data:
            return "eof"
        writer.write(data)
        await writer.drain()


async def relay(client: XmlStream, reader: asyncio.StreamReader,
                writer: asyncio.StreamWriter) -> str:
    """The client's decrypted bytes to the home and the home's back, until one side is
    done: then the other is closed too (politely: what is in flight goes out first; a
    broken side gets the other's connection dropped). Returns why it ended."""
    client.flush()
    up = asyncio.ensure_future(_pipe(client.reader, writer))
    down = asyncio.ensure_future(_pipe(reader, client.writer))
    try:
        done, _ = await asyncio.wait((up, down), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        up.cancel()
        down.cancel()
        writer.transport.abort()
        client.abort(hard=True)
        raise
    first = up if up in done else down
    try:
        why = first.result()
        broken = False
    except (OSError, ConnectionError, asyncio.IncompleteReadError) as exc:
        why, broken = f"{type(exc).__name__}", True
    side = "client" if first is up else "home"
    for task in (up, down):
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await asyncio.gather(up, down, return_exceptions=True)
    if broken:
        writer.transport.abort()
        client.abort(hard=True)
    else:
        with contextlib.suppress(Exception):
            writer.close()  # the home reads EOF: the client is gone (or the home closed)
        client.abort()  # TLS close_notify after what is queued; dropped after a grace
    return f"{side} {why}"
