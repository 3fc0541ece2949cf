"""Message carbons (XEP-0280) and blocking (XEP-0191) through the proxy in front of the
legacy Prosody: with its carbons and blocklist modules off the proxy provides both; with
them on it passes everything through and no copy or push arrives twice.

Raw clients: two or three resources of one account through the proxy, and a contact (bob)
logged in directly on Prosody. Counts are taken after a quiet period, so a doubled copy
would show.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from lxml import etree

from tests.integration.conftest import MakeAccount, MakeProxy
from tests.integration.proxyproc import ProxyProcess
from tests.peers.prosody import LegacyProsody
from tests.peers.rawclient import RawClient, raw_login
from tests.peers.util import run

pytestmark = pytest.mark.integration

Element = etree._Element
CARBONS = "urn:xmpp:carbons:2"
BLOCKING = "urn:xmpp:blocking"
MESSAGE = "{jabber:client}message"
IQ = "{jabber:client}iq"
BODY = "{jabber:client}body"
FORWARDED_BODY = "{urn:xmpp:forward:0}forwarded/{jabber:client}message/{jabber:client}body"
STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
QUIET = 1.5  # seconds without anything new before counting what arrived


def user(jid: str) -> str:
    return jid.split("@")[0]


async def login(host: str, port: int, account: tuple[str, str], resource: str) -> RawClient:
    client = await raw_login(host, port, user(account[0]), account[1], direct_tls=False,
                             resource=resource, timeout=15.0)
    client.send("<presence/>")
    return client


async def via_proxy(proxy: ProxyProcess, account: tuple[str, str], resource: str) -> RawClient:
    return await login(proxy.host, proxy.port, account, resource)


async def direct(server: LegacyProsody, account: tuple[str, str], resource: str) -> RawClient:
    return await login(server.host, server.c2s_port, account, resource)


async def collect(client: RawClient, quiet: float = QUIET, limit: float = 15.0) -> list[Element]:
    """Everything that arrives until nothing has for ``quiet`` seconds (at most ``limit``)."""
    seen: list[Element] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while loop.time() < deadline:
        try:
            seen.append(await client.read_element(quiet))
        except TimeoutError:
            break
    return seen


def bodies(elements: list[Element]) -> list[str]:
    return [el.findtext(BODY) or "" for el in elements
            if el.tag == MESSAGE and el.find(BODY) is not None]


def carbon_bodies(elements: list[Element], kind: str) -> list[str]:
    return [el.findtext(f"{{{CARBONS}}}{kind}/{FORWARDED_BODY}") or "" for el in elements
            if el.tag == MESSAGE and el.find(f"{{{CARBONS}}}{kind}") is not None]


def chat(to: str, body: str, extra: str = "") -> str:
    return (f"<message to='{to}' type='chat' id='{secrets.token_hex(4)}'>"
            f"<body>{body}</body>{extra}</message>")


async def enable(client: RawClient) -> None:
    answer = await client.iq(f"<enable xmlns='{CARBONS}'/>", type="set", timeout=10.0)
    assert answer.get("type") == "result", etree.tostring(answer)


async def domain_features(client: RawClient) -> set[str]:
    answer = await client.iq("<query xmlns='http://jabber.org/protocol/disco#info'/>",
                             to="localhost", timeout=10.0)
    return {f.get("var", "") for f in answer.iter("{http://jabber.org/protocol/disco#info}feature")}


async def settle(*clients: RawClient) -> None:
    """Read away what login brought (presence, ...), so counts start clean."""
    await asyncio.gather(*(collect(c, quiet=0.7) for c in clients))


# ---------------------------------------------------------------------- carbons, emulated


def test_carbons_emulated_both_ways(prosody: LegacyProsody, make_proxy: MakeProxy,
                                    accounts: MakeAccount) -> None:
    alice, bob = accounts("alice"), accounts("bob")
    proxy = make_proxy()

    async def scenario() -> None:
        a = await via_proxy(proxy, alice, "a")
        b = await via_proxy(proxy, alice, "b")
        c = await via_proxy(proxy, alice, "c")  # never enables carbons
        contact = await direct(prosody, bob, "desk")
        try:
            assert CARBONS in await domain_features(a)
            await enable(a)
            await enable(b)
            await settle(a, b, c, contact)

            # Sent: a's message reaches bob, and b (not c, not a) as a <sent/> copy.
            a.send(chat(bob[0], "from a"))
            got_b, got_c, got_a, got_bob = await asyncio.gather(
                collect(b), collect(c), collect(a), collect(contact))
            assert bodies(got_bob) == ["from a"]
            assert carbon_bodies(got_b, "sent") == ["from a"]
            assert got_c == [] and got_a == []
            (copy,) = [el for el in got_b if el.tag == MESSAGE]
            assert copy.get("from") == alice[0] and copy.get("to") == f"{alice[0]}/b"

            # Received, to a's full JID: b gets a <received/> copy, c nothing.
            contact.send(chat(f"{alice[0]}/a", "to a"))
            got_a, got_b, got_c = await asyncio.gather(collect(a), collect(b), collect(c))
            assert bodies(got_a) == ["to a"]
            assert carbon_bodies(got_b, "received") == ["to a"] and bodies(got_b) == []
            assert got_c == []

            # To the bare JID: Prosody gives it to every resource of the top priority
            # itself, so nobody gets a copy on top (exactly one each).
            contact.send(chat(alice[0], "to all"))
            got_a, got_b, got_c = await asyncio.gather(collect(a), collect(b), collect(c))
            for got in (got_a, got_b, got_c):
                assert bodies(got) == ["to all"]
                assert carbon_bodies(got, "received") == []

            # Private: no copy either way.
            a.send(chat(bob[0], "secret", f"<private xmlns='{CARBONS}'/>"))
            contact.send(chat(f"{alice[0]}/a", "secret back", f"<private xmlns='{CARBONS}'/>"))
            got_a, got_b, got_bob = await asyncio.gather(collect(a), collect(b),
                                                          collect(contact))
            assert bodies(got_bob) == ["secret"] and bodies(got_a) == ["secret back"]
            assert [el for el in got_b if el.tag == MESSAGE] == []

            # A negative priority: the server no longer routes bare-JID messages to b;
            # the proxy gives b a <received/> copy of what a got.
            b.send("<presence><priority>-1</priority></presence>")
            await settle(a, b, c, contact)
            contact.send(chat(alice[0], "top only"))
            got_a, got_b = await asyncio.gather(collect(a), collect(b))
            assert bodies(got_a) == ["top only"]
            assert bodies(got_b) == [] and carbon_bodies(got_b, "received") == ["top only"]
        finally:
            for client in (a, b, c, contact):
                client.abort()

    run(scenario(), timeout=120)


# ---------------------------------------------------------------------- blocking, emulated


def test_blocking_emulated_both_ways_pushes_and_restart(
        prosody: LegacyProsody, make_proxy: MakeProxy, accounts: MakeAccount) -> None:
    alice, bob = accounts("alice"), accounts("bob")
    proxy = make_proxy()

    async def scenario() -> None:
        a = await via_proxy(proxy, alice, "a")
        b = await via_proxy(proxy, alice, "b")
        contact = await direct(prosody, bob, "desk")
        try:
            assert BLOCKING in await domain_features(a)
            listed = await b.iq(f"<blocklist xmlns='{BLOCKING}'/>", timeout=10.0)
            assert listed.get("type") == "result" and len(listed[0]) == 0
            await settle(a, b, contact)
            answer = await a.iq(f"<block xmlns='{BLOCKING}'><item jid='{bob[0]}'/></block>",
                                type="set", timeout=10.0)
            assert answer.get("type") == "result"
            got_b, got_bob = await asyncio.gather(collect(b), collect(contact))
            (push,) = [el for el in got_b if el.tag == IQ]  # b asked for the list
            assert push.get("type") == "set"
            assert [i.get("jid") for i in push.iter(f"{{{BLOCKING}}}item")] == [bob[0]]
            b.send(f"<iq type='result' id='{push.get('id')}'/>")
            # Bob (a contact without a subscription) gets no presence from the block.

            # From bob: nothing reaches either resource; bob learns alice is unavailable.
            contact.send(chat(f"{alice[0]}/a", "let me in"))
            got_a, got_b, got_bob = await asyncio.gather(collect(a), collect(b),
                                                          collect(contact))
            assert bodies(got_a) == [] and bodies(got_b) == []
            errors = [el for el in got_bob if el.tag == MESSAGE and el.get("type") == "error"]
            assert len(errors) == 1
            assert errors[0].find(f"{{jabber:client}}error/{{{STANZAS}}}service-unavailable") \
                is not None
            # To the bare JID: Prosody hands it to both resources; bob gets one error.
            contact.send(chat(alice[0], "anyone there?"))
            got_a, got_b, got_bob = await asyncio.gather(collect(a), collect(b),
                                                          collect(contact))
            assert bodies(got_a) == [] and bodies(got_b) == []
            assert len([el for el in got_bob if el.tag == MESSAGE]) == 1

            # To bob: refused with not-acceptable and <blocked/>, from either resource.
            b.send(chat(bob[0], "never sent"))
            got_b, got_bob = await asyncio.gather(collect(b), collect(contact))
            (err,) = [el for el in got_b if el.tag == MESSAGE]
            assert err.get("type") == "error"
            assert err.find(f"{{jabber:client}}error/{{{STANZAS}}}not-acceptable") is not None
            assert err.find("{jabber:client}error/{urn:xmpp:blocking:errors}blocked") is not None
            assert bodies(got_bob) == []
        finally:
            for client in (a, b):
                client.abort()

        # The blocklist survives a restart of the proxy.
        proxy.stop()
        proxy.log_path.unlink()
        proxy.start()
        a = await via_proxy(proxy, alice, "a")
        try:
            listed = await a.iq(f"<blocklist xmlns='{BLOCKING}'/>", timeout=10.0)
            assert [i.get("jid") for i in listed.iter(f"{{{BLOCKING}}}item")] == [bob[0]]
            await settle(a, contact)
            contact.send(chat(f"{alice[0]}/a", "still blocked"))
            assert bodies(await collect(a)) == []
            answer = await a.iq(f"<unblock xmlns='{BLOCKING}'/>", type="set", timeout=10.0)
            assert answer.get("type") == "result"
            await settle(a, contact)
            contact.send(chat(f"{alice[0]}/a", "hello again"))
            assert bodies(await collect(a)) == ["hello again"]
        finally:
            a.abort()
            contact.abort()

    run(scenario(), timeout=120)


# ---------------------------------------------------------------------- server modules on


@pytest.fixture
def modern_prosody(tmp_path: Path) -> Iterator[LegacyProsody]:
    server = LegacyProsody(tmp_path / "prosody", carbons=True, blocklist=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_server_modules_pass_through_exactly_once(modern_prosody: LegacyProsody,
                                                  tmp_path: Path,
                                                  certs: tuple[Path, Path]) -> None:
    server = modern_prosody
    alice = (server.register("alice", "pw-alice"), "pw-alice")
    bob = (server.register("bob", "pw-bob"), "pw-bob")
    proxy = ProxyProcess(tmp_path / "proxy", server, *certs).start()

    async def scenario() -> None:
        a = await via_proxy(proxy, alice, "a")
        b = await via_proxy(proxy, alice, "b")
        contact = await direct(server, bob, "desk")
        try:
            await enable(a)
            await enable(b)  # the server's: the proxy passed both enables on
            listed = await b.iq(f"<blocklist xmlns='{BLOCKING}'/>", timeout=10.0)
            assert listed.get("type") == "result"
            await settle(a, b, contact)

            a.send(chat(bob[0], "sent once"))
            contact.send(chat(f"{alice[0]}/a", "received once"))
            got_a, got_b, got_bob = await asyncio.gather(collect(a), collect(b),
                                                          collect(contact))
            assert bodies(got_bob) == ["sent once"]
            assert bodies(got_a) == ["received once"]
            assert carbon_bodies(got_b, "sent") == ["sent once"]
            assert carbon_bodies(got_b, "received") == ["received once"]
            assert carbon_bodies(got_a, "sent") == [] and carbon_bodies(got_a, "received") == []

            answer = await a.iq(f"<block xmlns='{BLOCKING}'><item jid='{bob[0]}'/></block>",
                                type="set", timeout=10.0)
            assert answer.get("type") == "result"
            got_b = await collect(b)
            pushes = [el for el in got_b if el.tag == IQ and el.get("type") == "set"]
            assert len(pushes) == 1
            contact.send(chat(f"{alice[0]}/a", "blocked by the server"))
            assert bodies(await collect(a)) == []
        finally:
            for client in (a, b, contact):
                client.abort()

    try:
        run(scenario(), timeout=120)
    finally:
        proxy.stop()
    # The proxy never answered a carbons or blocking iq itself: the server did.
    assert not proxy.events("blocklist_changed")
