"""``workers: 2`` against the real legacy Prosody: the supervisor, the home hash and the
handoff of a connection accepted by the worker that is not the account's home.

Which worker accepts a connection is the kernel's choice, so the tests connect until the
case they need happened (each login's ``accepted`` event names the worker that accepted
it, its ``auth_ok`` the account's home; both carry the connection's id), within a bound.
"""

from __future__ import annotations

from typing import Any

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from proxy.workers import home_of
from tests.integration.proxyproc import REPO, ProxyProcess
# Fixtures of the domains tests, used here by name.
from tests.integration.test_domains import (BETA, account, proxy_certs,  # noqa: F401
                                            start_proxy, two_hosts)
from tests.integration.test_durability import (assert_ledgers_settled, count_both_ways, direct,
                                               durable_setup, numbered, via_proxy, wait_for)
from tests.peers import clients
from tests.peers.rawclient import RawClient, q, raw_login
from tests.peers.util import LOCALHOST, free_port, run

pytestmark = pytest.mark.integration

NS_CLIENT = "jabber:client"
NS_SM = "urn:xmpp:sm:3"
WORKERS = 2
TRIES = 40  # logins before a case that depends on the kernel's accept is given up


def user(jid: str) -> str:
    return jid.split("@")[0]


def where(proxy: ProxyProcess, account: str, after: int = 0) -> tuple[int, int]:
    """(accepting worker, home worker) of the last login of ``account`` after the
    ``after``-th event in the log."""
    events = proxy.events()[after:]
    ok = [e for e in events if e.get("event") == "auth_ok" and e.get("account") == account]
    assert ok, f"no auth_ok for {account}"
    conn = ok[-1]["conn"]
    accepted = [e for e in events if e.get("event") == "accepted" and e.get("conn") == conn]
    assert accepted, f"no accepted event for connection {conn}"
    return accepted[-1]["worker"], ok[-1]["worker"]


async def message(sender: RawClient, receiver: RawClient, body: str) -> None:
    assert receiver.jid is not None
    # A fresh id each time: a resumed session's dedupe drops a repeated one.
    sender.send(f"<message to='{receiver.jid}' type='chat' id='{secrets.token_hex(6)}'>"
                f"<body>{body}</body></message>")
    got = await receiver.read_until(q(NS_CLIENT, "message"), timeout=10)
    assert got.findtext(q(NS_CLIENT, "body")) == body
    assert got.get("from") == sender.jid


@pytest.fixture
def workers_proxy(make_proxy: Any) -> ProxyProcess:
    return make_proxy(workers=WORKERS)


def test_the_home_hash_is_stable_and_spreads() -> None:
    # Independent of the process (Python's hash() is salted) and of the JID's case.
    assert home_of("Alice@Localhost", 2) == home_of("alice@localhost", 2)
    homes = {home_of(f"user{i}@localhost", 2) for i in range(40)}
    assert homes == {0, 1}


def test_a_login_accepted_by_the_other_worker_is_relayed_to_the_home(
        workers_proxy: ProxyProcess, accounts: Any) -> None:
    proxy = workers_proxy
    bob_jid, bob_pw = accounts("bob")
    seen: dict[str, str] = {}

    async def scenario() -> None:
        bob = await raw_login(proxy.host, proxy.port, user(bob_jid), bob_pw, direct_tls=False,
                              resource="desk")
        try:
            for attempt in range(TRIES):
                direct_tls = attempt % 2 == 1
                jid, pw = accounts("alice")
                alice = await raw_login(proxy.host, proxy.direct_tls_port if direct_tls
                                        else proxy.port, user(jid), pw,
                                        direct_tls=direct_tls, resource="phone")
                try:
                    accepted, home = where(proxy, jid)
                    assert home == home_of(jid, WORKERS)
                    await message(alice, bob, f"hello bob from {attempt}")
                    await message(bob, alice, f"hello alice {attempt}")
                    kind = "relayed" if accepted != home else "local"
                    seen.setdefault(kind, jid)
                finally:
                    await alice.close()
                if len(seen) == 2:
                    return
        finally:
            await bob.close()

    run(scenario(), timeout=120)
    assert set(seen) == {"relayed", "local"}, seen
    relayed = seen["relayed"]
    handed = [e for e in proxy.events("handoff_sent") if e.get("home") == home_of(relayed, 2)]
    assert handed, "the accepting worker logged no handover"
    assert proxy.events("handoff_received"), "the home logged no connection taken over"


