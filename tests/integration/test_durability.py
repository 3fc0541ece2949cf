"""Nothing acknowledged is ever lost (issue 10): numbered messages through the proxy in front
of the real legacy Prosody, counting lost and duplicated ones, through clean closes, expired
hibernation, SIGTERM and SIGKILL of the proxy, with the server reachable or not.

bob talks to Prosody directly, so he is online whatever happens to the proxy; alice goes
through the proxy, whose link to the server runs through a fault relay. Prosody has no offline
storage (a legacy server), so a message for a user who is offline comes back to its sender as
an error: that is the server's doing, and counted as such.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.integration.proxyproc import ProxyProcess
from tests.peers.faultrelay import FaultRelay
from tests.peers.prosody import LegacyProsody
from tests.peers.smpeer import SmPeer, duplicates
from tests.peers.util import LOCALHOST, run

pytestmark = pytest.mark.integration

FAST = {"first_delay_max": 0.3, "base": 0.2, "cap": 1.0, "max_outage": 60}


@dataclass
class Durable:
    tmp: Path
    certs: tuple[Path, Path]
    server: LegacyProsody
    relay: FaultRelay
    proxy: ProxyProcess
    overrides: dict[str, Any]
    runs: int = 1

    def account(self, name: str) -> tuple[str, str]:
        return self.server.register(name, f"{name}-pw"), f"{name}-pw"

    def restart_proxy(self) -> ProxyProcess:
        """A new proxy process on the same store (the old one must be stopped)."""
        self.runs += 1
        self.proxy = ProxyProcess(self.tmp / f"proxy{self.runs}", self.server, *self.certs,
                                  upstream_port=self.relay.port, **self.overrides).start()
        return self.proxy

    def kill_proxy(self) -> None:
        assert self.proxy.proc is not None
        os.killpg(self.proxy.proc.pid, signal.SIGKILL)
        self.proxy.proc.wait(5)

    async def outage(self) -> None:
        """The link to the server fails (refused and reset) and the proxy noticed."""
        self.relay.refuse()
        self.relay.reset()
        await wait_for(lambda: self.proxy.events("upstream_down"), 10, "upstream_down")


async def wait_for(condition: Any, timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise TimeoutError(f"no {what} within {timeout}s")
        await asyncio.sleep(0.05)


@contextmanager
def durable_setup(tmp_path: Path, certs: tuple[Path, Path], **overrides: Any) -> Iterator[Durable]:
    server = LegacyProsody(tmp_path / "prosody")
    server.start()
    relay = FaultRelay(LOCALHOST, server.c2s_port).start()
    merged = {"reconnect": FAST, "store": {"path": str(tmp_path / "front.sqlite3")},
              **overrides}
    proxy = ProxyProcess(tmp_path / "proxy1", server, *certs, upstream_port=relay.port,
                         **merged)
    setup = Durable(tmp_path, certs, server, relay, proxy, merged)
    try:
        proxy.start()
        yield setup
    finally:
        setup.proxy.stop()
        proxy.stop()
        relay.stop()
        server.stop()


def user(jid: str) -> str:
    return jid.split("@")[0]


async def via_proxy(s: Durable, account: tuple[str, str], resource: str, **kw: Any) -> SmPeer:
    return await SmPeer.login(s.proxy.host, s.proxy.port, user(account[0]), account[1],
                              resource, **kw)


async def direct(s: Durable, account: tuple[str, str], resource: str) -> SmPeer:
    return await SmPeer.login(s.server.host, s.server.c2s_port, user(account[0]), account[1],
                              resource, sm=False)


def assert_ledgers_settled(*proxies: ProxyProcess | Path) -> None:
    """Every session's ledger emptied through the named exits only (a proxy, or the log
    file of one that is gone)."""
    for proxy in proxies:
        events = (proxy.events("ledger") if isinstance(proxy, ProxyProcess) else
                  [e for e in ProxyProcess.read_events(proxy) if e.get("event") == "ledger"])
        assert events, "no ledger event"
        for event in events:
            for lane in ("c2s", "s2c"):
                counts = event[lane]
                exits = sum(counts[name] for name in ("delivered", "stored", "bounced",
                                                      "discarded"))
                assert counts["held"] == 0 and counts["entered"] == exits, (lane, event)


def numbered(prefix: str, count: int) -> list[str]:
    return [f"{prefix}{n}" for n in range(count)]


def test_sent_during_an_outage_then_a_clean_close_all_arrive(tmp_path: Path, certs) -> None:
    with durable_setup(tmp_path, certs) as s:
        alice, bob = s.account("alice"), s.account("bob")

        async def scenario() -> None:
            b = await direct(s, bob, "pc")
            a = await via_proxy(s, alice, "phone")
            try:
                await s.outage()
                for body in numbered("m", 5):
                    a.message(bob[0] + "/pc", body)
                await a.wait_acked(6)  # presence and the five: the proxy's promise
                await a.close()  # a clean close, with the server still away
                await asyncio.sleep(0.5)
                s.relay.pass_through()
                await b.wait_bodies(5, 20)
                await asyncio.sleep(0.5)
                assert b.bodies == numbered("m", 5)
            finally:
                b.abort()

        run(scenario(), 60)
        assert s.proxy.wait_event("upstream_finished")
        assert_ledgers_settled(s.proxy)


def test_hibernation_expires_before_the_server_is_back(tmp_path: Path, certs) -> None:
    with durable_setup(tmp_path, certs) as s:
        alice, bob = s.account("alice"), s.account("bob")

        async def scenario() -> None:
            b = await direct(s, bob, "pc")
            a = await via_proxy(s, alice, "phone", resume_max=1)
            try:
                await s.outage()
                for body in numbered("h", 5):
                    a.message(bob[0] + "/pc", body)
                await a.wait_acked(6)
                a.abort()  # the link drops: hibernation, which runs out (1 s)
                await wait_for(lambda: s.proxy.events("session_ended"), 10, "session_ended")
                s.relay.pass_through()
                await b.wait_bodies(5, 20)
                await asyncio.sleep(0.5)
                assert b.bodies == numbered("h", 5)
            finally:
                b.abort()

        run(scenario(), 60)
        assert_ledgers_settled(s.proxy)


def test_sigterm_during_an_outage_keeps_them_for_the_next_login(tmp_path: Path, certs) -> None:
    with durable_setup(tmp_path, certs) as s:
        alice, bob = s.account("alice"), s.account("bob")

        async def before() -> SmPeer:
            b = await direct(s, bob, "pc")
            a = await via_proxy(s, alice, "phone")
            await s.outage()
            for body in numbered("t", 3):
                a.message(bob[0] + "/pc", body)
            await a.wait_acked(4)
            await asyncio.to_thread(s.proxy.stop)  # SIGTERM, the server still away
            a.abort()
            return b

        async def after(b: SmPeer) -> None:
            try:
                s.relay.pass_through()
                s.restart_proxy()
                a = await via_proxy(s, alice, "laptop")
                try:
                    await b.wait_bodies(3, 20)
                    await asyncio.sleep(0.5)
                    assert b.bodies == numbered("t", 3)
                finally:
                    a.abort()
            finally:
                b.abort()

        async def scenario() -> None:
            await after(await before())

        run(scenario(), 60)
        first = s.proxy.workdir.parent / "proxy1"
        settled = [e for e in ProxyProcess.read_events(first / "xmpp-front.log")
                   if e.get("event") == "unconfirmed_settled"]
        assert sum(e["pending"] for e in settled) == 3
        assert s.proxy.wait_event("pending_replayed")["sent"] == 3


def test_graceful_restart_with_a_hibernated_receiver(tmp_path: Path, certs) -> None:
    with durable_setup(tmp_path, certs) as s:
        alice, bob = s.account("alice"), s.account("bob")

        async def scenario() -> None:
            b = await direct(s, bob, "pc")
            a = await via_proxy(s, alice, "phone", resume_max=300)
            try:
                a.abort()  # alice's phone is away: her session hibernates
                await wait_for(lambda: s.proxy.events("hibernating"), 10, "hibernating")
                for body in numbered("g", 5):
                    b.message(alice[0] + "/phone", body)
                await asyncio.sleep(0.5)  # the proxy holds them for her
                await asyncio.to_thread(s.proxy.stop)
                s.restart_proxy()
                again = await via_proxy(s, alice, "tablet")  # initial presence: stored follow
                try:
                    await again.wait_bodies(5, 20)
                    await asyncio.sleep(0.5)
                    assert again.bodies == numbered("g", 5)
                finally:
                    again.abort()
            finally:
                b.abort()

        run(scenario(), 60)
        assert not [e for e in s.proxy.events("stanza") if e.get("type") == "error"]


async def traffic(s: Durable, a: SmPeer, b: SmPeer, alice: str, bob: str, *,
                  seconds: float, rate: float, stop_proxy: Any) -> None:
    """alice and bob exchange numbered messages at ``rate`` per second each way; after
    ``seconds / 2`` the proxy is stopped by ``stop_proxy`` (a blocking call) while bob goes
    on until the proxy is gone."""
    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()

    async def alice_sends() -> None:
        n = 0
        while not stopped.is_set() and not a.closed:
            a.message(bob + "/pc", f"a{n}")
            n += 1
            if n % 20 == 0:
                a.request_ack()
            await asyncio.sleep(1 / rate)

    async def bob_sends() -> None:
        n = 0
        end = loop.time() + seconds
        while loop.time() < end:
            b.message(alice + "/phone", f"b{n}")
            n += 1
            await asyncio.sleep(1 / rate)

    async def stopper() -> None:
        await asyncio.sleep(seconds / 2)
        await asyncio.to_thread(stop_proxy)
        stopped.set()

    await asyncio.gather(alice_sends(), bob_sends(), stopper())


def count_both_ways(s: Durable, stop_proxy_name: str, **overrides: Any) -> dict[str, Any]:
    alice, bob = s.account("alice"), s.account("bob")
    result: dict[str, Any] = {}

    async def scenario() -> None:
        b = await direct(s, bob, "pc")
        a = await via_proxy(s, alice, "phone")
        try:
            stop = s.proxy.stop if stop_proxy_name == "sigterm" else s.kill_proxy
            await traffic(s, a, b, alice[0], bob[0], seconds=3.0, rate=100, stop_proxy=stop)
            acked = [x for x in a.acked if x.startswith("a")]
            a.abort()
            s.restart_proxy()
            again = await via_proxy(s, alice, "tablet")  # stored ones follow its presence
            try:
                b_sent = numbered("b", sum(1 for x in b.sent if x.startswith("b")))
                bounced = {e.findtext("{jabber:client}body") for e in b.errors}
                # Everything bob sent reaches alice in one run or the other, or comes back
                # to him from the server (alice offline): wait until it is all accounted for.
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 20
                while loop.time() < deadline:
                    got = set(a.bodies) | set(again.bodies)
                    bounced = {e.findtext("{jabber:client}body") for e in b.errors}
                    if not [x for x in b_sent if x not in got and x not in bounced] and \
                            not [x for x in acked if x not in b.bodies]:
                        break
                    await asyncio.sleep(0.2)
                await asyncio.sleep(0.5)
                got_alice = a.bodies + again.bodies
                result.update(
                    alice_acked=len(acked),
                    alice_lost=[x for x in acked if x not in b.bodies],
                    alice_dups=duplicates([x for x in b.bodies if x.startswith("a")]),
                    bob_sent=len(b_sent),
                    bob_lost=[x for x in b_sent if x not in got_alice and x not in bounced],
                    bob_dups=duplicates(got_alice),
                    bob_bounced_by_server=len(bounced),
                )
            finally:
                again.abort()
        finally:
            b.abort()

    run(scenario(), 90)
    return result


def test_sigterm_under_traffic_both_ways_loses_nothing(tmp_path: Path, certs) -> None:
    with durable_setup(tmp_path, certs) as s:
        r = count_both_ways(s, "sigterm")
        print("SIGTERM under traffic:", r)
        assert r["alice_acked"] > 50 and r["bob_sent"] > 200
        assert r["alice_lost"] == [] and r["bob_lost"] == []
        assert r["alice_dups"] == {} and r["bob_dups"] == {}
        first = ProxyProcess.read_events(tmp_path / "proxy1" / "xmpp-front.log")
        assert [e for e in first if e.get("event") == "sessions_settled"]
        # Also the sessions the stop ended: what the server confirmed while its stream
        # was closing left as delivered, the rest stored; nothing held, nothing lost.
        assert_ledgers_settled(tmp_path / "proxy1" / "xmpp-front.log")


def test_sigkill_under_traffic_then_restart_loses_nothing_acked(tmp_path: Path, certs) -> None:
    with durable_setup(tmp_path, certs) as s:
        r = count_both_ways(s, "sigkill")
        print("SIGKILL under traffic:", r)
        assert r["alice_acked"] > 50 and r["bob_sent"] > 200
        # What the proxy acknowledged to alice was journaled first: never lost. A crash can
        # repeat what the server had confirmed just before it (docs/outages.md).
        assert r["alice_lost"] == []
        assert s.proxy.wait_event("journal_recovered")["sessions"] >= 1
        # bob's messages that the proxy had read are journaled too; only what was still in
        # the kernel's buffers, unread, can die with the process.
        assert len(r["bob_lost"]) <= 5, r["bob_lost"]


def test_a_silently_dead_client_link_is_declared_dead(tmp_path: Path, certs) -> None:
    with durable_setup(tmp_path, certs, stream_management={"ack_timeout": 1}) as s:
        alice, bob = s.account("alice"), s.account("bob")
        link = FaultRelay(LOCALHOST, s.proxy.port).start()  # alice's Wi-Fi
        try:
            async def scenario() -> float:
                b = await direct(s, bob, "pc")
                a = await SmPeer.login(LOCALHOST, link.port, user(alice[0]), alice[1], "phone",
                                       resume_max=2)
                try:
                    link.blackhole()  # no FIN, no RST: every packet dropped both ways
                    loop = asyncio.get_running_loop()
                    started = loop.time()
                    b.message(alice[0] + "/phone", "into the void")
                    await wait_for(lambda: s.proxy.events("session_ended"), 15,
                                   "session_ended")
                    took = loop.time() - started
                    # The ledger is logged once the session's upstream stream has closed.
                    await wait_for(lambda: s.proxy.events("ledger"), 15, "ledger")
                    return took
                finally:
                    a.abort()
                    b.abort()

            took = run(scenario(), 40)
        finally:
            link.stop()
        assert took < 8, took  # ack_timeout 1 s + hibernation 2 s, not a 30 s TLS shutdown
        assert s.proxy.events("client_link_dead")
        assert s.proxy.events("hibernating")
        assert s.proxy.events("undelivered")[-1]["stored"] == 1
        assert not s.proxy.events("connection_failed")
        assert_ledgers_settled(s.proxy)
