"""Blocking command (XEP-0191) as the proxy emulates it: playbooks against SessionCores of
one account sharing a store, ToAccount handed over as the hub does."""

from __future__ import annotations

import copy

import pytest
from lxml import etree

from proxy.commands import Log, ToAccount, WhenStored
from proxy.config import ConfigError, parse_config
from proxy.features.blocking import BLOCKING, BLOCKING_ERRORS, BlockingFactory, is_blocked
from proxy.session import Outputs, SessionCore
from proxy.store import RosterItem, Store
from proxy.xmpp.codec import StanzaReceived, XmlStreamParser
from proxy.xmpp.disco import DiscoInfo, ServerInfo
from proxy.xmpp.jid import Jid
from proxy.xmpp.stanza import error_condition

Element = etree._Element
HEADER = (b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'"
          b" version='1.0'>")
ACCOUNT = "juliet@capulet.com"
ITEM = f"{{{BLOCKING}}}item"


def parse(raw: str) -> Element:
    events = XmlStreamParser().feed(HEADER + raw.encode())
    (el,) = [e.element for e in events if isinstance(e, StanzaReceived)]
    return el


class Account:
    def __init__(self, *resources: str, store: Store | None = None, max_items: int = 1000,
                 server: ServerInfo | None = None) -> None:
        self.store = store or Store(":memory:")
        self.factory = BlockingFactory(self.store, "auto", max_items)
        self.sessions = {r: SessionCore(Jid.parse(f"{ACCOUNT}/{r}"), [self.factory], server)
                         for r in resources}
        self.client: dict[str, list[Element]] = {r: [] for r in resources}
        self.upstream: dict[str, list[Element]] = {r: [] for r in resources}
        # WhenStored as the shell carries it out: at once (the writer committed), unless
        # the test holds them to commit or fail them itself.
        self.hold = False
        self.held: list[tuple[str, WhenStored]] = []
        self.logs: list[Log] = []

    def _run(self, resource: str, out: Outputs) -> None:
        self.client[resource].extend(out.to_client)
        self.upstream[resource].extend(out.to_upstream)
        for command in out.commands:
            if isinstance(command, Log):
                self.logs.append(command)
            elif isinstance(command, WhenStored):
                if self.hold:
                    self.held.append((resource, command))
                else:
                    self._run(resource, command.then)
            elif isinstance(command, ToAccount):
                for other, core in self.sessions.items():
                    if other != resource:
                        self._run(other, core.from_account(command.kind,
                                                           copy.deepcopy(command.payload)))

    def send(self, resource: str, raw: str) -> list[Element]:
        before = len(self.client[resource])
        out = self.sessions[resource].from_client(parse(raw))
        self._run(resource, out)
        return self.client[resource][before:]

    def receive(self, resource: str, raw: str) -> None:
        self._run(resource, self.sessions[resource].from_upstream(parse(raw)))

    def blocklist(self, resource: str) -> list[str]:
        (answer,) = self.send(resource, f"<iq type='get' id='bl'><blocklist xmlns='{BLOCKING}'/>"
                                        "</iq>")
        assert answer.get("type") == "result"
        return [i.get("jid", "") for i in answer.iter(ITEM)]

    def block(self, resource: str, *jids: str, iq_id: str = "b") -> list[Element]:
        items = "".join(f"<item jid='{j}'/>" for j in jids)
        return self.send(resource, f"<iq type='set' id='{iq_id}'><block xmlns='{BLOCKING}'>"
                                   f"{items}</block></iq>")

    def release(self, *, committed: bool = True) -> None:
        """The writer committed (or failed to commit) what the held replies wait for."""
        held, self.held = self.held, []
        for resource, command in held:
            self._run(resource, command.then if committed else command.failed)

    def close(self) -> None:
        for core in self.sessions.values():
            core.closed()