def accepted_since(proxy: ProxyProcess, after: int) -> list[int]:
    """The workers that accepted each connection since the ``after``-th log event."""
    return [e["worker"] for e in proxy.events()[after:] if e.get("event") == "accepted"]


async def enable(raw: RawClient) -> str:
    raw.send(f"<enable xmlns='{NS_SM}' resume='true'/>")
    enabled = await raw.read_until(q(NS_SM, "enabled"), timeout=10)
    sm_id = enabled.get("id")
    assert sm_id
    return sm_id


def test_a_resume_that_lands_on_the_other_worker_succeeds(
        workers_proxy: ProxyProcess, accounts: Any) -> None:
    proxy = workers_proxy
    (alice_jid, alice_pw), (bob_jid, bob_pw) = accounts("alice"), accounts("bob")
    home = home_of(alice_jid, WORKERS)
    landed: set[str] = set()

    async def scenario() -> None:
        bob = await raw_login(proxy.host, proxy.port, user(bob_jid), bob_pw, direct_tls=False,
                              resource="desk")
        alice = await raw_login(proxy.host, proxy.port, user(alice_jid), alice_pw,
                                direct_tls=False, resource="phone")
        try:
            sm_id = await enable(alice)
            for attempt in range(TRIES):
                alice.abort()  # the network drops
                await asyncio.sleep(0.2)
                body = f"while away {attempt}"
                bob.send(f"<message to='{alice_jid}/phone' type='chat'><body>{body}</body>"
                         "</message>")
                await asyncio.sleep(0.2)
                mark = len(proxy.events())
                alice = await RawClient.connect(proxy.host, proxy.port, direct_tls=False)
                await alice.login_plain(user(alice_jid), alice_pw)
                alice.send(f"<resume xmlns='{NS_SM}' previd='{sm_id}' h='{attempt}'/>")
                assert (await alice.read_until(q(NS_SM, "resumed"), timeout=10)) is not None
                got = await alice.read_until(q(NS_CLIENT, "message"), timeout=10)
                assert got.findtext(q(NS_CLIENT, "body")) == body
                alice.jid = f"{alice_jid}/phone"
                await message(alice, bob, f"back {attempt}")
                (worker,) = accepted_since(proxy, mark)
                landed.add("other" if worker != home else "home")
                if landed == {"other", "home"}:
                    return
        finally:
            alice.abort()
            await bob.close()

    run(scenario(), timeout=120)
    assert landed == {"other", "home"}, landed
    # Every resume was the home's: one session, never one per worker.
    resumes = [e for e in proxy.events("auth_ok") if e.get("account") == alice_jid]
    assert {e["worker"] for e in resumes} == {home}


def test_a_takeover_from_a_connection_on_the_other_worker_succeeds(
        workers_proxy: ProxyProcess, accounts: Any) -> None:
    proxy = workers_proxy
    (alice_jid, alice_pw), (bob_jid, bob_pw) = accounts("alice"), accounts("bob")
    home = home_of(alice_jid, WORKERS)
    landed: set[str] = set()

    async def scenario() -> None:
        bob = await raw_login(proxy.host, proxy.port, user(bob_jid), bob_pw, direct_tls=False,
                              resource="desk")
        old = await raw_login(proxy.host, proxy.port, user(alice_jid), alice_pw,
                              direct_tls=False, resource="tab")
        try:
            for attempt in range(TRIES):
                mark = len(proxy.events())
                new = await raw_login(proxy.host, proxy.port, user(alice_jid), alice_pw,
                                      direct_tls=False, resource="tab")
                # The old connection is replaced (RFC 6120 §7.7.2.2: conflict).
                assert await old.expect_closed(10)
                await message(new, bob, f"from the new one {attempt}")
                await message(bob, new, f"to the new one {attempt}")
                (worker,) = accepted_since(proxy, mark)
                landed.add("other" if worker != home else "home")
                old = new
                if landed == {"other", "home"}:
                    return
        finally:
            old.abort()
            await bob.close()

    run(scenario(), timeout=120)
    assert landed == {"other", "home"}, landed


