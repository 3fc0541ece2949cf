"""Roster versioning (RFC 6121 §2.6), subscription pre-approval (§3.4) and roster groups
(§2.3.3) through the proxy in front of the legacy Prosody, which has neither versioning nor
pre-approval (tests/peers/prosody_plugins hide them): what clients see is the proxy's own.

Raw clients read the exact ``ver`` attributes and pushes (and answer every push, as a client
must); slixmpp clients play the contacts. The legacy server is asked directly, on a fresh
connection, whenever a test needs to know what really reached it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

import pytest
from lxml import etree

from tests.integration.proxyproc import ProxyProcess
from tests.peers import clients
from tests.peers.prosody import LegacyProsody
from tests.peers.rawclient import RawClient, raw_login, tostring
from tests.peers.util import run

pytestmark = pytest.mark.integration

Element = etree._Element
Peer = ProxyProcess | LegacyProsody
# (jid, name, subscription, ask, approved, groups in the order they came)
View = tuple[str | None, str | None, str | None, str | None, str | None, tuple[str, ...]]

ROSTER = "jabber:iq:roster"
IQ = "{jabber:client}iq"
PRESENCE = "{jabber:client}presence"
QUERY = f"{{{ROSTER}}}query"
ITEM = f"{{{ROSTER}}}item"
GROUP = f"{{{ROSTER}}}group"
STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
ROSTERVER = "{urn:xmpp:features:rosterver}ver"
PREAPPROVAL = "{urn:xmpp:features:pre-approval}sub"


# ---------------------------------------------------------------------- helpers


def user(jid: str) -> str:
    return jid.split("@")[0]


def item_xml(jid: str, name: str | None = None, groups: tuple[str, ...] | list[str] = (),
             subscription: str | None = None) -> str:
    attrs = f" jid={quoteattr(jid)}"
    if name is not None:
        attrs += f" name={quoteattr(name)}"
    if subscription is not None:
        attrs += f" subscription={quoteattr(subscription)}"
    return f"<item{attrs}>" + "".join(f"<group>{escape(g)}</group>" for g in groups) + "</item>"


def view(item: Element) -> View:
    return (item.get("jid"), item.get("name"), item.get("subscription"), item.get("ask"),
            item.get("approved"), tuple(g.text or "" for g in item.findall(GROUP)))


def server_view(v: View) -> View:
    """What the legacy server itself would show of an item (it knows no ``approved``)."""
    return (*v[:4], None, v[5])


def is_push(el: Element) -> bool:
    return el.tag == IQ and el.get("type") == "set" and el.find(QUERY) is not None


def pushed(push: Element) -> View:
    (item,) = push.find(QUERY).findall(ITEM)
    return view(item)


def push_ver(push: Element) -> str:
    ver = push.find(QUERY).get("ver")
    assert ver, f"a roster push without ver: {tostring(push)}"
    return ver


def full_roster(result: Element) -> tuple[str | None, list[View]]:
    """(ver, items) of a roster result that carries the roster."""
    assert result.get("type") == "result", tostring(result)
    query = result.find(QUERY)
    assert query is not None, f"expected the full roster, got {tostring(result)}"
    return query.get("ver"), [view(i) for i in query.findall(ITEM)]


def assert_empty_result(result: Element) -> None:
    assert result.get("type") == "result" and len(result) == 0, \
        f"expected an empty result, got {tostring(result)}"


def by_jid(views: list[View]) -> dict[str | None, View]:
    out = {v[0]: v for v in views}
    assert len(out) == len(views), f"an item listed twice: {views}"
    return out


def error_of(reply: Element) -> tuple[str | None, str | None]:
    """(type, condition) of an error reply."""
    assert reply.get("type") == "error", tostring(reply)
    error = reply.find("{jabber:client}error")
    assert error is not None, tostring(reply)
    condition = next(etree.QName(c).localname for c in error
                     if etree.QName(c).namespace == STANZAS and etree.QName(c).localname != "text")
    return error.get("type"), condition


class Client:
    """A raw client that reads its stream exactly: every element is kept in ``seen``; every
    roster push is answered with a result (RFC 6121 §2.1.6) and its id kept in ``answered``."""

    def __init__(self, raw: RawClient) -> None:
        self.raw = raw
        self.seen: list[Element] = []
        self.answered: list[str] = []

    @classmethod
    async def login(cls, peer: Peer, account: tuple[str, str], resource: str) -> Client:
        port = peer.c2s_port if isinstance(peer, LegacyProsody) else peer.port
        raw = await raw_login(peer.host, port, user(account[0]), account[1],
                              direct_tls=False, resource=resource)
        return cls(raw)

    def send(self, data: str) -> None:
        self.raw.send(data)

    def abort(self) -> None:
        self.raw.abort()

    async def next(self, timeout: float = 10.0) -> Element:
        el = await self.raw.read_element(timeout)
        self.seen.append(el)
        if is_push(el):
            self.raw.send(f"<iq type='result' id={quoteattr(el.get('id', ''))}/>")
            self.answered.append(el.get("id", ""))
        return el

    async def until(self, match: Callable[[Element], bool], timeout: float = 10.0) -> Element:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            el = await self.next(max(0.0, deadline - loop.time()))
            if match(el):
                return el

    async def request(self, type_: str, payload: str, timeout: float = 10.0) -> Element:
        iq_id = self.raw.next_id(type_)
        self.send(f"<iq type='{type_}' id='{iq_id}'>{payload}</iq>")
        return await self.until(lambda e: e.tag == IQ and e.get("id") == iq_id
                                and e.get("type") in ("result", "error"), timeout)

    async def get(self, ver: str | None = "", timeout: float = 10.0) -> Element:
        """A roster get; ``ver=None`` sends none."""
        attr = "" if ver is None else f" ver={quoteattr(ver)}"
        return await self.request("get", f"<query xmlns='{ROSTER}'{attr}/>", timeout)

    async def set(self, item: str, timeout: float = 10.0) -> Element:
        return await self.request("set", f"<query xmlns='{ROSTER}'>{item}</query>", timeout)

    async def push(self, timeout: float = 10.0) -> Element:
        return await self.until(is_push, timeout)

    async def pushes(self, count: int, timeout: float = 10.0) -> list[Element]:
        return [await self.push(timeout) for _ in range(count)]

    async def quiet(self, seconds: float) -> list[Element]:
        """Everything that arrives within ``seconds`` (pushes answered)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        got: list[Element] = []
        while (remaining := deadline - loop.time()) > 0:
            try:
                got.append(await self.next(remaining))
            except TimeoutError:
                break
        return got

    def roster_pushes(self) -> list[Element]:
        return [e for e in self.seen if is_push(e)]

    def subscribe_requests(self) -> list[Element]:
        return [e for e in self.seen if e.tag == PRESENCE and e.get("type") == "subscribe"]


