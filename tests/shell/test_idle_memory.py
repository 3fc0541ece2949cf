"""What an idle session holds: its two streams drop their lxml parsers after PARSER_IDLE,
and the session relays both ways as before once bytes come."""

from __future__ import annotations

import asyncio

import pytest

from proxy.net import xmlstream

from .playbook import Harness, playbook


@pytest.fixture(autouse=True)
def quick_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(xmlstream, "PARSER_IDLE", 0.1)


async def _until(check: object, timeout: float = 3.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():  # type: ignore[operator]
            await asyncio.sleep(0.02)


@playbook()
async def test_an_idle_session_holds_no_parser_and_relays_on(h: Harness) -> None:
    alice = await h.client("alice", resource="phone")
    await h.server.expect_bind("phone")
    assert h.proxy is not None
    (session,) = h.proxy.hub.sessions
    client, upstream = session.client, session.upstream.link.stream
    assert client is not None

    def idle() -> bool:
        return not client.parser.holds_parser and not upstream.parser.holds_parser
    await _until(idle)

    alice.send("<message to='bob@localhost' type='chat' id='m1'><body>1</body></message>")
    m = await h.server.expect_stanza(kind="message", body="1")
    assert m.get("from") == "alice@localhost/phone"
    h.server.push_message(alice.jid, "hello", frm="bob@localhost/desk", id="s1")
    got = await alice.expect_message("hello")
    assert got.get("from") == "bob@localhost/desk"
    await _until(idle)  # and dropped again once quiet
