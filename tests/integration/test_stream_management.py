"""XEP-0198 toward clients, through the proxy in front of the legacy Prosody (which has none).

Raw-wire tests drive the cases no client library sends; the slixmpp test is the real thing.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from tests.integration.proxyproc import ProxyProcess
from tests.peers import clients
from tests.peers.rawclient import RawClient, raw_login, stream_error_condition
from tests.peers.util import run

pytestmark = pytest.mark.integration

SM = "urn:xmpp:sm:3"
STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
STREAM = "http://etherx.jabber.org/streams"
MESSAGE = "{jabber:client}message"


def q(local: str) -> str:
    return f"{{{SM}}}{local}"


def user(jid: str) -> str:
    return jid.split("@")[0]


def condition(el: etree._Element) -> str:
    return next(etree.QName(c).localname for c in el if etree.QName(c).localname != "text")


async def login(proxy: ProxyProcess, account: tuple[str, str], resource: str) -> RawClient:
    return await raw_login(proxy.host, proxy.port, user(account[0]), account[1],
                           direct_tls=False, resource=resource)


async def enable(raw: RawClient, attrs: str = "resume='true'") -> etree._Element:
    raw.send(f"<enable xmlns='{SM}' {attrs}/>")
    enabled = await raw.read_element(10)
    while etree.QName(enabled).namespace != SM:  # a roster push or presence came first
        enabled = await raw.read_element(10)
    assert enabled.tag == q("enabled"), etree.tostring(enabled)
    return enabled


async def messages(raw: RawClient, count: int, timeout: float = 10) -> list[etree._Element]:
    """The next ``count`` messages; SM requests met on the way are answered honestly."""
    got: list[etree._Element] = []
    handled = 0
    while len(got) < count:
        el = await raw.read_element(timeout)
        if el.tag == MESSAGE:
            got.append(el)
            handled += 1
        elif el.tag == q("r"):
            pass  # left unanswered here: tests that need acks send them explicitly
    return got


async def presence_to(raw: RawClient) -> None:
    """Initial presence, so the server routes bare-JID messages and presence to us."""
    raw.send("<presence/>")


async def send_numbered(sender: Any, to: str, prefix: str, count: int) -> None:
    for n in range(count):
        sender.send_message(mto=to, mbody=f"{prefix}{n}", mtype="chat")


def test_enable_before_bind_and_second_enable_are_refused_and_the_stream_goes_on(
        proxy, accounts) -> None:
    alice = accounts("alice")

    async def scenario() -> None:
        raw = await RawClient.connect(proxy.host, proxy.port, direct_tls=False)
        try:
            features = await raw.login_plain(user(alice[0]), alice[1])
            assert features.find(q("sm")) is not None  # offered after authentication
            raw.send(f"<enable xmlns='{SM}'/>")
            refused = await raw.read_element(10)
            assert refused.tag == q("failed") and condition(refused) == "unexpected-request"
            assert await raw.bind("r1")  # the stream goes on
            await enable(raw)
            raw.send(f"<enable xmlns='{SM}'/>")
            again = await raw.read_element(10)
            assert again.tag == q("failed") and condition(again) == "unexpected-request"
            raw.send(f"<r xmlns='{SM}'/>")
            answer = await raw.read_element(10)
            assert answer.tag == q("a") and answer.get("h") == "0"
        finally:
            raw.abort()

    run(scenario(), 30)


def test_sm_is_not_offered_before_authentication_and_resume_there_fails(proxy) -> None:
    async def scenario() -> None:
        raw = await RawClient.connect(proxy.host, proxy.port, direct_tls=False)
        try:
            features = await raw.secure()
            assert features.find(q("sm")) is None
            raw.send(f"<resume xmlns='{SM}' previd='whatever' h='0'/>")
            refused = await raw.read_element(10)
            assert refused.tag == q("failed") and condition(refused) == "unexpected-request"
        finally:
            raw.abort()

    run(scenario(), 30)


def test_pipelined_enable_stanzas_and_r(proxy, accounts) -> None:
    alice, bob = accounts("alice"), accounts("bob")

    async def scenario() -> None:
        raw = await login(proxy, alice, "pipe")
        try:
            raw.send(f"<enable xmlns='{SM}' resume='true'/>"
                     f"<message to='{bob[0]}' type='chat'><body>1</body></message>"
                     f"<message to='{bob[0]}' type='chat'><body>2</body></message>"
                     f"<iq type='get' id='p1' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>"
                     f"<r xmlns='{SM}'/>")
            enabled = await raw.read_element(10)
            assert enabled.tag == q("enabled")
            ack = await raw.read_until(q("a"), 10)
            assert ack.get("h") == "3"
        finally:
            raw.abort()

    run(scenario(), 30)


def test_counters_wrap_at_2_to_the_32_both_ways(make_proxy, accounts) -> None:
    proxy = make_proxy(stream_management={"debug_counter_start": 2 ** 32 - 2})
    alice, bob = accounts("alice"), accounts("bob")

    async def scenario() -> None:
        a = await login(proxy, alice, "wrap")
        b = await login(proxy, bob, "wrapb")
        try:
            await enable(a)
            for n in range(3):  # inbound: 2^32-2 + 3 wraps to 1
                a.send(f"<message to='{bob[0]}/wrapb' type='chat'><body>{n}</body></message>")
            a.send(f"<r xmlns='{SM}'/>")
            assert (await a.read_until(q("a"), 10)).get("h") == "1"
            for n in range(4):  # outbound: the proxy's count wraps to 2
                b.send(f"<message to='{alice[0]}/wrap' type='chat'><body>{n}</body></message>")
            await messages(a, 4)
            a.send(f"<a xmlns='{SM}' h='2'/>")  # acknowledges all four, across the wrap
            a.send(f"<r xmlns='{SM}'/>")
            assert (await a.read_until(q("a"), 10)).get("h") == "1"
            a.send(f"<a xmlns='{SM}' h='3'/>")  # one more than was sent: too high
            assert await a.expect_closed(10)
            errors = [e for e in a.seen_before_close if e.tag == f"{{{STREAM}}}error"]
            assert stream_error_condition(errors[0]) == "undefined-condition"
            too_high = errors[0].find(q("handled-count-too-high"))
            assert too_high is not None and too_high.get("send-count") == "2"
        finally:
            a.abort()
            b.abort()

    run(scenario(), 40)


def test_ack_timeout_treats_the_connection_as_dead_and_hibernates(make_proxy, accounts) -> None:
    proxy = make_proxy(stream_management={"ack_timeout": 1})
    alice, bob = accounts("alice"), accounts("bob")

    async def scenario() -> None:
        a = await login(proxy, alice, "silent")
        b = await login(proxy, bob, "talker")
        try:
            enabled = await enable(a)
            b.send(f"<message to='{alice[0]}/silent' type='chat'><body>hi</body></message>")
            await a.read_until(q("r"), 10)  # the proxy asks; we never answer
            assert await a.expect_closed(10)
            # The session hibernates rather than ends: it can be resumed.
            again = await RawClient.connect(proxy.host, proxy.port, direct_tls=False)
            await again.login_plain(user(alice[0]), alice[1])
            again.send(f"<resume xmlns='{SM}' previd='{enabled.get('id')}' h='0'/>")
            resumed = await again.read_element(10)
            assert resumed.tag == q("resumed")
            [msg] = await messages(again, 1)
            assert msg.findtext("{jabber:client}body") == "hi"
            again.abort()
        finally:
            a.abort()
            b.abort()

    run(scenario(), 40)
    assert any("ack_timeout" in e["reason"] for e in proxy.events("hibernating"))


def test_resume_after_bind_and_with_another_users_id_fail(proxy, accounts) -> None:
    alice, mallory = accounts("alice"), accounts("mallory")

    async def scenario() -> None:
        a = await login(proxy, alice, "victim")
        m = await login(proxy, mallory, "m")
        try:
            alice_id = (await enable(a)).get("id")
            m.send(f"<resume xmlns='{SM}' previd='{alice_id}' h='0'/>")  # after bind
            refused = await m.read_element(10)
            assert refused.tag == q("failed") and condition(refused) == "unexpected-request"
            thief = await RawClient.connect(proxy.host, proxy.port, direct_tls=False)
            await thief.login_plain(user(mallory[0]), mallory[1])
            thief.send(f"<resume xmlns='{SM}' previd='{alice_id}' h='0'/>")
            refused = await thief.read_element(10)
            assert refused.tag == q("failed") and condition(refused) == "item-not-found"
            assert refused.get("h") is None  # nothing about alice's session leaks
            thief.abort()
            a.send(f"<r xmlns='{SM}'/>")  # alice's session is untouched
            assert (await a.read_until(q("a"), 10)).get("h") == "0"
        finally:
            a.abort()
            m.abort()

    run(scenario(), 40)


def test_expired_id_fails_with_the_last_h_twice_then_the_client_may_bind(proxy,
                                                                         accounts) -> None:
    alice = accounts("alice")

    async def scenario() -> None:
        a = await login(proxy, alice, "short")
        old_id = (await enable(a, "resume='true' max='1'")).get("id")
        a.send(f"<message to='{alice[0]}/nowhere'><body>x</body></message>"
               f"<message to='{alice[0]}/nowhere'><body>y</body></message>")
        a.send(f"<r xmlns='{SM}'/>")
        await a.read_until(q("a"), 10)
        a.abort()
        await asyncio.sleep(2.5)  # past the granted max of 1 s
        for _ in range(2):
            b = await RawClient.connect(proxy.host, proxy.port, direct_tls=False)
            try:
                await b.login_plain(user(alice[0]), alice[1])
                b.send(f"<resume xmlns='{SM}' previd='{old_id}' h='0'/>")
                refused = await b.read_element(10)
                assert refused.tag == q("failed") and condition(refused) == "item-not-found"
                assert refused.get("h") == "2"
                assert await b.bind("short")  # and the client may bind on the same stream
            finally:
                b.abort()

    run(scenario(), 40)


def test_old_connection_still_open_gets_conflict(proxy, accounts) -> None:
    alice, bob = accounts("alice"), accounts("bob")

    async def scenario() -> None:
        old = await login(proxy, alice, "dup")
        b = await login(proxy, bob, "b")
        try:
            sm_id = (await enable(old)).get("id")
            new = await RawClient.connect(proxy.host, proxy.port, direct_tls=False)
            await new.login_plain(user(alice[0]), alice[1])
            new.send(f"<resume xmlns='{SM}' previd='{sm_id}' h='0'/>")
            assert (await new.read_element(10)).tag == q("resumed")
            assert await old.expect_closed(10)
            errors = [stream_error_condition(e) for e in old.seen_before_close
                      if e.tag == f"{{{STREAM}}}error"]
            assert errors == ["conflict"]
            b.send(f"<message to='{alice[0]}/dup' type='chat'><body>to the new one</body>"
                   "</message>")
            [msg] = await messages(new, 1)
            assert msg.findtext("{jabber:client}body") == "to the new one"
            new.abort()
        finally:
            old.abort()
            b.abort()

    run(scenario(), 40)


def test_queue_overflow_while_hibernating_ends_the_session(make_proxy, accounts) -> None:
    proxy = make_proxy(stream_management={"max_queue": 3})
    alice, bob = accounts("alice"), accounts("bob")

    async def scenario() -> None:
        a = await login(proxy, alice, "full")
        b = await login(proxy, bob, "sender")
        try:
            sm_id = (await enable(a)).get("id")
            a.abort()
            await asyncio.sleep(0.5)
            for n in range(5):
                b.send(f"<message to='{alice[0]}/full' type='chat'><body>{n}</body></message>")
            await asyncio.sleep(1.5)
            again = await RawClient.connect(proxy.host, proxy.port, direct_tls=False)
            await again.login_plain(user(alice[0]), alice[1])
            again.send(f"<resume xmlns='{SM}' previd='{sm_id}' h='0'/>")
            refused = await again.read_element(10)
            # Never a resume that skips stanzas: the session ended instead.
            assert refused.tag == q("failed") and condition(refused) == "item-not-found"
            again.abort()
        finally:
            b.abort()

    run(scenario(), 40)
    assert any("overflow" in e["reason"] for e in proxy.events("session_ended"))


def test_clean_close_then_resume_fails(proxy, accounts) -> None:
    alice = accounts("alice")

    async def scenario() -> None:
        a = await login(proxy, alice, "clean")
        sm_id = (await enable(a)).get("id")
        a.send(b"</stream:stream>")
        assert await a.expect_closed(10, reply=False)
        b = await RawClient.connect(proxy.host, proxy.port, direct_tls=False)
        try:
            await b.login_plain(user(alice[0]), alice[1])
            b.send(f"<resume xmlns='{SM}' previd='{sm_id}' h='0'/>")
            refused = await b.read_element(10)
            assert refused.tag == q("failed") and condition(refused) == "item-not-found"
        finally:
            b.abort()

    run(scenario(), 30)


def test_rebinding_the_resource_takes_the_hibernated_session_over(proxy, accounts) -> None:
    alice, bob = accounts("alice"), accounts("bob")

    async def scenario() -> None:
        watcher = await clients.connect_client(bob[0] + "/watch", bob[1], proxy.host,
                                               proxy.port, direct_tls=False)
        a = await login(proxy, alice, "tab")
        try:
            # Mutual subscription, so bob would see alice go offline.
            await a.iq("<query xmlns='jabber:iq:roster'/>")
            a.send("<presence/>")
            await watcher.get_roster(timeout=10)
            watcher.send_presence_subscription(pto=alice[0])
            await a.read_until("{jabber:client}presence", 10, type="subscribe")
            a.send(f"<presence to='{bob[0]}' type='subscribed'/>")
            await asyncio.sleep(0.5)
            offline = clients.Inbox(watcher, "presence_unavailable",
                                    lambda p: str(p["from"]) == alice[0] + "/tab")
            await enable(a)
            a.abort()
            await asyncio.sleep(0.3)
            watcher.send_message(mto=alice[0] + "/tab", mbody="while you were away",
                                 mtype="chat")
            await asyncio.sleep(0.5)
            b = await login(proxy, alice, "tab")  # bind the same resource, no resume
            try:
                [msg] = await messages(b, 1)
                assert msg.findtext("{jabber:client}body") == "while you were away"
                assert msg.find("{urn:xmpp:delay}delay") is not None
                await offline.expect_none(0.5)  # the upstream session was never rebound
            finally:
                b.abort()
        finally:
            a.abort()
            await clients.disconnect(watcher)

    run(scenario(), 40)
    assert proxy.events("taken_over")


def test_slixmpp_resumes_and_gets_every_message_exactly_once(proxy, accounts) -> None:
    alice, bob = accounts("alice"), accounts("bob")

    async def scenario() -> None:
        a = await clients.connect_client(alice[0] + "/phone", alice[1], proxy.host, proxy.port,
                                         direct_tls=False,
                                         plugins=("xep_0030", "xep_0199", "xep_0198"))
        b = await clients.connect_client(bob[0] + "/pc", bob[1], proxy.host, proxy.port,
                                         direct_tls=False)
        try:
            # bob follows alice's presence: he must never see her go offline.
            await a.get_roster(timeout=10)
            await b.get_roster(timeout=10)
            b.send_presence_subscription(pto=alice[0])
            deadline = asyncio.get_running_loop().time() + 10
            while b.client_roster[alice[0]]["subscription"] not in ("to", "both"):
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.1)
            a.send_presence()
            await asyncio.sleep(0.5)
            offline = clients.Inbox(b, "presence_unavailable",
                                    lambda p: str(p["from"]).startswith(alice[0]))
            inbox = clients.Inbox(a)
            await send_numbered(b, alice[0] + "/phone", "before-", 3)
            got = [(await inbox.get(10))["body"] for _ in range(3)]
            assert got == ["before-0", "before-1", "before-2"]

            resumed = asyncio.get_running_loop().create_future()
            a.add_event_handler("session_resumed",
                                lambda *_: resumed.done() or resumed.set_result(True))
            a.transport.abort()  # the network drops mid-conversation
            await asyncio.sleep(0.3)
            await send_numbered(b, alice[0] + "/phone", "during-", 5)
            await asyncio.sleep(0.5)
            a.connect(proxy.host, proxy.port)
            await asyncio.wait_for(resumed, 15)
            got = [(await inbox.get(10))["body"] for _ in range(5)]
            assert got == [f"during-{n}" for n in range(5)]
            await inbox.expect_none(1.0)  # exactly once
            await offline.expect_none(0.2)
        finally:
            await clients.disconnect(a)
            await clients.disconnect(b)

    run(scenario(), 60)


def test_timeout_with_store_delivers_at_next_login_also_after_a_proxy_restart(
        make_proxy, accounts, tmp_path: Path) -> None:
    store = {"path": str(tmp_path / "front.sqlite3")}
    proxy = make_proxy(store=store, stream_management={"on_timeout": "store"})
    alice, bob = accounts("alice"), accounts("bob")

    async def go_away() -> None:
        a = await login(proxy, alice, "phone")
        b = await login(proxy, bob, "pc")
        try:
            await enable(a, "resume='true' max='1'")
            a.abort()
            await asyncio.sleep(0.3)
            for n in range(3):
                b.send(f"<message to='{alice[0]}/phone' type='chat' id='s{n}'>"
                       f"<body>stored {n}</body></message>")
            await asyncio.sleep(2.5)  # the session times out with those unacknowledged
        finally:
            b.abort()

    run(go_away(), 30)
    assert proxy.events("undelivered")[-1]["stored"] == 3
    proxy.stop()
    restarted = make_proxy(store=store)  # a new proxy process on the same store

    async def come_back() -> list[etree._Element]:
        a = await login(restarted, alice, "laptop")
        try:
            a.send("<presence/>")  # stored messages follow initial presence
            return await messages(a, 3)
        finally:
            a.abort()

    got = run(come_back(), 30)
    assert [m.findtext("{jabber:client}body") for m in got] == [f"stored {n}" for n in range(3)]
    assert all(m.find("{urn:xmpp:delay}delay") is not None for m in got)


def test_timeout_with_bounce_returns_errors_to_the_sender(make_proxy, accounts) -> None:
    proxy = make_proxy(stream_management={"on_timeout": "bounce"})
    alice, bob = accounts("alice"), accounts("bob")

    async def scenario() -> None:
        a = await login(proxy, alice, "phone")
        b = await clients.connect_client(bob[0] + "/pc", bob[1], proxy.host, proxy.port,
                                         direct_tls=False)
        errors = clients.Inbox(b, "message_error")
        try:
            await enable(a, "resume='true' max='1'")
            a.abort()
            await asyncio.sleep(0.3)
            b.send_message(mto=alice[0] + "/phone", mbody="will bounce", mtype="chat")
            bounced = await errors.get(10)
            assert bounced["error"]["condition"] == "recipient-unavailable"
            assert str(bounced["from"]) == alice[0] + "/phone"
        finally:
            await clients.disconnect(b)

    run(scenario(), 30)
