"""A listener behind a load balancer, in process: the session's client address is the one
the PROXY header gave (what the admin view shows), and the log's peer is it too."""

from __future__ import annotations

import asyncio

from proxy.proxyproto import encode_v1, encode_v2
from tests.peers.rawclient import RawClient
from tests.peers.util import LOCALHOST

from .playbook import DOMAIN, PASSWORD, Harness, playbook


async def behind_balancer(h: Harness, header: bytes, resource: str) -> RawClient:
    assert h.proxy is not None
    port = h.proxy.servers[0].sockets[0].getsockname()[1]
    reader, writer = await asyncio.wait_for(asyncio.open_connection(LOCALHOST, port), 2)
    writer.write(header)
    raw = RawClient(reader, writer, host=LOCALHOST, port=port, tls=False,
                    server_hostname=DOMAIN)
    await raw.login_plain("alice", PASSWORD, to=DOMAIN, timeout=2.0)
    await raw.bind(resource, timeout=2.0)
    return raw


@playbook(listen=[{"host": LOCALHOST, "port": 0, "proxy_protocol": True}])
async def test_the_sessions_client_address_is_the_headers(h: Harness) -> None:
    assert h.proxy is not None
    phone = await behind_balancer(h, encode_v1(("198.51.100.20", 50123), (LOCALHOST, 5222)),
                                  "phone")
    desk = await behind_balancer(h, encode_v2(("2001:db8::7", 443), ("2001:db8::1", 5222)),
                                 "desk")
    addresses = {s.jid: s.client_address for s in h.proxy.hub.sessions}
    assert addresses == {"alice@localhost/phone": "198.51.100.20:50123",
                         "alice@localhost/desk": "[2001:db8::7]:443"}
    auth = h.events("auth_ok")
    assert {e["peer"] for e in auth} == {"198.51.100.20:50123", "[2001:db8::7]:443"}
    assert all(e["via"].startswith(f"{LOCALHOST}:") for e in auth)
    for raw in (phone, desk):
        raw.abort()