def test_matching_rules() -> None:
    items = {"romeo@montague.net", "iago@shakespeare.lit/phone", "evil.example",
             "service.example/res"}
    assert is_blocked(items, "romeo@montague.net")
    assert is_blocked(items, "romeo@montague.net/orchard")      # bare: any resource
    assert is_blocked(items, "iago@shakespeare.lit/phone")
    assert not is_blocked(items, "iago@shakespeare.lit/laptop")  # full: that one only
    assert not is_blocked(items, "iago@shakespeare.lit")
    assert is_blocked(items, "anyone@evil.example/x")            # domain: everyone there
    assert is_blocked(items, "evil.example")
    assert is_blocked(items, "muc.evil.example")                 # and its subdomains
    assert not is_blocked(items, "notevil.example")
    assert is_blocked(items, "service.example/res")
    assert not is_blocked(items, "service.example")
    assert not is_blocked(items, "user@service.example/res")
    assert not is_blocked(items, None) and not is_blocked(items, "bad@@jid")


def test_block_get_unblock_and_persistence() -> None:
    acct = Account("chamber", "balcony")
    assert acct.blocklist("chamber") == []
    # The asking session asked for the list: it gets the push too, after the result.
    answer, push = acct.block("chamber", "Romeo@Montague.net", "evil.example")
    assert answer.get("type") == "result" and answer.get("id") == "b"
    assert push.get("type") == "set" and push.find(f"{{{BLOCKING}}}block") is not None
    assert acct.upstream["chamber"] == []  # never passed on to the server
    assert sorted(acct.blocklist("balcony")) == ["evil.example", "romeo@montague.net"]
    assert acct.store.blocklist.items(ACCOUNT) == {"evil.example", "romeo@montague.net"}
    acct.close()
    # A new login reads it back from the store.
    again = Account("hall", store=acct.store)
    assert sorted(again.blocklist("hall")) == ["evil.example", "romeo@montague.net"]
    (answer,) = again.send("hall", f"<iq type='set' id='u'><unblock xmlns='{BLOCKING}'>"
                                   "<item jid='evil.example'/></unblock></iq>")[:1]
    assert answer.get("type") == "result"
    assert again.blocklist("hall") == ["romeo@montague.net"]
    again.send("hall", f"<iq type='set' id='ua'><unblock xmlns='{BLOCKING}'/></iq>")
    assert again.blocklist("hall") == [] and again.store.blocklist.items(ACCOUNT) == set()


def test_pushes_only_to_sessions_that_asked_for_the_list() -> None:
    acct = Account("chamber", "balcony", "hall")
    acct.blocklist("balcony")
    acct.block("chamber", "romeo@montague.net")
    (push,) = acct.client["balcony"][1:]
    assert push.get("to") == f"{ACCOUNT}/balcony" and push.get("type") == "set"
    assert [i.get("jid") for i in push.iter(ITEM)] == ["romeo@montague.net"]
    assert acct.client["hall"] == []
    # The client's answer to the push is the proxy's: consumed, not passed on.
    acct.send("balcony", f"<iq type='result' id='{push.get('id')}'/>")
    assert acct.upstream["balcony"] == []
    acct.send("chamber", f"<iq type='set' id='u'><unblock xmlns='{BLOCKING}'/></iq>")
    unblock = acct.client["balcony"][-1]
    assert unblock.find(f"{{{BLOCKING}}}unblock") is not None and len(unblock[0]) == 0


def test_the_result_and_the_pushes_wait_for_the_store_and_the_block_is_in_force_at_once(
        ) -> None:
    acct = Account("chamber", "balcony")
    acct.blocklist("chamber")
    acct.blocklist("balcony")
    acct.hold = True
    assert acct.block("chamber", "romeo@montague.net") == []  # held: not yet stored
    assert acct.client["balcony"][1:] == []  # nor pushed (§3.3: the result comes first)
    # In force meanwhile: a message to the contact is refused, and the list says so.
    (refused,) = acct.send("chamber", "<message to='romeo@montague.net'><body>hi</body>"
                                      "</message>")
    assert error_condition(refused) == "not-acceptable"
    assert acct.blocklist("balcony") == ["romeo@montague.net"]
    before = len(acct.client["chamber"])
    acct.release()  # the writer committed
    answer, push = acct.client["chamber"][before:]
    assert answer.get("type") == "result" and answer.get("id") == "b"
    assert push.get("type") == "set" and push.find(f"{{{BLOCKING}}}block") is not None
    (other,) = acct.client["balcony"][2:]
    assert [i.get("jid") for i in other.iter(ITEM)] == ["romeo@montague.net"]


