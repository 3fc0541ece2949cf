"""The stream relay core against a real legacy Prosody and real slixmpp clients.

Every client here talks to xmpp-front, which logs in to Prosody on the client's behalf.
"""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import pytest

from tests.integration.proxyproc import ProxyProcess
from tests.peers import clients
from tests.peers.faultrelay import FaultRelay
from tests.peers.prosody import LegacyProsody
from tests.peers.rawclient import RawClient, raw_login, stream_error_condition
from tests.peers.util import run

pytestmark = pytest.mark.integration

NS_STREAM = "http://etherx.jabber.org/streams"


def user(jid: str) -> str:
    return jid.split("@")[0]


async def roundtrip(sender, receiver, text: str, timeout: float = 10.0) -> None:
    """``sender`` messages ``receiver``'s full JID and the message arrives, body intact."""
    inbox = clients.Inbox(receiver)
    try:
        sender.send_message(mto=receiver.boundjid.full, mbody=text, mtype="chat")
        msg = await inbox.get(timeout)
        assert msg["body"] == text
        assert msg["from"] == sender.boundjid
    finally:
        inbox.close()


@pytest.mark.parametrize("direct_tls", [False, True], ids=["starttls", "direct-tls"])
def test_two_users_chat_roster_subscription_disco_ping(proxy: ProxyProcess, accounts,
                                                       direct_tls: bool) -> None:
    (alice_jid, alice_pw), (bob_jid, bob_pw) = accounts("alice"), accounts("bob")
    port = proxy.direct_tls_port if direct_tls else proxy.port

    async def scenario() -> None:
        alice = await clients.connect_client(alice_jid + "/phone", alice_pw, proxy.host, port,
                                             direct_tls=direct_tls)
        bob = await clients.connect_client(bob_jid + "/desk", bob_pw, proxy.host, port,
                                           direct_tls=direct_tls)
        try:
            # The client got the full JID the server bound, with the resource it asked for.
            assert alice.boundjid.full == alice_jid + "/phone"
            await roundtrip(alice, bob, "hello bob, through the proxy")
            await roundtrip(bob, alice, "hi alice — ünïcode & <markup> survive")

            # Presence subscription alice -> bob; slixmpp auto-approves on bob's side.
            await alice.get_roster(timeout=10)
            await bob.get_roster(timeout=10)
            alice.send_presence_subscription(pto=bob_jid)
            deadline = asyncio.get_running_loop().time() + 10
            while alice.client_roster[bob_jid]["subscription"] not in ("to", "both"):
                assert asyncio.get_running_loop().time() < deadline, "subscription incomplete"
                await asyncio.sleep(0.1)
            await alice.get_roster(timeout=10)  # versioned: may be an empty result
            assert alice.client_roster[bob_jid]["subscription"] in ("to", "both")

            info = await alice.plugin["xep_0030"].get_info(jid="localhost", timeout=10)
            assert "urn:xmpp:ping" in info["disco_info"]["features"]
            rtt = await alice.plugin["xep_0199"].ping(jid="localhost", timeout=10)
            assert rtt is not None
        finally:
            await clients.disconnect(alice)
            await clients.disconnect(bob)

    run(scenario(), 60)
    bound = {e["jid"] for e in proxy.events("bound")}
    assert {alice_jid + "/phone", bob_jid + "/desk"} <= bound


def test_wrong_password_gives_not_authorized_and_others_keep_working(proxy, accounts) -> None:
    (alice_jid, alice_pw), (bob_jid, bob_pw) = accounts("alice"), accounts("bob")

    async def scenario() -> None:
        alice = await clients.connect_client(alice_jid + "/a", alice_pw, proxy.host,
                                             proxy.port, direct_tls=False)
        bob = await clients.connect_client(bob_jid + "/b", bob_pw, proxy.host, proxy.port,
                                           direct_tls=False)
        try:
            condition = await clients.login_fails(bob_jid, "not-the-password", proxy.host,
                                                  proxy.port, direct_tls=False)
            assert condition == "not-authorized"
            await roundtrip(alice, bob, "still here")
        finally:
            await clients.disconnect(alice)
            await clients.disconnect(bob)

    run(scenario(), 60)
    failed = proxy.events("auth_failed")
    assert any(e["reason"] == "not-authorized" and e["account"] == bob_jid for e in failed)
    # The password never reaches the log.
    assert "not-the-password" not in proxy.log_path.read_text()
    assert bob_pw not in proxy.log_path.read_text()


