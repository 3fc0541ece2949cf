"""A load balancer in front: listeners with ``proxy_protocol`` take the client's address
from a PROXY header (v1 or v2) sent before TLS, through a real TLS login against the legacy
Prosody; connections without a valid header, or from outside ``proxy_protocol_from``, are
closed with a log event."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import yaml

from tests.integration.proxyproc import ProxyProcess
from tests.peers.prosody import LegacyProsody
from tests.peers.rawclient import RawClient, unverified_context
from tests.peers.util import LOCALHOST, run
from proxy.proxyproto import encode_v1, encode_v2

pytestmark = pytest.mark.integration


def balanced_proxy(workdir: Path, server: LegacyProsody, certs: tuple[Path, Path],
                   **listener: object) -> ProxyProcess:
    """A proxy whose two listeners (STARTTLS, direct TLS) require a PROXY header."""
    proxy = ProxyProcess(workdir, server, *certs, **{
        "listen": [], "abuse": {"max_connections_per_address": 1}})
    proxy.config["listen"] = [
        {"host": LOCALHOST, "port": proxy.port, "proxy_protocol": True, **listener},
        {"host": LOCALHOST, "port": proxy.direct_tls_port, "direct_tls": True,
         "proxy_protocol": True, **listener}]
    proxy.config_path.write_text(yaml.safe_dump(proxy.config))
    return proxy


async def connect_behind(port: int, header: bytes, *, direct_tls: bool) -> RawClient:
    """What a balancer does: TCP, the header, then the client's own bytes (TLS at once on
    a direct-TLS listener, sent right behind the header as a client would)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(LOCALHOST, port), 5)
    writer.write(header)
    if direct_tls:
        await asyncio.wait_for(writer.start_tls(unverified_context(),
                                                server_hostname="localhost"), 10)
    return RawClient(reader, writer, host=LOCALHOST, port=port, tls=direct_tls,
                     server_hostname="localhost")


async def login(client: RawClient, user: str, password: str, resource: str) -> str:
    await client.login_plain(user, password, timeout=10)
    return await client.bind(resource, 10)


def test_v1_and_v2_headers_give_the_clients_address_on_both_listener_kinds(
        own_prosody: LegacyProsody, certs: tuple[Path, Path], tmp_path: Path) -> None:
    own_prosody.register("alice", "alice-pw")
    proxy = balanced_proxy(tmp_path / "proxy", own_prosody, certs).start()
    try:
        async def scenario() -> None:
            v1 = await connect_behind(proxy.port, encode_v1(("203.0.113.7", 40001),
                                                            (LOCALHOST, proxy.port)),
                                      direct_tls=False)
            assert await login(v1, "alice", "alice-pw", "v1") == "alice@localhost/v1"
            v2 = await connect_behind(proxy.direct_tls_port,
                                      encode_v2(("2001:db8::42", 40002),
                                                ("2001:db8::1", proxy.direct_tls_port)),
                                      direct_tls=True)
            assert await login(v2, "alice", "alice-pw", "v2") == "alice@localhost/v2"
            # The same claimed address again: over its per-address limit (1), so the
            # limit counts the client behind the balancer, not the balancer.
            again = await connect_behind(proxy.port, encode_v1(("203.0.113.7", 40003),
                                                               (LOCALHOST, proxy.port)),
                                         direct_tls=False)
            again.send(again.stream_header("localhost"))
            assert await again.expect_closed(10)
            for client in (v1, v2):
                await client.close()
        run(scenario(), 60)
        accepted = proxy.events("accepted")
        assert {e["peer"] for e in accepted} >= {"203.0.113.7:40001", "[2001:db8::42]:40002"}
        assert all(e["via"].startswith(f"{LOCALHOST}:") for e in accepted)
        auth = proxy.events("auth_ok")  # the abuse limits' address is this one too
        assert {e["peer"] for e in auth} == {"203.0.113.7:40001", "[2001:db8::42]:40002"}
        refused = proxy.wait_event("connection_refused")
        assert refused["peer"] == "203.0.113.7:40003"
    finally:
        proxy.stop()


