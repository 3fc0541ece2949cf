"""The login's disco#info discovery, in process: what the server sends meanwhile is relayed,
a server that never answers delays a login by at most the discovery timeout, and the
server's answers reach the client's own questions."""

from __future__ import annotations

import time

from .playbook import Harness, playbook
from .xmlpeer import NS_DISCO_INFO, q


# Carbons and blocking off: the proxy then adds nothing, the answer is the server's own.
@playbook(features={"carbons": "off", "blocking": "off"})
async def test_a_message_routed_during_discovery_is_relayed_in_order(h: Harness) -> None:
    h.server.disco = {"domain": "<feature var='urn:xmpp:ping'/>", "account": ""}
    h.server.before_disco_answer = [
        "<message from='bob@localhost/desk' to='alice@localhost/phone' type='chat' "
        "id='early'><body>right after the bind</body></message>"]
    alice = await h.client("alice", sm=True)
    got = await alice.expect_message("right after the bind")
    assert got.get("id") == "early"
    conn = await h.server.expect_bind("phone")
    assert [d.get("to") for d in conn.discovery] == ["localhost", "alice@localhost"]
    assert h.events("discovery_incomplete") == []
    asked = alice.iq(f"<query xmlns='{NS_DISCO_INFO}'/>", to="localhost")
    answer = await alice.expect(kind="iq", id=asked)
    assert [f.get("var") for f in answer.iter(q(NS_DISCO_INFO, "feature"))] == \
        ["urn:xmpp:ping"]


@playbook(upstream={"discovery_timeout": 0.3})
async def test_a_server_that_never_answers_delays_login_by_the_timeout_only(
        h: Harness) -> None:
    h.server.disco_silent = True
    started = time.monotonic()
    alice = await h.client("alice")
    assert 0.3 <= time.monotonic() - started < 3.0
    event = await h.logged("discovery_incomplete")
    assert event["domain"] is False and event["account"] is False
    h.server.push_message(alice.jid, "still relayed", frm="bob@localhost/desk")
    await alice.expect_message("still relayed")