def test_slixmpp_resumes_through_the_other_worker(workers_proxy: ProxyProcess,
                                                  accounts: Any) -> None:
    proxy = workers_proxy
    (alice_jid, alice_pw), (bob_jid, bob_pw) = accounts("alice"), accounts("bob")
    home = home_of(alice_jid, WORKERS)
    landed: set[str] = set()

    async def scenario() -> None:
        a = await clients.connect_client(alice_jid + "/phone", alice_pw, proxy.host,
                                         proxy.port, direct_tls=False,
                                         plugins=("xep_0030", "xep_0199", "xep_0198"))
        b = await clients.connect_client(bob_jid + "/pc", bob_pw, proxy.host, proxy.port,
                                         direct_tls=False)
        inbox = clients.Inbox(a)
        try:
            for attempt in range(TRIES // 4):
                resumed = asyncio.get_running_loop().create_future()
                a.add_event_handler("session_resumed",
                                    lambda *_, f=resumed: f.done() or f.set_result(True))
                a.transport.abort()
                await asyncio.sleep(0.3)
                b.send_message(mto=alice_jid + "/phone", mbody=f"during {attempt}",
                               mtype="chat")
                await asyncio.sleep(0.3)
                mark = len(proxy.events())
                a.connect(proxy.host, proxy.port)
                await asyncio.wait_for(resumed, 15)
                assert (await inbox.get(10))["body"] == f"during {attempt}"
                accepted = accepted_since(proxy, mark)
                landed.update("other" if w != home else "home" for w in accepted)
                if "other" in landed:
                    return
        finally:
            inbox.close()
            await clients.disconnect(a)
            await clients.disconnect(b)

    run(scenario(), timeout=120)
    assert "other" in landed, landed


# Stop, reload, crash ----------------------------------------------------------------------


def worker_pids(proxy: ProxyProcess) -> dict[int, int]:
    """The pid of each worker's latest start, from the supervisor's log."""
    return {e["worker"]: e["pid"] for e in proxy.events("worker_started")}


def test_sigterm_under_traffic_with_two_workers_loses_nothing(tmp_path: Path,
                                                              certs: Any) -> None:
    with durable_setup(tmp_path, certs, workers=WORKERS) as s:
        r = count_both_ways(s, "sigterm")
        assert r["alice_acked"] > 50 and r["bob_sent"] > 200
        assert r["alice_lost"] == [] and r["bob_lost"] == []
        # Exactly once both ways: once the stop asked the client for its last ack, the home
        # writes nothing more to it (bob keeps sending until the proxy is gone: that is
        # stored, never also delivered), so the relay's extra hop opens no window either.
        assert r["alice_dups"] == {} and r["bob_dups"] == {}
        first = ProxyProcess.read_events(tmp_path / "proxy1" / "xmpp-front.log")
        # Every worker stopped itself, then the supervisor, which saw a clean stop.
        assert {e.get("worker") for e in first if e.get("event") == "stopped"
                and e.get("role") != "supervisor"} == {0, 1}
        assert next(e for e in first if e.get("event") == "stopped"
                and e.get("role") == "supervisor")["clean"] is True
        assert_ledgers_settled(tmp_path / "proxy1" / "xmpp-front.log")


def test_sigkill_of_everything_under_traffic_then_restart_loses_nothing_acked(
        tmp_path: Path, certs: Any) -> None:
    with durable_setup(tmp_path, certs, workers=WORKERS) as s:
        r = count_both_ways(s, "sigkill")
        assert r["alice_acked"] > 50 and r["bob_sent"] > 200
        assert r["alice_lost"] == []
        # The new supervisor settled the dead workers' journals before its workers started.
        assert s.proxy.wait_event("journal_recovered")["sessions"] >= 1
        assert len(r["bob_lost"]) <= 5, r["bob_lost"]


def test_a_crashed_worker_is_restarted_and_its_journal_settled(tmp_path: Path,
                                                               certs: Any) -> None:
    with durable_setup(tmp_path, certs, workers=WORKERS) as s:
        alice, bob = s.account("alice"), s.account("bob")
        home = home_of(alice[0], WORKERS)

        async def scenario() -> None:
            b = await direct(s, bob, "pc")
            a = await via_proxy(s, alice, "phone", resume_max=300)
            try:
                a.abort()  # alice's phone is away: the home holds what comes for her
                await wait_for(lambda: s.proxy.events("hibernating"), 10, "hibernating")
                for body in numbered("k", 5):
                    b.message(alice[0] + "/phone", body)
                await asyncio.sleep(1.0)  # taken from the server, journaled
                os.kill(worker_pids(s.proxy)[home], signal.SIGKILL)
                await wait_for(lambda: s.proxy.events("worker_exited"), 10, "worker_exited")
                await wait_for(lambda: [e for e in s.proxy.events("worker_started")
                                        if e["restarts"] == 1], 30, "the restart")
                assert s.proxy.running  # the supervisor and the other worker carried on
                again = await via_proxy(s, alice, "tablet")
                try:
                    await again.wait_bodies(5, 20)
                    assert again.bodies == numbered("k", 5)
                finally:
                    again.abort()
            finally:
                b.abort()

        run(scenario(), 90)
        (exited,) = s.proxy.events("worker_exited")
        assert exited["worker"] == home and exited["code"] == -signal.SIGKILL
        recovered = s.proxy.wait_event("journal_recovered")
        assert recovered["worker"] == home and recovered["stored"] >= 5


def test_sighup_reloads_every_worker(workers_proxy: ProxyProcess) -> None:
    proxy = workers_proxy
    config = dict(proxy.config)
    config["log"] = {**config["log"], "level": "info"}
    proxy.config_path.write_text(yaml.safe_dump(config))
    assert proxy.proc is not None
    proxy.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 20
    while {e.get("worker") for e in proxy.events("config_reloaded")} != {0, 1}:
        assert time.monotonic() < deadline, proxy.log_tail()
        time.sleep(0.1)
    for event in proxy.events("config_reloaded"):
        assert event["changed"] == ["log.level"] and event["needs_restart"] == []


# Metrics and the admin view across workers ------------------------------------------------


async def http_get(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(LOCALHOST, port), 5)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    raw = await asyncio.wait_for(reader.read(), 20)
    writer.close()
    head, _, body = raw.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


def sample(text: str, name: str, **labels: str) -> float:
    label_text = ",".join(f'{k}="{v}"' for k, v in labels.items())
    key = f"{name}{{{label_text}}}" if labels else name
    (line,) = [x for x in text.splitlines() if x.rpartition(" ")[0] == key]
    return float(line.rpartition(" ")[2])


def front(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], cwd=REPO, text=True,
                          capture_output=True, timeout=60, stdin=subprocess.DEVNULL)