async def upstream_roster(server: LegacyProsody, account: tuple[str, str]) -> list[View]:
    """The account's roster as the legacy server has it: a full get on a fresh direct
    connection (a legacy server has no versioning: always the full roster)."""
    direct = await Client.login(server, account, "check")
    try:
        _, items = full_roster(await direct.get(None))
        return items
    finally:
        direct.abort()


async def fill(client: Client, items: list[str], timeout: float = 60.0) -> None:
    """Roster sets pipelined in one write; returns when every one is answered."""
    ids = [client.raw.next_id("fill") for _ in items]
    client.send("".join(f"<iq type='set' id='{i}'><query xmlns='{ROSTER}'>{x}</query></iq>"
                        for i, x in zip(ids, items, strict=True)))
    waiting = set(ids)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while waiting:
        el = await client.next(max(0.0, deadline - loop.time()))
        if el.tag == IQ and el.get("id") in waiting:
            assert el.get("type") == "result", tostring(el)
            waiting.discard(el.get("id"))


async def wait_for(check: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise TimeoutError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.05)


def subscription(client: Any, contact: str) -> str:
    """The subscription of ``contact`` in a slixmpp client's roster."""
    return str(client.client_roster[contact]["subscription"])


@pytest.fixture
def loud(tmp_path: Path, certs: tuple[Path, Path]) -> Iterator[tuple[LegacyProsody,
                                                                     ProxyProcess]]:
    """A private legacy server logging every stanza it receives (debug level), with a proxy
    in front of it: to check what never reached the server."""
    server = LegacyProsody(tmp_path / "prosody", log_level="debug")
    server.start()
    proxy = ProxyProcess(tmp_path / "proxy", server, *certs)
    try:
        proxy.start()
        yield server, proxy
    finally:
        proxy.stop()
        server.stop()


