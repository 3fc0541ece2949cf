"""Roster versioning, pre-approval and roster-set checks: scripted playbooks of stanzas in
and stanzas out against a SessionCore built with the RosterFactory (no sockets)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

from lxml import etree

from proxy.commands import CatchUp
from proxy.features.roster import RosterFactory
from proxy.session import Outputs, SessionCore
from proxy.store import Store
from proxy.xmpp import ns
from proxy.xmpp.codec import StanzaReceived, XmlStreamParser
from proxy.xmpp.jid import Jid
from proxy.xmpp.stanza import error_condition

Element = etree._Element
HEADER = (b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'"
          b" version='1.0'>")
QUERY = ns.qname(ns.ROSTER, "query")
ITEM = ns.qname(ns.ROSTER, "item")
GROUP = ns.qname(ns.ROSTER, "group")
ACCOUNT = "juliet@example.com"
BALCONY = "juliet@example.com/balcony"
GARDEN = "juliet@example.com/garden"


def parse(raw: str) -> Element:
    events = XmlStreamParser().feed(HEADER + raw.encode())
    (el,) = [e.element for e in events if isinstance(e, StanzaReceived)]
    return el


def epochs() -> Callable[[], str]:
    counter = itertools.count(1)
    return lambda: f"E{next(counter)}"


def new_store(path: str = ":memory:") -> Store:
    return Store(path, new_epoch=epochs())


class Server:
    """The legacy server, scripted: its roster (item XML in order) and its stanzas."""

    def __init__(self, *items: str) -> None:
        self.items: dict[str, str] = {}
        for raw in items:
            self.set(raw)
        self._ids = itertools.count(1)

    def set(self, raw: str) -> None:
        el = etree.fromstring(f"<x xmlns='jabber:iq:roster'>{raw}</x>")[0]
        if el.get("subscription") == "remove":
            self.items.pop(el.get("jid", ""), None)
        else:
            self.items[el.get("jid", "")] = raw

    def result(self, get: Element) -> str:
        body = "".join(self.items.values())
        return (f"<iq type='result' id='{get.get('id')}' to='{get.get('from')}'>"
                f"<query xmlns='jabber:iq:roster'>{body}</query></iq>")

    def push(self, raw: str, to: str = BALCONY, *, apply: bool = True) -> str:
        if apply:
            self.set(raw)
        return (f"<iq type='set' id='push{next(self._ids)}' to='{to}'>"
                f"<query xmlns='jabber:iq:roster'>{raw}</query></iq>")


class Client:
    """One session: what its client sends, what its upstream receives."""

    def __init__(self, factory: RosterFactory, jid: str = BALCONY) -> None:
        self.core = SessionCore(Jid.parse(jid), [factory])
        self.jid = jid

    def send(self, raw: str) -> Outputs:
        return self.core.from_client(parse(raw))

    def recv(self, raw: str) -> Outputs:
        return self.core.from_upstream(parse(raw))

    def get(self, ver: str | None = "", id: str = "r1") -> Outputs:
        attr = "" if ver is None else f" ver='{ver}'"
        return self.send(f"<iq type='get' id='{id}'><query xmlns='jabber:iq:roster'{attr}/></iq>")

    def login(self, server: Server, ver: str | None = "") -> list[Element]:
        """A roster get; the server answers the proxy's own get; what the client got."""
        out = self.get(ver)
        got = list(out.to_client)
        (fetch,) = roster_gets(out)
        got += self.recv(server.result(fetch)).to_client
        return got


def roster_gets(out: Outputs) -> list[Element]:
    return [e for e in out.to_upstream
            if e.get("type") == "get" and e.find(QUERY) is not None]


def ver(el: Element) -> str | None:
    q = el.find(QUERY)
    return None if q is None else q.get("ver")


def item_of(el: Element) -> tuple[str, str, list[str], str | None, str | None]:
    (it,) = el.find(QUERY).findall(ITEM)
    return (it.get("jid", ""), it.get("subscription", ""),
            [g.text or "" for g in it.findall(GROUP)], it.get("name"), it.get("approved"))


def items_of(el: Element) -> list[tuple[str, str, list[str], str | None, str | None]]:
    return [(it.get("jid", ""), it.get("subscription", ""),
             [g.text or "" for g in it.findall(GROUP)], it.get("name"), it.get("approved"))
            for it in el.find(QUERY).findall(ITEM)]


def is_empty_result(el: Element, id: str = "r1") -> bool:
    return el.get("type") == "result" and el.get("id") == id and len(el) == 0


def is_push(el: Element) -> bool:
    return el.get("type") == "set" and el.find(QUERY) is not None


ROMEO = ("<item jid='romeo@example.net' name='Romeo' subscription='both'>"
         "<group>Friends</group></item>")
