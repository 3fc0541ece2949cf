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


@playbook()
async def test_a_resumed_sessions_events_name_its_new_connection(h: Harness) -> None:
    """The session keeps one bound logger and rebinds ``conn`` at each attach: its events
    after a resumption carry the new connection's id, with the session's own fields."""
    alice = await h.client("alice", resource="phone", sm=True)
    await h.server.expect_bind("phone")
    (bound,) = h.events("bound")
    alice.cut()
    again, answer = await h.resume(alice)
    assert answer.tag.endswith("resumed")
    await again.close()
    ended = await h.logged("session_ended", timeout=3.0)
    (closed,) = [e for e in h.events("closed") if e.get("phase") == "session"
                 and e.get("conn") != bound["conn"]] or [None]
    assert closed is not None
    assert ended["conn"] == closed["conn"] != bound["conn"]
    assert ended["session"] == bound["session"] and ended["account"] == "alice@localhost"
    assert ended["jid"] == "alice@localhost/phone"


def _proxy_tasks() -> list[str]:
    """The running tasks whose coroutine is the proxy's own code, by name."""
    names = []
    for task in asyncio.all_tasks():
        code = getattr(task.get_coro(), "cr_code", None)
        if code is not None and "/proxy/" in code.co_filename.replace("\\", "/"):
            names.append(code.co_qualname)
    return sorted(names)


@playbook()
async def test_idle_sessions_hold_no_task_and_relay_when_bytes_come(h: Harness) -> None:
    """An idle session's two connections are read by callbacks: no task (and none of its
    coroutine frames) waits in a read for as long as the session lasts."""
    before = _proxy_tasks()  # the proxy's own (the transcripts' pruning, the writers')
    alice = await h.client("alice", resource="phone")
    await h.server.expect_bind("phone")
    await h.client("bob", resource="desk")  # a second idle session beside hers
    await h.server.expect_bind("desk")
    await _until(lambda: _proxy_tasks() == before)  # the logins' tasks end at the attach

    alice.send("<message to='bob@localhost' type='chat' id='m1'><body>1</body></message>")
    m = await h.server.expect_stanza(kind="message", body="1")
    assert m.get("from") == "alice@localhost/phone"
    h.server.push_message(alice.jid, "hello", frm="bob@localhost/desk", id="s1")
    await alice.expect_message("hello")
    await _until(lambda: _proxy_tasks() == before)

    await alice.close()
    await h.logged("session_ended", timeout=3.0)
    closed = [e for e in h.events("closed") if e.get("phase") == "session"]
    assert closed and closed[0]["jid"] == "alice@localhost/phone"