def received_by_server(server: LegacyProsody, needle: str) -> list[str]:
    """Lines of the server's debug log recording a received stanza that contains ``needle``."""
    return [line for line in server.log_path.read_text(errors="replace").splitlines()
            if "Received[" in line and needle in line]


# ---------------------------------------------------------------------- versioning


def test_stream_features_offer_versioning_and_pre_approval_the_server_lacks(
        proxy, prosody, accounts) -> None:
    alice = accounts("alice")

    async def scenario() -> None:
        for port, offered in ((proxy.port, True), (prosody.c2s_port, False)):
            raw = await RawClient.connect(proxy.host, port, direct_tls=False)
            try:
                features = await raw.login_plain(user(alice[0]), alice[1])
                assert (features.find(ROSTERVER) is not None) is offered, tostring(features)
                assert (features.find(PREAPPROVAL) is not None) is offered, tostring(features)
            finally:
                raw.abort()

    run(scenario(), 30)


def test_empty_ver_gives_the_full_roster_with_a_ver_and_that_ver_an_empty_result(
        proxy, prosody, accounts) -> None:
    alice = accounts("alice")

    async def scenario() -> None:
        a = await Client.login(proxy, alice, "phone")
        try:
            await fill(a, [item_xml("romeo@example.net", "Romeo", ["Friends"]),
                           item_xml("mercutio@example.net")])
            assert not a.roster_pushes()  # not interested yet (§2.2): no pushes
            expected = by_jid([server_view(v) for v in await upstream_roster(prosody, alice)])
            assert set(expected) == {"romeo@example.net", "mercutio@example.net"}

            ver, items = full_roster(await a.get(""))
            assert ver
            assert by_jid(items) == expected
            assert_empty_result(await a.get(ver))
            again_ver, again = full_roster(await a.get(None))  # no ver: the full roster too
            assert by_jid(again) == expected
            assert again_ver == ver
            assert_empty_result(await a.get(ver))
            assert not await a.quiet(0.5)
        finally:
            a.abort()

    run(scenario(), 30)