NURSE = "<item jid='nurse@example.com' subscription='to'/>"
BENVOLIO = ("<item jid='benvolio@example.net' name='Benvolio' subscription='from'>"
            "<group>Friends</group><group>Verona</group></item>")


def factory_with(server_items: tuple[str, ...] = (ROMEO, NURSE),
                 **kw: object) -> tuple[RosterFactory, Server]:
    return RosterFactory(new_store(), **kw), Server(*server_items)  # type: ignore[arg-type]


# ---------------------------------------------------------------- features


def test_stream_features_advertise_versioning_and_preapproval() -> None:
    factory, _ = factory_with()
    feats = Client(factory).core.stream_features()
    assert [f.tag for f in feats] == [ns.qname(ns.ROSTER_VER, "ver"),
                                      ns.qname(ns.PRE_APPROVAL, "sub")]
    assert Client(factory).core.disco_features() == []
    # the same from the factory: the hub offers them before any session exists
    assert [f.tag for f in factory.stream_features()] == [f.tag for f in feats]


# ---------------------------------------------------------------- gets


def test_full_get_with_empty_ver_fetches_without_ver_and_answers_with_a_version() -> None:
    factory, server = factory_with()
    c = Client(factory)
    out = c.get("")
    assert out.to_client == []
    (fetch,) = out.to_upstream  # the client's get is not forwarded: the proxy's own is
    assert fetch.get("id") != "r1" and fetch.find(QUERY).get("ver") is None
    reply = c.recv(server.result(fetch))
    assert reply.to_upstream == []
    (result,) = reply.to_client  # the server's reply to the proxy never reaches the client
    assert result.get("id") == "r1" and result.get("to") == BALCONY
    assert ver(result) == "E1-1"
    assert items_of(result) == [("romeo@example.net", "both", ["Friends"], "Romeo", None),
                                ("nurse@example.com", "to", [], None, None)]


def test_same_version_gets_an_empty_result() -> None:
    factory, server = factory_with()
    (result,) = Client(factory).login(server)
    current = ver(result)
    c2 = Client(factory, GARDEN)
    out = c2.get(current)
    # fresh cache: answered at once; the session still registers its own interest upstream
    (answer,) = out.to_client
    assert is_empty_result(answer)
    assert len(roster_gets(out)) == 1


def test_no_ver_gets_the_full_roster_with_ver() -> None:
    factory, server = factory_with()
    Client(factory).login(server)
    (result,) = Client(factory, GARDEN).get(None).to_client
    assert ver(result) == "E1-1" and len(items_of(result)) == 2


def test_unknown_or_foreign_version_gets_the_full_roster() -> None:
    factory, server = factory_with()
    Client(factory).login(server)
    for i, bad in enumerate(("E1-99", "OTHER-1", "garbage", "E1-0")):
        (result,) = Client(factory, f"{ACCOUNT}/r{i}").get(bad).to_client
        assert ver(result) == "E1-1" and len(items_of(result)) == 2


def test_older_version_gets_empty_result_then_pushes_in_order_of_change() -> None:
    factory, server = factory_with((ROMEO, NURSE, BENVOLIO))
    c = Client(factory)
    (result,) = c.login(server)
    old = ver(result)
    # another resource adds, changes groups, removes: the server pushes each change
    changes = [
        "<item jid='mercutio@example.com' name='Mercutio' subscription='none'/>",
        "<item jid='romeo@example.net' name='Romeo' subscription='both'>"
        "<group>Lovers</group><group>Friends</group></item>",
        "<item jid='nurse@example.com' subscription='remove'/>",
        "<item jid='mercutio@example.com' name='Mercutio' subscription='none'>"
        "<group>Friends</group></item>",
    ]
    pushed_vers = []
    for raw in changes:
        (fwd,) = c.recv(server.push(raw)).to_client
        pushed_vers.append(ver(fwd))
    assert pushed_vers == ["E1-2", "E1-3", "E1-4", "E1-5"]

    c2 = Client(factory, GARDEN)
    answer, *pushes = c2.get(old).to_client
    assert is_empty_result(answer)
    # one push per changed item, final state, in order of (last) change, each with its ver
    assert [item_of(p) for p in pushes] == [
        ("romeo@example.net", "both", ["Lovers", "Friends"], "Romeo", None),
        ("nurse@example.com", "remove", [], None, None),
        ("mercutio@example.com", "none", ["Friends"], "Mercutio", None),
    ]
    assert [ver(p) for p in pushes] == ["E1-3", "E1-4", "E1-5"]
    assert all(p.get("to") == GARDEN and p.get("from") is None for p in pushes)


