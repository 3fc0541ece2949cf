"""The upstream link's shell in process: ``connect_upstream`` and ``UpstreamLink`` against a
scripted server on loopback, each case a fraction of a second. The decisions are the
negotiation core's (``tests/unit/test_upstream_negotiation.py``); these check that the
shell carries them out on a real socket: what it writes, the exception each failure becomes,
the timeouts, and the events the discovery hands back to the session in order."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from proxy.config import UpstreamConfig
from proxy.net.upstream import (UpstreamAuthFailed, UpstreamBindFailed, UpstreamLink,
                                UpstreamLoop, UpstreamUnavailable, connect_upstream)
from proxy.xmpp import codec

from .playbook import run_bounded

HOST = "127.0.0.1"
SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
PLAIN_FEATURES = (f"<stream:features><mechanisms xmlns='{SASL}'><mechanism>PLAIN</mechanism>"
                  "</mechanisms></stream:features>")
BIND_FEATURES = ("<stream:features><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/>"
                 "</stream:features>")
Script = Callable[["Peer"], Awaitable[None]]


def header(stream_id: str = "srv-1") -> str:
    return ("<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
            "xmlns:stream='http://etherx.jabber.org/streams' version='1.0' "
            f"from='localhost' id='{stream_id}'>")


class Peer:
    """The scripted server's side of one connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.received = b""

    async def until(self, marker: bytes) -> bytes:
        """Read until ``marker``; what came up to it."""
        while marker not in self.received:
            chunk = await asyncio.wait_for(self.reader.read(4096), 3)
            if not chunk:
                raise ConnectionError("the proxy closed")
            self.received += chunk
        before, _, self.received = self.received.partition(marker)
        return before + marker

    async def header(self) -> None:
        await self.until(b"<stream:stream")
        await self.until(b">")

    def send(self, data: str) -> None:
        self.writer.write(data.encode())

    async def login(self, sasl_answer: str = f"<success xmlns='{SASL}'/>",
                    stream_id: str = "srv-1") -> None:
        await self.header()
        self.send(header(stream_id) + PLAIN_FEATURES)
        await self.until(b"</auth>")
        self.send(sasl_answer)
        await self.header()
        self.send(header("srv-2") + BIND_FEATURES)

    async def iq_id(self) -> str:
        iq = await self.until(b"</iq>")
        found = re.search(rb"id=['\"]([^'\"]+)['\"]", iq)
        assert found is not None, iq
        return found.group(1).decode()


def case(script: Script, test: Callable[[UpstreamConfig, dict[str, Any]], Awaitable[None]],
         **config: Any) -> None:
    """Serve ``script`` on loopback and run ``test`` against it, bounded."""
    async def main() -> None:
        seen: dict[str, Any] = {}

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            peer = Peer(reader, writer)
            try:
                await script(peer)
                await asyncio.sleep(5)  # keep the connection open until the case is over
            except (ConnectionError, TimeoutError):
                pass
            finally:
                seen["received"] = peer.received
                writer.transport.abort()

        server = await asyncio.start_server(serve, HOST, 0)
        port = server.sockets[0].getsockname()[1]
        try:
            settings = {"domain": "localhost", "tls": "none", "connect_timeout": 2.0, **config}
            await test(UpstreamConfig(host=HOST, port=port, **settings), seen)
        finally:
            server.close()
    run_bounded(main(), 8)


async def connect(config: UpstreamConfig, **kw: Any) -> UpstreamLink:
    return await connect_upstream(config, None, "alice", "secret", max_stanza_bytes=65536,
                                  **kw)


def test_a_login_binds_and_discovers_handing_back_what_came_meanwhile_in_order() -> None:
    async def script(peer: Peer) -> None:
        await peer.login()
        bind = await peer.iq_id()
        peer.send(f"<iq type='result' id='{bind}'><bind xmlns='urn:ietf:params:xml:ns:xmpp-"
                  "bind'><jid>alice@localhost/phone</jid></bind></iq>")
        domain, account = await peer.iq_id(), await peer.iq_id()
        peer.send("<message from='bob@localhost/desk' id='m1'><body>early</body></message>")
        peer.send(f"<iq type='result' id='{domain}' from='localhost'><query xmlns='http://"
                  "jabber.org/protocol/disco#info'><feature var='urn:xmpp:ping'/></query></iq>")
        peer.send("<presence from='bob@localhost/desk'/>")
        peer.send(f"<iq type='error' id='{account}'/>")

    async def test(config: UpstreamConfig, _: dict[str, Any]) -> None:
        link = await connect(config)
        assert link.mechanism == "PLAIN"
        assert await link.bind("phone") == "alice@localhost/phone"
        info = await link.discover()
        assert info.domain_has("urn:xmpp:ping") and info.account is None
        first = await link.stream.next_event(1)
        second = await link.stream.next_event(1)
        assert isinstance(first, codec.StanzaReceived) and first.element.get("id") == "m1"
        assert isinstance(second, codec.StanzaReceived) and second.element.tag.endswith(
            "presence")
        link.stream.abort()
    case(script, test)