def test_old_version_gets_an_empty_result_then_the_changes_in_order(loud) -> None:
    server, proxy = loud
    alice = server.register("alice", "alice-pw"), "alice-pw"
    x, y, z = "x@example.net", "y@example.net", "z@example.net"

    async def scenario() -> None:
        desk = await Client.login(proxy, alice, "desk")
        try:
            await desk.get("")
            await fill(desk, [item_xml(y, "Why", ["Old"]), item_xml(z, "Zed")])
            phone = await Client.login(proxy, alice, "phone")
            old_ver, items = full_roster(await phone.get(""))
            assert {v[0] for v in items} == {y, z}
            phone.abort()  # the phone goes away; another resource changes the roster

            await desk.set(item_xml(x, None, ["A"]))                      # add
            await desk.set(item_xml(y, "Why", ["New 1", "New 2"]))        # change groups
            await desk.set(item_xml(z, subscription="remove"))            # remove
            await desk.set(item_xml(x, "Ex", ["B"]))                      # change again
            await desk.quiet(0.3)
            desk_vers = [push_ver(p) for p in desk.roster_pushes()]
            upstream = by_jid(await upstream_roster(server, alice))
            assert sorted(upstream) == [x, y]
            assert sorted(upstream[y][5]) == ["New 1", "New 2"]  # in the server's own order

            phone = await Client.login(proxy, alice, "phone")
            try:
                assert_empty_result(await phone.get(old_ver))
                pushes = await phone.pushes(3)
                # One push per changed item, in its final state, in order of last change.
                assert [pushed(p) for p in pushes] == [
                    upstream[y], (z, None, "remove", None, None, ()), upstream[x]]
                assert upstream[x] == (x, "Ex", "none", None, None, ("B",))
                vers = [push_ver(p) for p in pushes]
                assert len({old_ver, *vers}) == 4
                assert not [e for e in await phone.quiet(0.7) if is_push(e)]
                # The last push's ver is the current version, the same for every resource.
                assert vers[-1] == desk_vers[-1]
                assert_empty_result(await phone.get(vers[-1]))
                assert phone.answered == [p.get("id") for p in pushes]
                # The answers to the proxy's own pushes stay with it: the server never sees
                # them. A ping sent after them marks how far the server's log must reach.
                ping = await phone.request("get", "<ping xmlns='urn:xmpp:ping'/>")
                assert ping.get("type") == "result", tostring(ping)
            finally:
                phone.abort()
        finally:
            desk.abort()
        ping_id = ping.get("id")
        await wait_for(lambda: bool(received_by_server(server, f"id='{ping_id}'")), 5,
                       "the ping in the server's log")
        for push_id in phone.answered:
            assert not received_by_server(server, push_id), push_id
        # Control: the server's log does record what clients send through the proxy.
        assert received_by_server(server, "type='set'")

    run(scenario(), 40)


def test_versions_survive_a_proxy_restart(make_proxy, accounts, tmp_path: Path) -> None:
    store = {"path": str(tmp_path / "x.sqlite3")}
    alice = accounts("alice")
    first = make_proxy(store=store)

    async def before() -> str:
        a = await Client.login(first, alice, "phone")
        try:
            await fill(a, [item_xml("romeo@example.net", "Romeo", ["Friends"]),
                           item_xml("nurse@example.net", "Nurse"),
                           item_xml("tybalt@example.net", None, ["Ελλάδα"])])
            ver, items = full_roster(await a.get(""))
            assert len(items) == 3
            assert ver
            return ver
        finally:
            a.abort()

    old_ver = run(before(), 30)
    first.stop()
    second = make_proxy(store=store)

    async def after() -> None:
        a = await Client.login(second, alice, "phone")
        desk = await Client.login(second, alice, "desk")
        try:
            assert_empty_result(await a.get(old_ver))
            assert not await a.quiet(0.5)
            await desk.get("")
            await desk.set(item_xml("paris@example.net", "Paris"))
            live = await a.push()
            assert pushed(live) == ("paris@example.net", "Paris", "none", None, None, ())
            new_ver = push_ver(live)
            assert new_ver != old_ver
            # The change log goes on from where the first process left it.
            phone = await Client.login(second, alice, "tablet")
            try:
                assert_empty_result(await phone.get(old_ver))
                (push,) = await phone.pushes(1)
                assert pushed(push) == pushed(live)
                assert push_ver(push) == new_ver
                assert not [e for e in await phone.quiet(0.5) if is_push(e)]
            finally:
                phone.abort()
        finally:
            a.abort()
            desk.abort()

    run(after(), 30)