def test_changes_found_by_diff_after_all_sessions_left() -> None:
    factory, server = factory_with((ROMEO, NURSE, BENVOLIO))
    c = Client(factory)
    (result,) = c.login(server)
    old = ver(result)
    c.core.closed()  # nobody follows the account's pushes any more
    server.set("<item jid='romeo@example.net' subscription='both'/>")  # groups dropped
    server.set("<item jid='benvolio@example.net' subscription='remove'/>")
    server.set("<item jid='tybalt@example.com' subscription='none'><group>Capulet</group></item>")
    c2 = Client(factory, GARDEN)
    answer, *pushes = c2.login(server, old)
    assert is_empty_result(answer)
    assert [item_of(p)[:3] for p in pushes] == [
        ("romeo@example.net", "both", []),
        ("tybalt@example.com", "none", ["Capulet"]),
        ("benvolio@example.net", "remove", []),
    ]
    assert [ver(p) for p in pushes] == ["E1-2", "E1-3", "E1-4"]


def test_versions_never_repeat_add_remove_readd() -> None:
    factory, server = factory_with(())
    c = Client(factory)
    (result,) = c.login(server)
    seen = [ver(result)]
    tybalt = "<item jid='tybalt@example.com' subscription='none'/>"
    removed = "<item jid='tybalt@example.com' subscription='remove'/>"
    for raw in (tybalt, removed, tybalt, removed):
        (fwd,) = c.recv(server.push(raw)).to_client
        seen.append(ver(fwd))
    assert len(set(seen)) == len(seen) == 5
    # the roster is back to its first content, under a version never used before
    (again,) = Client(factory, GARDEN).get("").to_client
    assert items_of(again) == [] and ver(again) == seen[-1] != seen[0]


def test_log_bound_gives_older_clients_the_full_roster() -> None:
    factory, server = factory_with((ROMEO,), max_changes=2)
    c = Client(factory)
    (result,) = c.login(server)
    old = ver(result)
    for n in range(3):
        c.recv(server.push(f"<item jid='c{n}@example.com' subscription='none'/>"))
    (full,) = Client(factory, GARDEN).get(old).to_client
    assert ver(full) == "E1-4" and len(items_of(full)) == 4
    answer, *pushes = Client(factory, f"{ACCOUNT}/x").get("E1-2").to_client
    assert is_empty_result(answer) and [ver(p) for p in pushes] == ["E1-3", "E1-4"]


def test_concurrent_gets_during_a_fetch_are_all_answered() -> None:
    factory, server = factory_with()
    c = Client(factory)
    (fetch,) = roster_gets(c.get("", id="a"))
    assert c.get(None, id="b").to_upstream == []  # joins the fetch in flight
    first, second = c.recv(server.result(fetch)).to_client
    assert (first.get("id"), second.get("id")) == ("a", "b")


def test_fetch_error_is_returned_to_the_client_and_not_retried() -> None:
    factory, _ = factory_with()
    c = Client(factory)
    (fetch,) = roster_gets(c.get(""))
    out = c.recv(f"<iq type='error' id='{fetch.get('id')}'><error type='wait'>"
                 "<resource-constraint xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>"
                 "</error></iq>")
    (err,) = out.to_client
    assert err.get("id") == "r1" and error_condition(err) == "resource-constraint"
    assert out.to_upstream == []
    assert c.recv("<message from='romeo@example.net'><body>hi</body></message>").to_upstream == []


# ---------------------------------------------------------------- pushes


def test_server_push_gets_ver_and_the_client_answer_goes_upstream_unchanged() -> None:
    factory, server = factory_with()
    c = Client(factory)
    c.login(server)
    out = c.recv(server.push(BENVOLIO))
    (fwd,) = out.to_client
    assert fwd.get("id") == "push1" and fwd.get("to") == BALCONY and ver(fwd) == "E1-2"
    assert item_of(fwd) == ("benvolio@example.net", "from", ["Friends", "Verona"],
                            "Benvolio", None)
    out = c.send("<iq type='result' id='push1'/>")
    (answer,) = out.to_upstream
    assert answer.get("id") == "push1" and out.to_client == []


def test_push_from_someone_else_is_not_a_push() -> None:
    factory, server = factory_with()
    c = Client(factory)
    c.login(server)
    raw = server.push(BENVOLIO, apply=False).replace("<iq ", "<iq from='evil@example.org' ")
    (fwd,) = c.recv(raw).to_client
    assert ver(fwd) is None  # relayed untouched: the client rejects it (RFC 6121 §2.1.6)


def test_push_with_no_change_is_answered_by_the_proxy() -> None:
    factory, server = factory_with()
    c = Client(factory)
    c.login(server)
    out = c.recv(server.push(ROMEO))
    assert out.to_client == []
    (answer,) = out.to_upstream
    assert answer.get("type") == "result" and answer.get("id") == "push1"