def test_required_starttls_not_offered_fails_before_any_credentials() -> None:
    async def script(peer: Peer) -> None:
        await peer.header()
        peer.send(header() + PLAIN_FEATURES)
        await peer.until(b"<never/>")  # everything the proxy sends, to its close

    async def test(config: UpstreamConfig, seen: dict[str, Any]) -> None:
        with pytest.raises(UpstreamUnavailable, match="does not offer STARTTLS"):
            await connect(config)
        async with asyncio.timeout(3):
            while "received" not in seen:  # the server saw the connection close
                await asyncio.sleep(0.02)
        assert b"auth" not in seen["received"] and b"starttls" not in seen["received"]
    case(script, test, tls="starttls")


def test_refused_credentials_raise_the_servers_condition() -> None:
    async def script(peer: Peer) -> None:
        await peer.login(f"<failure xmlns='{SASL}'><account-disabled/></failure>")

    async def test(config: UpstreamConfig, _: dict[str, Any]) -> None:
        with pytest.raises(UpstreamAuthFailed) as failed:
            await connect(config)
        assert failed.value.condition == "account-disabled"
    case(script, test)


def test_a_temporary_sasl_failure_is_unavailable_not_refused() -> None:
    async def script(peer: Peer) -> None:
        await peer.login(f"<failure xmlns='{SASL}'><temporary-auth-failure/></failure>")

    async def test(config: UpstreamConfig, _: dict[str, Any]) -> None:
        with pytest.raises(UpstreamUnavailable, match="temporary-auth-failure"):
            await connect(config)
    case(script, test)


def test_our_own_stream_id_raises_the_loop() -> None:
    async def script(peer: Peer) -> None:
        await peer.header()
        peer.send(header("issued-by-us") + PLAIN_FEATURES)

    async def test(config: UpstreamConfig, _: dict[str, Any]) -> None:
        with pytest.raises(UpstreamLoop):
            await connect(config, own_stream_ids=frozenset({"issued-by-us"}))
    case(script, test)


def test_a_refused_bind_raises_with_the_servers_error_and_a_new_bind_may_follow() -> None:
    async def script(peer: Peer) -> None:
        await peer.login()
        bind = await peer.iq_id()
        peer.send(f"<iq type='error' id='{bind}'><error type='cancel'><conflict xmlns="
                  "'urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>")
        bind = await peer.iq_id()
        peer.send(f"<iq type='result' id='{bind}'><bind xmlns='urn:ietf:params:xml:ns:xmpp-"
                  "bind'><jid>alice@localhost/laptop</jid></bind></iq>")

    async def test(config: UpstreamConfig, _: dict[str, Any]) -> None:
        link = await connect(config)
        with pytest.raises(UpstreamBindFailed) as failed:
            await link.bind("phone")
        assert str(failed.value) == "conflict"
        assert failed.value.error_reply.get("type") == "error"
        # The client may ask again on the same link (RFC 6120 §7.6.2).
        assert await link.bind("laptop") == "alice@localhost/laptop"
        link.stream.abort()
    case(script, test)


def test_a_silent_server_fails_the_login_within_the_connect_timeout() -> None:
    async def script(peer: Peer) -> None:
        await peer.header()  # and nothing more

    async def test(config: UpstreamConfig, _: dict[str, Any]) -> None:
        started = time.monotonic()
        with pytest.raises(UpstreamUnavailable, match="did not answer in time"):
            await connect(config)
        assert 0.3 <= time.monotonic() - started < 2.0
    case(script, test, connect_timeout=0.3)


def test_a_server_that_never_answers_the_discovery_delays_it_by_the_timeout_only() -> None:
    async def script(peer: Peer) -> None:
        await peer.login()
        bind = await peer.iq_id()
        peer.send(f"<iq type='result' id='{bind}'><bind xmlns='urn:ietf:params:xml:ns:xmpp-"
                  "bind'><jid>alice@localhost/phone</jid></bind></iq>")

    async def test(config: UpstreamConfig, _: dict[str, Any]) -> None:
        link = await connect(config)
        await link.bind("phone")
        started = time.monotonic()
        info = await link.discover()
        assert 0.3 <= time.monotonic() - started < 2.0
        assert info.domain is None and info.account is None
        link.stream.abort()
    case(script, test, discovery_timeout=0.3)


def test_a_refused_connection_is_unavailable() -> None:
    async def main() -> None:
        probe = await asyncio.start_server(lambda r, w: None, HOST, 0)
        port = probe.sockets[0].getsockname()[1]
        probe.close()
        await probe.wait_closed()
        with pytest.raises(UpstreamUnavailable, match=f"cannot connect to {HOST}:{port}"):
            await connect(UpstreamConfig(host=HOST, port=port, tls="none",
                                         connect_timeout=1.0))
    run_bounded(main(), 5)