def test_server_pushes_carry_ver_and_versions_never_repeat(proxy, accounts) -> None:
    alice = accounts("alice")
    x = "x@example.net"

    async def scenario() -> None:
        phone = await Client.login(proxy, alice, "phone")
        desk = await Client.login(proxy, alice, "desk")
        try:
            v0, _ = full_roster(await phone.get(""))
            await desk.get("")
            vers, views = [], []
            for item in (item_xml(x, "Ex", ["Friends"]), item_xml(x, subscription="remove"),
                         item_xml(x, "Ex", ["Friends"])):  # add, remove, re-add the same
                assert (await desk.set(item)).get("type") == "result"
                push = await phone.push()
                vers.append(push_ver(push))
                views.append(pushed(push))
            assert views == [(x, "Ex", "none", None, None, ("Friends",)),
                             (x, None, "remove", None, None, ()),
                             (x, "Ex", "none", None, None, ("Friends",))]
            # The roster went back to an earlier content; its version did not.
            assert len({v0, *vers}) == 4, [v0, *vers]
            await desk.quiet(0.3)
            assert [push_ver(p) for p in desk.roster_pushes()] == vers  # one shared cache
            assert_empty_result(await phone.get(vers[2]))
            assert_empty_result(await phone.get(vers[0]))
            (catch_up,) = await phone.pushes(1)  # x changed since: its final state only
            assert pushed(catch_up) == views[2] and push_ver(catch_up) == vers[2]
            assert not [e for e in await phone.quiet(0.5) if is_push(e)]
        finally:
            phone.abort()
            desk.abort()

    run(scenario(), 30)


def test_unchanged_roster_reloaded_by_the_server_keeps_its_version(
        own_prosody, certs, tmp_path: Path) -> None:
    server = own_prosody
    alice = server.register("alice", "alice-pw"), "alice-pw"
    proxy = ProxyProcess(tmp_path / "proxy", server, *certs)
    # Twenty items, each in six groups of its own.
    items = [item_xml(f"c{n}@example.net", f"C{n}",
                      [f"{word}{n}" for word in ("Família", "友達", "Ελλάδα", "Work", "zeta",
                                                 "Alpha")])
             for n in range(20)]

    async def before() -> str:
        a = await Client.login(proxy, alice, "phone")
        try:
            await fill(a, items)
            ver, got = full_roster(await a.get(""))
            assert ver and len(got) == 20
            return ver
        finally:
            a.abort()

    async def after(ver: str) -> None:
        a = await Client.login(proxy, alice, "phone")
        try:
            result = await a.get(ver)
            extra = [pushed(e) for e in await a.quiet(1.0) if is_push(e)]
            assert len(result) == 0 and not extra, (
                f"the roster did not change, yet {len(extra)} pushes follow: {extra[:3]}")
        finally:
            a.abort()

    proxy.start()
    try:
        ver = run(before(), 30)
        server.restart()  # nothing changes in the roster; the server reloads it
        run(after(ver), 30)
    finally:
        proxy.stop()


# ---------------------------------------------------------------------- pre-approval


def test_pre_approved_contact_subscribes_without_the_user_seeing_the_request(
        proxy, accounts) -> None:
    alice, bob = accounts("alice"), accounts("bob")

    async def scenario() -> None:
        a = await Client.login(proxy, alice, "phone")
        b = await clients.connect_client(bob[0] + "/pc", bob[1], proxy.host, proxy.port,
                                         direct_tls=False)
        try:
            await a.get("")
            a.send("<presence/>")
            await b.get_roster(timeout=10)
            a.send(f"<presence type='subscribed' to='{bob[0]}'/>")  # nobody asked: pre-approve
            push = await a.push()
            assert pushed(push) == (bob[0], None, "none", None, "true", ())
            assert push_ver(push)
            _, items = full_roster(await a.get(""))
            assert by_jid(items)[bob[0]][4] == "true"

            alice_online = clients.Inbox(b, "presence_available",
                                         lambda p: p["from"].bare == alice[0])
            b.send_presence_subscription(pto=alice[0])
            await wait_for(lambda: subscription(b, alice[0]) in ("to", "both"), 10,
                           "bob's subscription to alice")
            assert str((await alice_online.get(10))["from"]) == alice[0] + "/phone"
            # alice's roster follows: bob now has her presence, the pre-approval is used up.
            done = await a.until(lambda e: is_push(e) and pushed(e)[2] == "from")
            assert pushed(done) == (bob[0], None, "from", None, None, ())
            await a.quiet(0.5)
            assert not a.subscribe_requests(), [tostring(e) for e in a.subscribe_requests()]
            _, items = full_roster(await a.get(""))
            assert by_jid(items)[bob[0]] == (bob[0], None, "from", None, None, ())
        finally:
            a.abort()
            await clients.disconnect(b)

    run(scenario(), 40)