def test_push_to_a_client_that_never_asked_is_answered_by_the_proxy() -> None:
    factory, server = factory_with()
    c = Client(factory)
    (fetch,) = roster_gets(c.send("<presence/>"))  # the proxy registers interest itself
    assert c.recv(server.result(fetch)).to_client == []
    out = c.recv(server.push(BENVOLIO))
    assert out.to_client == [] and [e.get("type") for e in out.to_upstream] == ["result"]
    # the cache followed: a later get is answered at once, with that item
    (result,) = c.get("").to_client
    assert "benvolio@example.net" in [i[0] for i in items_of(result)]


def test_push_during_an_in_flight_get_is_not_lost() -> None:
    factory, server = factory_with()
    c = Client(factory)
    (fetch,) = roster_gets(c.get(""))
    # a push overtakes the result, which was computed before it (and lacks it)
    result_raw = server.result(fetch)
    out = c.recv(server.push(BENVOLIO))
    assert out.to_client == [] and out.to_upstream == []  # held
    result, fwd = c.recv(result_raw).to_client
    assert result.get("id") == "r1" and len(items_of(result)) == 2
    assert fwd.get("id") == "push1" and ver(fwd) == "E1-2"
    assert item_of(fwd)[0] == "benvolio@example.net"
    (later,) = Client(factory, GARDEN).get("").to_client
    assert len(items_of(later)) == 3


def test_push_already_in_the_result_makes_no_extra_version() -> None:
    factory, server = factory_with()
    c = Client(factory)
    (fetch,) = roster_gets(c.get(""))
    push = server.push(BENVOLIO)
    c.recv(push)
    out = c.recv(server.result(fetch))  # includes benvolio
    (result,) = out.to_client
    assert ver(result) == "E1-1" and len(items_of(result)) == 3
    assert [e.get("id") for e in out.to_upstream] == ["push1"]  # answered by the proxy


def test_client_replies_to_proxy_pushes_are_swallowed() -> None:
    factory, server = factory_with()
    c = Client(factory)
    (result,) = c.login(server)
    c.recv(server.push(BENVOLIO))
    c2 = Client(factory, GARDEN)
    _, push = c2.get(ver(result)).to_client
    assert push.get("id", "").startswith("xf-")
    out = c2.send(f"<iq type='result' id='{push.get('id')}'/>")
    assert out.to_upstream == [] and out.to_client == []
    out = c2.send(f"<iq type='error' id='{push.get('id')}'/>")
    assert out.to_upstream[0].get("type") == "error"  # only the first reply is ours


# ---------------------------------------------------------------- several sessions


def test_two_sessions_share_one_cache_and_one_version_per_change() -> None:
    factory, server = factory_with()
    a = Client(factory)
    (result,) = a.login(server)
    b = Client(factory, GARDEN)
    out = b.get(ver(result))
    assert is_empty_result(out.to_client[0])
    (b_fetch,) = roster_gets(out)
    b.recv(server.result(b_fetch))
    raw_a = server.push(BENVOLIO)
    raw_b = raw_a.replace(BALCONY, GARDEN)
    (fa,) = a.recv(raw_a).to_client
    (fb,) = b.recv(raw_b).to_client
    assert ver(fa) == ver(fb) == "E1-2"
    assert fb.get("id") == "push1" and fb.get("to") == GARDEN
    assert item_of(fa) == item_of(fb)


def test_a_lagging_session_never_rolls_the_cache_back() -> None:
    factory, server = factory_with()
    a = Client(factory)
    (result,) = a.login(server)
    b = Client(factory, GARDEN)
    (b_fetch,) = roster_gets(b.get(ver(result)))
    b.recv(server.result(b_fetch))
    first = server.push("<item jid='tybalt@example.com' subscription='none' ask='subscribe'/>")
    second = server.push("<item jid='tybalt@example.com' subscription='to'/>")
    a.recv(first)
    a.recv(second)
    # b reads the same two pushes later: the first is old news
    (fb,) = b.recv(first.replace(BALCONY, GARDEN)).to_client
    assert ver(fb) == "E1-3" and item_of(fb)[1] == "to"
    out = b.recv(second.replace(BALCONY, GARDEN))
    assert out.to_client == [] and [e.get("id") for e in out.to_upstream] == ["push2"]
    (full,) = Client(factory, f"{ACCOUNT}/c").get("").to_client
    assert ver(full) == "E1-3"
    assert ("tybalt@example.com", "to", [], None, None) in items_of(full)


def test_second_session_answered_from_cache_without_waiting() -> None:
    factory, server = factory_with()
    Client(factory).login(server)
    assert factory.account_fresh(ACCOUNT)
    (result,) = Client(factory, GARDEN).get("").to_client
    assert ver(result) == "E1-1"