def test_a_block_the_store_failed_to_write_gets_an_error_and_no_push() -> None:
    acct = Account("chamber", "balcony")
    acct.blocklist("balcony")
    acct.hold = True
    acct.send("chamber", f"<iq type='set' id='u'><unblock xmlns='{BLOCKING}'/></iq>")
    acct.block("chamber", "romeo@montague.net", iq_id="b2")
    acct.release(committed=False)
    unblocked, error = acct.client["chamber"]
    assert unblocked.get("type") == "error" and unblocked.get("id") == "u"
    assert error.get("type") == "error" and error.get("id") == "b2"
    assert error_condition(error) == "internal-server-error"
    assert error.find("{jabber:client}error").get("type") == "wait"  # try again later
    assert acct.client["balcony"][1:] == []  # nothing pushed: nothing was stored
    assert [(c.event, c.fields.get("action"), c.level) for c in acct.logs
            if c.event == "blocklist_not_stored"] == [
        ("blocklist_not_stored", "unblock", "error"), ("blocklist_not_stored", "block", "error")]


def test_bad_requests() -> None:
    acct = Account("chamber")
    (err,) = acct.block("chamber")
    assert error_condition(err) == "bad-request"
    (err,) = acct.block("chamber", "a@@b")
    assert error_condition(err) == "jid-malformed"
    (err,) = acct.send("chamber", f"<iq type='get' id='x'><block xmlns='{BLOCKING}'>"
                                  "<item jid='a@b'/></block></iq>")
    assert error_condition(err) == "bad-request"
    assert acct.upstream["chamber"] == [] and acct.store.blocklist.items(ACCOUNT) == set()


def test_limit() -> None:
    acct = Account("chamber", max_items=2)
    assert acct.block("chamber", "a@x", "b@x")[0].get("type") == "result"
    (err,) = acct.block("chamber", "c@x")
    assert error_condition(err) == "policy-violation"
    assert acct.block("chamber", "a@x")[0].get("type") == "result"  # already there: no growth
    assert acct.store.blocklist.items(ACCOUNT) == {"a@x", "b@x"}


def test_inbound_from_blocked() -> None:
    acct = Account("chamber")
    acct.block("chamber", "romeo@montague.net")
    acct.client["chamber"].clear()
    acct.receive("chamber", f"<presence from='romeo@montague.net/o' to='{ACCOUNT}'/>")
    acct.receive("chamber", f"<message from='romeo@montague.net/o' to='{ACCOUNT}/chamber'"
                            " type='chat' id='m'><body>hi</body></message>")
    acct.receive("chamber", f"<message from='romeo@montague.net/o' to='{ACCOUNT}'"
                            " type='headline' id='h'><body>hi</body></message>")
    acct.receive("chamber", f"<iq from='romeo@montague.net/o' to='{ACCOUNT}/chamber'"
                            " type='get' id='q'><query xmlns='jabber:iq:version'/></iq>")
    acct.receive("chamber", f"<iq from='romeo@montague.net/o' to='{ACCOUNT}/chamber'"
                            " type='result' id='r'/>")
    assert acct.client["chamber"] == []  # nothing reaches the client
    answers = acct.upstream["chamber"]
    assert [(a.tag.split('}')[1], a.get("id"), error_condition(a)) for a in answers] == [
        ("message", "m", "service-unavailable"), ("iq", "q", "service-unavailable")]
    assert all(a.get("to") == "romeo@montague.net/o" for a in answers)
    # Others pass.
    acct.receive("chamber", f"<message from='nurse@capulet.com/x' to='{ACCOUNT}/chamber'"
                            " type='chat' id='n'><body>hi</body></message>")
    assert [m.get("id") for m in acct.client["chamber"]] == ["n"]


