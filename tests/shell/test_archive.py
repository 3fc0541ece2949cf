"""The archive stores a message as the proxy wrote it (in process, through the real shell):
the client's as the server got it (with the origin-id the journal adds), the server's as the
client got it (with the stanza-id stamped), whether the write had serialized it already (the
journal's bytes) or the shell serialized it for both (no journal, no stream management)."""

from __future__ import annotations

from lxml import etree

from .playbook import Client, Harness, playbook

MAM = "urn:xmpp:mam:2"
SID = "urn:xmpp:sid:0"
FORWARD = "urn:xmpp:forward:0"


async def archived(client: Client) -> list[tuple[str, etree._Element]]:
    """(result id, the archived message) of every message in the client's archive."""
    before = len(client.received)
    qid = client.iq(f"<query xmlns='{MAM}' queryid='all'/>", type="set")
    await client.expect(kind="iq", id=qid, timeout=5.0)
    found = []
    for el in client.received[before:]:
        result = el.find(f"{{{MAM}}}result")
        if result is not None:
            original = result.find(f"{{{FORWARD}}}forwarded/{{jabber:client}}message")
            assert original is not None
            found.append((result.get("id", ""), original))
    return found


async def both_ways_stored_as_written(h: Harness, *, sm: bool) -> None:
    alice = await h.client("alice", sm=sm)
    alice.message("bob@localhost", "out one", id="c1")
    upstream = await h.server.expect_stanza(kind="message", body="out one", timeout=5.0)
    h.server.push_message(alice.jid, "in one", frm="bob@localhost/desk", id="s1")
    delivered = await alice.expect_message("in one", timeout=5.0)

    [(_, sent), (received_id, received)] = await archived(alice)
    # The client's message as the server got it: same origin-id (the journal's, if any).
    origin = f"{{{SID}}}origin-id"
    assert sent.findtext("{jabber:client}body") == "out one"
    assert [o.get("id") for o in sent.findall(origin)] == [
        o.get("id") for o in upstream.findall(origin)]
    # The server's as the client got it: with the stanza-id, which is its archive id.
    assert received.findtext("{jabber:client}body") == "in one"
    stamped = [(s.get("by"), s.get("id")) for s in delivered.findall(f"{{{SID}}}stanza-id")]
    assert stamped == [("alice@localhost", received_id)]
    assert [(s.get("by"), s.get("id")) for s in received.findall(f"{{{SID}}}stanza-id")] \
        == stamped


@playbook(timeout=20.0)
async def test_archived_as_written_with_the_journal_and_stream_management(h: Harness) -> None:
    await both_ways_stored_as_written(h, sm=True)


@playbook(timeout=20.0, durability={"mode": "memory"})
async def test_archived_as_written_without_a_journal(h: Harness) -> None:
    await both_ways_stored_as_written(h, sm=False)