def test_cache_is_not_fresh_once_the_last_session_left() -> None:
    factory, server = factory_with()
    a = Client(factory)
    a.login(server)
    a.core.closed()
    assert not factory.account_fresh(ACCOUNT)
    out = Client(factory, GARDEN).get("")
    assert out.to_client == [] and len(roster_gets(out)) == 1


def test_a_change_by_another_session_wakes_it_to_catch_up() -> None:
    factory = RosterFactory(new_store())
    server = Server(ROMEO, NURSE)
    a, b = Client(factory), Client(factory, GARDEN)
    a.login(server)
    b.login(server)
    # a pre-approval on a's client changes nurse's item; b's client is owed a push
    out = a.send("<presence type='subscribed' to='nurse@example.com'/>")
    assert out.to_upstream == []
    woken = [c.session_id for c in out.commands if isinstance(c, CatchUp)]
    assert woken == [b.core.id]
    (push,) = b.core.catch_up().to_client
    assert item_of(push)[0] == "nurse@example.com" and item_of(push)[4] == "true"
    assert b.core.catch_up().to_client == []


def test_catch_up_happens_at_the_next_stanza_without_waking() -> None:
    factory, server = factory_with()
    a, b = Client(factory), Client(factory, GARDEN)
    a.login(server)
    b.login(server)
    a.send("<presence type='subscribed' to='nurse@example.com'/>")
    push, msg = b.recv("<message from='romeo@example.net'><body>hi</body></message>").to_client
    assert is_push(push) and ver(push) == "E1-2" and msg.tag == ns.qname(ns.CLIENT, "message")


# ---------------------------------------------------------------- restart and reconnect


def test_versions_survive_a_restart(tmp_path: Path) -> None:
    path = str(tmp_path / "front.sqlite3")
    server = Server(ROMEO, NURSE)
    factory = RosterFactory(Store(path))
    c = Client(factory)
    (result,) = c.login(server)
    old = ver(result)
    (fwd,) = c.recv(server.push(BENVOLIO)).to_client
    current = ver(fwd)
    factory.store.close()

    factory = RosterFactory(Store(path))  # the proxy restarted
    c = Client(factory)
    (answer,) = c.login(server, current)
    assert is_empty_result(answer)
    answer, push = Client(factory, GARDEN).get(old).to_client
    assert is_empty_result(answer) and ver(push) == current
    assert item_of(push)[0] == "benvolio@example.net"
    # a change made while the proxy was down is found and gets the next version
    c.core.closed()
    factory.store.close()
    server.set("<item jid='nurse@example.com' subscription='both'/>")
    factory = RosterFactory(Store(path))
    answer, push = Client(factory).login(server, current)
    assert is_empty_result(answer)
    assert item_of(push)[:2] == ("nurse@example.com", "both")
    assert ver(push) is not None and ver(push) not in (old, current)
    assert ver(push).split("-")[0] == current.split("-")[0]
    factory.store.close()


def test_upstream_restored_fetches_again_and_pushes_the_difference() -> None:
    factory, server = factory_with()
    c = Client(factory)
    c.login(server)
    server.set("<item jid='romeo@example.net' name='Romeo' subscription='both'>"
               "<group>Friends</group><group>Montague</group></item>")
    server.set(BENVOLIO)
    out = c.core.upstream_restored()
    assert out.to_client == []
    (fetch,) = roster_gets(out)
    pushes = c.recv(server.result(fetch)).to_client
    assert [item_of(p)[:3] for p in pushes] == [
        ("romeo@example.net", "both", ["Friends", "Montague"]),
        ("benvolio@example.net", "from", ["Friends", "Verona"]),
    ]
    assert [ver(p) for p in pushes] == ["E1-2", "E1-3"]
    for p in pushes:  # the client's answers to these are the proxy's business
        assert c.send(f"<iq type='result' id='{p.get('id')}'/>").to_upstream == []


def test_upstream_restored_with_a_get_in_flight() -> None:
    factory, server = factory_with()
    c = Client(factory)
    (lost,) = roster_gets(c.get(""))
    (fetch,) = roster_gets(c.core.upstream_restored())
    (result,) = c.recv(server.result(fetch)).to_client
    assert result.get("id") == "r1" and ver(result) == "E1-1"
    # the lost get, replayed after the reconnect, is answered too: swallowed
    out = c.recv(server.result(lost))
    assert out.to_client == [] and out.to_upstream == []


# ---------------------------------------------------------------- groups


