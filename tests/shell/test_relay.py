"""Relay both ways through the real proxy, in process."""

from __future__ import annotations

from pathlib import Path

from .playbook import Harness, playbook


@playbook()
async def test_relay_both_ways_and_from_stamping(h: Harness) -> None:
    alice = await h.client("alice", resource="phone")
    assert alice.jid == "alice@localhost/phone"
    conn = await h.server.expect_bind("phone")
    assert conn.jid == "alice@localhost/phone"

    # A forged from is replaced with the client's full JID (RFC 6120 §8.1.2.1).
    alice.send("<message to='bob@localhost' from='mallory@localhost/x' type='chat' id='m1'>"
               "<body>1</body></message>")
    m = await h.server.expect_stanza(kind="message", body="1")
    assert m.get("from") == "alice@localhost/phone"
    assert m.get("to") == "bob@localhost" and m.get("id") == "m1"

    h.server.push_message(alice.jid, "hello", frm="bob@localhost/desk", id="s1")
    got = await alice.expect_message("hello")
    assert got.get("from") == "bob@localhost/desk" and got.get("id") == "s1"


@playbook()
async def test_a_message_routed_twice_reaches_the_client_once(h: Harness) -> None:
    alice = await h.client("alice", sm=True)
    # What a replay after an outage can make the legacy server do: the same message again.
    h.server.push_message(alice.jid, "once", frm="bob@localhost/desk", id="dup")
    h.server.push_message(alice.jid, "once", frm="bob@localhost/desk", id="dup")
    h.server.push_message(alice.jid, "next", frm="bob@localhost/desk", id="other")
    await alice.expect_message("next")
    assert [m.get("id") for m in alice.received] == ["dup", "other"]


@playbook(server_sm=True)
async def test_server_stream_management_acks_replace_barriers(h: Harness) -> None:
    alice = await h.client("alice", sm=True)
    conn = await h.server.expect_bind("phone")
    await h.server.expect_nonza("enable", conn=conn)  # the proxy enabled XEP-0198 upstream
    alice.message("bob@localhost", "1")
    await h.server.expect_stanza(kind="message", body="1")
    await h.server.expect_nonza("r", conn=conn)  # an <r/> instead of a barrier ping
    assert not [el for el in conn.received if el.find("{urn:xmpp:ping}ping") is not None]

    # The proxy answers the server's <r/> with what it received since <enable/>.
    h.server.push_message(alice.jid, "a")
    h.server.push_message(alice.jid, "b")
    await alice.expect_message("b")
    before = len(conn.nonzas)
    h.server.push(alice.jid, "<r xmlns='urn:xmpp:sm:3'/>")
    a = await h.server.expect_nonza("a", conn=conn, after=before)
    assert a.get("h") == str(conn.h_out)


# Nothing emulated (the scripted server lists no features): the proxy adds nothing to the
# domain's disco#info, so the server's own caps stand.
@playbook(features={"carbons": "off", "blocking": "off"})
async def test_the_servers_entity_caps_reach_the_client_unchanged(h: Harness) -> None:
    caps = ("<c xmlns='http://jabber.org/protocol/caps' hash='sha-1' "
            "node='https://legacy.example/server' ver='QgayPKawpkPSDYmwT/WM94uAlu0='/>")
    h.server.extra_features = caps
    alice = await h.login("alice")
    features = alice.raw.features
    assert features is not None
    (c,) = features.findall("{http://jabber.org/protocol/caps}c")
    assert (c.get("hash"), c.get("node"), c.get("ver")) == (
        "sha-1", "https://legacy.example/server", "QgayPKawpkPSDYmwT/WM94uAlu0=")
    h.server.extra_features = ""
    bob = await h.login("bob")
    assert bob.raw.features is not None
    assert bob.raw.features.find("{http://jabber.org/protocol/caps}c") is None


REDACT = str(Path(__file__).resolve().parents[2] / "proxy" / "rulepacks" / "redact-bodies.yaml")


@playbook(rules=[REDACT])
async def test_rule_hits_are_counted_for_metrics(h: Harness) -> None:
    alice = await h.client("alice")
    for n in range(3):
        alice.message("bob@localhost", f"secret {n}")
    for _ in range(3):
        await h.server.expect_stanza(kind="message", body="[redacted]")
    assert h.proxy is not None
    text = "\n".join(h.proxy.gather_metrics())
    assert 'xmpp_front_rule_hits_total{rule="redact-bodies"} 3' in text