def test_outbound_to_blocked_refused_with_blocked_condition() -> None:
    acct = Account("chamber")
    acct.block("chamber", "romeo@montague.net")
    (err,) = acct.send("chamber", "<message to='romeo@montague.net/o' type='chat' id='m'>"
                                  "<body>Can you hear me now?</body></message>")
    assert error_condition(err) == "not-acceptable" and err.get("id") == "m"
    assert err.get("from") == "romeo@montague.net/o"
    assert err.find(f"{{jabber:client}}error/{{{BLOCKING_ERRORS}}}blocked") is not None
    (err,) = acct.send("chamber", "<presence to='romeo@montague.net' type='subscribe'/>")
    assert error_condition(err) == "not-acceptable"
    assert acct.send("chamber", "<iq to='romeo@montague.net/o' type='result' id='r'/>") == []
    assert acct.upstream["chamber"] == []
    acct.send("chamber", "<message to='nurse@capulet.com' type='chat' id='ok'/>")
    assert [m.get("id") for m in acct.upstream["chamber"]] == ["ok"]


def test_block_sends_unavailable_and_unblock_current_presence_to_watchers() -> None:
    store = Store(":memory:")
    store.roster.replace(ACCOUNT, [RosterItem("romeo@montague.net", subscription="both"),
                                   RosterItem("tybalt@capulet.com", subscription="to"),
                                   RosterItem("mercutio@montague.net", subscription="from")])
    acct = Account("chamber", "balcony", "hall", store=store)
    acct.send("chamber", "<presence><show>away</show></presence>")
    acct.send("balcony", "<presence/>")  # hall is not available
    for r in acct.upstream:
        acct.upstream[r].clear()
    acct.block("chamber", "montague.net", "tybalt@capulet.com")
    for r in ("chamber", "balcony"):
        sent = acct.upstream[r]
        assert sorted(p.get("to") for p in sent) == ["mercutio@montague.net",
                                                       "romeo@montague.net"]
        assert all(p.get("type") == "unavailable" for p in sent)
    assert acct.upstream["hall"] == []
    for r in acct.upstream:
        acct.upstream[r].clear()
    acct.send("balcony", f"<iq type='set' id='u'><unblock xmlns='{BLOCKING}'>"
                         "<item jid='montague.net'/></unblock></iq>")
    (p,) = [x for x in acct.upstream["chamber"] if x.get("to") == "romeo@montague.net"]
    assert p.get("type") is None and p.findtext("{jabber:client}show") == "away"
    assert len(acct.upstream["chamber"]) == 2 and len(acct.upstream["balcony"]) == 2


def test_server_with_blocking_passes_through_and_disco() -> None:
    server = ServerInfo(domain=DiscoInfo(features=frozenset({BLOCKING})))
    acct = Account("chamber", server=server)
    acct.block("chamber", "romeo@montague.net")
    assert len(acct.upstream["chamber"]) == 1 and acct.client["chamber"] == []
    assert BLOCKING not in acct.sessions["chamber"].disco_features()
    assert BLOCKING in Account("x").sessions["x"].disco_features()


def test_stored_messages_from_blocked_dropped() -> None:
    acct = Account("chamber")
    acct.block("chamber", "romeo@montague.net")
    core = acct.sessions["chamber"]
    assert core.from_store(parse("<message from='romeo@montague.net/o' type='chat'/>")) is None
    assert core.from_store(parse("<message from='nurse@capulet.com/o' type='chat'/>")) is not None


def test_config_edges() -> None:
    assert parse_config({"blocking": {"max_items": 1}}).blocking.max_items == 1
    assert parse_config({"carbons": {"bare_wait": 0}}).carbons.bare_wait == 0
    for bad in ({"blocking": {"max_items": 0}}, {"carbons": {"bare_wait": 5.5}},
                {"features": {"blocking": "maybe"}}):
        with pytest.raises(ConfigError):
            parse_config(bad)


def test_a_bare_jid_message_to_several_sessions_is_answered_once() -> None:
    acct = Account("chamber", "balcony")
    acct.block("chamber", "romeo@montague.net")
    raw = (f"<message from='romeo@montague.net/o' to='{ACCOUNT}' type='chat' id='b'>"
           "<body>hi</body></message>")
    acct.receive("chamber", raw)
    acct.receive("balcony", raw)
    errors = acct.upstream["chamber"] + acct.upstream["balcony"]
    assert [error_condition(e) for e in errors] == ["service-unavailable"]
    assert acct.client["balcony"] == [] and len(acct.client["chamber"]) == 1  # the result
