"""Push notifications (XEP-0357) in the shell: the hooks the live session calls (the client
gone and the session hibernating, a message stored at the end of a session) reach the push
feature, and its publishes go out on the session's upstream stream."""

from __future__ import annotations

from .playbook import Client, Harness, playbook
from .xmlpeer import body, q

PUSH = "urn:xmpp:push:0"
PUBSUB = "http://jabber.org/protocol/pubsub"
DATA = "jabber:x:data"
BOB = "bob@localhost/desk"


async def enable_push(alice: Client) -> None:
    iq_id = alice.iq(f"<enable xmlns='{PUSH}' jid='push.example' node='N'/>", type="set")
    answer = await alice.expect(kind="iq", id=iq_id)
    assert answer.get("type") == "result"


def count(publish) -> str | None:
    for f in publish.iter(q(DATA, "field")):
        if f.get("var") == "message-count":
            return f.findtext(q(DATA, "value"))
    return None


@playbook(push={"min_interval": 0})
async def test_unacked_messages_at_hibernation_then_new_ones_are_published(h: Harness) -> None:
    alice = await h.client("alice", sm=True, auto_ack=False)
    await enable_push(alice)
    h.server.push_message(alice.jid, "seen?", frm=BOB, id="u1")
    await alice.expect_message("seen?")
    alice.cut()  # never acknowledged: the phone may never have seen it
    first = await h.server.expect_stanza(kind="iq", to="push.example", timeout=2.0)
    assert first.get("type") == "set" and count(first) == "1"
    assert first.find(f"{q(PUBSUB, 'pubsub')}/{q(PUBSUB, 'publish')}").get("node") == "N"
    h.server.push_message(alice.jid, "later", frm=BOB, id="u2")
    second = await h.server.expect_stanza(kind="iq", to="push.example", timeout=2.0)
    assert count(second) == "1"


@playbook(push={"min_interval": 0})
async def test_a_message_stored_when_an_active_session_ends_is_published(h: Harness) -> None:
    alice = await h.client("alice", sm=True, resume=False, auto_ack=False)
    await enable_push(alice)
    h.server.push_message(alice.jid, "unacked", frm=BOB, id="s1")
    got = await alice.expect_message("unacked")
    assert body(got) == "unacked"
    alice.cut()  # no resumption: the session ends and stores what was unacknowledged
    publish = await h.server.expect_stanza(kind="iq", to="push.example", timeout=2.0)
    assert count(publish) == "1"
    assert h.events("push_published")
