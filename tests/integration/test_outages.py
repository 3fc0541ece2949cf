"""Upstream outages: clients stay connected to the proxy while the legacy server crashes,
restarts or vanishes behind a fault-injecting relay, and nothing they send is lost."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from slixmpp.xmlstream import ET

from tests.integration.proxyproc import ProxyProcess
from tests.peers import clients
from tests.peers.faultrelay import FaultRelay
from tests.peers.prosody import LegacyProsody
from tests.peers.rawclient import RawClient, raw_login, stream_error_condition
from tests.peers.util import LOCALHOST, run

pytestmark = pytest.mark.integration

STREAM = "http://etherx.jabber.org/streams"
FAST = {"first_delay_max": 0.3, "base": 0.2, "cap": 1.0, "max_outage": 60}


@dataclass
class Setup:
    server: LegacyProsody
    relay: FaultRelay
    proxy: ProxyProcess

    def account(self, name: str) -> tuple[str, str]:
        return self.server.register(name, f"{name}-pw"), f"{name}-pw"


@contextmanager
def make_setup(tmp_path: Path, certs: tuple[Path, Path], *, prosody: dict[str, Any] | None = None,
               **proxy_overrides: Any) -> Iterator[Setup]:
    server = LegacyProsody(tmp_path / "prosody", **(prosody or {}))
    server.start()
    relay = FaultRelay(LOCALHOST, server.c2s_port).start()
    overrides = {"reconnect": FAST, **proxy_overrides}
    proxy = ProxyProcess(tmp_path / "proxy", server, *certs, upstream_port=relay.port,
                         **overrides)
    try:
        proxy.start()
        yield Setup(server, relay, proxy)
    finally:
        proxy.stop()
        relay.stop()
        server.stop()


@pytest.fixture
def setup(tmp_path: Path, certs) -> Iterator[Setup]:
    with make_setup(tmp_path, certs, prosody={"muc": True}) as s:
        yield s


@asynccontextmanager
async def chat_pair(s: Setup) -> AsyncIterator[tuple[Any, Any]]:
    """alice and bob logged in through the proxy; logged out at the end."""
    (a_jid, a_pw), (b_jid, b_pw) = s.account("alice"), s.account("bob")
    a = await clients.connect_client(a_jid + "/a", a_pw, s.proxy.host, s.proxy.port,
                                     direct_tls=False)
    try:
        b = await clients.connect_client(b_jid + "/b", b_pw, s.proxy.host, s.proxy.port,
                                         direct_tls=False)
        try:
            yield a, b
        finally:
            await clients.disconnect(b)
    finally:
        await clients.disconnect(a)


def assert_in_order(got: list[Any], expected: list[str]) -> None:
    """Each message exactly once and in order. One exception, the server's: when the
    receiver's own session was being restored too, a message the sender's replay reached
    the server with before the receiver was bound again is kept in the server's offline
    storage and delivered, with its <delay/>, after the receiver's restored presence, so
    after messages that were routed live in between. Those keep their order among
    themselves."""
    bodies = [m["body"] for m in got]
    assert sorted(bodies) == sorted(expected) and len(set(bodies)) == len(bodies), bodies
    delayed = [m["body"] for m in got if m.xml.find("{urn:xmpp:delay}delay") is not None]
    live = [body for body in bodies if body not in delayed]
    assert live == [x for x in expected if x in live], bodies
    assert delayed == [x for x in expected if x in delayed], bodies


async def exchange_through(outage, a, b, count: int = 30, *, pause: float = 0.05) -> None:
    """Numbered messages both ways while ``outage()`` (a coroutine) runs; every message must
    arrive exactly once and in order per sender, and both clients stay connected."""
    inbox_a, inbox_b = clients.Inbox(a), clients.Inbox(b)
    disconnected: list[str] = []
    for c in (a, b):
        c.add_event_handler("disconnected", lambda *_, c=c: disconnected.append(str(c.boundjid)))

    async def sender() -> None:
        for n in range(count):
            a.send_message(mto=b.boundjid.full, mbody=f"a{n}", mtype="chat")
            b.send_message(mto=a.boundjid.full, mbody=f"b{n}", mtype="chat")
            await asyncio.sleep(pause)

    await asyncio.gather(sender(), outage())
    got_b = [await inbox_b.get(30) for _ in range(count)]
    got_a = [await inbox_a.get(30) for _ in range(count)]
    assert_in_order(got_b, [f"a{n}" for n in range(count)])
    assert_in_order(got_a, [f"b{n}" for n in range(count)])
    await inbox_a.expect_none(1.0)  # exactly once
    await inbox_b.expect_none(0.1)
    assert disconnected == []


async def restored(s: Setup, count: int, timeout: float = 30) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while len(s.proxy.events("upstream_restored")) < count:
        assert asyncio.get_running_loop().time() < deadline, "sessions not restored"
        await asyncio.sleep(0.1)


def test_server_killed_and_restarted_twice_mid_flow(setup: Setup) -> None:
    async def outage() -> None:
        for n in range(2):
            await asyncio.sleep(0.4)
            setup.server.kill()
            await asyncio.sleep(0.5)
            setup.server.start()
            await restored(setup, 2 * (n + 1))  # both sessions back before the next crash

    async def scenario() -> None:
        async with chat_pair(setup) as (a, b):
            await exchange_through(outage, a, b, count=40)

    run(scenario(), 90)
    assert len(setup.proxy.events("upstream_restored")) >= 4  # two sessions, twice


def test_graceful_server_restart(setup: Setup) -> None:
    async def outage() -> None:
        await asyncio.sleep(0.4)
        await asyncio.to_thread(setup.server.stop)  # clients of Prosody get system-shutdown
        setup.server.start()

    async def scenario() -> None:
        async with chat_pair(setup) as (a, b):
            await exchange_through(outage, a, b, count=30)

    run(scenario(), 90)
    assert any("system-shutdown" in e["reason"] for e in setup.proxy.events("upstream_down"))


def chat_through_a_reset(s: Setup) -> None:
    """alice and bob chat while the link to the server is reset under them."""
    async def outage() -> None:
        await asyncio.sleep(0.4)
        s.relay.reset()

    async def scenario() -> None:
        async with chat_pair(s) as (a, b):
            await exchange_through(outage, a, b, count=20)

    run(scenario(), 60)


def test_reset_recovers_and_reuses_the_tls_session(tmp_path: Path, certs) -> None:
    # Prosody turns TLS session tickets off by default; a server that allows them lets
    # the proxy's reconnect skip the full handshake.
    with make_setup(tmp_path, certs, prosody={"tls_tickets": True}) as s:
        chat_through_a_reset(s)
        done = s.proxy.events("upstream_restored")
        assert len(done) == 2 and all(e["tls_resumed"] for e in done), (
            done, s.proxy.events("upstream_down"), s.proxy.events("upstream_reconnect_failed"))


def test_refusal_for_a_while_then_recovery_with_pings_answered_meanwhile(setup: Setup) -> None:
    async def scenario() -> None:
        async with chat_pair(setup) as (a, b):
            async def outage() -> None:
                await asyncio.sleep(0.3)
                setup.relay.refuse()
                setup.relay.reset()  # cut the established connections too
                await asyncio.sleep(0.5)
                # The server is away: a ping to it is answered by the proxy.
                rtt = await a.plugin["xep_0199"].ping(jid="localhost", timeout=5)
                assert rtt is not None
                await asyncio.sleep(1.5)
                setup.relay.pass_through()

            await exchange_through(outage, a, b, count=30)

    run(scenario(), 60)
    assert setup.proxy.events("upstream_reconnect_failed")


def test_blackhole_is_detected_within_ping_idle_plus_timeout(tmp_path: Path, certs) -> None:
    with make_setup(tmp_path, certs, upstream={"ping_idle": 1, "ping_timeout": 1}) as s:
        async def scenario() -> float:
            async with chat_pair(s) as (a, b):
                await asyncio.sleep(0.5)
                started = asyncio.get_running_loop().time()
                s.relay.blackhole()
                while not s.proxy.events("upstream_down"):
                    await asyncio.sleep(0.05)
                    assert asyncio.get_running_loop().time() - started < 10
                detected = asyncio.get_running_loop().time() - started
                s.relay.pass_through()
                inbox = clients.Inbox(b)
                a.send_message(mto=b.boundjid.full, mbody="after the blackhole", mtype="chat")
                assert (await inbox.get(20))["body"] == "after the blackhole"
                return detected

        detected = run(scenario(), 60)
        # ping_idle + ping_timeout, plus slack for a loaded machine (two test processes):
        # without the ping it would take TCP minutes to notice.
        assert detected <= 1 + 1 + 2.5
        assert any("no answer to a ping" in e["reason"] for e in s.proxy.events("upstream_down"))


def _stream_errors(raw: RawClient) -> list[str | None]:
    return [stream_error_condition(e) for e in raw.seen_before_close
            if e.tag == f"{{{STREAM}}}error"]


def _errored_messages(raw: RawClient) -> list[tuple[str | None, str | None]]:
    out = []
    for e in raw.seen_before_close:
        if e.tag == "{jabber:client}message" and e.get("type") == "error":
            cond = e.find("{jabber:client}error")
            out.append((e.get("id"), cond[0].tag.split("}")[1] if cond is not None else None))
    return out


def test_a_different_resource_at_rebind_gives_up_without_changing_the_jid(tmp_path: Path,
                                                                          certs) -> None:
    # Prosody keeps the blackholed session (it never saw the connection end) and, with
    # "increment", binds "res#1" to the proxy's new login instead of "res".
    with make_setup(tmp_path, certs, prosody={"extra_config": 'conflict_resolve = "increment"'},
                        upstream={"ping_idle": 1, "ping_timeout": 1}) as s:
        alice = s.account("alice")

        async def scenario() -> None:
            raw = await raw_login(s.proxy.host, s.proxy.port, "alice", alice[1],
                                  direct_tls=False, resource="res")
            try:
                # The old connection dies silently for good; the reconnect gets through at
                # once (no race between the first attempt and switching the relay back).
                s.relay.blackhole_existing()
                await asyncio.sleep(0.3)
                raw.send("<message to='nobody@localhost' id='lost1'><body>x</body></message>")
                while not s.proxy.events("upstream_down"):
                    await asyncio.sleep(0.05)
                assert await raw.expect_closed(20)
                assert _stream_errors(raw) == ["conflict"]
                assert ("lost1", "remote-server-timeout") in _errored_messages(raw)
            finally:
                raw.abort()

        run(scenario(), 60)
        [gave_up] = s.proxy.events("upstream_gave_up")
        assert "res#1" in gave_up["reason"]


def test_an_outage_beyond_max_outage_returns_buffered_messages_as_errors(tmp_path: Path,
                                                                        certs) -> None:
    with make_setup(tmp_path, certs, reconnect={**FAST, "max_outage": 2}) as s:
        alice = s.account("alice")

        async def scenario() -> None:
            raw = await raw_login(s.proxy.host, s.proxy.port, "alice", alice[1],
                                  direct_tls=False, resource="r")
            try:
                s.relay.refuse()
                s.relay.reset()
                await asyncio.sleep(0.3)
                raw.send("<message to='nobody@localhost' id='held1'><body>1</body></message>"
                         "<message to='nobody@localhost' id='held2'><body>2</body></message>")
                assert await raw.expect_closed(20)
                assert _stream_errors(raw) == ["remote-connection-failed"]
                assert _errored_messages(raw) == [("held1", "remote-server-timeout"),
                                                  ("held2", "remote-server-timeout")]
            finally:
                raw.abort()

        run(scenario(), 60)


def join_room(client: Any, room_jid: str) -> None:
    """XEP-0045 join: a directed presence carrying the MUC <x/>."""
    presence = client.make_presence(pto=room_jid)
    presence.append(ET.Element("{http://jabber.org/protocol/muc}x"))
    presence.send()


async def subscribe_both(a: Any, b: Any) -> None:
    await a.get_roster(timeout=10)
    await b.get_roster(timeout=10)
    for x, y in ((a, b), (b, a)):
        x.send_presence_subscription(pto=y.boundjid.bare)
    deadline = asyncio.get_running_loop().time() + 10
    while (a.client_roster[b.boundjid.bare]["subscription"] != "both"
           or b.client_roster[a.boundjid.bare]["subscription"] != "both"):
        assert asyncio.get_running_loop().time() < deadline, "no mutual subscription"
        await asyncio.sleep(0.1)


def test_after_reconnect_the_client_is_back_in_its_room_with_its_presence(
        tmp_path: Path, certs) -> None:
    room = "lounge@conference.localhost"
    with make_setup(tmp_path, certs, prosody={
            "muc": True, "extra_config": "muc_room_locking = false"}) as s:

        async def scenario() -> None:
            async with chat_pair(s) as (a, b):
                await subscribe_both(a, b)
                for c, nick in ((a, "alice"), (b, "bob")):
                    joined = clients.Inbox(c, "presence",
                                           lambda p, n=nick: str(p["from"]) == f"{room}/{n}")
                    join_room(c, f"{room}/{nick}")
                    await joined.get(10)
                    joined.close()
                a.send_presence(pshow="away", pstatus="lunch")
                await asyncio.sleep(0.5)

                # (slixmpp fires presence_available only on changes: watch all presence)
                back = clients.Inbox(b, "presence",
                                     lambda p: str(p["from"]) == a.boundjid.full)
                s.server.kill()
                await asyncio.sleep(0.3)
                s.server.start()
                deadline = asyncio.get_running_loop().time() + 20
                while len(s.proxy.events("upstream_restored")) < 2:
                    assert asyncio.get_running_loop().time() < deadline
                    await asyncio.sleep(0.1)
                # bob's restored session learns alice's presence again: still away, lunch.
                presence = await back.get(10)
                assert (presence["show"], presence["status"]) == ("away", "lunch")
                # alice is in the room again: she gets what is said there.
                await asyncio.sleep(0.5)
                groupchat = clients.Inbox(a, "message", lambda m: m["body"] == "welcome back")
                b.send_message(mto=room, mbody="welcome back", mtype="groupchat")
                assert (await groupchat.get(10))["body"] == "welcome back"

        run(scenario(), 60)


def test_fifty_sessions_spread_their_reconnects(tmp_path: Path, certs) -> None:
    window = 3.0
    with make_setup(tmp_path, certs, prosody={"allow_registration": True},
                        reconnect={**FAST, "first_delay_max": window}) as s:

        async def scenario() -> None:
            raws = []
            for n in range(50):
                reg = await RawClient.connect(s.proxy.host, s.server.c2s_port, direct_tls=False)
                await reg.register(f"u{n}", "pw")
                reg.abort()
                raws.append(await raw_login(s.proxy.host, s.proxy.port, f"u{n}", "pw",
                                            direct_tls=False, resource="r"))
            try:
                s.server.kill()
                await asyncio.sleep(0.1)
                s.server.start()
                deadline = asyncio.get_running_loop().time() + 30
                while len(s.proxy.events("upstream_restored")) < 50:
                    assert asyncio.get_running_loop().time() < deadline
                    await asyncio.sleep(0.2)
            finally:
                for raw in raws:
                    raw.abort()

        run(scenario(), 120)
        waits = [e for e in s.proxy.events("upstream_reconnect_wait") if e["attempt"] == 1]
        assert len(waits) == 50
        first_delays = sorted(e["delay"] for e in waits)
        assert first_delays[-1] - first_delays[0] > window / 2  # spread, not a stampede
        assert all(0 <= d <= window for d in first_delays)
        stamps = sorted(datetime.fromisoformat(e["timestamp"])
                        for e in s.proxy.events("upstream_restored"))
        assert (stamps[-1] - stamps[0]).total_seconds() > window / 3


def test_a_server_with_stream_management_confirms_by_its_acks(tmp_path: Path, certs) -> None:
    """When the server offers XEP-0198 the proxy uses its acks instead of barrier pings;
    an outage still loses nothing."""
    with make_setup(tmp_path, certs, prosody={"smacks": True},
                    upstream={"barrier_every": 2}) as s:
        chat_through_a_reset(s)
        # Enabled on the first connection and again after the reconnect, for both sessions.
        enabled = s.proxy.events("upstream_sm_enabled")
        assert len(enabled) == 4, (enabled, s.proxy.events("upstream_restored"),
                                   s.proxy.events("upstream_down"))
        assert not s.proxy.events("upstream_sm_refused")