def test_groups_several_none_and_non_ascii_survive() -> None:
    items = (
        "<item jid='a@example.com' name='Ann' subscription='both'>"
        "<group>Zeta</group><group>Alpha</group><group>Mitte</group></item>",
        "<item jid='b@example.com' subscription='none'/>",
        "<item jid='jürgen@exämple.de' name='Jürgen ☃' subscription='to'>"
        "<group>Fréunde</group><group>家族</group><group>😀 emoji</group></item>",
    )
    factory, server = factory_with(items)
    c = Client(factory)
    (result,) = c.login(server)
    expected = [
        ("a@example.com", "both", ["Zeta", "Alpha", "Mitte"], "Ann", None),
        ("b@example.com", "none", [], None, None),
        ("jürgen@exämple.de", "to", ["Fréunde", "家族", "😀 emoji"], "Jürgen ☃", None),
    ]
    assert items_of(result) == expected
    changed = ("<item jid='jürgen@exämple.de' name='Jürgen ☃' subscription='to'>"
               "<group>家族</group><group>Fréunde</group></item>")
    (fwd,) = c.recv(server.push(changed)).to_client
    assert item_of(fwd) == ("jürgen@exämple.de", "to", ["家族", "Fréunde"], "Jürgen ☃", None)
    _, push = Client(factory, GARDEN).get(ver(result)).to_client
    assert item_of(push) == item_of(fwd)


def test_five_hundred_items_with_mixed_groups_round_trip(tmp_path: Path) -> None:
    raw = []
    for n in range(500):
        groups = "".join(f"<group>G{g} ü{n % 7}</group>" for g in range(n % 4))
        name = f" name='Kontakt {n} ☃'" if n % 3 else ""
        raw.append(f"<item jid='c{n}@example.com'{name} subscription='both'>{groups}</item>")
    path = str(tmp_path / "s.sqlite3")
    server = Server(*raw)
    factory = RosterFactory(Store(path))
    (result,) = Client(factory).login(server)
    expected = items_of(parse(server.result(parse("<iq id='x' from='y'/>"))))
    assert items_of(result) == expected
    factory.store.close()
    factory = RosterFactory(Store(path))
    (answer,) = Client(factory).login(server, ver(result))
    assert is_empty_result(answer)  # nothing changed: nothing sent but the empty result
    (full,) = Client(factory, GARDEN).get("").to_client
    assert items_of(full) == expected
    factory.store.close()


def test_duplicate_group_is_a_bad_request_and_nothing_goes_upstream() -> None:
    factory, server = factory_with()
    c = Client(factory)
    c.login(server)
    out = c.send("<iq type='set' id='s1'><query xmlns='jabber:iq:roster'>"
                 "<item jid='tybalt@example.com'><group>A</group><group>B</group>"
                 "<group>A</group></item></query></iq>")
    (err,) = out.to_client
    assert err.get("type") == "error" and err.get("id") == "s1" and err.get("to") == BALCONY
    assert error_condition(err) == "bad-request"
    assert err.find(ns.qname(ns.CLIENT, "error")).get("type") == "modify"
    assert out.to_upstream == []


def test_empty_group_is_not_acceptable_and_nothing_goes_upstream() -> None:
    factory, server = factory_with()
    c = Client(factory)
    c.login(server)
    for empty in ("<group/>", "<group></group>"):
        out = c.send("<iq type='set' id='s2'><query xmlns='jabber:iq:roster'>"
                     f"<item jid='tybalt@example.com'><group>A</group>{empty}</item>"
                     "</query></iq>")
        (err,) = out.to_client
        assert error_condition(err) == "not-acceptable" and out.to_upstream == []


def test_more_than_one_item_in_a_set_is_a_bad_request() -> None:
    factory, server = factory_with()
    c = Client(factory)
    c.login(server)
    out = c.send("<iq type='set' id='s3'><query xmlns='jabber:iq:roster'>"
                 "<item jid='a@example.com'/><item jid='b@example.com'/></query></iq>")
    assert error_condition(out.to_client[0]) == "bad-request" and out.to_upstream == []


def test_good_roster_set_passes_upstream_unchanged() -> None:
    factory, server = factory_with()
    c = Client(factory)
    c.login(server)
    raw = ("<iq type='set' id='s4'><query xmlns='jabber:iq:roster'>"
           "<item jid='tybalt@example.com' name='Tybalt'><group>Capulet</group>"
           "<group>capulet</group><group> </group></item></query></iq>")
    out = c.send(raw)
    (fwd,) = out.to_upstream
    assert fwd.get("id") == "s4" and out.to_client == []
    assert etree.tostring(fwd.find(QUERY)) == etree.tostring(parse(raw).find(QUERY))


# ---------------------------------------------------------------- pre-approval


