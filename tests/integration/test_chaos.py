"""The chaos soak, short (issue 11): four raw SM clients send numbered messages to each other
through the proxy while their connections are cut and resumed at random, the legacy Prosody is
killed (SIGKILL) or stopped (SIGTERM) and restarted, the proxy-server link is reset, a fifth
client never reads, and a canary pings the server's domain every 0.5 s. One run (about 40 s)
feeds every test below; the long version is ``python -m bench.soak`` (tests/integration/chaos.py
is the engine).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from tests.integration.chaos import Soak, SoakConfig, SoakResult, run_soak
from tests.integration.proxyproc import ProxyProcess
from tests.peers.prosody import LegacyProsody
from tests.peers.smpeer import SmPeer
from tests.peers.util import run

pytestmark = pytest.mark.integration

SEED = 11
CONFIG = SoakConfig(seconds=25, clients=4, seed=SEED, settle=20)


@pytest.fixture(scope="module")
def soak(tmp_path_factory: pytest.TempPathFactory,
         certs: tuple[Path, Path]) -> tuple[SoakResult, Soak]:
    workdir = tmp_path_factory.mktemp("chaos")
    result, engine = asyncio.run(asyncio.wait_for(run_soak(workdir, CONFIG, certs), 120))
    engine.dump(workdir / "books.json")
    print(result.summary())
    print(f"books and logs: {workdir}")
    return result, engine


def test_the_soak_injected_every_kind_of_fault(soak) -> None:
    r, _ = soak
    for kind in ("client_cut", "non_reader_cut", "server_kill", "server_stop", "link_reset"):
        assert r.faults[kind] >= 1, (kind, r.faults)
    assert r.sent > 500 and r.sink_bodies > 50, r.summary()
    assert r.resumes >= r.faults["client_cut"], r.summary()


def test_every_acknowledged_message_was_delivered_or_bounced(soak) -> None:
    r, _ = soak
    assert r.unacked == 0, r.summary()  # the quiet phase got every message acknowledged
    assert r.lost == [], r.summary()
    assert r.misrouted == [], r.summary()
    assert r.bounced_acked_and_delivered == [], r.summary()


def test_no_message_came_again_after_the_client_acknowledged_it(soak) -> None:
    """A copy the client received but never acknowledged before its session ended comes
    again at its next login (XEP-0198 cannot tell): those are counted, not failed. So are
    (about one in 1,000-10,000 in the long soak) a copy from the proxy's store plus another
    from the server in the same session: fixed, see the dedupe case below."""
    r, _ = soak
    assert r.duplicated_acked == {}, r.summary()


def test_messages_arrive_in_order_per_sender(soak) -> None:
    """Except messages that a store (Prosody's offline store, or the proxy's) hands out at the
    initial presence, when a newer one was routed to the full JID between the bind and that
    presence: counted in the summary, not failed (both stores deliver at the presence by
    design; the soak's report describes the window)."""
    r, _ = soak
    assert r.out_of_order == [], r.summary()


def test_the_canary_never_waited_a_second(soak) -> None:
    """Measured: every ping's round trip through the proxy. Pings in flight at the instant
    of a kill, stop or reset are replayed after the restore (their round trip includes the
    outage) and are only counted; those sent while the server is down are answered by the
    proxy itself and must be as quick as the rest."""
    r, _ = soak
    assert r.canary_pings >= CONFIG.seconds * 2 - 2, r.summary()
    assert r.canary_unanswered == 0, r.summary()
    assert r.canary_over_1s_clear == 0 and r.canary_max_rtt_clear < 1.0, r.summary()


def test_the_proxys_memory_is_back_near_its_baseline(soak) -> None:
    r, _ = soak
    assert r.rss_final_kib <= r.rss_baseline_kib + 20 * 1024, r.summary()


def test_every_session_ledger_settled_through_named_exits(soak) -> None:
    _, engine = soak
    assert engine.proxy is not None
    ledgers = engine.proxy.events("ledger")
    assert ledgers
    for event in ledgers:
        for lane in ("c2s", "s2c"):
            counts = event[lane]
            exits = sum(counts[name] for name in ("delivered", "stored", "bounced", "discarded"))
            assert counts["held"] == 0 and counts["entered"] == exits, (lane, event)
    assert not engine.proxy.events("connection_failed")


# -- found by the soak ------------------------------------------------------------------------
#
# The long soak's non-reader piled up more stored messages than stream_management.max_queue;
# from then on every login of its account ended at once. Pinned down here, smallest form.

# Found by the chaos soak (backlog_bug): at the initial presence of a new session,
# _deliver_stored (proxy/net/live.py) puts every stored message into its SM queue at once; more
# than stream_management.max_queue of them overflow it (sm_queue_overflow), the session ends at
# once ('stream management queue overflow') and they are stored again (undelivered): at every
# login, so the account never keeps a session and gets its backlog again each time. Fixed:
# stored messages go out as the SM queue has room, the rest after acks.


@pytest.fixture(scope="module")
def backlog(tmp_path_factory: pytest.TempPathFactory,
            certs: tuple[Path, Path]) -> dict[str, Any]:
    """alice's session ends with 8 stored messages (max_queue 5); she logs in again with a
    diligent client that reads and acknowledges everything."""
    tmp = tmp_path_factory.mktemp("backlog")
    server = LegacyProsody(tmp / "prosody")
    server.start()
    proxy = ProxyProcess(tmp / "proxy", server, *certs,
                         store={"path": str(tmp / "front.sqlite3")},
                         stream_management={"max_queue": 5})
    outcome: dict[str, Any] = {}

    async def scenario() -> None:
        bob = await SmPeer.login(proxy.host, proxy.port, "bob", "bob-pw", "pc")
        alice = await SmPeer.login(proxy.host, proxy.port, "alice", "alice-pw", "phone",
                                   resume_max=1)
        alice.abort()  # away: her session hibernates for 1 s, then ends
        for n in range(8):
            bob.message("alice@localhost/phone", f"s{n}")
        await bob.wait_acked(9)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        while not proxy.events("undelivered") and loop.time() < deadline:
            await asyncio.sleep(0.1)
        outcome["stored"] = sum(e["stored"] for e in proxy.events("undelivered"))
        ended_before = len(proxy.events("session_ended"))
        undelivered_before = len(proxy.events("undelivered"))
        again = await SmPeer.login(proxy.host, proxy.port, "alice", "alice-pw", "tablet")
        await asyncio.sleep(1.5)
        again.request_ack()
        await asyncio.sleep(0.5)
        outcome["bodies"] = list(again.bodies)
        outcome["closed"] = again.closed
        outcome["ended_after_login"] = [
            e.get("reason") for e in proxy.events("session_ended")[ended_before:]]
        outcome["overflows"] = len(proxy.events("sm_queue_overflow"))
        outcome["stored_again"] = [
            e["stored"] for e in proxy.events("undelivered")[undelivered_before:]]
        again.abort()
        bob.abort()

    try:
        proxy.start()
        server.register("alice", "alice-pw")
        server.register("bob", "bob-pw")
        run(scenario(), 40)
    finally:
        proxy.stop()
        server.stop()
    print("backlog:", outcome)
    return outcome


def test_a_stored_backlog_reaches_the_next_login_in_order(backlog: dict[str, Any]) -> None:
    assert backlog["stored"] == 8, backlog
    assert backlog["bodies"] == [f"s{n}" for n in range(8)], backlog


def test_a_stored_backlog_larger_than_max_queue_does_not_end_the_new_session(
        backlog: dict[str, Any]) -> None:
    assert backlog["ended_after_login"] == [] and not backlog["closed"], backlog


# The long soak (seed 42, 180 s) saw one message twice at a client that had logged in afresh:
# the first copy from the proxy's store (its <delay/> in microseconds), the second from
# Prosody's offline store (whole seconds); seed 7 (240 s) 16 such, 10 of them with the second
# copy live from the server. Its sender's proxy session had replayed it after a
# server kill (unconfirmed: the kill came 0.19 s after it was sent), so the server routed it
# twice: once into the recipient's old session (stored when that session ended) and once to
# the recipient's offline store (no session then). The dedupe feature sees only stanzas from
# the server, never the proxy's own stored deliveries. The same two copies, made on purpose:
# the sender talks to Prosody directly and sends the same message (same id) twice.

# Found by the chaos soak (dedupe_bug): dedupe (proxy/features/dedupe.py) records only messages
# that come from the server through the pipeline; a stored message delivered by the proxy
# (_deliver_stored) is not recorded, so a second copy of it from the server (a replay, live or
# kept offline by Prosody) reaches the same session too. Fixed: stored deliveries pass the
# features' from_store, dedupe records them.


@pytest.fixture(scope="module")
def two_copies(tmp_path_factory: pytest.TempPathFactory,
               certs: tuple[Path, Path]) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("two-copies")
    server = LegacyProsody(tmp / "prosody")
    server.start()
    proxy = ProxyProcess(tmp / "proxy", server, *certs,
                         store={"path": str(tmp / "front.sqlite3")})
    outcome: dict[str, Any] = {}

    async def scenario() -> None:
        bob = await SmPeer.login(server.host, server.c2s_port, "bob", "bob-pw", "pc", sm=False)
        alice = await SmPeer.login(proxy.host, proxy.port, "alice", "alice-pw", "phone",
                                   resume_max=1)
        # live: the same message twice while alice is connected: the second is dropped
        bob.message("alice@localhost/phone", "live", msg_id="same-live")
        bob.message("alice@localhost/phone", "live", msg_id="same-live")
        await asyncio.sleep(1.0)
        outcome["live"] = list(alice.bodies)
        alice.abort()  # away: her session hibernates 1 s, then ends
        bob.message("alice@localhost/phone", "once", msg_id="same-stored")  # -> proxy's store
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        while not proxy.events("undelivered") and loop.time() < deadline:
            await asyncio.sleep(0.1)
        outcome["stored"] = sum(e["stored"] for e in proxy.events("undelivered"))
        await asyncio.sleep(0.5)  # alice's upstream is gone: Prosody keeps the next offline
        bob.message("alice@localhost/phone", "once", msg_id="same-stored")
        await asyncio.sleep(0.5)
        again = await SmPeer.login(proxy.host, proxy.port, "alice", "alice-pw", "phone")
        await asyncio.sleep(1.5)
        outcome["after_login"] = list(again.bodies)
        again.abort()
        bob.abort()

    try:
        proxy.start()
        server.register("alice", "alice-pw")
        server.register("bob", "bob-pw")
        run(scenario(), 40)
    finally:
        proxy.stop()
        server.stop()
    print("two copies:", outcome)
    return outcome


def test_a_second_copy_to_a_live_session_is_dropped(two_copies: dict[str, Any]) -> None:
    assert two_copies["live"] == ["live"], two_copies
    assert two_copies["stored"] == 1, two_copies
    assert "once" in two_copies["after_login"], two_copies


def test_a_second_copy_of_a_stored_message_is_dropped(two_copies: dict[str, Any]) -> None:
    assert two_copies["after_login"] == ["once"], two_copies


# The long soak (seed 2026, 150 s) saw a client's new session killed by the server with
# <conflict/>, two of its messages bounced to it although they had been delivered, and an
# older message of that client arrive after them: its previous session had ended during a
# server outage with unconfirmed messages, so it kept "finishing" (upstream_finishing); the
# client logged in again with the same resource meanwhile (a new session, bound upstream);
# then the finishing session's restore bound that resource again, and Prosody kicked the
# other holder (upstream_gave_up "stream error: conflict", unconfirmed_returned, session_ended
# of the NEW session, in the same millisecond as the old one's upstream_restored).

# Found by the chaos soak (conflict_bug): a session that ended while the server was down keeps
# finishing its upstream (upstream_finishing) and its restore binds the same resource again,
# after the client has logged in anew with that resource: the server kicks the new session
# (upstream_gave_up 'stream error: conflict', session_ended), whose client loses its stream and
# gets bounces for messages the server had delivered. Fixed: the finishing session hands what it
# owes to the new one before the new bind.


@pytest.fixture(scope="module")
def finishing_then_login(tmp_path_factory: pytest.TempPathFactory,
                         certs: tuple[Path, Path]) -> dict[str, Any]:
    from tests.peers.faultrelay import FaultRelay
    from tests.peers.util import LOCALHOST

    tmp = tmp_path_factory.mktemp("finishing")
    server = LegacyProsody(tmp / "prosody")
    server.start()
    relay = FaultRelay(LOCALHOST, server.c2s_port).start()
    # slow, even reconnection attempts: room for a login between two of them
    proxy = ProxyProcess(tmp / "proxy", server, *certs, upstream_port=relay.port,
                         reconnect={"first_delay_max": 0.5, "base": 3, "cap": 3,
                                    "max_outage": 60},
                         store={"path": str(tmp / "front.sqlite3")})
    outcome: dict[str, Any] = {}

    async def wait_event(name: str, pred: Any = lambda e: True, timeout: float = 20) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            found = [e for e in proxy.events(name) if pred(e)]
            if found:
                return found[-1]
            await asyncio.sleep(0.02)
        raise TimeoutError(name)

    async def scenario() -> None:
        bob = await SmPeer.login(server.host, server.c2s_port, "bob", "bob-pw", "pc", sm=False)
        alice = await SmPeer.login(proxy.host, proxy.port, "alice", "alice-pw", "phone",
                                   resume_max=1)
        relay.refuse()
        relay.reset()  # the server is away for the proxy (bob, direct, stays online)
        await wait_event("upstream_down")
        alice.message("bob@localhost/pc", "m1")
        await alice.wait_acked(2)  # the proxy took it on: it must reach bob
        alice.abort()  # and she goes: her session ends in 1 s, its upstream still owing m1
        old = (await wait_event("upstream_finishing"))["session"]
        seen = len(proxy.events("upstream_reconnect_wait"))
        await wait_event("upstream_reconnect_wait",
                         lambda e: e.get("session") == old and e.get("delay", 0) >= 1.5
                         and proxy.events("upstream_reconnect_wait").index(e) >= seen)
        relay.pass_through()  # the server is back; the old session retries in >= 1.5 s
        again = await SmPeer.login(proxy.host, proxy.port, "alice", "alice-pw", "phone")
        again.message("bob@localhost/pc", "m2")
        await again.wait_acked(2)
        if not proxy.events("handed_over"):  # unless the new session took over what it owed
            await wait_event("upstream_finished", lambda e: e.get("session") == old)
        await asyncio.sleep(1.0)
        outcome["bob"] = list(bob.bodies)
        outcome["alice_errors"] = [e.get("id") for e in again.errors]
        outcome["alice_closed"] = again.closed
        outcome["gave_up"] = [(e.get("session"), e.get("reason"))
                              for e in proxy.events("upstream_gave_up")]
        outcome["old"] = old
        again.abort()
        bob.abort()

    try:
        proxy.start()
        server.register("alice", "alice-pw")
        server.register("bob", "bob-pw")
        run(scenario(), 60)
    finally:
        proxy.stop()
        relay.stop()
        server.stop()
    print("finishing then login:", outcome)
    return outcome


def test_what_a_finishing_session_owed_is_delivered(finishing_then_login: dict[str, Any]) -> None:
    assert sorted(finishing_then_login["bob"]) == ["m1", "m2"], finishing_then_login


def test_a_finishing_session_does_not_kick_the_accounts_new_session(
        finishing_then_login: dict[str, Any]) -> None:
    o = finishing_then_login
    assert o["gave_up"] == [] and not o["alice_closed"] and o["alice_errors"] == [], o


def test_what_a_finishing_session_owed_goes_before_the_new_sessions_messages(
        finishing_then_login: dict[str, Any]) -> None:
    assert finishing_then_login["bob"] == ["m1", "m2"], finishing_then_login
