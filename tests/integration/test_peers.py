"""The real-peer harness itself, proven against Prosody directly (no proxy in between)."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.conftest import MakeAccount
from tests.peers.clients import (
    Inbox,
    connect_client,
    disconnect,
    login_fails,
    wait_disconnected,
)
from tests.peers.faultrelay import FaultRelay
from tests.peers.prosody import LegacyProsody
from tests.peers.rawclient import (
    NS_CLIENT,
    NS_ROSTER,
    NS_SM,
    RawAuthError,
    RawClient,
    feature_namespaces,
    q,
    raw_login,
    stream_error_condition,
    tostring,
)
from tests.peers.util import run

pytestmark = pytest.mark.integration

NS_ROSTERVER = "urn:xmpp:features:rosterver"
NS_PREAPPROVAL = "urn:xmpp:features:pre-approval"
NS_CSI = "urn:xmpp:csi:0"
PING = "<ping xmlns='urn:xmpp:ping'/>"


def _user(jid: str) -> str:
    return jid.split("@", 1)[0]


def test_slixmpp_users_exchange_messages_over_starttls_and_direct_tls(
    prosody: LegacyProsody, accounts: MakeAccount
) -> None:
    (alice_jid, alice_pw), (bob_jid, bob_pw) = accounts("alice"), accounts("bob")

    async def scenario() -> None:
        alice = await connect_client(alice_jid, alice_pw, prosody.host, prosody.c2s_port,
                                     direct_tls=False)
        bob = await connect_client(bob_jid, bob_pw, prosody.host, prosody.direct_tls_port,
                                   direct_tls=True)
        try:
            alice_inbox, bob_inbox = Inbox(alice), Inbox(bob)
            alice.send_message(mto=bob.boundjid.full, mbody="hello over starttls")
            got = await bob_inbox.get(timeout=5)
            assert got["body"] == "hello over starttls"
            assert got["from"].bare == alice_jid
            bob.send_message(mto=alice.boundjid.full, mbody="hello over direct tls")
            got = await alice_inbox.get(timeout=5)
            assert got["body"] == "hello over direct tls"
        finally:
            await disconnect(alice)
            await disconnect(bob)

    run(scenario(), timeout=30)


def test_stream_features_are_legacy(prosody: LegacyProsody, accounts: MakeAccount) -> None:
    jid, password = accounts()

    async def scenario() -> None:
        for port, direct_tls in ((prosody.c2s_port, False), (prosody.direct_tls_port, True)):
            client = await RawClient.connect(prosody.host, port, direct_tls=direct_tls)
            try:
                pre_auth = await client.secure()
                assert "PLAIN" in client.mechanisms()
                features = await client.login_plain(_user(jid), password)
                namespaces = feature_namespaces(pre_auth) | feature_namespaces(features)
                assert q("urn:ietf:params:xml:ns:xmpp-bind", "bind") in {
                    child.tag for child in features
                }
                for absent in (NS_SM, NS_ROSTERVER, NS_PREAPPROVAL, NS_CSI):
                    assert absent not in namespaces, f"{absent} advertised: {namespaces}"
            finally:
                await client.close()

    run(scenario(), timeout=20)


def test_roster_results_and_pushes_carry_no_ver(
    prosody: LegacyProsody, accounts: MakeAccount
) -> None:
    (jid, password), (contact, _) = accounts(), accounts("contact")

    async def scenario() -> None:
        client = await raw_login(prosody.host, prosody.c2s_port, _user(jid), password,
                                 direct_tls=False)
        try:
            # A versioning-aware request (ver='') would get a ver back from stock Prosody.
            reply = await client.iq(f"<query xmlns='{NS_ROSTER}' ver=''/>")
            query = reply.find(q(NS_ROSTER, "query"))
            assert reply.get("type") == "result" and query is not None
            assert query.get("ver") is None
            client.send(
                f"<iq type='set' id='set1'><query xmlns='{NS_ROSTER}'>"
                f"<item jid='{contact}' name='Contact'><group>Friends</group></item>"
                "</query></iq>"
            )
            push = result = None
            while push is None or result is None:
                element = await client.read_until(q(NS_CLIENT, "iq"), timeout=5)
                if element.get("id") == "set1":
                    result = element
                elif element.get("type") == "set":
                    push = element
            assert result.get("type") == "result"
            push_query = push.find(q(NS_ROSTER, "query"))
            assert push_query is not None and push_query.get("ver") is None
            # A 'ver' equal to the server's would give an empty result: the module strips
            # it, so the full roster always comes back.
            for ver in ("1", "2", "3"):
                reply = await client.iq(f"<query xmlns='{NS_ROSTER}' ver='{ver}'/>")
                query = reply.find(q(NS_ROSTER, "query"))
                assert query is not None and query.get("ver") is None
                items = query.findall(q(NS_ROSTER, "item"))
                assert [item.get("jid") for item in items] == [contact]
                assert items[0].findtext(q(NS_ROSTER, "group")) == "Friends"
        finally:
            await client.close()

    run(scenario(), timeout=20)


def test_wrong_password_is_not_authorized(
    prosody: LegacyProsody, accounts: MakeAccount
) -> None:
    jid, password = accounts()

    async def scenario() -> None:
        condition = await login_fails(jid, password + "x", prosody.host, prosody.c2s_port,
                                      direct_tls=False)
        assert condition == "not-authorized"
        condition = await login_fails(jid, "wrong", prosody.host, prosody.direct_tls_port,
                                      direct_tls=True, sasl_mech="PLAIN")
        assert condition == "not-authorized"
        client = await RawClient.connect(prosody.host, prosody.direct_tls_port,
                                         direct_tls=True)
        try:
            with pytest.raises(RawAuthError) as failure:
                await client.login_plain(_user(jid), "wrong")
            assert failure.value.condition == "not-authorized"
        finally:
            await client.close()

    run(scenario(), timeout=30)


def test_crash_then_restart_keeps_accounts_and_rosters(own_prosody: LegacyProsody) -> None:
    server = own_prosody
    jid = server.register("carol", "carol-pw")

    async def scenario() -> None:
        client = await raw_login(server.host, server.c2s_port, "carol", "carol-pw",
                                 direct_tls=False)
        await client.iq(f"<query xmlns='{NS_ROSTER}'><item jid='dave@localhost'/></query>",
                        type="set")
        pid = server.pid
        await asyncio.to_thread(server.kill)
        assert not server.running and pid is not None
        # A crash just drops TCP: no </stream:stream>, no stream error.
        assert await client.expect_closed(timeout=5)
        assert client.eof and not client.stream_closed
        assert client.seen_before_close == [] or all(
            stream_error_condition(e) is None for e in client.seen_before_close
        )
        await asyncio.to_thread(server.restart)
        assert server.running and server.pid != pid
        slix = await connect_client(jid, "carol-pw", server.host, server.c2s_port,
                                    direct_tls=False)
        await disconnect(slix)
        client = await raw_login(server.host, server.direct_tls_port, "carol", "carol-pw",
                                 direct_tls=True)
        try:
            reply = await client.iq(f"<query xmlns='{NS_ROSTER}'/>")
            items = reply.findall(f"{q(NS_ROSTER, 'query')}/{q(NS_ROSTER, 'item')}")
            assert [item.get("jid") for item in items] == ["dave@localhost"]
        finally:
            await client.close()

    run(scenario(), timeout=30)


def test_graceful_stop_sends_system_shutdown(own_prosody: LegacyProsody) -> None:
    server = own_prosody
    server.register("erin", "erin-pw")

    async def scenario() -> float:
        client = await raw_login(server.host, server.c2s_port, "erin", "erin-pw",
                                 direct_tls=False)
        # Let Prosody go idle: a SIGTERM landing while it is still finishing a write to
        # this connection can lose the stream error (see LegacyProsody.stop).
        await asyncio.sleep(0.1)
        started = time.monotonic()
        stopping = asyncio.create_task(asyncio.to_thread(server.stop))
        element = await client.read_element(timeout=5)
        assert stream_error_condition(element) == "system-shutdown"
        assert await client.expect_closed(timeout=5)  # and answers </stream:stream>
        assert client.stream_closed
        await asyncio.wait_for(stopping, 10)
        return time.monotonic() - started

    elapsed = run(scenario(), timeout=20)
    assert not server.running
    # Prosody closes the connections itself: no waiting out c2s_close_timeout (5 s).
    assert elapsed < 3, elapsed


def test_fault_relay_pass_through_reset_refuse(
    prosody: LegacyProsody, accounts: MakeAccount
) -> None:
    jid, password = accounts()

    async def scenario(relay: FaultRelay) -> None:
        # pass-through: a real client logs in through the relay
        slix = await connect_client(jid, password, relay.host, relay.port, direct_tls=False)
        raw = await raw_login(relay.host, relay.port, _user(jid), password, direct_tls=False)
        assert relay.connections_total == 2 and relay.connections_active == 2
        assert (await raw.iq(PING, to="localhost")).get("type") == "result"

        # reset: both clients see their connection drop
        await asyncio.to_thread(relay.reset)
        await wait_disconnected(slix, timeout=5)
        assert await raw.expect_closed(timeout=5)
        assert raw.eof and not raw.stream_closed
        await disconnect(slix)

        # refuse: new connections fail, and come back after pass_through()
        await asyncio.to_thread(relay.refuse)
        with pytest.raises(ConnectionRefusedError):
            await RawClient.connect(relay.host, relay.port, direct_tls=False)
        await asyncio.to_thread(relay.pass_through)
        raw = await raw_login(relay.host, relay.port, _user(jid), password, direct_tls=False)
        try:
            # delay: each direction is late by the delay
            await asyncio.to_thread(relay.delay, 0.3)
            started = asyncio.get_running_loop().time()
            assert (await raw.iq(PING, to="localhost")).get("type") == "result"
            assert asyncio.get_running_loop().time() - started >= 0.55
            # stall: nothing moves, then everything held is delivered
            await asyncio.to_thread(relay.stall)
            raw.send(f"<iq type='get' id='held' to='localhost'>{PING}</iq>")
            with pytest.raises(TimeoutError):
                await raw.read_element(timeout=0.5)
            await asyncio.to_thread(relay.pass_through)
            held = await raw.read_element(timeout=5)
            assert held.get("id") == "held" and held.get("type") == "result"
            # blackhole: bytes vanish (and this TLS stream is corrupt from now on)
            await asyncio.to_thread(relay.blackhole)
            raw.send(f"<iq type='get' id='lost' to='localhost'>{PING}</iq>")
            with pytest.raises(TimeoutError):
                await raw.read_element(timeout=0.5)
            raw.abort()
        finally:
            if not raw.writer.is_closing():
                await raw.close()

    with FaultRelay(prosody.host, prosody.c2s_port) as relay:
        run(scenario(relay), timeout=40)
    assert relay.connections_total == 3


def test_legacy_server_ignores_subscription_preapproval(
    prosody: LegacyProsody, accounts: MakeAccount
) -> None:
    (a_jid, a_pw), (b_jid, b_pw) = accounts("pre"), accounts("sub")

    async def scenario() -> None:
        a = await raw_login(prosody.host, prosody.c2s_port, _user(a_jid), a_pw,
                            direct_tls=False)
        b = await raw_login(prosody.host, prosody.c2s_port, _user(b_jid), b_pw,
                            direct_tls=False)
        try:
            a.send("<presence/>")
            await a.iq(f"<query xmlns='{NS_ROSTER}'/>")  # interested in roster pushes
            # Pre-approve b: a server with RFC 6121 3.4 would store it; this one ignores it.
            a.send(f"<presence type='subscribed' to='{b_jid}'/>")
            b.send(f"<presence type='subscribe' to='{a_jid}'/>")
            # Without pre-approval, a is asked (stock Prosody would auto-answer 'subscribed').
            request = await a.read_until(q(NS_CLIENT, "presence"), timeout=5,
                                         type="subscribe")
            assert request.get("from") == b_jid
        finally:
            await a.close()
            await b.close()

    run(scenario(), timeout=20)


def test_in_band_registration_and_muc_component(
    prosody: LegacyProsody, accounts: MakeAccount
) -> None:
    """The shared server allows XEP-0077 from loopback (fast accounts) and hosts a MUC."""
    ibr_user = _user(accounts("taken")[0]) + "ibr"  # a name nobody has registered
    assert prosody.muc_domain is not None

    async def scenario() -> None:
        client = await RawClient.connect(prosody.host, prosody.c2s_port, direct_tls=False)
        try:
            await client.register(ibr_user, "ibr-pw")
        finally:
            await client.close()
        client = await raw_login(prosody.host, prosody.direct_tls_port, ibr_user, "ibr-pw",
                                 direct_tls=True)
        try:
            reply = await client.iq(
                "<query xmlns='http://jabber.org/protocol/disco#info'/>",
                to=str(prosody.muc_domain),
            )
            identity = reply.find(
                "{http://jabber.org/protocol/disco#info}query/"
                "{http://jabber.org/protocol/disco#info}identity"
            )
            assert identity is not None and identity.get("category") == "conference", (
                tostring(reply)
            )
        finally:
            await client.close()

    run(scenario(), timeout=20)


def test_certs_are_usable_tls_server_certs(certs: tuple[Path, Path]) -> None:
    cert, key = certs
    ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    text = subprocess.run(
        ["openssl", "x509", "-in", str(cert), "-noout", "-text"],
        check=True, capture_output=True, text=True, timeout=10,
    ).stdout
    assert "DNS:localhost" in text and "CN = localhost" in text
