"""Abuse limits (issue 11 item 4) and the self-upstream loop (issue 10) on the wire, through a
real proxy process in front of the real legacy Prosody."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import yaml

from tests.integration.proxyproc import ProxyProcess
from tests.peers.faultrelay import FaultRelay
from tests.peers.prosody import LegacyProsody
from tests.peers.rawclient import (
    NS_BIND,
    NS_SM,
    NS_STANZA_ERRORS,
    RawAuthError,
    RawClient,
    q,
    raw_login,
    stream_error_condition,
)
from tests.peers.util import LOCALHOST, run

pytestmark = pytest.mark.integration

NS_XEP0205 = "urn:xmpp:errors"


def user(jid: str) -> str:
    return jid.split("@")[0]


def prosody_tls_streams(prosody: LegacyProsody) -> int:
    """Client streams the legacy server has encrypted so far: one per upstream login the
    proxy attempted (it logs no line per failed password at level info)."""
    text = prosody.log_path.read_text(errors="replace")
    return sum(1 for line in text.splitlines() if "Stream encrypted" in line)


async def try_login(proxy: ProxyProcess, username: str, password: str) -> str | None:
    """One login on a fresh connection: None if it worked, else the SASL condition."""
    client = await RawClient.connect(proxy.host, proxy.port, direct_tls=False)
    try:
        await client.login_plain(username, password, timeout=10)
        return None
    except RawAuthError as exc:
        return exc.condition
    finally:
        client.abort()


async def wait_until(predicate, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


def test_wrong_passwords_are_delayed_then_refused_without_an_upstream_login(
        make_proxy, accounts, prosody: LegacyProsody) -> None:
    proxy = make_proxy(abuse={"login_failures_free": 1, "login_delay": 0.3,
                              "login_delay_max": 0.6, "login_failures_per_account": 3,
                              "login_failures_per_address": 0, "login_lockout": 60})
    (victim_jid, victim_pw), (other_jid, other_pw) = accounts("victim"), accounts("other")
    victim = user(victim_jid)

    async def scenario() -> None:
        # A session of another account, open all along, must not notice anything.
        bystander = await raw_login(proxy.host, proxy.port, user(other_jid), other_pw,
                                    direct_tls=False, resource="bystander")
        try:
            before = prosody_tls_streams(prosody)
            outcomes, took = [], []
            for _ in range(5):
                started = time.monotonic()
                outcomes.append(await try_login(proxy, victim, "wrong"))
                took.append(time.monotonic() - started)
            # limit-1 and limit: answered by the server; limit+1 on: refused by the proxy.
            assert outcomes == ["not-authorized"] * 3 + ["temporary-auth-failure"] * 2
            # The second and third failures waited their growing delays on the wire.
            assert took[1] >= 0.3 and took[2] >= 0.6
            # Even the right password is refused during the lockout, with no upstream try.
            assert await try_login(proxy, victim, victim_pw) == "temporary-auth-failure"
            await wait_until(lambda: prosody_tls_streams(prosody) - before >= 3)
            await asyncio.sleep(0.3)
            assert prosody_tls_streams(prosody) - before == 3

            # Another account from the same address is not affected (per-address limit off).
            assert await try_login(proxy, user(other_jid), other_pw) is None
            reply = await bystander.iq("<ping xmlns='urn:xmpp:ping'/>", to="localhost")
            assert reply.get("type") == "result"
        finally:
            bystander.abort()

    run(scenario(), timeout=60)
    assert [e["delay"] for e in proxy.events("login_throttled")] == [0.3, 0.6]
    refused = proxy.events("login_refused")
    assert len(refused) == 3
    assert {e["limit"] for e in refused} == {"abuse.login_failures_per_account"}
    assert len([e for e in proxy.events("auth_failed")
                if e.get("account", "").startswith(victim)]) == 3


def test_a_good_login_resets_the_account_count(make_proxy, accounts) -> None:
    proxy = make_proxy(abuse={"login_failures_per_account": 3, "login_delay": 0,
                              "login_failures_per_address": 0})
    jid, password = accounts("reset")

    async def scenario() -> None:
        for _ in range(2):  # limit - 1
            assert await try_login(proxy, user(jid), "wrong") == "not-authorized"
        assert await try_login(proxy, user(jid), password) is None
        for _ in range(2):  # counted from zero again: still below the limit
            assert await try_login(proxy, user(jid), "wrong") == "not-authorized"
        assert await try_login(proxy, user(jid), password) is None

    run(scenario(), timeout=60)
    assert proxy.events("login_refused") == []


def test_failures_per_address_lock_out_every_account_from_it(make_proxy, accounts) -> None:
    proxy = make_proxy(abuse={"login_failures_per_account": 0, "login_failures_per_address": 3,
                              "login_delay": 0})
    targets = [accounts("spray") for _ in range(3)]
    fresh_jid, fresh_pw = accounts("fresh")

    async def scenario() -> None:
        for jid, _ in targets:
            assert await try_login(proxy, user(jid), "wrong") == "not-authorized"
        assert await try_login(proxy, user(fresh_jid), fresh_pw) == "temporary-auth-failure"

    run(scenario(), timeout=60)
    (refused,) = proxy.events("login_refused")
    assert refused["limit"] == "abuse.login_failures_per_address"


async def open_refused(proxy: ProxyProcess, port: int, direct_tls: bool) -> str | None:
    """Connect, send a header; the stream error condition the proxy answers with."""
    client = await RawClient.connect(proxy.host, port, direct_tls=direct_tls)
    try:
        client._new_parser()
        client.send(client.stream_header("localhost"))
        element = await client.read_element(timeout=5)
        # The error is well-formed: it came inside the proxy's own stream header.
        assert client.stream_attrs.get("from") == "localhost"
        assert await client.expect_closed(timeout=5)
        return stream_error_condition(element)
    finally:
        client.abort()


@pytest.mark.parametrize("direct_tls", [False, True], ids=["starttls", "direct-tls"])
def test_connections_per_address_over_the_limit_get_policy_violation(
        make_proxy, accounts, direct_tls: bool) -> None:
    proxy = make_proxy(abuse={"max_connections_per_address": 2})
    port = proxy.direct_tls_port if direct_tls else proxy.port
    jid, password = accounts("conn")

    async def scenario() -> None:
        first = await raw_login(proxy.host, port, user(jid), password, direct_tls=direct_tls,
                                resource="first")
        second = await RawClient.connect(proxy.host, port, direct_tls=direct_tls)
        try:
            await second.secure()  # limit: still served
            await wait_until(lambda: len(proxy.events("accepted")) == 2)
            assert await open_refused(proxy, port, direct_tls) == "policy-violation"
            # The admitted ones carry on.
            reply = await first.iq("<ping xmlns='urn:xmpp:ping'/>", to="localhost")
            assert reply.get("type") == "result"
            second.abort()
            # A slot came free: a new connection is served again.
            await wait_until(lambda: any(e.get("phase") == "negotiation"
                                         for e in proxy.events("closed")))
            again = await raw_login(proxy.host, port, user(jid), password,
                                    direct_tls=direct_tls, resource="again")
            again.abort()
        finally:
            first.abort()
            second.abort()

    run(scenario(), timeout=60)
    (refused,) = proxy.events("connection_refused")
    assert refused["limit"] == "abuse.max_connections_per_address"
    assert refused["condition"] == "policy-violation"


def test_connections_in_total_over_the_limit_get_resource_constraint(make_proxy) -> None:
    proxy = make_proxy(abuse={"max_connections": 2, "max_connections_per_address": 0})

    async def scenario() -> None:
        held = [await RawClient.connect(proxy.host, proxy.port, direct_tls=False)
                for _ in range(2)]
        try:
            for client in held:
                await client.open_stream()
            assert await open_refused(proxy, proxy.port, False) == "resource-constraint"
        finally:
            for client in held:
                client.abort()

    run(scenario(), timeout=30)
    (refused,) = proxy.events("connection_refused")
    assert refused["limit"] == "abuse.max_connections"


def test_sessions_per_account_over_the_limit_get_resource_constraint(make_proxy,
                                                                     accounts) -> None:
    proxy = make_proxy(abuse={"max_sessions_per_account": 2})
    jid, password = accounts("many")
    other_jid, other_pw = accounts("single")

    async def scenario() -> None:
        sessions = [await raw_login(proxy.host, proxy.port, user(jid), password,
                                    direct_tls=False, resource=f"r{i}") for i in range(2)]
        third = await RawClient.connect(proxy.host, proxy.port, direct_tls=False)
        try:
            await third.login_plain(user(jid), password)
            reply = await third.iq(f"<bind xmlns='{NS_BIND}'><resource>r2</resource></bind>",
                                   type="set")
            assert reply.get("type") == "error"
            error = reply.find(q("jabber:client", "error"))
            assert error is not None and error.get("type") == "wait"
            assert error.find(q(NS_STANZA_ERRORS, "resource-constraint")) is not None
            assert error.find(q(NS_XEP0205, "resource-limit-exceeded")) is not None
            # Taking over a bound resource is not one more session: allowed.
            assert await third.bind("r0") == f"{jid}/r0"
            # Another account is not affected.
            other = await raw_login(proxy.host, proxy.port, user(other_jid), other_pw,
                                    direct_tls=False, resource="r0")
            other.abort()
            reply = await sessions[1].iq("<ping xmlns='urn:xmpp:ping'/>", to="localhost")
            assert reply.get("type") == "result"
        finally:
            third.abort()
            for session in sessions:
                session.abort()

    run(scenario(), timeout=60)
    (refused,) = proxy.events("session_refused")
    assert refused["limit"] == "abuse.max_sessions_per_account"


def test_the_proxy_as_its_own_upstream_is_refused_at_the_first_nested_connection(
        tmp_path: Path, prosody: LegacyProsody, certs, accounts) -> None:
    """A TCP forwarder hides the loop from the config check; the stream id gives it away."""
    jid, password = accounts("loop")
    proxy = ProxyProcess(tmp_path / "loop", prosody, *certs,
                         upstream={"verify": False, "ca": None})
    with FaultRelay(LOCALHOST, proxy.port) as relay:
        proxy.config["upstream"]["port"] = relay.port
        proxy.config_path.write_text(yaml.safe_dump(proxy.config))
        # Closed while the proxy starts, so its start-up reachability probe is not counted
        # below (it is logged instead).
        relay.refuse()
        with proxy:
            proxy.wait_event("upstream_unreachable")
            relay.pass_through()
            outcome = run(try_login(proxy, user(jid), password), timeout=30)
            assert outcome == "temporary-auth-failure"
            proxy.wait_event("loop_refused")
            # Give a runaway loop time to show itself before counting.
            run(asyncio.sleep(0.5))
            assert relay.connections_total == 1
            assert len(proxy.events("accepted")) == 2  # the client and one nested login
            assert len(proxy.events("loop_refused")) == 1


def test_a_hibernated_session_counts_toward_the_account_limit(make_proxy, accounts) -> None:
    proxy = make_proxy(abuse={"max_sessions_per_account": 1})
    jid, password = accounts("hib")

    async def scenario() -> None:
        phone = await raw_login(proxy.host, proxy.port, user(jid), password, direct_tls=False,
                                resource="phone")
        phone.send(f"<enable xmlns='{NS_SM}' resume='true'/>")
        await phone.read_until(q(NS_SM, "enabled"))
        phone.abort()  # a network drop: the session hibernates, still bound upstream
        await asyncio.to_thread(proxy.wait_event, "hibernating", timeout=10)
        laptop = await RawClient.connect(proxy.host, proxy.port, direct_tls=False)
        try:
            await laptop.login_plain(user(jid), password)
            reply = await laptop.iq(
                f"<bind xmlns='{NS_BIND}'><resource>laptop</resource></bind>", type="set")
            assert reply.get("type") == "error"
            # Binding the hibernated resource itself is a takeover: allowed.
            assert await laptop.bind("phone") == f"{jid}/phone"
        finally:
            laptop.abort()

    run(scenario(), timeout=60)
    assert len(proxy.events("session_refused")) == 1
