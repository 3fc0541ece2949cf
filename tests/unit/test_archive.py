"""The message archive (XEP-0313): the pure parts (what is archived, query and RSM parsing,
the form, preferences, JID matching), the feature as a playbook (stanzas in, commands and
stanzas out), the store's SQL (paging, filters, limits; paging properties with hypothesis)
and the writer thread."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs
from lxml import etree

from proxy.archive_store import (ArchiveArea, ArchiveBounds, ArchivedMessage, ArchiveEnds,
                                 ArchiveFilter, ArchiveMissing, ArchivePage, ArchiveSearch,
                                 ArchiveWriter, PageRequest, Prefs, Retention, archive_path,
                                 open_archive_connection)
from proxy.commands import ArchivePut, ArchiveQuery
from proxy.config import ArchiveConfig
from proxy.features import archive as mam
from proxy.session import SessionCore
from proxy.store import Store
from proxy.xmpp import codec
from proxy.xmpp.disco import DiscoInfo, ServerInfo
from proxy.xmpp.jid import Jid

ALICE = "alice@example.org"
BOB = "bob@example.org"


def x(text: str) -> etree._Element:
    return etree.fromstring(text)


def msg(body: str | None = "hi", *, type_: str | None = "chat", to: str = BOB,
        from_: str | None = None, extra: str = "", id_: str | None = "m1") -> etree._Element:
    attrs = f" to='{to}'"
    if type_ is not None:
        attrs += f" type='{type_}'"
    if from_ is not None:
        attrs += f" from='{from_}'"
    if id_ is not None:
        attrs += f" id='{id_}'"
    inner = (f"<body>{body}</body>" if body is not None else "") + extra
    return x(f"<message xmlns='jabber:client'{attrs}>{inner}</message>")


def form(*fields: tuple[str, list[str]]) -> etree._Element:
    parts = "".join(f"<field var='{var}'>" + "".join(f"<value>{v}</value>" for v in values)
                    + "</field>" for var, values in fields)
    return x(f"<x xmlns='jabber:x:data' type='submit'>{parts}</x>")


# ---------------------------------------------------------------------- what is archived


@pytest.mark.parametrize("el, expected", [
    (msg(), True),
    (msg(type_=None), True),                      # normal
    (msg(type_="normal"), True),
    (msg(type_="groupchat"), False),
    (msg(type_="headline"), False),
    (msg(type_="error"), False),
    (msg(None), False),                           # no body: chat states, receipts
    (msg(None, extra="<store xmlns='urn:xmpp:hints'/>"), True),
    (msg(extra="<no-store xmlns='urn:xmpp:hints'/>"), False),
    (msg(extra="<no-permanent-store xmlns='urn:xmpp:hints'/>"), False),
    (x("<presence xmlns='jabber:client'/>"), False),
])
def test_archivable(el: etree._Element, expected: bool) -> None:
    assert mam.archivable(el) is expected


def test_prefs_decide_by_never_then_always_then_default() -> None:
    in_roster = {"friend@x"}.__contains__
    prefs = Prefs("roster", always=frozenset({"stranger@x", "both@x"}),
                  never=frozenset({"friend2@x", "both@x"}))
    assert mam.wanted(prefs, "friend@x", in_roster)
    assert not mam.wanted(prefs, "other@x", in_roster)
    assert mam.wanted(prefs, "stranger@x", in_roster)
    assert not mam.wanted(prefs, "both@x", in_roster)  # never wins
    assert not mam.wanted(Prefs("never"), "friend@x", in_roster)
    assert mam.wanted(Prefs("always"), "other@x", in_roster)


def test_prefs_parse_and_render_round_trip() -> None:
    el = x("<prefs xmlns='urn:xmpp:mam:2' default='roster'><always><jid>A@x/r</jid>"
           "<jid>b@x</jid></always><never><jid>c@x</jid></never></prefs>")
    prefs = mam.parse_prefs(el)
    assert prefs == Prefs("roster", frozenset({"a@x", "b@x"}), frozenset({"c@x"}))
    assert mam.parse_prefs(mam.prefs_element(prefs)) == prefs
    assert isinstance(mam.parse_prefs(x("<prefs xmlns='urn:xmpp:mam:2' default='x'/>")),
                      mam.QueryRefused)


# ---------------------------------------------------------------------- query parsing


def test_form_lists_the_mandatory_and_extended_fields() -> None:
    q = mam.query_form()
    fields = {f.get("var"): f.get("type") for f in q.iter("{jabber:x:data}field")}
    assert fields == {"FORM_TYPE": "hidden", "with": "jid-single", "start": "text-single",
                      "end": "text-single", "before-id": "text-single",
                      "after-id": "text-single", "ids": "list-multi"}
    assert q.find(".//{http://jabber.org/protocol/xdata-validate}open") is not None


def test_filter_fields_parse() -> None:
    f = mam.parse_filter(form(("FORM_TYPE", ["urn:xmpp:mam:2"]), ("with", ["Bob@Example.org"]),
                              ("start", ["2010-06-07T00:00:00Z"]),
                              ("end", ["2010-07-07T13:23:54.5+02:00"]),
                              ("after-id", ["a1"]), ("before-id", ["b1"]),
                              ("ids", ["i1", "i2"])))
    assert f == ArchiveFilter(with_jid=BOB, with_bare=True, start=1275868800.0,
                              end=1278501834.5, after_id="a1", before_id="b1",
                              ids=("i1", "i2"))
    full = mam.parse_filter(form(("with", [BOB + "/phone"])))
    assert isinstance(full, ArchiveFilter) and full.with_jid == BOB + "/phone"
    assert not full.with_bare


@pytest.mark.parametrize("fields, condition", [
    ((("include-groupchat", ["true"]),), "feature-not-implemented"),
    ((("{urn:example}free-text", ["x"]),), "feature-not-implemented"),
    ((("FORM_TYPE", ["urn:xmpp:mam:1"]),), "bad-request"),
    ((("start", ["yesterday"]),), "bad-request"),
    ((("start", ["2010-06-07T00:00:00"]),), "bad-request"),  # no zone
    ((("with", ["@bad"]),), "bad-request"),
    ((("with", ["a@x", "b@x"]),), "bad-request"),
])
def test_bad_filter_fields_are_refused(fields: tuple[tuple[str, list[str]], ...],
                                       condition: str) -> None:
    refused = mam.parse_filter(form(*fields))
    assert isinstance(refused, mam.QueryRefused) and refused.condition == condition


def rsm(inner: str) -> etree._Element:
    return x(f"<set xmlns='http://jabber.org/protocol/rsm'>{inner}</set>")


def test_rsm_paging_requests() -> None:
    assert mam.parse_page(None, 100) == PageRequest(max=100)
    assert mam.parse_page(rsm("<max>2</max><after>a</after>"), 100) == PageRequest(2, after="a")
    assert mam.parse_page(rsm("<max>500</max>"), 100) == PageRequest(100)  # capped
    last = mam.parse_page(rsm("<max>3</max><before/>"), 100)
    assert last == PageRequest(3, before="") and isinstance(last, PageRequest) and last.backward
    assert mam.parse_page(rsm("<max>3</max><index>4</index>"), 100) == PageRequest(3, index=4)
    for bad in ("<max>-1</max>", "<max>x</max>", "<after/>", "<after>a</after><before>b</before>",
                "<index>z</index>"):
        refused = mam.parse_page(rsm(bad), 100)
        assert isinstance(refused, mam.QueryRefused) and refused.condition == "bad-request"


def test_stamps_round_trip() -> None:
    assert mam.parse_stamp(mam.format_stamp(1700000000.25)) == 1700000000.25


# ---------------------------------------------------------------------- the feature


class Ids:
    def __init__(self) -> None:
        self.n = itertools.count(1)

    def __call__(self) -> tuple[str, None, None]:
        return f"A{next(self.n)}", None, None


def factory(**kw: object) -> mam.ArchiveFactory:
    saved: dict[str, Prefs] = {}
    options: dict[str, object] = dict(
        load_prefs=saved.get, save_prefs=saved.__setitem__, new_id=Ids(),
        now=lambda: 1700000000.0, clock=lambda: 0.0)
    options.update(kw)
    return mam.ArchiveFactory("auto", ArchiveConfig(), "example.org", **options)  # type: ignore[arg-type]


def session(f: mam.ArchiveFactory, resource: str = "phone",
            server: ServerInfo | None = None) -> SessionCore:
    return SessionCore(Jid.parse(f"{ALICE}/{resource}"), [f], server)


def puts(commands: list[object]) -> list[ArchivedMessage]:
    """What is archived: the message with the bytes the shell stores for it (the element as
    the write serializes it, after the pipeline)."""
    return [c.message if c.element is None
            else c.message._replace(stanza=codec.document(c.element))
            for c in commands if isinstance(c, ArchivePut)]


def test_sent_and_received_messages_are_archived_and_received_ones_stamped() -> None:
    f = factory()
    s = session(f)
    out = s.from_client(msg("to bob"))
    [sent] = puts(out.commands)
    assert (sent.direction, sent.with_bare, sent.with_full, sent.archive_id) == (
        "out", BOB, BOB, "A1")
    assert out.to_upstream and out.to_upstream[0].find("{urn:xmpp:sid:0}stanza-id") is None
    spoof = "<stanza-id xmlns='urn:xmpp:sid:0' by='alice@example.org' id='evil'/>"
    other = "<stanza-id xmlns='urn:xmpp:sid:0' by='room@muc' id='keep'/>"
    out = s.from_upstream(msg("from bob", to=ALICE, from_=BOB + "/laptop", extra=spoof + other))
    [received] = puts(out.commands)
    assert (received.direction, received.with_bare, received.with_full) == (
        "in", BOB, BOB + "/laptop")
    [delivered] = out.to_client
    ids = {(e.get("by"), e.get("id")) for e in delivered.findall("{urn:xmpp:sid:0}stanza-id")}
    assert ids == {(ALICE, received.archive_id), ("room@muc", "keep")}
    assert b"evil" not in received.stanza


def test_the_archived_bytes_are_the_messages_as_they_go_on() -> None:
    """The feature leaves the bytes to the shell (ArchivePut.element: the very element that
    goes on), so a message is serialized once; a received one is stored as the client gets
    it, with the stanza-id, which is its archive id (so a result's message agrees with it)."""
    s = session(factory())
    out = s.from_client(msg("to bob"))
    [put] = [c for c in out.commands if isinstance(c, ArchivePut)]
    assert put.element is out.to_upstream[0] and put.message.stanza == b""
    out = s.from_upstream(msg("from bob", to=ALICE, from_=BOB + "/laptop"))
    [put] = [c for c in out.commands if isinstance(c, ArchivePut)]
    assert put.element is out.to_client[0]
    stored = etree.fromstring(codec.document(put.element))
    [sid] = stored.findall("{urn:xmpp:sid:0}stanza-id")
    assert (sid.get("by"), sid.get("id")) == (ALICE, put.message.archive_id)
    assert stored.findtext("{jabber:client}body") == "from bob"


def test_groupchat_no_store_and_bodiless_are_not_archived() -> None:
    s = session(factory())
    for el in (msg(type_="groupchat", from_="room@muc/x", to=ALICE),
               msg(None, from_=BOB, to=ALICE),
               msg(from_=BOB, to=ALICE, extra="<no-store xmlns='urn:xmpp:hints'/>")):
        out = s.from_upstream(el)
        assert not puts(out.commands)
        assert out.to_client[0].find("{urn:xmpp:sid:0}stanza-id") is None


def test_a_message_forked_to_two_sessions_is_archived_once_with_one_id() -> None:
    f = factory()
    phone, laptop = session(f, "phone"), session(f, "laptop")
    a = phone.from_upstream(msg(to=ALICE, from_=BOB + "/x", id_="fork1"))
    b = laptop.from_upstream(msg(to=ALICE, from_=BOB + "/x", id_="fork1"))
    assert len(puts(a.commands)) == 1 and not puts(b.commands)
    sid = [o.to_client[0].find("{urn:xmpp:sid:0}stanza-id").get("id") for o in (a, b)]
    assert sid[0] == sid[1]
    # Another id from the same sender is another message.
    assert puts(laptop.from_upstream(msg(to=ALICE, from_=BOB + "/x", id_="fork2")).commands)


def test_prefs_never_and_roster_default() -> None:
    f = factory(in_roster=lambda account, jid: jid == BOB)
    s = session(f)
    out = s.from_client(x("<iq xmlns='jabber:client' type='set' id='p'><prefs xmlns="
                          "'urn:xmpp:mam:2' default='roster'><never><jid>carol@example.org"
                          "</jid></never></prefs></iq>"))
    [answer] = out.to_client
    assert answer.get("type") == "result"
    assert answer.find("{urn:xmpp:mam:2}prefs").get("default") == "roster"
    assert puts(s.from_client(msg(to=BOB)).commands)
    assert not puts(s.from_client(msg(to="carol@example.org")).commands)
    assert not puts(s.from_client(msg(to="dave@example.org")).commands)  # not in roster
    # The account's other session, and a new one, go by the same preferences.
    assert not puts(session(f, "laptop").from_client(msg(to="dave@example.org")).commands)
    got = s.from_client(x("<iq xmlns='jabber:client' type='get' id='g'>"
                          "<prefs xmlns='urn:xmpp:mam:2'/></iq>")).to_client[0]
    assert [j.text for j in got.iter("{urn:xmpp:mam:2}jid")] == ["carol@example.org"]


def query_iq(inner: str = "", to: str | None = None, queryid: str = "q1") -> etree._Element:
    to_attr = f" to='{to}'" if to else ""
    return x(f"<iq xmlns='jabber:client' type='set' id='iq1'{to_attr}>"
             f"<query xmlns='urn:xmpp:mam:2' queryid='{queryid}'>{inner}</query></iq>")


def test_a_query_becomes_a_store_request_and_its_result_the_answer() -> None:
    s = session(factory())
    out = s.from_client(query_iq("<set xmlns='http://jabber.org/protocol/rsm'><max>2</max>"
                                 "<before/></set>"))
    assert not out.to_upstream and not out.to_client  # never forwarded
    [ask] = [c for c in out.commands if isinstance(c, ArchiveQuery)]
    assert isinstance(ask.request, ArchiveSearch)
    assert ask.request.page == PageRequest(2, before="")
    stored = msg("old", to=BOB, from_=ALICE + "/phone")
    from proxy.archive_store import ArchiveItem
    page = ArchivePage((ArchiveItem("A7", 1700000000.0, etree.tostring(stored)),),
                       complete=False, count=5, first_index=4)
    answer = s.store_result(ask.token, page).to_client
    result, fin_iq = answer
    r = result.find("{urn:xmpp:mam:2}result")
    assert (r.get("queryid"), r.get("id")) == ("q1", "A7")
    assert result.get("to") == f"{ALICE}/phone"
    forwarded = r.find("{urn:xmpp:forward:0}forwarded")
    assert forwarded.find("{urn:xmpp:delay}delay").get("stamp") == "2023-11-14T22:13:20.000000Z"
    assert forwarded.find("{jabber:client}message/{jabber:client}body").text == "old"
    assert fin_iq.get("type") == "result" and fin_iq.get("id") == "iq1"
    fin = fin_iq.find("{urn:xmpp:mam:2}fin")
    assert fin.get("complete") is None
    first = fin.find("{http://jabber.org/protocol/rsm}set/{http://jabber.org/protocol/rsm}first")
    assert (first.text, first.get("index")) == ("A7", "4")
    assert fin.findtext("{http://jabber.org/protocol/rsm}set/"
                        "{http://jabber.org/protocol/rsm}count") == "5"
    # Unknown tokens (another feature's, or a repeat) do nothing.
    assert not s.store_result(ask.token, page).to_client


def test_query_errors() -> None:
    s = session(factory())
    out = s.from_client(query_iq("<x xmlns='jabber:x:data' type='submit'><field var='nope'>"
                                 "<value>1</value></field></x>"))
    assert st_condition(out.to_client[0]) == "feature-not-implemented"
    out = s.from_client(query_iq())
    [ask] = [c for c in out.commands if isinstance(c, ArchiveQuery)]
    err = s.store_result(ask.token, ArchiveMissing("zz")).to_client[0]
    assert err.get("type") == "error" and st_condition(err) == "item-not-found"


def st_condition(el: etree._Element) -> str | None:
    from proxy.xmpp import stanza
    return stanza.error_condition(el)


def test_another_users_archive_is_forbidden_and_a_rooms_passes() -> None:
    s = session(factory())
    out = s.from_client(query_iq(to=BOB))
    assert st_condition(out.to_client[0]) == "forbidden" and not out.commands
    assert not out.to_upstream
    out = s.from_client(query_iq(to="room@conference.example.org"))
    assert out.to_upstream and not out.commands
    out = s.from_client(query_iq(to=ALICE))  # its own, addressed explicitly
    assert any(isinstance(c, ArchiveQuery) for c in out.commands)


def test_another_user_is_one_of_the_sessions_own_domain() -> None:
    # Several served domains: a user of beta.example asks about its own domain's users.
    f = factory()
    s = SessionCore(Jid.parse("carol@beta.example/phone"), [f], None)
    out = s.from_client(query_iq(to="dave@beta.example"))
    assert st_condition(out.to_client[0]) == "forbidden" and not out.to_upstream
    out = s.from_client(query_iq(to=BOB))  # another server's user: that server's to answer
    assert out.to_upstream and not out.commands


def test_form_and_metadata_requests() -> None:
    s = session(factory())
    out = s.from_client(x("<iq xmlns='jabber:client' type='get' id='f'>"
                          "<query xmlns='urn:xmpp:mam:2'/></iq>"))
    assert out.to_client[0].find("{urn:xmpp:mam:2}query/{jabber:x:data}x") is not None
    out = s.from_client(x("<iq xmlns='jabber:client' type='get' id='m'>"
                          "<metadata xmlns='urn:xmpp:mam:2'/></iq>"))
    [ask] = [c for c in out.commands if isinstance(c, ArchiveQuery)]
    assert isinstance(ask.request, ArchiveBounds)
    answer = s.store_result(ask.token, ArchiveEnds(None, None)).to_client[0]
    assert answer.find("{urn:xmpp:mam:2}metadata") is not None


def test_a_server_with_mam_keeps_it_and_the_proxy_archives_nothing() -> None:
    f = factory()
    server = ServerInfo(account=DiscoInfo(features=frozenset({mam.MAM})))
    s = session(f, server=server)
    assert mam.MAM not in s.additions.account
    out = s.from_client(query_iq())
    assert out.to_upstream and not out.commands
    assert not puts(s.from_client(msg()).commands)
    plain = session(f)
    assert {mam.MAM, mam.MAM_EXTENDED} <= plain.additions.account


# ---------------------------------------------------------------------- the store


def fill(area: ArchiveArea, account: str, n: int, *, with_: str = BOB, start: float = 1000.0,
         step: float = 1.0, prefix: str = "id") -> list[str]:
    ids = [f"{prefix}{i}" for i in range(n)]
    area.put([(account, ArchivedMessage(i, start + k * step, "in", with_, with_ + "/r",
                                        f"<m n='{k}'/>".encode())) for k, i in enumerate(ids)])
    return ids


def search(area: ArchiveArea, account: str = ALICE, **kw: object) -> ArchivePage:
    flt = {k: v for k, v in kw.items() if k in ArchiveFilter.__slots__}
    page = {k: v for k, v in kw.items() if k not in flt}
    page.setdefault("max", 100)
    result = area.search(account, ArchiveSearch(ArchiveFilter(**flt), PageRequest(**page)))  # type: ignore[arg-type]
    assert isinstance(result, ArchivePage), result
    return result


def ids_of(page: ArchivePage) -> list[str]:
    return [i.archive_id for i in page.items]


@pytest.fixture
def area() -> ArchiveArea:
    return ArchiveArea(open_archive_connection(":memory:"))


def test_paging_forward_backward_and_last_page(area: ArchiveArea) -> None:
    ids = fill(area, ALICE, 5)
    fill(area, BOB, 3, with_=ALICE, prefix="bob")  # another account's archive
    p = search(area, max=2)
    assert ids_of(p) == ids[:2] and not p.complete and p.count == 5 and p.first_index == 0
    p = search(area, max=2, after=ids[1])
    assert ids_of(p) == ids[2:4] and p.first_index == 2
    p = search(area, max=2, after=ids[3])
    assert ids_of(p) == ids[4:] and p.complete
    p = search(area, max=2, before="")
    assert ids_of(p) == ids[3:] and not p.complete and p.first_index == 3
    p = search(area, max=2, before=ids[1])
    assert ids_of(p) == ids[:1] and p.complete
    p = search(area, max=2, index=3)
    assert ids_of(p) == ids[3:5]
    p = search(area, max=0)
    assert p.items == () and p.count == 5 and not p.complete
    assert area.search(ALICE, ArchiveSearch(page=PageRequest(2, after="bob0"))) == \
        ArchiveMissing("bob0")  # another account's id is unknown here


def test_filters(area: ArchiveArea) -> None:
    a = fill(area, ALICE, 4, with_=BOB)
    c = fill(area, ALICE, 2, with_="carol@example.org", start=1001.5, prefix="c")
    assert ids_of(search(area, with_jid=BOB)) == a
    assert ids_of(search(area, with_jid=BOB + "/r", with_bare=False)) == a
    assert ids_of(search(area, with_jid=BOB + "/other", with_bare=False)) == []
    assert ids_of(search(area, start=1001.0, end=1002.0)) == [a[1], c[0], a[2]]
    assert ids_of(search(area, after_id=a[1], before_id=a[3])) == [c[0], a[2], c[1]]
    assert ids_of(search(area, ids=(c[1], a[0]))) == [a[0], c[1]]
    assert area.search(ALICE, ArchiveSearch(ArchiveFilter(ids=("nope",)))) == \
        ArchiveMissing("nope")
    assert area.search(ALICE, ArchiveSearch(ArchiveFilter(after_id="nope"))) == \
        ArchiveMissing("nope")
    ends = area.ends(ALICE)
    assert ends.first and ends.last and (ends.first.archive_id, ends.last.archive_id) == (
        a[0], a[3])


def test_trim_and_expire(area: ArchiveArea) -> None:
    ids = fill(area, ALICE, 10)
    fill(area, BOB, 3, prefix="b")
    assert area.trim(ALICE, 4, chunk=100) == 6
    assert ids_of(search(area)) == ids[6:]
    assert area.trim(ALICE, 4) == 0
    assert area.expire(1008.0) == 2 + 3  # alice's 1006, 1007 and all of bob's
    assert ids_of(search(area)) == ids[8:]


@settings(max_examples=60, deadline=None)
@given(n=hs.integers(0, 30), size=hs.integers(1, 7),
       stamps=hs.lists(hs.integers(0, 5), min_size=30, max_size=30))
def test_paging_walks_every_message_once_in_order(n: int, size: int, stamps: list[int]) -> None:
    """Forward from the start by ``after`` and backward from the end by ``before`` each see
    the whole archive exactly once, in chronological (ts, archiving) order; only the last
    page of a walk is complete, and every first index is the item's position."""
    area = ArchiveArea(open_archive_connection(":memory:"))
    area.put([(ALICE, ArchivedMessage(f"i{k}", float(stamps[k]), "in", BOB, BOB, b"<m/>"))
              for k in range(n)])
    expected = [f"i{k}" for k in sorted(range(n), key=lambda k: (stamps[k], k))]
    seen: list[str] = []
    after: str | None = None
    while True:
        p = search(area, max=size, after=after)
        if p.items:
            assert p.first_index == len(seen)
        seen += ids_of(p)
        if p.complete:
            break
        assert len(p.items) == size
        after = p.items[-1].archive_id
    assert seen == expected
    back: list[str] = []
    before = ""
    while True:
        p = search(area, max=size, before=before)
        back = ids_of(p) + back
        if p.complete:
            break
        before = p.items[0].archive_id
    assert back == expected


# ---------------------------------------------------------------------- the writer


def test_writer_orders_queries_after_puts_and_survives_reopening(tmp_path: Path) -> None:
    path = str(tmp_path / "store.db")
    Store(path).close()

    async def first() -> ArchivePage:
        writer = ArchiveWriter(archive_path(path))
        for k in range(3):
            writer.put(ALICE, ArchivedMessage(f"w{k}", 1000.0 + k, "out", BOB, BOB, b"<m/>"))
        got: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        writer.query(ALICE, ArchiveSearch(), got.set_result)  # asked before any commit
        result = await asyncio.wait_for(got, 10)
        await writer.close()
        assert isinstance(result, ArchivePage)
        return result

    assert ids_of(asyncio.run(first())) == ["w0", "w1", "w2"]
    reopened = open_archive_connection(archive_path(path))
    assert ids_of(search(ArchiveArea(reopened))) == ["w0", "w1", "w2"]
    reopened.close()
    assert archive_path(path) == str(tmp_path / "store-archive.db")  # beside the store


def test_writer_enforces_the_size_limit(tmp_path: Path) -> None:
    path = str(tmp_path / "store.db")
    Store(path).close()

    async def run() -> None:
        writer = ArchiveWriter(archive_path(path),
                               retention=Retention(max_per_account=5, check_every=1))
        for k in range(12):
            writer.put(ALICE, ArchivedMessage(f"w{k}", 1000.0 + k, "out", BOB, BOB, b"<m/>"))
        got: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        writer.query(ALICE, ArchiveSearch(), got.set_result)
        result = await asyncio.wait_for(got, 10)
        await writer.close()
        assert isinstance(result, ArchivePage)
        assert ids_of(result) == [f"w{k}" for k in range(7, 12)]

    asyncio.run(run())


# ---------------------------------------------------------------------- ids and the file


def put_new(area: ArchiveArea, n: int, *, account: str = ALICE, start: float = 1000.0,
            with_: str = BOB) -> list[str]:
    """``n`` messages with ids as the proxy hands them out (``ArchiveIds.new``)."""
    rows, ids = [], []
    for k in range(n):
        archive_id, seq, nonce = area.ids.new()
        ids.append(archive_id)
        rows.append((account, ArchivedMessage(archive_id, start + k, "in", with_, with_,
                                              f"<m n='{k}'/>".encode(), seq, nonce)))
    area.put(rows)
    return ids


def test_the_proxys_ids_are_found_without_an_index_of_ids(area: ArchiveArea) -> None:
    ids = put_new(area, 6)
    fill(area, BOB, 2, prefix="b")
    assert ids_of(search(area)) == ids
    assert ids_of(search(area, max=2, after=ids[1])) == ids[2:4]
    assert ids_of(search(area, max=2, before=ids[2])) == ids[:2]
    assert ids_of(search(area, after_id=ids[0], before_id=ids[3])) == ids[1:3]
    assert ids_of(search(area, ids=(ids[4], ids[1]))) == [ids[1], ids[4]]
    # Found through the row number: no row of them is in the index of stored ids.
    assert area.conn.execute("SELECT count(*) FROM archive JOIN archive_jids ON"
                             " archive_jids.id = account WHERE jid = ? AND nonce IS NULL",
                             (ALICE,)).fetchone()[0] == 0
    assert len(set(ids)) == 6 and all(len(i) == mam_ids_length() for i in ids)
    # Another account's id, a tampered one and one of another archive's key are not found.
    bob_id = put_new(area, 1, account=BOB)[0]
    assert area.search(ALICE, ArchiveSearch(page=PageRequest(2, after=bob_id))) == \
        ArchiveMissing(bob_id)
    flipped = ids[0][:-2] + ("A" if ids[0][-2] != "A" else "B") + ids[0][-1]
    assert area.search(ALICE, ArchiveSearch(ArchiveFilter(ids=(flipped,)))) == \
        ArchiveMissing(flipped)
    other = ArchiveArea(open_archive_connection(":memory:"))
    foreign = put_new(other, 1)[0]
    assert area.search(ALICE, ArchiveSearch(ArchiveFilter(after_id=foreign))) == \
        ArchiveMissing(foreign)


def test_ids_of_the_derivation_before_are_still_found(area: ArchiveArea) -> None:
    """Ids made with one hash per id (before one hash served eight) stay valid: stamped on
    delivered messages, kept by clients, named in later queries."""
    from binascii import b2a_base64
    ids = area.ids
    rows, old_ids = [], []
    for k in range(3):
        seq, nonce = ids.take(), 0x1234_5678_9ABC_DEF0 + k
        n = nonce.to_bytes(8, "big")
        raw = n + (seq ^ ids._mask_v2(n)).to_bytes(8, "big")
        archive_id = b2a_base64(raw, newline=False)[:22].translate(
            bytes.maketrans(b"+/", b"-_")).decode()
        old_ids.append(archive_id)
        rows.append((ALICE, ArchivedMessage(archive_id, 1000.0 + k, "in", BOB, BOB,
                                            f"<m n='{k}'/>".encode(), seq, nonce)))
    area.put(rows)
    new_ids = put_new(area, 2, start=2000.0)
    assert ids_of(search(area, after_id=old_ids[0])) == [*old_ids[1:], *new_ids]
    assert ids_of(search(area, ids=(new_ids[1], old_ids[1]))) == [old_ids[1], new_ids[1]]
    assert ids_of(search(area, max=1, before=new_ids[0])) == [old_ids[2]]


def test_one_hash_serves_eight_ids_and_each_id_encodes_its_seq(area: ArchiveArea) -> None:
    keys = [area.ids.new() for _ in range(20)]
    assert len({k[0] for k in keys}) == 20
    for archive_id, seq, nonce in keys:
        assert seq is not None and nonce is not None
        assert area.ids.encode(seq, nonce) == archive_id
        assert area.ids.candidates(archive_id)[0] == seq
    # Eight consecutive ids share a hash: their nonces differ in the index bits only.
    assert len({k[2] >> 3 for k in keys if k[2] is not None}) == 3


def mam_ids_length() -> int:
    from proxy.archive_store import ArchiveIds
    return ArchiveIds.LENGTH


def test_ids_handed_out_are_never_handed_out_again_after_a_crash(tmp_path: Path) -> None:
    path = str(tmp_path / "a.sqlite3")
    conn = open_archive_connection(path)
    area = ArchiveArea(conn)
    kept = put_new(area, 3)
    lost = [area.ids.new() for _ in range(5)]  # stamped on messages, never written: a crash
    conn.close()
    conn = open_archive_connection(path)
    again = ArchiveArea(conn)
    assert ids_of(search(again)) == kept
    fresh = [again.ids.new() for _ in range(5)]
    assert {k[1] for k in fresh}.isdisjoint({k[1] for k in lost})
    assert min(k[1] for k in fresh if k[1] is not None) > max(
        k[1] for k in lost if k[1] is not None)
    conn.close()


class EventLog:
    """Records the structured events the archive logs."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, object]]] = []

    def warning(self, event: str, **kw: object) -> None:
        self.events.append((event, kw))

    info = warning


def test_a_version_1_archive_is_rebuilt_and_its_ids_still_work(tmp_path: Path) -> None:
    path = str(tmp_path / "old-archive.sqlite3")
    import sqlite3
    old = sqlite3.connect(path)
    old.executescript("""
        CREATE TABLE archive (seq INTEGER PRIMARY KEY AUTOINCREMENT, account TEXT NOT NULL,
            archive_id TEXT NOT NULL, ts REAL NOT NULL, direction TEXT NOT NULL,
            with_bare TEXT NOT NULL, with_full TEXT NOT NULL, stanza BLOB NOT NULL);
        CREATE UNIQUE INDEX archive_by_id ON archive (account, archive_id);
        CREATE INDEX archive_by_time ON archive (account, ts, seq);
        CREATE INDEX archive_by_with ON archive (account, with_bare, ts, seq);
        CREATE INDEX archive_by_age ON archive (ts);
    """)
    old.executemany("INSERT INTO archive (account, archive_id, ts, direction, with_bare,"
                    " with_full, stanza) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(ALICE, f"oldid{k:011d}", 1000.0 + k, "in", BOB, BOB + "/r",
                      f"<m n='{k}'/>".encode()) for k in range(5)]
                    + [(BOB, "bobsoldid000000", 1000.0, "out", ALICE, ALICE, b"<m/>")])
    old.commit()
    old.close()
    log = EventLog()
    conn = open_archive_connection(path, log)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 3
    assert [(e, kw["rows"], kw["from_version"]) for e, kw in log.events] == [
        ("archive_migrating", 6, 1), ("archive_migrated", 6, 1)]
    indexes = {r[0] for r in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'archive'"
        " AND sql IS NOT NULL")}
    assert indexes == {"archive_by_time", "archive_by_with", "archive_by_stored_id"}
    area = ArchiveArea(conn)
    old_ids = [f"oldid{k:011d}" for k in range(5)]
    assert ids_of(search(area)) == old_ids
    assert ids_of(search(area, with_jid=BOB + "/r", with_bare=False)) == old_ids
    assert ids_of(search(area, max=2, after=old_ids[2])) == old_ids[3:]
    assert ids_of(search(area, ids=(old_ids[1],))) == [old_ids[1]]
    new = put_new(area, 2, start=2000.0)
    assert ids_of(search(area)) == old_ids + new
    assert ids_of(search(area, after_id=old_ids[4])) == new
    assert ids_of(search(area, account=BOB)) == ["bobsoldid000000"]
    conn.close()
    reopened = open_archive_connection(path, log)  # version 3 now: opened as it is
    assert ids_of(search(ArchiveArea(reopened))) == old_ids + new
    assert len(log.events) == 2
    reopened.close()


def test_writer_reserves_more_ids_before_they_run_out(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from proxy.archive_store import ArchiveIds
    monkeypatch.setattr(ArchiveIds, "BLOCK", 8)
    path = str(tmp_path / "store.db")

    async def run() -> list[str]:
        writer = ArchiveWriter(archive_path(path))
        given = []
        for k in range(40):
            archive_id, seq, nonce = writer.new_id()
            given.append(archive_id)
            writer.put(ALICE, ArchivedMessage(archive_id, 1000.0 + k, "out", BOB, BOB,
                                              b"<m/>", seq, nonce))
            if k % 4 == 3:  # let the writer commit now and then, as the loop turns
                writer.flush()
                await asyncio.sleep(0.05)
        got: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        writer.query(ALICE, ArchiveSearch(page=PageRequest(100)), got.set_result)
        result = await asyncio.wait_for(got, 10)
        reserved = writer.area.conn.execute(
            "SELECT value FROM archive_meta WHERE name = 'reserved'").fetchone()[0]
        top = writer.area.conn.execute("SELECT max(seq) FROM archive").fetchone()[0]
        await writer.close()
        assert isinstance(result, ArchivePage)
        assert reserved > top
        assert ids_of(result) == given
        return given

    given = asyncio.run(run())
    assert len(set(given)) == 40
    # The writer kept ahead: (nearly) every id is one of the proxy's own kind.
    assert sum(len(i) == ArchiveIds.LENGTH for i in given) >= 36


# Version 2's table: the account and the other party as text.
V2_SCHEMA = """
    CREATE TABLE archive (seq INTEGER PRIMARY KEY, account TEXT NOT NULL,
        archive_id TEXT NOT NULL, nonce INTEGER, ts REAL NOT NULL, direction TEXT NOT NULL,
        with_bare TEXT NOT NULL, with_full TEXT, stanza BLOB NOT NULL);
    CREATE INDEX archive_by_time ON archive (account, ts);
    CREATE INDEX archive_by_with ON archive (account, with_bare, ts);
    CREATE UNIQUE INDEX archive_by_stored_id ON archive (account, archive_id)
        WHERE nonce IS NULL;
    CREATE TABLE archive_meta (name TEXT PRIMARY KEY, value NOT NULL);
    PRAGMA user_version = 2;
"""


def test_a_version_2_archive_is_migrated_to_numbered_jids_and_answers_the_same(
        tmp_path: Path) -> None:
    """Version 3 keys rows by the numbers of the account and the other party: an old
    store's messages are still found by id (the proxy's and stored ones), by contact (bare
    and full), by time, with paging and counts, and new ones go on after them."""
    import sqlite3

    from proxy.archive_store import load_ids
    path = str(tmp_path / "v2-archive.sqlite3")
    old = sqlite3.connect(path, isolation_level=None)
    old.executescript(V2_SCHEMA)
    ids = load_ids(old)  # the file's key, as version 2 made it
    rows = []
    for k in range(8):
        archive_id, seq, nonce = ids.new()
        other = (BOB, "carol@example.org")[k % 2]
        rows.append((seq, ALICE, archive_id, nonce, 1000.0 + k, ("in", "out")[k % 2], other,
                     None if k % 4 == 0 else f"{other}/r{k % 3}", f"<m n='{k}'/>".encode()))
    rows.append((ids.take(), BOB, "bobs-stored-id", None, 1000.0, "in", ALICE, None, b"<m/>"))
    old.executemany("INSERT INTO archive VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    old.close()
    alice_ids = [r[2] for r in rows[:8]]
    log = EventLog()
    conn = open_archive_connection(path, log)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 3
    assert [(e, kw["from_version"]) for e, kw in log.events] == [
        ("archive_migrating", 2), ("archive_migrated", 2)]
    assert conn.execute("SELECT typeof(account), typeof(with_bare) FROM archive"
                        " GROUP BY 1, 2").fetchall() == [("integer", "integer")]
    area = ArchiveArea(conn)
    assert ids_of(search(area)) == alice_ids
    assert [bytes(i.stanza) for i in search(area).items] == [r[8] for r in rows[:8]]
    assert ids_of(search(area, after_id=alice_ids[2])) == alice_ids[3:]
    assert ids_of(search(area, ids=(alice_ids[5], alice_ids[1]))) == [alice_ids[1],
                                                                       alice_ids[5]]
    assert ids_of(search(area, with_jid=BOB)) == alice_ids[0::2]
    assert ids_of(search(area, with_jid="carol@example.org/r1", with_bare=False)) == [
        alice_ids[k] for k in range(8) if k % 2 and k % 4 and k % 3 == 1]
    assert ids_of(search(area, start=1002.0, end=1004.0)) == alice_ids[2:5]
    page = area.search(ALICE, ArchiveSearch(page=PageRequest(3, before="")))
    assert isinstance(page, ArchivePage) and ids_of(page) == alice_ids[5:]
    assert (page.count, page.first_index) == (8, 5)
    assert ids_of(search(area, max=2, after=alice_ids[5])) == alice_ids[6:]
    assert ids_of(search(area, account=BOB, ids=("bobs-stored-id",))) == ["bobs-stored-id"]
    assert area.search(ALICE, ArchiveSearch(ArchiveFilter(ids=("bobs-stored-id",)))) == \
        ArchiveMissing("bobs-stored-id")
    assert sorted(area.accounts()) == [ALICE, BOB]
    new = put_new(area, 2, start=2000.0)
    assert ids_of(search(area)) == alice_ids + new
    assert ids_of(search(area, with_jid=BOB)) == alice_ids[0::2] + new
    conn.close()


def test_an_old_archive_opened_by_two_processes_at_once_is_rebuilt_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two workers may open a version 2 file at the same moment: both read version 2, one
    rebuilds it; the other, once it holds the lock, must find version 3 and leave it (a
    second rebuild would rename the rebuilt table and fail or lose its rows)."""
    import sqlite3

    from proxy import archive_store
    from proxy.archive_store import load_ids
    path = str(tmp_path / "v2-archive.sqlite3")
    old = sqlite3.connect(path, isolation_level=None)
    old.executescript(V2_SCHEMA)
    ids = load_ids(old)
    archive_id, seq, nonce = ids.new()
    old.execute("INSERT INTO archive VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (seq, ALICE, archive_id, nonce, 1000.0, "in", BOB, None, b"<m n='1'/>"))
    old.close()

    first: list[sqlite3.Connection] = []
    real_upgrade = archive_store._upgrade

    def other_process_first(conn: sqlite3.Connection, script: str) -> bool:
        # The other worker got the lock first, between this one's look and its BEGIN.
        monkeypatch.setattr(archive_store, "_upgrade", real_upgrade)
        first.append(open_archive_connection(path, EventLog()))
        return real_upgrade(conn, script)

    monkeypatch.setattr(archive_store, "_upgrade", other_process_first)
    log = EventLog()
    conn = open_archive_connection(path, log)
    assert [e for e, _ in log.events] == ["archive_migrating"]  # and nothing rebuilt here
    for c in (conn, first[0]):
        assert c.execute("PRAGMA user_version").fetchone()[0] == 3
        assert ids_of(search(ArchiveArea(c))) == [archive_id]
    assert conn.execute("SELECT name FROM sqlite_master WHERE name = 'archive_old'"
                        ).fetchall() == []
    conn.close()
    first[0].close()


def test_the_supervisor_rebuilds_an_old_archive_before_its_workers_start(
        tmp_path: Path) -> None:
    """With ``workers: N`` the supervisor opens the archive once before the workers, as it
    does the store: a long rebuild is not raced by N processes each waiting on the first's
    lock (``busy_timeout`` is 5 s; a million rows take half a minute)."""
    import sqlite3

    import structlog

    from proxy.archive_store import archive_path, load_ids
    from proxy.config import parse_config
    from proxy.supervisor import Supervisor
    config = parse_config({"store": {"path": "data/front.sqlite3"}, "workers": 2}, tmp_path)
    (tmp_path / "data").mkdir()
    path = archive_path(str(config.path(config.store.path)))
    old = sqlite3.connect(path, isolation_level=None)
    old.executescript(V2_SCHEMA)
    archive_id, seq, nonce = load_ids(old).new()
    old.execute("INSERT INTO archive VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (seq, ALICE, archive_id, nonce, 1000.0, "in", BOB, None, b"<m/>"))
    old.close()
    Supervisor(config, tmp_path / "config.yaml", 2, structlog.get_logger()).prepare_store()
    conn = sqlite3.connect(path, isolation_level=None)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 3
    assert ids_of(search(ArchiveArea(conn))) == [archive_id]
    conn.close()