def accounts_on_both(accounts: Any, per_worker: int = 1) -> list[tuple[str, str]]:
    """Fresh accounts, ``per_worker`` of them homed in each worker."""
    found: dict[int, list[tuple[str, str]]] = {i: [] for i in range(WORKERS)}
    while any(len(v) < per_worker for v in found.values()):
        jid, pw = accounts("m")
        home = found[home_of(jid, WORKERS)]
        if len(home) < per_worker:
            home.append((jid, pw))
    return [a for v in found.values() for a in v]


def test_metrics_sessions_and_kick_cover_every_worker(make_proxy: Any, accounts: Any) -> None:
    port = free_port()
    proxy = make_proxy(workers=WORKERS, metrics={"listen": f"{LOCALHOST}:{port}"})
    people = accounts_on_both(accounts, per_worker=2)

    async def scenario() -> None:
        logged = [await raw_login(proxy.host, proxy.port, user(jid), pw, direct_tls=False,
                                  resource="r") for jid, pw in people]
        try:
            status, text = await http_get(port, "/metrics")
            assert status == 200
            assert sample(text, "xmpp_front_workers") == WORKERS
            assert sample(text, "xmpp_front_sessions", state="active") == len(people)
            assert sample(text, "xmpp_front_logins_total", result="ok") == len(people)
            assert (await http_get(port, "/healthz"))[0] == 200

            done = await asyncio.to_thread(front, "sessions", "-c", str(proxy.config_path),
                                           "--json")
            assert done.returncode == 0, done.stderr
            rows = json.loads(done.stdout)
            assert sorted(r["account"] for r in rows) == sorted(jid for jid, _ in people)
            assert {r["account"]: r["worker"] for r in rows} == {
                jid: home_of(jid, WORKERS) for jid, _ in people}

            victim = people[-1][0]  # homed in the last worker
            done = await asyncio.to_thread(front, "kick", victim, "-c",
                                           str(proxy.config_path))
            assert done.returncode == 0, done.stderr
            assert done.stdout.strip() == f"kicked {victim}/r"
            assert await logged[-1].expect_closed(10)
            done = await asyncio.to_thread(front, "kick", victim, "-c",
                                           str(proxy.config_path))
            assert done.returncode == 1 and "no live session" in done.stderr
            await message(logged[0], logged[1], "the others go on")
        finally:
            for client in logged:
                client.abort()

    run(scenario(), timeout=90)