def test_unsubscribed_cancels_a_pre_approval(proxy, accounts) -> None:
    alice, carol = accounts("alice"), accounts("carol")

    async def scenario() -> None:
        a = await Client.login(proxy, alice, "phone")
        c = await clients.connect_client(carol[0] + "/pc", carol[1], proxy.host, proxy.port,
                                         direct_tls=False)
        try:
            await a.get("")
            a.send("<presence/>")
            await c.get_roster(timeout=10)
            a.send(f"<presence type='subscribed' to='{carol[0]}'/>")
            approved = await a.push()
            assert pushed(approved)[4] == "true"
            a.send(f"<presence type='unsubscribed' to='{carol[0]}'/>")
            cancelled = await a.push()
            assert pushed(cancelled) == (carol[0], None, "none", None, None, ())
            assert push_ver(cancelled) != push_ver(approved)
            _, items = full_roster(await a.get(""))
            assert by_jid(items)[carol[0]][4] is None

            c.send_presence_subscription(pto=alice[0])
            request = await a.until(lambda e: e.tag == PRESENCE
                                    and e.get("type") == "subscribe")
            assert request.get("from", "").split("/")[0] == carol[0]
            await asyncio.sleep(0.5)
            assert subscription(c, alice[0]) == "none"  # nobody approved it
            a.send(f"<presence type='subscribed' to='{carol[0]}'/>")  # a real approval now
            await wait_for(lambda: subscription(c, alice[0]) in ("to", "both"), 10,
                           "carol's subscription to alice")
        finally:
            a.abort()
            await clients.disconnect(c)

    run(scenario(), 40)


def test_pre_approval_survives_a_proxy_restart(make_proxy, accounts, tmp_path: Path) -> None:
    store = {"path": str(tmp_path / "x.sqlite3")}
    alice, dave = accounts("alice"), accounts("dave")
    first = make_proxy(store=store)

    async def before() -> None:
        a = await Client.login(first, alice, "phone")
        try:
            await a.get("")
            a.send(f"<presence type='subscribed' to='{dave[0]}'/>")
            assert pushed(await a.push())[4] == "true"
        finally:
            a.abort()

    run(before(), 30)
    first.stop()
    second = make_proxy(store=store)

    async def after() -> None:
        a = await Client.login(second, alice, "phone")
        d = await clients.connect_client(dave[0] + "/pc", dave[1], second.host, second.port,
                                         direct_tls=False)
        try:
            _, items = full_roster(await a.get(""))
            assert by_jid(items)[dave[0]] == (dave[0], None, "none", None, "true", ())
            a.send("<presence/>")
            await a.request("get", "<ping xmlns='urn:xmpp:ping'/>")  # presence is through
            await d.get_roster(timeout=10)
            d.send_presence_subscription(pto=alice[0])
            await wait_for(lambda: subscription(d, alice[0]) in ("to", "both"), 10,
                           "dave's subscription to alice")
            await a.until(lambda e: is_push(e) and pushed(e)[2] == "from")
            await a.quiet(0.5)
            assert not a.subscribe_requests(), [tostring(e) for e in a.subscribe_requests()]
        finally:
            a.abort()
            await clients.disconnect(d)

    run(after(), 40)


# ---------------------------------------------------------------------- groups


