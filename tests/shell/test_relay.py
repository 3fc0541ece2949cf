"""Relay both ways through the real proxy, in process."""

from __future__ import annotations

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