def test_a_missing_or_broken_header_or_an_untrusted_peer_closes_the_connection(
        own_prosody: LegacyProsody, certs: tuple[Path, Path], tmp_path: Path) -> None:
    proxy = balanced_proxy(tmp_path / "proxy", own_prosody, certs,
                           proxy_protocol_from=["127.0.0.0/8"])
    proxy.config["limits"] = {"proxy_header_timeout": 1.0}
    proxy.config_path.write_text(yaml.safe_dump(proxy.config))
    untrusted = balanced_proxy(tmp_path / "untrusted", own_prosody, certs,
                               proxy_protocol_from=["192.0.2.0/24"])
    proxy.start()
    untrusted.start()
    try:
        async def closed_after(port: int, data: bytes, *, direct_tls: bool = False) -> bool:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(LOCALHOST, port), 5)
            writer.write(data)
            try:
                got = await asyncio.wait_for(reader.read(), 10)
            except ConnectionError:
                got = b""
            writer.close()
            return got == b""  # closed without an answer

        async def scenario() -> None:
            # A client that skipped the balancer: its stream header, then its ClientHello.
            assert await closed_after(proxy.port, b"<?xml version='1.0'?><stream:stream ")
            assert await closed_after(proxy.direct_tls_port, b"\x16\x03\x01\x02\x00\x01\x00")
            assert await closed_after(proxy.port, b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 1\r\n")
            assert await closed_after(proxy.port, b"PROXY TCP4 1.2.3.4")  # then silence
            assert await closed_after(untrusted.port, encode_v2(("198.51.100.1", 1),
                                                                (LOCALHOST, 2)))
        run(scenario(), 60)
        reasons = [e["reason"] for e in proxy.events("proxy_header_refused")]
        assert len(reasons) == 4, reasons
        assert sum("no PROXY protocol header" in r for r in reasons) == 2
        assert any("not a port" in r for r in reasons)
        assert any("within 1 s" in r for r in reasons)
        assert not proxy.events("accepted")  # nothing got as far as XMPP
        (refusal,) = untrusted.events("proxy_header_refused")
        assert "proxy_protocol_from" in refusal["reason"]
        assert refusal["peer"].startswith(f"{LOCALHOST}:")
    finally:
        proxy.stop()
        untrusted.stop()


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_the_clients_address_is_passed_upstream_in_a_proxy_header(
        own_prosody: LegacyProsody, certs: tuple[Path, Path], tmp_path: Path,
        version: str) -> None:
    """Prosody 0.12 as packaged takes no PROXY header, so the server here is a second
    xmpp-front with a PROXY listener in front of it (as jabberd2/ejabberd with it on would
    be): it must see the address of the client behind the first one, also after the first
    one reconnected to it."""
    own_prosody.register("alice", "alice-pw")
    server_side = balanced_proxy(tmp_path / "server-side", own_prosody, certs).start()
    front = ProxyProcess(tmp_path / "front", own_prosody, *certs,
                         upstream_port=server_side.port,
                         upstream={"proxy_protocol": version, "ca": str(certs[0])},
                         reconnect={"first_delay_max": 0.2, "base": 0.2, "cap": 1.0})
    front.start()
    try:
        async def scenario() -> None:
            client = await connect_behind(front.port, b"", direct_tls=False)
            address = client.writer.get_extra_info("sockname")
            assert await login(client, "alice", "alice-pw", "phone") == "alice@localhost/phone"
            seen = server_side.events("auth_ok")
            assert [e["peer"] for e in seen] == [f"{address[0]}:{address[1]}"]
            assert seen[0]["via"].startswith(f"{LOCALHOST}:")  # the front proxy's link
            server_side.stop()  # the "server" restarts: the front logs in again
            server_side.start()
            for _ in range(200):
                if front.events("upstream_restored"):
                    break
                await asyncio.sleep(0.05)
            assert front.events("upstream_restored")
            seen = server_side.events("auth_ok")
            assert [e["peer"] for e in seen] == [f"{address[0]}:{address[1]}"] * 2
            await client.close()
        run(scenario(), 60)
    finally:
        front.stop()
        server_side.stop()
