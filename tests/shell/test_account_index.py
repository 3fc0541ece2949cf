"""The hub finds an account's sessions without looking at every session (``Hub.by_account``,
``Hub.by_id``): the per-account session limit, carbon copies and a session's wake all go
through that index, so it must follow every bind, takeover, replacement and end, and leave
nothing behind when the sessions are gone (it would keep ended sessions alive)."""

from __future__ import annotations

from .playbook import PASSWORD, Client, Harness, playbook

CARBONS = "urn:xmpp:carbons:2"
FORWARD = "urn:xmpp:forward:0"


def index_of(h: Harness) -> dict[str, set[str]]:
    assert h.proxy is not None
    hub = h.proxy.hub
    assert set(hub.by_id.values()) == set(hub.by_jid.values())
    index = {str(account): {s.jid for s in sessions}
             for account, sessions in hub.by_account.items()}
    assert sum(map(len, hub.by_account.values())) == len(hub.by_jid)  # each session once
    return index


async def enable_carbons(c: Client) -> None:
    iq = c.iq(f"<enable xmlns='{CARBONS}'/>", type="set")
    await c.expect(kind="iq", type="result", id=iq, timeout=2.0)


@playbook(timeout=30.0, accounts={"alice": PASSWORD, "bob": PASSWORD, "carol": PASSWORD},
          abuse={"max_sessions_per_account": 2, "max_connections_per_address": 0})
async def test_the_session_limit_counts_the_accounts_live_sessions(h: Harness) -> None:
    phone = await h.client("alice", resource="phone")
    await h.client("alice", resource="laptop")
    await h.client("bob", resource="phone")
    assert index_of(h) == {"alice@localhost": {"alice@localhost/phone", "alice@localhost/laptop"},
                           "bob@localhost": {"bob@localhost/phone"}}

    third = await h.login("alice")
    third.raw.send("<iq type='set' id='b1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
                   "<resource>tablet</resource></bind></iq>")
    await third.expect(kind="iq", type="error", id="b1", error="resource-constraint",
                       timeout=2.0)

    phone.cut()
    await h.log.changes.until(lambda: h.events("session_ended") or None, 5.0,
                              "alice's phone session ending")
    assert index_of(h)["alice@localhost"] == {"alice@localhost/laptop"}
    tablet = await h.client("alice", resource="tablet")
    assert tablet.jid == "alice@localhost/tablet"
    # A takeover of a live resource keeps one session under that JID.
    await h.client("alice", resource="tablet")
    assert index_of(h)["alice@localhost"] == {"alice@localhost/laptop",
                                             "alice@localhost/tablet"}


@playbook(timeout=30.0, accounts={"alice": PASSWORD, "bob": PASSWORD, "carol": PASSWORD},
          abuse={"max_connections_per_address": 0})
async def test_carbons_reach_the_accounts_other_sessions_only(h: Harness) -> None:
    phone = await h.client("alice", resource="phone")
    laptop = await h.client("alice", resource="laptop")
    carol = await h.client("carol", resource="phone")
    for c in (phone, laptop, carol):
        await enable_carbons(c)

    phone.message("bob@localhost", "sent from the phone", id="s1")
    copy = await laptop.expect(kind="message", timeout=2.0,
                               where=lambda el: el.find(f"{{{CARBONS}}}sent") is not None)
    body = copy.find(f"{{{CARBONS}}}sent/{{{FORWARD}}}forwarded/{{jabber:client}}message/"
                     "{jabber:client}body")
    assert body is not None and body.text == "sent from the phone"
    carol.iq("<ping xmlns='urn:xmpp:ping'/>", to="localhost", id="p1")
    await carol.expect(kind="iq", id="p1", timeout=2.0)  # anything for carol came before
    assert not [el for el in carol.received if el.tag == "{jabber:client}message"]

    await laptop.close()
    await h.log.changes.until(lambda: h.events("session_ended") or None, 5.0,
                              "the laptop's session ending")
    assert index_of(h)["alice@localhost"] == {"alice@localhost/phone"}
    phone.message("bob@localhost", "nobody to copy to", id="s2")
    await h.server.expect_stanza(kind="message", id="s2")

    for c in (phone, carol):
        await c.close()
    await h.log.changes.until(lambda: len(h.events("session_ended")) >= 3 or None, 5.0,
                              "every session ending")
    assert index_of(h) == {}