def test_several_no_and_non_ascii_groups_survive_cache_versions_and_diffs(
        proxy, prosody, accounts) -> None:
    alice = accounts("alice")
    contacts = [
        ("maria@example.net", "Maria", ["Família", "友達", "Ελλάδα", "Work", "ünï 🎉"]),
        ("nobody@example.net", "Nobody", []),
        ("sofia@example.net", None, ["Ελλάδα"]),
        ("tomo@example.net", "Ωmega 友", ["Friends", "friends"]),  # case-sensitive: two
    ]

    async def scenario() -> None:
        phone = await Client.login(proxy, alice, "phone")
        desk = await Client.login(proxy, alice, "desk")
        try:
            v0, empty = full_roster(await phone.get(""))
            assert not empty
            await desk.get("")
            for jid, name, groups in contacts:
                assert (await desk.set(item_xml(jid, name, groups))).get("type") == "result"
            live = await phone.pushes(len(contacts))
            upstream = by_jid(await upstream_roster(prosody, alice))
            for jid, name, groups in contacts:  # the server kept them (in an order of its own)
                assert upstream[jid][1] == name and sorted(upstream[jid][5]) == sorted(groups)
            order = [jid for jid, _, _ in contacts]
            # Live pushes, catch-up pushes and the full roster: the server's groups, in the
            # server's order.
            assert [pushed(p) for p in live] == [upstream[j] for j in order]
            catch_up = await Client.login(proxy, alice, "tablet")
            try:
                assert_empty_result(await catch_up.get(v0))
                got = await catch_up.pushes(len(contacts))
                assert [pushed(p) for p in got] == [upstream[j] for j in order]
                ver, items = full_roster(await catch_up.get(""))
                assert ver == push_ver(got[-1])
                assert by_jid(items) == upstream
            finally:
                catch_up.abort()
        finally:
            phone.abort()
            desk.abort()

    run(scenario(), 30)


def test_duplicate_or_empty_groups_are_refused_before_reaching_the_server(
        proxy, prosody, accounts) -> None:
    alice = accounts("alice")
    keep = "keep@example.net"

    async def scenario() -> None:
        a = await Client.login(proxy, alice, "phone")
        try:
            await a.get("")
            assert (await a.set(item_xml(keep, "Keep", ["G"]))).get("type") == "result"
            await a.push()
            before = await upstream_roster(prosody, alice)
            refused = [
                (item_xml(keep, "Changed", ["G", "G"]), "bad-request"),
                (item_xml("dup@example.net", None, ["Família", "Família"]), "bad-request"),
                (item_xml("empty@example.net", "E", [""]), "not-acceptable"),
                ("<item jid='empty2@example.net'><group>ok</group><group></group></item>",
                 "not-acceptable"),
                ("<item jid='both@example.net'><group/><group/></item>", "not-acceptable"),
            ]
            for item, condition in refused:
                assert error_of(await a.set(item)) == ("modify", condition), item
            assert not [e for e in await a.quiet(0.5) if is_push(e)]
            # Nothing reached the server: its roster is as it was.
            assert await upstream_roster(prosody, alice) == before == [
                (keep, "Keep", "none", None, None, ("G",))]
            # The stream goes on; groups differing only in case are not duplicates.
            ok = item_xml("case@example.net", None, ["Friends", "friends"])
            assert (await a.set(ok)).get("type") == "result"
            assert sorted(pushed(await a.push())[5]) == ["Friends", "friends"]
        finally:
            a.abort()

    run(scenario(), 30)


GROUP_MIX: list[list[str]] = [[], ["Friends"], ["Família", "友達"], ["Ελλάδα", "Work", "Family"],
                              ["Coworkers"]]


def test_five_hundred_items_with_mixed_groups(proxy, prosody, accounts) -> None:
    alice = accounts("alice")
    items = [item_xml(f"contact{n}@example.net", None if n % 3 == 0 else f"Contact {n} ✓",
                      GROUP_MIX[n % len(GROUP_MIX)]) for n in range(500)]

    async def scenario() -> None:
        # Filled directly upstream; this connection stays, so the server keeps the roster
        # loaded (and the order of each item's groups) while the proxy reads it.
        direct = await Client.login(prosody, alice, "filler")
        try:
            await fill(direct, items)
            _, reference = full_roster(await direct.get(None, timeout=20))
            assert len(reference) == 500
            a = await Client.login(proxy, alice, "phone")
            try:
                ver, got = full_roster(await a.get(None, timeout=20))
                assert ver
                assert got == reference  # complete, unchanged, in the server's order
                assert_empty_result(await a.get(ver))
                assert not await a.quiet(0.5)
            finally:
                a.abort()
        finally:
            direct.abort()

    run(scenario(), 50)
