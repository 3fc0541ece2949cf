"""The journal's origin-id (``durability.origin_id``), in process through the real shell: off
by default, a client message reaches the server as the client sent it; on, a message with an
id and no origin-id gets one of the same value; a client's own origin-id is never touched."""

from __future__ import annotations

from .playbook import Harness, playbook

ORIGIN = "{urn:xmpp:sid:0}origin-id"


async def origin_ids_upstream(h: Harness) -> tuple[list[str | None], list[str | None]]:
    """The origin-ids the server got on a message without one and on one with its own."""
    alice = await h.client("alice")
    alice.message("bob@localhost", "plain", id="c1")
    plain = await h.server.expect_stanza(kind="message", body="plain", timeout=5.0)
    alice.message("bob@localhost", "own", id="c2",
                  extra="<origin-id xmlns='urn:xmpp:sid:0' id='theirs'/>")
    own = await h.server.expect_stanza(kind="message", body="own", timeout=5.0)
    assert (plain.get("id"), own.get("id")) == ("c1", "c2")
    return [o.get("id") for o in plain.findall(ORIGIN)], [o.get("id") for o in own.findall(ORIGIN)]


@playbook(timeout=20.0)
async def test_by_default_the_journal_adds_no_origin_id(h: Harness) -> None:
    assert h.proxy is not None and h.proxy.config.durability.mode == "journal"
    assert await origin_ids_upstream(h) == ([], ["theirs"])


@playbook(timeout=20.0, durability={"origin_id": True})
async def test_asked_for_the_journal_gives_a_message_its_id_as_origin_id(h: Harness) -> None:
    assert await origin_ids_upstream(h) == (["c1"], ["theirs"])


@playbook(timeout=20.0, durability={"mode": "memory", "origin_id": True})
async def test_without_a_journal_there_is_no_origin_id_to_add(h: Harness) -> None:
    assert await origin_ids_upstream(h) == ([], ["theirs"])