def test_preapproval_of_a_contact_not_in_the_roster() -> None:
    factory, server = factory_with()
    c = Client(factory)
    c.login(server)
    out = c.send("<presence type='subscribed' to='tybalt@example.com/sword'/>")
    # not forwarded as presence; the item is created upstream, name-less
    assert out.to_client == []
    (create,) = out.to_upstream
    assert create.get("type") == "set"
    (it,) = create.find(QUERY)
    assert dict(it.attrib) == {"jid": "tybalt@example.com"} and len(it) == 0
    assert factory.store.roster.preapprovals(ACCOUNT) == {"tybalt@example.com"}
    # the server's reply is the proxy's; its push shows approved='true'
    assert c.recv(f"<iq type='result' id='{create.get('id')}'/>").to_client == []
    (fwd,) = c.recv(server.push("<item jid='tybalt@example.com' subscription='none'/>")).to_client
    assert item_of(fwd) == ("tybalt@example.com", "none", [], None, "true")
    (full,) = Client(factory, GARDEN).get("").to_client
    assert ("tybalt@example.com", "none", [], None, "true") in items_of(full)


def test_preapproval_of_a_contact_in_the_roster_pushes_approved() -> None:
    factory, server = factory_with()
    c = Client(factory)
    c.login(server)
    out = c.send("<presence type='subscribed' to='nurse@example.com'/>")
    assert out.to_upstream == []
    (push,) = out.to_client
    assert item_of(push) == ("nurse@example.com", "to", [], None, "true")
    assert ver(push) == "E1-2"
    # sending it again changes nothing
    out = c.send("<presence type='subscribed' to='nurse@example.com'/>")
    assert out.to_client == [] and out.to_upstream == []


def test_preapproved_contact_is_approved_on_the_users_behalf() -> None:
    factory, server = factory_with()
    c = Client(factory)
    c.login(server)
    c.send("<presence type='subscribed' to='nurse@example.com'/>")
    out = c.recv("<presence type='subscribe' from='nurse@example.com' to='juliet@example.com'/>")
    (approval,) = out.to_upstream
    assert approval.tag == ns.qname(ns.CLIENT, "presence")
    assert approval.get("type") == "subscribed" and approval.get("to") == "nurse@example.com"
    (push,) = out.to_client  # the request never reaches the client; the flag goes away
    assert is_push(push) and item_of(push)[4] is None and ver(push) == "E1-3"
    assert factory.store.roster.preapprovals(ACCOUNT) == set()
    (fwd,) = c.recv(server.push("<item jid='nurse@example.com' subscription='both'/>")).to_client
    assert item_of(fwd)[:2] == ("nurse@example.com", "both") and ver(fwd) == "E1-4"


def test_subscribe_without_preapproval_reaches_the_client_and_subscribed_is_forwarded() -> None:
    factory, server = factory_with()
    c = Client(factory)
    c.login(server)
    request = "<presence type='subscribe' from='tybalt@example.com'/>"
    (delivered,) = c.recv(request).to_client
    assert delivered.get("type") == "subscribe"
    out = c.send("<presence type='subscribed' to='tybalt@example.com'/>")
    (fwd,) = out.to_upstream  # a normal approval: pending inbound request
    assert fwd.get("type") == "subscribed" and out.to_client == []
    assert factory.store.roster.preapprovals(ACCOUNT) == set()


def test_pending_request_seen_by_another_session_counts() -> None:
    factory, server = factory_with()
    a, b = Client(factory), Client(factory, GARDEN)
    a.login(server)
    b.login(server)
    a.recv("<presence type='subscribe' from='tybalt@example.com'/>")
    (fwd,) = b.send("<presence type='subscribed' to='tybalt@example.com'/>").to_upstream
    assert fwd.get("type") == "subscribed"


def test_subscribed_to_a_contact_with_from_subscription_is_relayed() -> None:
    factory, server = factory_with((BENVOLIO,))
    c = Client(factory)
    c.login(server)
    (fwd,) = c.send("<presence type='subscribed' to='benvolio@example.net'/>").to_upstream
    assert fwd.get("type") == "subscribed"
    assert factory.store.roster.preapprovals(ACCOUNT) == set()


def test_unsubscribed_cancels_a_preapproval_and_is_not_routed() -> None:
    factory, server = factory_with()
    c = Client(factory)
    c.login(server)
    c.send("<presence type='subscribed' to='nurse@example.com'/>")
    out = c.send("<presence type='unsubscribed' to='nurse@example.com'/>")
    assert out.to_upstream == []
    (push,) = out.to_client
    assert item_of(push)[4] is None and ver(push) == "E1-3"
    assert factory.store.roster.preapprovals(ACCOUNT) == set()
    # the contact's request now reaches the client
    (delivered,) = c.recv("<presence type='subscribe' from='nurse@example.com'/>").to_client
    assert delivered.get("type") == "subscribe"


