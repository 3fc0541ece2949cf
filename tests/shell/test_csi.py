"""Client state indication (XEP-0352) through the real proxy: an inactive client gets what
is urgent at once and the rest, coalesced, when it matters."""

from __future__ import annotations

import asyncio

from .playbook import Harness, playbook
from .xmlpeer import NS_CLIENT, q

CSI = "urn:xmpp:csi:0"
CHATSTATES = "http://jabber.org/protocol/chatstates"


def presence(frm: str, to: str, show: str | None = None) -> str:
    inner = f"<show>{show}</show>" if show else ""
    return f"<presence from='{frm}' to='{to}'>{inner}</presence>"


def composing(frm: str, to: str) -> str:
    return (f"<message from='{frm}' to='{to}' type='chat'>"
            f"<composing xmlns='{CHATSTATES}'/></message>")


def seen(client: object) -> list[tuple[str, str | None, str | None]]:
    out = []
    for el in client.received:  # type: ignore[attr-defined]
        local = el.tag.split("}")[1]
        show = el.findtext(q(NS_CLIENT, "show")) if local == "presence" else None
        body = el.findtext(q(NS_CLIENT, "body")) if local == "message" else None
        out.append((local, el.get("from"), show or body))
    return out


@playbook()
async def test_inactive_holds_presence_and_chat_states_until_something_urgent(h: Harness) -> None:
    alice = await h.login("alice")
    assert alice.raw.features is not None
    assert alice.raw.features.find(f"{{{CSI}}}csi") is not None  # advertised
    alice.jid = await alice.raw.bind("phone", timeout=2.0)
    alice.send(f"<inactive xmlns='{CSI}'/>")
    await h.server.expect_bind("phone")
    await asyncio.sleep(0.05)
    h.server.push(alice.jid, presence("carol@localhost/a", alice.jid))
    h.server.push(alice.jid, composing("dave@localhost/b", alice.jid))
    h.server.push(alice.jid, presence("carol@localhost/a", alice.jid, show="away"))
    h.server.push(alice.jid, presence("erin@localhost/c", alice.jid))
    await asyncio.sleep(0.2)
    assert alice.received == []  # nothing urgent yet: the phone sleeps
    h.server.push_message(alice.jid, "wake up", frm="dave@localhost/b")
    await alice.expect_message("wake up")
    # What waited comes first, each sender's latest only, in order; then the message.
    assert seen(alice) == [("message", "dave@localhost/b", None),
                           ("presence", "carol@localhost/a", "away"),
                           ("presence", "erin@localhost/c", None),
                           ("message", "dave@localhost/b", "wake up")]


@playbook()
async def test_active_flushes_and_a_subscription_request_is_urgent(h: Harness) -> None:
    alice = await h.client("alice")
    alice.send(f"<inactive xmlns='{CSI}'/>")
    await asyncio.sleep(0.05)
    h.server.push(alice.jid, presence("carol@localhost/a", alice.jid))
    h.server.push(alice.jid, f"<presence from='frank@localhost' to='{alice.jid}' "
                             "type='subscribe'/>")
    request = await alice.expect(kind="presence", type="subscribe")
    assert request.get("from") == "frank@localhost"
    h.server.push(alice.jid, presence("erin@localhost/c", alice.jid))
    await asyncio.sleep(0.2)
    assert [x[1] for x in seen(alice)] == ["carol@localhost/a", "frank@localhost"]
    alice.send(f"<active xmlns='{CSI}'/>")
    await alice.expect(kind="presence", from_="erin@localhost/c")


@playbook(csi={"max_held": 3})
async def test_a_full_buffer_is_flushed(h: Harness) -> None:
    alice = await h.client("alice")
    alice.send(f"<inactive xmlns='{CSI}'/>")
    await asyncio.sleep(0.05)
    for n in range(3):
        h.server.push(alice.jid, presence(f"c{n}@localhost/x", alice.jid))
    for n in range(3):
        await alice.expect(kind="presence", from_=f"c{n}@localhost/x")


@playbook()
async def test_a_resumed_stream_starts_active_and_gets_what_was_held(h: Harness) -> None:
    alice = await h.client("alice", sm=True)
    alice.send(f"<inactive xmlns='{CSI}'/>")
    await asyncio.sleep(0.05)
    h.server.push(alice.jid, presence("carol@localhost/a", alice.jid, show="dnd"))
    await asyncio.sleep(0.2)
    alice.cut()  # the phone's link drops while it is inactive: nothing is lost
    again, resumed = await h.resume(alice)
    assert resumed.tag.endswith("resumed")
    held = await again.expect(kind="presence", from_="carol@localhost/a")
    assert held.findtext(q(NS_CLIENT, "show")) == "dnd"
