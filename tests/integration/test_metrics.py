"""/metrics, /healthz and /readyz of a real proxy in front of the legacy Prosody: the
figures move with traffic, readiness follows the server."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from tests.integration.proxyproc import ProxyProcess
from tests.peers.prosody import LegacyProsody
from tests.peers.smpeer import SmPeer
from tests.peers.util import LOCALHOST, free_port, run

pytestmark = pytest.mark.integration


async def get(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(LOCALHOST, port), 5)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = raw.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


def value(text: str, name: str, **labels: str) -> float:
    label_text = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(f"{name}{{{label_text}}}" if labels else name) + r" (\S+)"
    match = re.search(r"^" + pattern + r"$", text, re.M)
    assert match, f"no {name} {labels} in:\n{text}"
    return float(match.group(1))


def test_metrics_move_with_traffic_and_readiness_follows_the_server(
        tmp_path: Path, certs: tuple[Path, Path]) -> None:
    server = LegacyProsody(tmp_path / "prosody")
    server.start()
    port = free_port()
    proxy = ProxyProcess(tmp_path / "proxy", server, *certs,
                         metrics={"listen": f"{LOCALHOST}:{port}"},
                         store={"path": str(tmp_path / "front.sqlite3")})
    try:
        proxy.start()
        server.register("alice", "alice-pw")
        server.register("bob", "bob-pw")

        async def scenario() -> None:
            status, text = await get(port, "/metrics")
            assert status == 200
            assert value(text, "xmpp_front_sessions", state="active") == 0
            assert (await get(port, "/healthz"))[0] == 200
            assert (await get(port, "/readyz"))[0] == 200
            a = await SmPeer.login(proxy.host, proxy.port, "alice", "alice-pw", "phone")
            b = await SmPeer.login(proxy.host, proxy.port, "bob", "bob-pw", "pc")
            for n in range(5):
                a.message("bob@localhost/pc", f"m{n}")
            await a.wait_acked(6)
            await b.wait_bodies(5)
            await asyncio.sleep(0.5)  # the server's confirmation of the last ones
            text = (await get(port, "/metrics"))[1]
            assert value(text, "xmpp_front_sessions", state="active") == 2
            assert value(text, "xmpp_front_upstream_links", state="up") == 2
            assert value(text, "xmpp_front_client_connections") == 2
            assert value(text, "xmpp_front_ledger_stanzas_total", lane="c2s",
                         exit="delivered") >= 6
            assert value(text, "xmpp_front_ledger_stanzas_total", lane="s2c",
                         exit="entered") >= 5
            a.abort()  # alice's phone drops: her session hibernates
            await asyncio.sleep(0.5)
            text = (await get(port, "/metrics"))[1]
            assert value(text, "xmpp_front_sessions", state="hibernating") == 1
            server.kill()
            await asyncio.sleep(5.5)  # past the readiness cache
            status, body = await get(port, "/readyz")
            assert status == 503 and "not ready" in body
            assert (await get(port, "/healthz"))[0] == 200  # the proxy itself is fine
            server.start()
            await asyncio.sleep(5.5)
            assert (await get(port, "/readyz"))[0] == 200
            assert (await get(port, "/nope"))[0] == 404
            b.abort()

        run(scenario(), 60)
    finally:
        proxy.stop()
        server.stop()