def test_server_down_at_login_gives_temporary_auth_failure(tmp_path: Path, prosody, certs,
                                                           accounts) -> None:
    (alice_jid, alice_pw), (bob_jid, bob_pw) = accounts("alice"), accounts("bob")
    with FaultRelay("127.0.0.1", prosody.c2s_port) as relay, ProxyProcess(
            tmp_path / "proxy", prosody, *certs, upstream_port=relay.port) as proxy:

        async def scenario() -> None:
            alice = await clients.connect_client(alice_jid + "/a", alice_pw, proxy.host,
                                                 proxy.port, direct_tls=False)
            relay.refuse()  # the server is now unreachable for new connections
            try:
                condition = await clients.login_fails(bob_jid, bob_pw, proxy.host,
                                                      proxy.port, direct_tls=False)
                assert condition == "temporary-auth-failure"
                relay.pass_through()
                bob = await clients.connect_client(bob_jid + "/b", bob_pw, proxy.host,
                                                   proxy.port, direct_tls=False)
                try:
                    await roundtrip(alice, bob, "the established session survived")
                finally:
                    await clients.disconnect(bob)
            finally:
                await clients.disconnect(alice)

        run(scenario(), 60)
        assert any(e["reason"] == "upstream-unavailable" for e in proxy.events("auth_failed"))


async def _logged_in_raw(proxy: ProxyProcess, jid: str, password: str,
                         resource: str = "raw") -> RawClient:
    return await raw_login(proxy.host, proxy.port, user(jid), password, direct_tls=False,
                           resource=resource)


