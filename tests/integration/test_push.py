"""Push notifications (XEP-0357) through the proxy, against the real Prosody: a pubsub
component on the same server (``push.localhost``) stands in for the app server. A slixmpp
client enables push, its link is cut (the session hibernates), bob writes to it, and the
published notification is read back from the pubsub node."""

from __future__ import annotations

import asyncio
import secrets
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from tests.integration.proxyproc import ProxyProcess
from tests.peers import clients
from tests.peers.prosody import LegacyProsody
from tests.peers.rawclient import RawClient, raw_login
from tests.peers.util import run

PUSH = "urn:xmpp:push:0"
PUBSUB = "http://jabber.org/protocol/pubsub"
DATA = "jabber:x:data"
APP_SERVER = "push.localhost"
OPTIONS = (f"<x xmlns='{DATA}' type='submit'><field var='FORM_TYPE'>"
           "<value>http://jabber.org/protocol/pubsub#publish-options</value></field></x>")


APP_ACCOUNT = "appserver"  # the app server's side: it provisions nodes (a server admin)
NODE_CONFIG = (f"<x xmlns='{DATA}' type='submit'><field var='FORM_TYPE' type='hidden'>"
               "<value>http://jabber.org/protocol/pubsub#node_config</value></field>"
               "<field var='pubsub#publish_model'><value>open</value></field></x>")


@pytest.fixture
def push_prosody(tmp_path: Path) -> Iterator[LegacyProsody]:
    server = LegacyProsody(tmp_path / "prosody", pubsub_component=APP_SERVER,
                           extra_config=f'admins = {{ "{APP_ACCOUNT}@localhost" }}')
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def app_server(server: LegacyProsody, node: str) -> RawClient:
    """The app server's client: provisions ``node`` (anyone may publish: the node name is
    the secret here) and reads what is published to it."""
    password = secrets.token_urlsafe(12)
    server.register(APP_ACCOUNT, password)
    client = await raw_login(server.host, server.c2s_port, APP_ACCOUNT, password,
                             direct_tls=False)
    reply = await client.iq(f"<pubsub xmlns='{PUBSUB}'><create node='{node}'/><configure>"
                            f"{NODE_CONFIG}</configure></pubsub>", type="set", to=APP_SERVER,
                            timeout=10)
    assert reply.get("type") == "result", etree.tostring(reply)
    return client


def account(server: LegacyProsody, prefix: str) -> tuple[str, str]:
    password = secrets.token_urlsafe(12)
    return server.register(f"{prefix}{secrets.token_hex(4)}", password), password


def start_proxy(tmp_path: Path, server: LegacyProsody, certs: tuple[Path, Path],
                **overrides: Any) -> ProxyProcess:
    return ProxyProcess(tmp_path / "proxy", server, *certs, **overrides).start()


async def enable_push(client: Any, node: str, jid: str = APP_SERVER) -> Any:
    iq = client.make_iq_set()
    iq.xml.append(ET.fromstring(f"<enable xmlns='{PUSH}' jid='{jid}' node='{node}'>{OPTIONS}"
                                "</enable>"))
    return await iq.send(timeout=10)


async def items(reader: RawClient, node: str) -> list[etree._Element]:
    reply = await reader.iq(f"<pubsub xmlns='{PUBSUB}'><items node='{node}'/></pubsub>",
                            to=APP_SERVER, timeout=10)
    if reply.get("type") != "result":
        raise AssertionError(etree.tostring(reply))
    return list(reply.iter(f"{{{PUBSUB}}}item"))


def summary(item: etree._Element) -> dict[str, str | None]:
    form = item.find(f"{{{PUSH}}}notification/{{{DATA}}}x")
    assert form is not None, etree.tostring(item)
    return {f.get("var", ""): f.findtext(f"{{{DATA}}}value")
            for f in form.iter(f"{{{DATA}}}field")}


async def wait_items(reader: RawClient, node: str, count: int,
                     timeout: float = 15.0) -> list[etree._Element]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        found = await items(reader, node)
        if len(found) >= count:
            return found
        assert asyncio.get_running_loop().time() < deadline, \
            f"{len(found)} of {count} notifications on node {node} within {timeout}s"
        await asyncio.sleep(0.2)


async def hibernate(client: Any, proxy: ProxyProcess, jid: str) -> None:
    client.transport.abort()  # the phone's network is gone
    await asyncio.to_thread(proxy.wait_event, "hibernating", timeout=10)