def test_unsubscribed_without_preapproval_is_relayed() -> None:
    factory, server = factory_with((BENVOLIO,))
    c = Client(factory)
    c.login(server)
    (fwd,) = c.send("<presence type='unsubscribed' to='benvolio@example.net'/>").to_upstream
    assert fwd.get("type") == "unsubscribed"
    c.recv("<presence type='subscribe' from='tybalt@example.com'/>")
    (fwd,) = c.send("<presence type='unsubscribed' to='tybalt@example.com'/>").to_upstream
    assert fwd.get("type") == "unsubscribed"  # a denial of a pending request


def test_preapproval_persists_across_a_restart(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sqlite3")
    server = Server(ROMEO, NURSE)
    factory = RosterFactory(Store(path))
    c = Client(factory)
    c.login(server)
    c.send("<presence type='subscribed' to='nurse@example.com'/>")
    factory.store.close()

    factory = RosterFactory(Store(path))
    c = Client(factory)
    (result,) = c.login(server)
    assert ("nurse@example.com", "to", [], None, "true") in items_of(result)
    out = c.recv("<presence type='subscribe' from='nurse@example.com'/>")
    assert [e.get("type") for e in out.to_upstream] == ["subscribed"]
    assert all(is_push(e) for e in out.to_client)
    factory.store.close()
    factory = RosterFactory(Store(path))
    assert factory.store.roster.preapprovals(ACCOUNT) == set()  # used up, and that persisted
    factory.store.close()


def test_other_sessions_copy_of_an_approved_request_is_swallowed() -> None:
    factory, server = factory_with()
    a, b = Client(factory), Client(factory, GARDEN)
    a.login(server)
    b.login(server)
    a.send("<presence type='subscribed' to='nurse@example.com'/>")
    request = "<presence type='subscribe' from='nurse@example.com'/>"
    out_a = a.recv(request)
    assert [e.get("type") for e in out_a.to_upstream] == ["subscribed"]
    out_b = b.recv(request)
    assert out_b.to_upstream == []
    assert not any(e.tag == ns.qname(ns.CLIENT, "presence") for e in out_b.to_client)


def test_removing_an_item_removes_its_preapproval() -> None:
    factory, server = factory_with()
    c = Client(factory)
    c.login(server)
    c.send("<presence type='subscribed' to='nurse@example.com'/>")
    c.recv(server.push("<item jid='nurse@example.com' subscription='remove'/>"))
    assert factory.store.roster.preapprovals(ACCOUNT) == set()


def test_pushes_held_across_a_reconnect_never_override_the_newer_roster() -> None:
    factory, server = factory_with()
    c = Client(factory)
    roster_gets(c.get(""))  # lost with the connection
    stale = server.push("<item jid='tybalt@example.com' subscription='none'/>")
    assert c.recv(stale).to_client == []  # held behind the get in flight
    server.set("<item jid='tybalt@example.com' subscription='to'><group>Capulet</group></item>")
    (fetch,) = roster_gets(c.core.upstream_restored())
    (result,) = c.recv(server.result(fetch)).to_client
    assert ("tybalt@example.com", "to", ["Capulet"], None, None) in items_of(result)
    (full,) = Client(factory, GARDEN).get("").to_client
    assert items_of(full) == items_of(result)


def test_roster_get_addressed_to_someone_else_is_relayed() -> None:
    factory, server = factory_with()
    c = Client(factory)
    c.login(server)
    out = c.send("<iq type='get' id='o1' to='romeo@example.net'>"
                 "<query xmlns='jabber:iq:roster'/></iq>")
    assert [e.get("id") for e in out.to_upstream] == ["o1"] and out.to_client == []
    out = c.send("<iq type='get' id='o2' to='juliet@example.com'>"
                 "<query xmlns='jabber:iq:roster' ver='E1-1'/></iq>")
    (answer,) = out.to_client  # her own bare JID: hers to answer
    assert is_empty_result(answer, "o2") and answer.get("from") == ACCOUNT


def test_live_client_behind_the_log_floor_gets_every_item() -> None:
    factory, server = factory_with((ROMEO,), max_changes=1)
    a, b = Client(factory), Client(factory, GARDEN)
    a.login(server)
    b.login(server)
    x = server.push("<item jid='x@example.com' subscription='none'/>")
    y = server.push("<item jid='y@example.com' subscription='none'/>")
    a.recv(x)
    a.recv(y)  # the log now reaches back to E1-2 only; b's client is at E1-1
    out = b.recv(x.replace(BALCONY, GARDEN))
    assert sorted(item_of(p)[0] for p in out.to_client) == [
        "romeo@example.net", "x@example.com", "y@example.com"]
    assert {ver(p) for p in out.to_client} == {"E1-3"}
    assert [p.get("id") for p in out.to_client].count("push1") == 1
    out = b.recv(y.replace(BALCONY, GARDEN))
    assert out.to_client == [] and [e.get("id") for e in out.to_upstream] == ["push2"]