BAD_INPUT = {
    "malformed": (b"<message><body>x</mismatch></message>", "not-well-formed"),
    "dtd": (b"<!DOCTYPE foo [<!ENTITY x 'y'>]>", "restricted-xml"),
    "entity": (b"<message to='localhost'><body>&xxe;</body></message>", "restricted-xml"),
    "comment": (b"<!-- a comment -->", "restricted-xml"),
    "oversized": (b"<message to='localhost'><body>" + b"A" * 300_000 + b"</body></message>",
                  "policy-violation"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_gets_its_stream_error_and_spares_other_sessions(proxy, accounts,
                                                                   case: str) -> None:
    payload, condition = BAD_INPUT[case]
    (mallory_jid, mallory_pw), (alice_jid, alice_pw), (bob_jid, bob_pw) = (
        accounts("mallory"), accounts("alice"), accounts("bob"))

    async def scenario() -> None:
        alice = await clients.connect_client(alice_jid + "/a", alice_pw, proxy.host,
                                             proxy.port, direct_tls=False)
        bob = await clients.connect_client(bob_jid + "/b", bob_pw, proxy.host, proxy.port,
                                           direct_tls=False)
        mallory = await _logged_in_raw(proxy, mallory_jid, mallory_pw)
        try:
            mallory.send(payload)
            assert await mallory.expect_closed(10), "the proxy did not close the stream"
            errors = [stream_error_condition(e) for e in mallory.seen_before_close
                      if e.tag == f"{{{NS_STREAM}}}error"]
            assert errors == [condition]
            await roundtrip(alice, bob, f"unaffected by {case}")
        finally:
            mallory.abort()
            await clients.disconnect(alice)
            await clients.disconnect(bob)

    run(scenario(), 60)
    assert proxy.running


def test_forged_from_is_replaced_by_the_senders_full_jid(proxy, accounts) -> None:
    (mallory_jid, mallory_pw), (bob_jid, bob_pw) = accounts("mallory"), accounts("bob")

    async def scenario() -> None:
        bob = await clients.connect_client(bob_jid + "/b", bob_pw, proxy.host, proxy.port,
                                           direct_tls=False)
        mallory = await _logged_in_raw(proxy, mallory_jid, mallory_pw, resource="forge")
        inbox = clients.Inbox(bob)
        try:
            mallory.send(f"<message from='ceo@localhost/desk' to='{bob_jid}/b' type='chat'>"
                         "<body>wire the money</body></message>")
            msg = await inbox.get(10)
            assert msg["body"] == "wire the money"
            assert str(msg["from"]) == mallory_jid + "/forge"
        finally:
            mallory.abort()
            await clients.disconnect(bob)

    run(scenario(), 30)


@pytest.mark.parametrize("auth,forbidden,expected", [
    ("internal_hashed", [], "SCRAM-SHA-1"),
    ("internal_plain", [], "SCRAM-SHA-256"),
    ("internal_plain", ["SCRAM-SHA-1", "SCRAM-SHA-256"], "PLAIN"),
])
def test_upstream_mechanisms(tmp_path: Path, certs, auth: str, forbidden: list[str],
                             expected: str) -> None:
    server = LegacyProsody(tmp_path / "prosody", auth=auth,  # type: ignore[arg-type]
                           disabled_sasl_mechanisms=forbidden)
    with server, ProxyProcess(tmp_path / "proxy", server, *certs) as proxy:
        jid = server.register("carol", "s3cret-pw")

        async def scenario() -> None:
            carol = await clients.connect_client(jid + "/m", "s3cret-pw", proxy.host,
                                                 proxy.port, direct_tls=False)
            await clients.disconnect(carol)

        run(scenario(), 30)
        [ok] = proxy.events("auth_ok")
        assert ok["upstream_mechanism"] == expected


def test_clean_close_passes_both_ways(proxy, accounts) -> None:
    (alice_jid, alice_pw), (bob_jid, bob_pw) = accounts("alice"), accounts("bob")

    async def scenario() -> None:
        bob = await clients.connect_client(bob_jid + "/b", bob_pw, proxy.host, proxy.port,
                                           direct_tls=False)
        presences = clients.Inbox(bob, "presence_unavailable",
                                  lambda p: str(p["from"]) == alice_jid + "/closer")
        await bob.get_roster(timeout=10)
        alice = await _logged_in_raw(proxy, alice_jid, alice_pw, resource="closer")
        try:
            # Mutual subscription so bob sees alice leave when her upstream stream closes.
            await alice.iq("<query xmlns='jabber:iq:roster'/>")
            alice.send("<presence/>")
            bob.send_presence_subscription(pto=alice_jid)
            await alice.read_until("{jabber:client}presence", 10, type="subscribe")
            alice.send(f"<presence to='{bob_jid}' type='subscribed'/>")
            await asyncio.sleep(1.0)
            alice.send(b"</stream:stream>")
            assert await alice.expect_closed(10, reply=False)
            assert alice.stream_closed  # the proxy answered with its own </stream:stream>
            await presences.get(10)  # alice's resource went offline upstream
        finally:
            alice.abort()
            await clients.disconnect(bob)

    run(scenario(), 40)
    closed = proxy.wait_event("closed", lambda e: e.get("jid") == alice_jid + "/closer")
    assert closed["reason"] == "client closed the stream"


def test_a_server_gone_for_good_ends_the_clients_stream_saying_so(tmp_path: Path,
                                                                 certs) -> None:
    """Shutdown and crash both start a reconnect; past max_outage the client is told."""
    server = LegacyProsody(tmp_path / "prosody")
    with server, ProxyProcess(tmp_path / "proxy", server, *certs, reconnect={
            "first_delay_max": 0.1, "base": 0.1, "cap": 0.2, "max_outage": 1.5}) as proxy:
        server.register("dave", "pw-dave")

        async def one(stop) -> str | None:
            raw = await raw_login(proxy.host, proxy.port, "dave", "pw-dave", direct_tls=False)
            try:
                stop()
                assert await raw.expect_closed(15)
                errors = [stream_error_condition(e) for e in raw.seen_before_close
                          if e.tag == f"{{{NS_STREAM}}}error"]
                return errors[0] if errors else None
            finally:
                raw.abort()

        assert run(one(server.stop), 30) == "remote-connection-failed"
        server.start()
        assert run(one(server.kill), 30) == "remote-connection-failed"
    gave_up = proxy.events("upstream_gave_up")
    assert len(gave_up) == 2 and all("unreachable" in e["reason"] for e in gave_up)


def test_sasl_plain_edge_cases(proxy, accounts) -> None:
    """Mechanism, encoding and authzid checks happen before any upstream login."""
    jid, password = accounts("erin")

    async def attempt(auth_xml: str) -> str:
        raw = await RawClient.connect(proxy.host, proxy.port, direct_tls=False)
        try:
            await raw.secure()
            raw.send(auth_xml)
            answer = await raw.read_element(10)
            assert answer.tag == "{urn:ietf:params:xml:ns:xmpp-sasl}failure"
            return next(c.tag.split("}")[1] for c in answer)
        finally:
            raw.abort()

    def plain(authzid: str, authcid: str, pw: str) -> str:
        token = base64.b64encode(f"{authzid}\0{authcid}\0{pw}".encode()).decode()
        return f"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{token}</auth>"

    sasl = "urn:ietf:params:xml:ns:xmpp-sasl"
    assert run(attempt(f"<auth xmlns='{sasl}' mechanism='DIGEST-MD5'/>")) == "invalid-mechanism"
    assert run(attempt(f"<auth xmlns='{sasl}' mechanism='PLAIN'>!!notbase64</auth>")) == (
        "incorrect-encoding")
    assert run(attempt(plain("boss@localhost", user(jid), password))) == "invalid-authzid"


def test_plaintext_before_starttls_is_refused(proxy) -> None:
    async def scenario() -> str | None:
        raw = await RawClient.connect(proxy.host, proxy.port, direct_tls=False)
        try:
            features = await raw.open_stream()
            starttls = features.find("{urn:ietf:params:xml:ns:xmpp-tls}starttls")
            assert starttls is not None
            assert starttls.find("{urn:ietf:params:xml:ns:xmpp-tls}required") is not None
            assert "PLAIN" not in raw.mechanisms()  # no SASL before TLS
            raw.send("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>"
                     "AGEAYg==</auth>")
            assert await raw.expect_closed(10)
            errors = [stream_error_condition(e) for e in raw.seen_before_close]
            return errors[0] if errors else None
        finally:
            raw.abort()

    assert run(scenario(), 20) == "policy-violation"


def test_features_offer_only_what_the_proxy_supports(proxy, accounts) -> None:
    jid, password = accounts("frank")

    async def scenario() -> tuple[list[str], set[str]]:
        raw = await RawClient.connect(proxy.host, proxy.direct_tls_port, direct_tls=True)
        try:
            await raw.secure()
            mechanisms = raw.mechanisms()
            features = await raw.login_plain(user(jid), password)
            return mechanisms, {c.tag for c in features}
        finally:
            raw.abort()

    mechanisms, tags = run(scenario(), 20)
    assert mechanisms == ["PLAIN"]  # never -PLUS: the proxy terminates TLS itself
    assert "{urn:ietf:params:xml:ns:xmpp-bind}bind" in tags
    assert not any("sasl2" in t or "bind2" in t or "mechanisms" in t for t in tags)


def test_the_first_log_line_says_what_runs_and_from_which_file(proxy) -> None:
    first = proxy.events()[0]
    assert first["event"] == "starting"
    assert first["config"] == str(proxy.config_path.resolve())
    assert first["version"] and first["version"] != "unknown"
    assert first["durability"] == "journal"
