"""XmlStream over real loopback sockets: the STARTTLS boundary, output limits, error framing.

No XMPP server here: one side is an XmlStream, the other a bare asyncio connection the test
scripts byte by byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from lxml import etree

from proxy.net import xmlstream
from proxy.net.xmlstream import ConnectionLost, PlaintextInjection, XmlStream
from proxy.xmpp import codec, ns
from tests.peers.certs import make_cert

HEADER = (b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
          b"xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='1.0'>")
STARTTLS = b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
AUTH = (b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>"
        b"AGFsaWNlAHNlY3JldA==</auth>")


class Log:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def _add(self, event: str, **kw: Any) -> None:
        self.events.append((event, kw))

    debug = info = warning = _add

    def names(self) -> list[str]:
        return [e for e, _ in self.events]


@contextlib.asynccontextmanager
async def pair(**stream_kwargs: Any) -> AsyncIterator[
        tuple[XmlStream, asyncio.StreamReader, asyncio.StreamWriter]]:
    """(server-side XmlStream, client reader, client writer) over 127.0.0.1."""
    accepted: asyncio.Future[XmlStream] = asyncio.get_running_loop().create_future()

    def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set_result(XmlStream(reader, writer, **stream_kwargs))

    server = await xmlstream.start_server(on_connect, "127.0.0.1", 0)  # as the proxy reads
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    stream = await asyncio.wait_for(accepted, 5)
    try:
        yield stream, reader, writer
    finally:
        stream.abort()
        writer.transport.abort()
        server.close()
        await server.wait_closed()


def run(coro: Awaitable[Any], timeout: float = 20) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, timeout)
    return asyncio.run(bounded())


async def until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.01)


@pytest.fixture(scope="module")
def server_tls(tmp_path_factory: pytest.TempPathFactory) -> ssl.SSLContext:
    cert, key = make_cert(tmp_path_factory.mktemp("certs"), "localhost")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


def client_tls() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def starttls_received(stream: XmlStream) -> None:
    assert isinstance(await stream.next_event(5), codec.StreamOpened)
    el = await stream.next_element(5)
    assert el.tag == ns.qname(ns.TLS, "starttls")


# ---------------------------------------------------------------- the STARTTLS boundary

@pytest.mark.parametrize("after", [
    HEADER + AUTH,  # the attack: a new stream and a login, in the clear
    AUTH,
    b"<presence/>",
    b"<a",  # half a tag, still inside the parser
    b"<a x='>",  # a ">" inside a quoted value is not the end of anything
])
def test_bytes_in_the_same_write_as_starttls_are_refused(
        server_tls: ssl.SSLContext, after: bytes) -> None:
    async def scenario() -> None:
        async with pair(track_trailing=True) as (stream, _reader, writer):
            writer.write(HEADER + STARTTLS + after)
            await starttls_received(stream)
            with pytest.raises(PlaintextInjection):
                await stream.start_tls(server_tls)
            # TLS was never started on the connection.
            assert stream.writer.get_extra_info("ssl_object") is None
    run(scenario())


def test_bytes_that_arrive_after_starttls_was_parsed_are_refused(
        server_tls: ssl.SSLContext) -> None:
    """The injection sits unread in the socket reader's buffer (the original bug: it was
    handed out after the handshake as if decrypted)."""
    async def scenario() -> None:
        async with pair(track_trailing=True) as (stream, _reader, writer):
            writer.write(HEADER + STARTTLS)
            await starttls_received(stream)
            writer.write(HEADER + AUTH)
            await until(lambda: len(stream.reader._buffer) > 0)  # type: ignore[attr-defined]
            with pytest.raises(PlaintextInjection) as caught:
                await stream.start_tls(server_tls)
            assert caught.value.buffered == len(HEADER + AUTH)
    run(scenario())


@pytest.mark.parametrize("after", [b"", b" \r\n"])
def test_a_clean_boundary_upgrades_and_the_new_stream_is_read_over_tls(
        server_tls: ssl.SSLContext, after: bytes) -> None:
    async def scenario() -> None:
        async with pair(track_trailing=True) as (stream, reader, writer):
            writer.write(HEADER + STARTTLS + after)
            await starttls_received(stream)
            stream.send_header(b"<stream:stream>")
            upgrade = asyncio.create_task(stream.start_tls(server_tls))
            await until(lambda: len(reader._buffer) > 0)  # type: ignore[attr-defined]
            reader._buffer.clear()  # type: ignore[attr-defined]
            await writer.start_tls(client_tls(), server_hostname="localhost")
            await asyncio.wait_for(upgrade, 5)
            assert stream.writer.get_extra_info("ssl_object") is not None
            assert not stream.header_sent  # a restart: our next header is still owed
            writer.write(HEADER + b"<presence/>")
            assert isinstance(await stream.next_event(5), codec.StreamOpened)
            assert (await stream.next_element(5)).tag == ns.qname(ns.CLIENT, "presence")
    run(scenario())


async def upgraded(stream: XmlStream, reader: asyncio.StreamReader,
                   writer: asyncio.StreamWriter, server_tls: ssl.SSLContext) -> None:
    """Both ends of ``pair()`` over TLS: the stream's (ours) and the client's (asyncio's)."""
    upgrade = asyncio.create_task(stream.start_tls(server_tls))
    await writer.start_tls(client_tls(), server_hostname="localhost")
    await asyncio.wait_for(upgrade, 5)


@pytest.mark.parametrize("hard", [True, False])
def test_an_abort_over_tls_ends_the_connection_even_if_the_peer_reads_nothing(
        server_tls: ssl.SSLContext, monkeypatch: pytest.MonkeyPatch, hard: bool) -> None:
    """A hard abort drops the connection at once, queued bytes and all; a polite one tries
    to send them and close_notify, and is cut after CLOSE_GRACE when the peer reads
    nothing."""
    monkeypatch.setattr(xmlstream, "CLOSE_GRACE", 0.3)

    async def scenario() -> None:
        async with pair() as (stream, reader, writer):
            await upgraded(stream, reader, writer, server_tls)
            writer.transport.pause_reading()  # type: ignore[attr-defined]
            transport = stream.writer.transport
            for _ in range(400):
                stream.send_bytes(b"x" * 65536)  # 25 MiB: more than the sockets hold
            stream.flush()
            assert transport.get_write_buffer_size() > 0
            stream.abort(hard=hard)
            assert stream.dead is hard
            sock = transport.get_extra_info("socket")
            # Hard: gone before anything else runs; polite: still sending, until the grace.
            assert (sock.fileno() == -1) is hard
            await until(lambda: sock.fileno() == -1, 5)
    run(scenario())


# ---------------------------------------------------------------- stream error framing

async def read_all(reader: asyncio.StreamReader) -> bytes:
    data = b""
    with contextlib.suppress(ConnectionError):
        while chunk := await asyncio.wait_for(reader.read(65536), 5):
            data += chunk
    return data


def test_an_error_before_our_header_comes_inside_a_header_of_ours() -> None:
    async def scenario() -> bytes:
        async with pair(error_header=codec.stream_header(from_="localhost")) as (
                stream, reader, writer):
            writer.write(b"<?xml version='1.0'?><stream:stream xmlns='jabber:cl")
            await stream.close(codec.stream_error("connection-timeout"))
            return await read_all(reader)
    data = run(scenario())
    root = etree.fromstring(data)  # one well-formed document
    assert root.tag == ns.qname(ns.STREAM, "stream") and root.get("from") == "localhost"
    (error,) = root
    assert error.tag == ns.qname(ns.STREAM, "error")
    assert error[0].tag == ns.qname(ns.STREAMS_ERRORS, "connection-timeout")


def test_an_error_after_our_header_is_not_given_a_second_one() -> None:
    async def scenario() -> bytes:
        async with pair() as (stream, reader, _writer):
            stream.send_header(codec.stream_header(from_="localhost"))
            await stream.close(codec.stream_error("policy-violation"))
            return await read_all(reader)
    data = run(scenario())
    assert data.count(b"<stream:stream") == 1
    etree.fromstring(data)


# ---------------------------------------------------------------- output limits

ANSWER = b"<a xmlns='urn:xmpp:sm:3' h='1234567'/>" * 100


def test_reading_stops_over_the_soft_limit_and_resumes_when_the_peer_reads() -> None:
    async def scenario() -> None:
        log = Log()
        async with pair(output_soft=65536, output_hard=1 << 30, log=log) as (
                stream, reader, writer):
            writer.write(HEADER + b"<r/>")
            assert isinstance(await stream.next_event(5), codec.StreamOpened)
            await stream.next_element(5)
            # The peer reads nothing; we queue far more than the soft limit (the kernel
            # buffers take their share first).
            for _ in range(3000):
                stream.send_bytes(ANSWER)
            writer.write(b"<r/>")
            blocked = asyncio.create_task(stream.next_event(10))
            await asyncio.sleep(0.5)
            assert not blocked.done()  # not read, so not answered
            assert stream.output_bytes > 65536
            assert "output_backpressure" in log.names()
            total = 3000 * len(ANSWER)
            got = 0
            while got < total:
                got += len(await asyncio.wait_for(reader.read(1 << 20), 5))
                await asyncio.sleep(0)
            event = await asyncio.wait_for(blocked, 5)
            assert isinstance(event, codec.StanzaReceived)
            assert not stream.overflowed
    run(scenario())


def test_past_the_hard_limit_the_stream_is_cut_with_policy_violation() -> None:
    async def scenario() -> None:
        log = Log()
        async with pair(output_soft=65536, output_hard=65536, log=log) as (
                stream, reader, writer):
            writer.write(HEADER)
            assert isinstance(await stream.next_event(5), codec.StreamOpened)
            stream.send_header(codec.stream_header(from_="localhost"))
            for _ in range(5000):
                stream.send_bytes(ANSWER)
                await asyncio.sleep(0) if _ % 100 == 0 else None
            await until(lambda: stream.overflowed)
            assert "output_overflow" in log.names()
            with pytest.raises(ConnectionLost):
                await stream.next_event(5)
            data = await read_all(reader)  # a peer that reads now still gets the error
            assert data.endswith(codec.stream_error(
                "policy-violation", "the client does not read what it is sent")
                + codec.STREAM_CLOSE)
    run(scenario())


def test_a_slow_reader_over_the_hard_limit_is_not_cut() -> None:
    """A burst over the hard limit (a resume's resend, a big roster) for a client that
    reads, if slowly, must get through."""
    async def scenario() -> None:
        log = Log()
        async with pair(output_soft=65536, output_hard=262144, log=log) as (
                stream, reader, _writer):
            burst = ANSWER * 4000  # ~15 MB in one write
            stream.send_bytes(burst)
            stream.flush()
            got = 0
            while got < len(burst):
                got += len(await asyncio.wait_for(reader.read(256 * 1024), 5))
                await asyncio.sleep(0.05)  # ~5 MB/s: slow, but reading
            assert not stream.overflowed
            assert "output_overflow" not in log.names()
    run(scenario(), 60)


def test_limits_off_by_default() -> None:
    async def scenario() -> None:
        async with pair() as (stream, _reader, _writer):
            for _ in range(2000):
                stream.send_bytes(ANSWER)
            stream.flush()
            assert not stream.overflowed
            assert stream.output_soft is None and stream.output_hard is None
    run(scenario())



def test_an_idle_stream_drops_its_parser_between_stanzas_and_reads_on(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """After PARSER_IDLE without a byte, a stream between stanzas holds no lxml parser; one
    inside a stanza keeps it; the next bytes are parsed as before, in the header's context."""
    monkeypatch.setattr(xmlstream, "PARSER_IDLE", 0.05)

    async def scenario() -> None:
        async with pair() as (stream, _reader, writer):
            writer.write(HEADER.replace(b" to=", b" xmlns:x='urn:example:x' to=")
                         + b"<message><body>1</body></message>")
            assert isinstance(await stream.next_event(5), codec.StreamOpened)
            assert (await stream.next_element(5)).findtext("{jabber:client}body") == "1"
            await until(lambda: not stream.parser.holds_parser)
            writer.write(b"<message><x:item/><body>2")  # half a stanza, then silence
            read = asyncio.ensure_future(stream.next_element(5))
            await until(lambda: stream.parser.holds_parser)
            await asyncio.sleep(0.2)  # several idle checks: it must keep what it has
            assert stream.parser.holds_parser and not read.done()
            writer.write(b"</body></message>")
            el = await read
            assert el.findtext("{jabber:client}body") == "2"
            assert el[0].tag == "{urn:example:x}item"
            await until(lambda: not stream.parser.holds_parser)
            writer.write(b"</stream:stream>")
            assert isinstance(await stream.next_event(5), codec.StreamClosed)
    run(scenario())


# Read by callbacks (the relay pumps): poll_event and when_readable ---------------------------


class Pump:
    """A pump as the relay's are: called back, takes every event that is there, listens."""

    def __init__(self, stream: XmlStream) -> None:
        self.stream = stream
        self.events: list[codec.StreamEvent] = []
        self.lost: ConnectionLost | None = None
        self.calls = 0

    def run(self) -> None:
        self.calls += 1
        try:
            while True:
                event = self.stream.poll_event()
                if event is None:
                    self.stream.when_readable(self.run)
                    return
                assert event is not xmlstream.OUTPUT_FULL
                self.events.append(event)  # type: ignore[arg-type]
        except ConnectionLost as exc:
            self.lost = exc

    def stanzas(self) -> list[str]:
        return [etree.QName(e.element).localname for e in self.events
                if isinstance(e, codec.StanzaReceived)]


def test_a_listening_stream_is_called_back_and_takes_every_stanza_of_a_read() -> None:
    async def main() -> None:
        async with pair() as (stream, _, writer):
            pump = Pump(stream)
            pump.run()
            assert pump.events == [] and pump.calls == 1  # nothing yet: it listens
            writer.write(HEADER + b"<message/><presence/>" + b"<iq type='get' id='1'/>")
            await until(lambda: len(pump.stanzas()) == 3)
            assert isinstance(pump.events[0], codec.StreamOpened)
            assert pump.stanzas() == ["message", "presence", "iq"]
            calls = pump.calls
            writer.write(b"<message/>")
            await until(lambda: len(pump.stanzas()) == 4)
            assert pump.calls == calls + 1  # one call for one read, not a task
    run(main())


@pytest.mark.parametrize("end", ["eof", "ConnectionResetError"])
def test_a_listening_stream_hears_the_end_of_the_connection(end: str) -> None:
    async def main() -> None:
        async with pair() as (stream, _, writer):
            pump = Pump(stream)
            pump.run()
            writer.write(HEADER)
            await until(lambda: len(pump.events) == 1)
            if end == "eof":
                writer.close()
            else:  # linger 0: the peer gets a RST, not a FIN (asyncio wakes no waiter)
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
            await until(lambda: pump.lost is not None)
            assert str(pump.lost) == end and stream.dead
    run(main())


def test_when_readable_times_out_and_stop_listening_silences_the_callback() -> None:
    async def main() -> None:
        async with pair() as (stream, _, writer):
            heard: list[str] = []
            stream.when_readable(lambda: heard.append("readable"), 0.05,
                                 lambda: heard.append("timeout"))
            await until(lambda: heard == ["timeout"])
            writer.write(HEADER)  # nobody listens after the timeout
            await asyncio.sleep(0.1)
            assert heard == ["timeout"]
            assert isinstance(stream.poll_event(), codec.StreamOpened)  # still there to take
            stream.when_readable(lambda: heard.append("readable"), 5.0,
                                 lambda: heard.append("timeout"))
            stream.stop_listening()
            writer.write(b"<message/>")
            await asyncio.sleep(0.1)
            assert heard == ["timeout"]
            stream.when_readable(lambda: heard.append("readable"))  # bytes wait: at once
            await until(lambda: heard == ["timeout", "readable"])
    run(main())


def test_a_stanza_larger_than_the_readers_limit_resumes_a_paused_reader() -> None:
    async def main() -> None:
        async with pair(max_stanza_bytes=1 << 20) as (stream, _, writer):
            pump = Pump(stream)
            # Past the reader's high-water mark (2 x 64 KiB) asyncio pauses the transport;
            # the pump must resume it as it takes the bytes, or the rest never arrives.
            body = b"x" * (600 * 1024)
            writer.write(HEADER + b"<message><body>" + body + b"</body></message>")
            reader: Any = stream.reader
            await until(lambda: reader._paused)
            pump.run()
            await until(lambda: pump.stanzas() == ["message"], timeout=10)
    run(main())


def test_poll_event_says_when_the_peer_must_read_first() -> None:
    async def main() -> None:
        async with pair(output_soft=1024) as (stream, reader, writer):
            writer.write(HEADER + b"<message/>")
            pump = Pump(stream)
            await until(lambda: bool(getattr(stream.reader, "_buffer", b"")))
            stream.send_bytes(b"y" * 4096)  # queued, not yet flushed: over the soft limit
            assert stream.poll_event() is xmlstream.OUTPUT_FULL
            await asyncio.wait_for(stream.output_room(), 5)
            pump.run()
            assert pump.stanzas() == ["message"]
            assert len(await reader.readexactly(4096)) == 4096
    run(main())