def test_a_first_start_says_nothing_of_an_unclean_store(workers_proxy: ProxyProcess) -> None:
    """A new store file is a clean start: no worker warns that changes may be lost."""
    assert len(worker_pids(workers_proxy)) == WORKERS
    assert workers_proxy.events("store_unclean_start") == []


def test_workers_stop_themselves_when_the_supervisor_is_killed(
        workers_proxy: ProxyProcess) -> None:
    proxy = workers_proxy
    pids = worker_pids(proxy)
    assert proxy.proc is not None and len(pids) == WORKERS
    proxy.proc.kill()  # the supervisor alone, not its process group
    proxy.proc.wait(5)
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() and "Z" not in _state(pid)
              for pid in pids.values()):
        assert time.monotonic() < deadline, "a worker outlived its supervisor"
        time.sleep(0.1)
    # What each worker logged on its way out (a worker seen gone may have written its last
    # lines a moment before the log is read).
    while not ({e["worker"] for e in proxy.events("supervisor_gone")} == set(pids)
               and {e.get("worker") for e in proxy.events("stopped")} >= set(pids)):
        assert time.monotonic() < deadline, proxy.log_tail()
        time.sleep(0.1)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def test_a_relayed_login_keeps_the_domain_its_header_chose(
        tmp_path: Path, two_hosts: Any, proxy_certs: Any) -> None:  # noqa: F811
    proxy = start_proxy(tmp_path, two_hosts, proxy_certs, workers=WORKERS)
    alice = account(two_hosts, "alice")  # localhost
    relayed = None
    try:
        async def scenario() -> None:
            nonlocal relayed
            a = await raw_login(proxy.host, proxy.port, user(alice[0]), alice[1],
                                direct_tls=False, resource="pc")
            try:
                for _ in range(TRIES):
                    jid, pw = account(two_hosts, "bob", BETA)
                    b = await raw_login(proxy.host, proxy.port, user(jid), pw,
                                        direct_tls=False, resource="phone", to=BETA)
                    try:
                        assert b.jid == f"{jid}/phone"
                        await message(b, a, "from beta")
                        await message(a, b, "to beta")
                        accepted, home = where(proxy, jid)
                        if accepted != home:
                            relayed = jid
                            return
                    finally:
                        await b.close()
            finally:
                await a.close()

        run(scenario(), 120)
    finally:
        proxy.stop()
    assert relayed is not None, "no beta.test login was accepted by the other worker"
    assert relayed.endswith("@" + BETA)


def rss_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_a_relayed_client_that_never_reads_is_cut_off_by_its_home_and_the_relay_holds_little(
        make_proxy: Any, accounts: Any) -> None:
    """Back-pressure through the relay: the home's output limits work over the link (the
    relay stops reading the home while the client's socket is full), and the accepting
    worker buffers no more than its transports' high-water marks meanwhile."""
    proxy = make_proxy(workers=WORKERS,
                       limits={"output_soft_bytes": 65536, "output_hard_bytes": 65536})
    flood = b"<r xmlns='urn:xmpp:sm:3'/>" * 400_000  # 10 MB of requests, each answered

    async def scenario() -> tuple[int, int, bool]:
        for _ in range(TRIES):
            jid, pw = accounts("flooder")
            raw = await raw_login(proxy.host, proxy.port, user(jid), pw, direct_tls=False)
            accepted, home = where(proxy, jid)
            if accepted == home:
                raw.abort()
                continue
            try:
                relay_pid = worker_pids(proxy)[accepted]
                before = rss_of(relay_pid)
                raw.send(f"<enable xmlns='{NS_SM}'/>")
                await raw.read_until(q(NS_SM, "enabled"), 10)
                raw.writer.write(flood)  # and never read
                writer = asyncio.ensure_future(raw.writer.drain())
                overflow = await asyncio.to_thread(
                    proxy.wait_event, "output_overflow", timeout=30)
                grown = rss_of(relay_pid) - before
                writer.cancel()
                closed = await raw.expect_closed(20, reply=False)
                return overflow["worker"], grown, closed
            finally:
                raw.abort()
        raise AssertionError("no login was accepted by the other worker")

    where_cut, grown, closed = run(scenario(), 120)
    overflow = proxy.wait_event("output_overflow")
    assert where_cut == home_of(next(e["account"] for e in proxy.events("auth_ok")
                                     if e["conn"] == overflow["conn"]), WORKERS)
    assert closed
    assert grown < 16 * 2 ** 20, f"the relaying worker grew by {grown / 2 ** 20:.1f} MiB"
    assert proxy.running