def test_a_hibernating_client_gets_a_push_and_none_while_it_is_active(
        tmp_path: Path, push_prosody: LegacyProsody, certs: tuple[Path, Path]) -> None:
    proxy = start_proxy(tmp_path, push_prosody, certs)
    alice, bob = (account(push_prosody, p) for p in ("alice", "bob"))
    node = f"n{secrets.token_hex(4)}"

    async def scenario() -> None:
        a = await clients.connect_client(alice[0] + "/phone", alice[1], proxy.host, proxy.port,
                                         direct_tls=False,
                                         plugins=("xep_0030", "xep_0199", "xep_0198"))
        b = await raw_login(proxy.host, proxy.port, bob[0].split("@")[0], bob[1],
                            direct_tls=False, resource="pc")
        reader = await app_server(push_prosody, node)
        try:
            info = await a.plugin["xep_0030"].get_info(jid=alice[0], timeout=10)
            assert PUSH in info["disco_info"]["features"]
            answer = await enable_push(a, node)
            assert answer["type"] == "result"
            inbox = clients.Inbox(a)
            b.send(f"<message to='{alice[0]}/phone' type='chat' id='live'>"
                   "<body>while active</body></message>")
            assert (await inbox.get(10))["body"] == "while active"
            await asyncio.sleep(1.0)
            assert await items(reader, node) == []  # active: no notification

            await hibernate(a, proxy, alice[0])
            b.send(f"<message to='{alice[0]}/phone' type='chat' id='h1'>"
                   "<body>secret words</body></message>")
            (item,) = await wait_items(reader, node, 1)
            form = summary(item)
            assert form["FORM_TYPE"] == "urn:xmpp:push:summary"
            assert form["message-count"] == "1"
            assert form["last-message-sender"] == f"{bob[0]}/pc"
            assert "last-message-body" not in form  # include_body is off by default
        finally:
            b.abort()
            reader.abort()
            await clients.disconnect(a, 1)

    try:
        run(scenario(), 60)
    finally:
        proxy.stop()
    published = proxy.events("push_published")
    assert [e["count"] for e in published] == [1]
    assert published[0]["app_server"] == APP_SERVER


def test_coalesced_with_the_body_when_configured_and_registrations_survive_a_restart(
        tmp_path: Path, push_prosody: LegacyProsody, certs: tuple[Path, Path]) -> None:
    store = str(tmp_path / "front.sqlite3")
    settings: dict[str, Any] = {"push": {"min_interval": 3, "include_body": True},
                                "store": {"path": store}}
    alice, bob = (account(push_prosody, p) for p in ("alice", "bob"))
    node = f"n{secrets.token_hex(4)}"

    async def register() -> None:
        a = await clients.connect_client(alice[0] + "/phone", alice[1], proxy.host,
                                         proxy.port, direct_tls=False)
        try:
            assert (await enable_push(a, node))["type"] == "result"
        finally:
            await clients.disconnect(a)

    proxy = start_proxy(tmp_path, push_prosody, certs, **settings)
    try:
        run(register(), 30)
    finally:
        proxy.stop()
    # A new proxy process on the same store: the client does not enable again.
    proxy = ProxyProcess(tmp_path / "proxy2", push_prosody, *certs, **settings).start()

    async def scenario() -> None:
        a = await clients.connect_client(alice[0] + "/phone", alice[1], proxy.host, proxy.port,
                                         direct_tls=False,
                                         plugins=("xep_0030", "xep_0199", "xep_0198"))
        b = await raw_login(proxy.host, proxy.port, bob[0].split("@")[0], bob[1],
                            direct_tls=False, resource="pc")
        reader = await app_server(push_prosody, node)
        try:
            await hibernate(a, proxy, alice[0])
            for n in range(3):
                b.send(f"<message to='{alice[0]}/phone' type='chat' id='c{n}'>"
                       f"<body>burst {n}</body></message>")
            first = await wait_items(reader, node, 1)
            assert summary(first[0])["message-count"] == "1"
            both = await wait_items(reader, node, 2, timeout=15)
            assert len(both) == 2
            counts = sorted(summary(i)["message-count"] or "" for i in both)
            assert counts == ["1", "2"]  # the other two, coalesced after min_interval
            later = next(i for i in both if summary(i)["message-count"] == "2")
            assert summary(later)["last-message-body"] == "burst 2"
            await asyncio.sleep(3.5)
            assert len(await items(reader, node)) == 2  # nothing more to say
        finally:
            b.abort()
            reader.abort()
            await clients.disconnect(a, 1)

    try:
        run(scenario(), 60)
    finally:
        proxy.stop()


def test_an_app_server_the_legacy_server_cannot_reach_is_disabled(
        tmp_path: Path, push_prosody: LegacyProsody, certs: tuple[Path, Path]) -> None:
    """Prosody without s2s answers the publish to another domain with an error: the proxy
    drops that registration (XEP-0357 §7.1) and publishes no more to it."""
    proxy = start_proxy(tmp_path, push_prosody, certs, push={"min_interval": 0})
    alice, bob = account(push_prosody, "alice"), account(push_prosody, "bob")

    async def scenario() -> None:
        a = await clients.connect_client(alice[0] + "/phone", alice[1], proxy.host, proxy.port,
                                         direct_tls=False,
                                         plugins=("xep_0030", "xep_0199", "xep_0198"))
        b = await raw_login(proxy.host, proxy.port, bob[0].split("@")[0], bob[1],
                            direct_tls=False, resource="pc")
        try:
            assert (await enable_push(a, "N", jid="push.elsewhere.example"))["type"] == "result"
            await hibernate(a, proxy, alice[0])
            b.send(f"<message to='{alice[0]}/phone' type='chat'><body>1</body></message>")
            disabled = await asyncio.to_thread(proxy.wait_event, "push_disabled", timeout=15)
            assert disabled["app_server"] == "push.elsewhere.example"
            assert disabled["why"].startswith("publish error")
            b.send(f"<message to='{alice[0]}/phone' type='chat'><body>2</body></message>")
            await asyncio.sleep(1.0)
        finally:
            b.abort()
            await clients.disconnect(a, 1)

    try:
        run(scenario(), 60)
    finally:
        proxy.stop()
    assert len(proxy.events("push_published")) == 1
