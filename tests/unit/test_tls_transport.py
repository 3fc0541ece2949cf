"""TlsTransport and its handshake over real loopback TCP: data both ways, backpressure,
pause/resume, close_notify, abort, EOF, a peer that goes away mid-handshake, SNI, session
resumption, and a PROXY header with the ClientHello right behind it in one segment."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from proxy.net import tls_transport
from proxy.net.preamble import read_proxy_header_from, tls_failure_reason
from proxy.net.tls_transport import TlsTransport, handshake
from proxy.proxyproto import encode_v1
from tests.peers.certs import make_cert


def run(coro: Awaitable[Any], timeout: float = 30) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, timeout)
    return asyncio.run(bounded())


async def until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.005)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("certs")
    make_cert(folder, "localhost")
    make_cert(folder, "other.example")
    return folder


def server_context(certs: Path, name: str = "localhost") -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs / f"{name}.crt", certs / f"{name}.key")
    return context


def client_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """(accepted, connecting): two ends of a loopback TCP connection."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    return server, client


class Recorder(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.eof = False
        self.lost: list[BaseException | None] = []
        self.pauses = 0
        self.resumes = 0
        self.events: list[str] = []

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> bool:
        self.eof = True
        self.events.append("eof")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.append(exc)
        self.events.append("lost")

    def pause_writing(self) -> None:
        self.pauses += 1

    def resume_writing(self) -> None:
        self.resumes += 1


async def tls_pair(certs: Path, server_ctx: ssl.SSLContext | None = None,
                   client_ctx: ssl.SSLContext | None = None, **client: Any
                   ) -> tuple[TlsTransport, Recorder, TlsTransport, Recorder]:
    s, c = tcp_pair()
    server_tls, client_tls = await asyncio.gather(
        handshake(s, server_ctx or server_context(certs), server_side=True, timeout=5),
        handshake(c, client_ctx or client_context(), server_side=False,
                  server_hostname="localhost", timeout=5, **client))
    loop = asyncio.get_running_loop()
    sp, cp = Recorder(), Recorder()
    st = TlsTransport(loop, server_tls, sp, call_connection_made=True)
    ct = TlsTransport(loop, client_tls, cp, call_connection_made=True)
    return st, sp, ct, cp


def test_data_goes_both_ways_and_the_facts_are_there(certs: Path) -> None:
    async def scenario() -> None:
        st, sp, ct, cp = await tls_pair(certs)
        st.write(b"hello ")
        st.writelines([b"from ", b"the server"])
        ct.write(b"hi")
        await until(lambda: cp.data == b"hello from the server" and sp.data == b"hi")
        assert isinstance(st.get_extra_info("ssl_object"), ssl.SSLSocket)
        assert st.get_extra_info("cipher") is not None
        assert st.get_extra_info("sslcontext") is not None
        assert ct.get_extra_info("peercert") == {}  # unverified: no parsed certificate
        assert st.get_extra_info("peername") == ct.get_extra_info("sockname")
        assert st.get_extra_info("nonsense", "x") == "x"
        assert st.is_reading() and not st.is_closing()
        st.abort()
        ct.abort()
    run(scenario())


def test_connections_share_one_read_buffer_and_every_byte_arrives_intact(certs: Path) -> None:
    """Twenty connections at once, both ways, through a read buffer smaller than what is
    sent: each gets exactly its own bytes."""
    tls_transport.size_reads(4096)
    size = 300_000

    def payload(i: int, way: bytes) -> bytes:
        return (way + b"%03d" % i) * (size // 6)

    async def one(i: int) -> None:
        st, sp, ct, cp = await tls_pair(certs)
        st.write(payload(i, b"dow"))
        ct.write(payload(i, b"up-"))
        await until(lambda: len(cp.data) >= size and len(sp.data) >= size)
        assert cp.data == payload(i, b"dow")
        assert sp.data == payload(i, b"up-")
        st.close()
        ct.close()

    async def scenario() -> None:
        await asyncio.gather(*(one(i) for i in range(20)))
        view = tls_transport._read_buffer.view
        assert view is not None and len(view) == 4096

    try:
        run(scenario(), 60)
    finally:
        tls_transport.size_reads(tls_transport.DEFAULT_READ_SIZE)


def test_a_peer_that_does_not_read_pauses_the_writer_and_nothing_is_lost(certs: Path) -> None:
    """The socket fills up (OpenSSL's write wants the socket writable mid-record): the bytes
    wait in order, the protocol is paused above the high-water mark and resumed below the
    low one, and the retried write sends them as they were."""
    async def scenario() -> None:
        st, sp, ct, cp = await tls_pair(certs)
        ct.pause_reading()
        big = bytes(range(256)) * 16384  # 4 MiB, far more than the sockets hold
        st.write(big)
        for i in range(100):
            st.write(b"<%d>" % i)
        assert st.get_write_buffer_size() > 0
        assert sp.pauses == 1 and sp.resumes == 0
        await asyncio.sleep(0.05)
        assert not cp.data  # paused: nothing read
        ct.resume_reading()
        tail = b"".join(b"<%d>" % i for i in range(100))
        await until(lambda: len(cp.data) == len(big) + len(tail))
        assert cp.data == big + tail
        await until(lambda: st.get_write_buffer_size() == 0)
        assert sp.resumes == 1
        st.abort()
        ct.abort()
    run(scenario())


def test_write_buffer_limits(certs: Path) -> None:
    async def scenario() -> None:
        st, _sp, ct, _ = await tls_pair(certs)
        st.set_write_buffer_limits(high=1000)
        assert st.get_write_buffer_limits() == (250, 1000)
        with pytest.raises(ValueError):
            st.set_write_buffer_limits(high=1, low=2)
        st.abort()
        ct.abort()
    run(scenario())


def test_reading_paused_holds_what_openssl_decrypted_until_resumed(certs: Path) -> None:
    async def scenario() -> None:
        st, _sp, ct, cp = await tls_pair(certs)
        ct.pause_reading()
        assert not ct.is_reading()
        st.write(b"a" * 100)
        st.write(b"b" * 100)
        await asyncio.sleep(0.1)
        assert not cp.data
        ct.resume_reading()
        await until(lambda: len(cp.data) == 200)
        assert cp.data == b"a" * 100 + b"b" * 100
        st.abort()
        ct.abort()
    run(scenario())


def test_close_flushes_then_sends_close_notify_without_waiting_for_the_peer(
        certs: Path) -> None:
    """The peer reads everything, then a clean TLS end (close_notify: EOF, then the
    connection lost without an error); our side is closed without the peer's answer."""
    async def scenario() -> None:
        st, sp, ct, cp = await tls_pair(certs)
        ct.pause_reading()  # the peer does not even read until we are gone
        st.write(b"x" * 500_000)
        st.close()
        assert st.is_closing()
        st.write(b"dropped: after the close")
        ct.resume_reading()
        await until(lambda: bool(sp.lost) and bool(cp.lost))
        assert bytes(cp.data) == b"x" * 500_000
        assert cp.events == ["eof", "lost"] and cp.lost == [None]
        assert sp.lost == [None]
    run(scenario())


def test_a_close_to_a_peer_that_never_reads_ends_after_the_timeout(
        certs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tls_transport, "CLOSE_TIMEOUT", 0.2)

    async def scenario() -> None:
        st, sp, ct, _cp = await tls_pair(certs)
        ct.pause_reading()
        st.write(b"x" * 8_000_000)
        st.close()
        await until(lambda: bool(sp.lost))
        assert st._sock.fileno() == -1
        ct.abort()
    run(scenario())


def test_abort_drops_at_once_and_the_peer_sees_the_end(certs: Path) -> None:
    async def scenario() -> None:
        st, sp, ct, _cp = await tls_pair(certs)
        cp2 = Recorder()
        ct.pause_reading()
        st.write(b"y" * 32_000_000)
        st.abort()
        await until(lambda: bool(sp.lost))
        assert st.get_write_buffer_size() == 0
        ct.set_protocol(cp2)
        assert ct.get_protocol() is cp2
        ct.resume_reading()
        await until(lambda: bool(cp2.lost))
        assert len(cp2.data) < 32_000_000  # what was queued was dropped
    run(scenario())


def test_a_tcp_end_without_close_notify_is_an_eof_too(certs: Path) -> None:
    async def scenario() -> None:
        st, _sp, _ct, cp = await tls_pair(certs)
        st.write(b"last words")
        await until(lambda: cp.data == b"last words")
        st._sock.shutdown(socket.SHUT_WR)  # TCP's FIN; SSLSocket sends no close_notify
        await until(lambda: bool(cp.lost))
        assert cp.events == ["eof", "lost"]
        st.abort()
    run(scenario())


def test_a_peer_that_goes_away_mid_handshake_fails_it_with_a_reason(certs: Path) -> None:
    async def scenario() -> None:
        s, c = tcp_pair()
        c.sendall(b"\x16\x03\x01\x00\xc8\x01\x00")  # the start of a ClientHello
        c.close()
        with pytest.raises((ssl.SSLError, OSError)) as caught:
            await handshake(s, server_context(certs), server_side=True, timeout=5)
        assert tls_failure_reason(caught.value)
        assert s.fileno() == -1  # detached into the SSLSocket, which was closed
    run(scenario())


def test_a_silent_peer_times_the_handshake_out(certs: Path) -> None:
    async def scenario() -> None:
        s, c = tcp_pair()
        with pytest.raises(TimeoutError) as caught:
            await handshake(s, server_context(certs), server_side=True, timeout=0.2)
        assert tls_failure_reason(caught.value) == "timeout"
        c.close()
    run(scenario())


def test_sni_chooses_the_certificate(certs: Path) -> None:
    """The server context's sni_callback gets the SSLSocket and switches its context."""
    other = server_context(certs, "other.example")
    default = server_context(certs)
    seen: list[str | None] = []

    def choose(sock: Any, name: str | None, _context: ssl.SSLContext) -> None:
        seen.append(name)
        if name == "other.example":
            sock.context = other
    default.sni_callback = choose

    async def served_name(name: str) -> str:
        s, c = tcp_pair()
        server_tls, client_tls = await asyncio.gather(
            handshake(s, default, server_side=True, timeout=5),
            handshake(c, client_context(), server_side=False, server_hostname=name,
                      timeout=5))
        der = client_tls.getpeercert(binary_form=True)
        server_tls.close()
        client_tls.close()
        assert der is not None
        return ssl.DER_cert_to_PEM_cert(der)

    async def scenario() -> None:
        assert await served_name("other.example") == \
            (certs / "other.example.crt").read_text()
        assert await served_name("localhost") == (certs / "localhost.crt").read_text()
        assert seen == ["other.example", "localhost"]
    run(scenario())


def test_a_session_of_an_earlier_connection_is_resumed(certs: Path) -> None:
    async def scenario() -> None:
        context = client_context()
        server = server_context(certs)
        st, _sp, ct, cp = await tls_pair(certs, server, context)
        ct.write(b"ping")  # TLS 1.3: the tickets come with the server's first bytes
        st.write(b"pong")
        await until(lambda: cp.data == b"pong")
        session = ct.get_extra_info("ssl_object").session
        assert session is not None
        st.abort()
        ct.abort()
        st2, _, ct2, _ = await tls_pair(certs, server, context, session=session)
        assert ct2.get_extra_info("ssl_object").session_reused
        st2.abort()
        ct2.abort()
        # A session of another context is not offered: a full handshake, no error.
        st3, _, ct3, _ = await tls_pair(certs, server, client_context(), session=session)
        assert not ct3.get_extra_info("ssl_object").session_reused
        st3.abort()
        ct3.abort()
    run(scenario())


def test_a_proxy_header_and_the_client_hello_in_one_segment(certs: Path) -> None:
    """The balancer's header and the ClientHello behind it arrive in one send: the header
    is read exactly, and the handshake finds the whole ClientHello in the socket."""
    async def scenario() -> None:
        s, c = tcp_pair()
        s.setblocking(False)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        client = client_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
        with pytest.raises(ssl.SSLWantReadError):
            client.do_handshake()
        header = encode_v1(("203.0.113.9", 5555), ("127.0.0.1", 5222))
        c.sendall(header + outgoing.read())
        parsed = await asyncio.wait_for(read_proxy_header_from(s), 5)
        assert parsed.source == ("203.0.113.9", 5555)
        done = asyncio.ensure_future(handshake(s, server_context(certs), server_side=True,
                                               timeout=5))
        c.setblocking(False)
        loop = asyncio.get_running_loop()
        while True:  # the client's half, by hand over its memory BIOs
            try:
                client.do_handshake()
                break
            except ssl.SSLWantReadError:
                pass
            if outgoing.pending:
                c.sendall(outgoing.read())
            try:
                incoming.write(await asyncio.wait_for(loop.sock_recv(c, 65536), 5))
            except TimeoutError:
                break
        if outgoing.pending:
            c.sendall(outgoing.read())
        server_tls = await asyncio.wait_for(done, 5)
        assert server_tls.version() is not None
        server_tls.close()
        c.close()
    run(scenario())


def test_direct_tls_after_a_proxy_header_on_accepted_streams(certs: Path) -> None:
    """As the server accepts on a direct-TLS listener: nothing read by asyncio (paused in
    connection_made), the socket taken, the PROXY header read exactly, then the stream pair
    goes on over TLS; the client sends the header and its ClientHello at once."""
    async def scenario() -> None:
        accepted: asyncio.Future[tuple[Any, Any]] = asyncio.get_running_loop().create_future()

        def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.transport.pause_reading()  # type: ignore[attr-defined]
            accepted.set_result((reader, writer))

        server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        c = socket.create_connection(("127.0.0.1", port))
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        client = client_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
        with pytest.raises(ssl.SSLWantReadError):
            client.do_handshake()
        c.sendall(encode_v1(("203.0.113.9", 5555), ("127.0.0.1", port)) + outgoing.read())
        reader, writer = await asyncio.wait_for(accepted, 5)
        sock = tls_transport.take_socket(writer.transport)
        header = await asyncio.wait_for(read_proxy_header_from(sock), 5)
        assert header.source == ("203.0.113.9", 5555)
        upgrade = asyncio.ensure_future(tls_transport.start_tls(
            reader, writer, server_context(certs), server_side=True, sock=sock, timeout=5))
        c.setblocking(False)
        loop = asyncio.get_running_loop()
        while True:  # the client's half, by hand over its memory BIOs
            try:
                client.do_handshake()
                break
            except ssl.SSLWantReadError:
                if outgoing.pending:
                    await loop.sock_sendall(c, outgoing.read())
                incoming.write(await asyncio.wait_for(loop.sock_recv(c, 65536), 5))
        client.write(b"<stream:stream>")
        await loop.sock_sendall(c, outgoing.read())
        transport = await asyncio.wait_for(upgrade, 5)
        assert writer.transport is transport
        assert await asyncio.wait_for(reader.readexactly(15), 5) == b"<stream:stream>"
        writer.write(b"<features/>")
        got = b""
        while b"<features/>" not in got:
            incoming.write(await asyncio.wait_for(loop.sock_recv(c, 65536), 5))
            with contextlib.suppress(ssl.SSLWantReadError):
                got += client.read(65536)
        writer.close()
        c.close()
        server.close()
    run(scenario())
