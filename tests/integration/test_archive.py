"""The message archive (XEP-0313) through the proxy in front of the legacy Prosody.

With Prosody's mod_mam off (the shared legacy server) the proxy archives and answers the
queries itself: messages both ways, a reconnect, paging, the stanza-id on delivery, another
account refused, a proxy restart. With mod_mam on (a private Prosody) the proxy passes the
queries through and archives nothing itself. Raw clients read the exact stanzas.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import pytest
from lxml import etree

from tests.integration.proxyproc import ProxyProcess
from tests.peers.prosody import LegacyProsody
from tests.peers.rawclient import RawClient, raw_login, tostring
from tests.peers.util import run

pytestmark = pytest.mark.integration

Element = etree._Element
MAM = "urn:xmpp:mam:2"
RSM = "http://jabber.org/protocol/rsm"
SID = "urn:xmpp:sid:0"
IQ = "{jabber:client}iq"
MESSAGE = "{jabber:client}message"


def user(jid: str) -> str:
    return jid.split("@")[0]


async def login(proxy: ProxyProcess | LegacyProsody, account: tuple[str, str],
                resource: str) -> RawClient:
    port = proxy.c2s_port if isinstance(proxy, LegacyProsody) else proxy.port
    return await raw_login(proxy.host, port, user(account[0]), account[1], direct_tls=False,
                           resource=resource)


async def next_message(client: RawClient, timeout: float = 10.0) -> Element:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        el = await client.read_element(max(0.1, deadline - loop.time()))
        if el.tag == MESSAGE and el.find("{jabber:client}body") is not None:
            return el


def send_chat(client: RawClient, to: str, body: str, extra: str = "") -> None:
    client.send(f"<message type='chat' to={quoteattr(to)} id={quoteattr(body)}>"
                f"<body>{escape(body)}</body>{extra}</message>")


async def query(client: RawClient, *, rsm: str = "", fields: str = "", to: str | None = None,
                timeout: float = 15.0) -> tuple[list[Element], Element]:
    """An archive query: the result messages (in the order they came) and the final iq."""
    iq_id = client.next_id("mam")
    queryid = f"q-{iq_id}"
    form = (f"<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE' type='hidden'>"
            f"<value>{MAM}</value></field>{fields}</x>") if fields else ""
    page = f"<set xmlns='{RSM}'>{rsm}</set>" if rsm else ""
    to_attr = f" to={quoteattr(to)}" if to else ""
    client.send(f"<iq type='set' id='{iq_id}'{to_attr}><query xmlns='{MAM}' "
                f"queryid='{queryid}'>{form}{page}</query></iq>")
    results: list[Element] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        el = await client.read_element(max(0.1, deadline - loop.time()))
        if el.tag == IQ and el.get("id") == iq_id:
            return results, el
        result = el.find(f"{{{MAM}}}result")
        if el.tag == MESSAGE and result is not None:
            assert result.get("queryid") == queryid, tostring(el)
            results.append(el)


def bodies(results: list[Element]) -> list[str]:
    return [r.findtext(f"{{{MAM}}}result/{{urn:xmpp:forward:0}}forwarded/"
                       "{jabber:client}message/{jabber:client}body") or "" for r in results]


def result_ids(results: list[Element]) -> list[str]:
    return [r.find(f"{{{MAM}}}result").get("id") for r in results]


def fin_of(iq: Element) -> tuple[bool, str | None, str | None, str | None]:
    """(complete, first, last, count) of the final iq."""
    assert iq.get("type") == "result", tostring(iq)
    fin = iq.find(f"{{{MAM}}}fin")
    assert fin is not None, tostring(iq)
    return (fin.get("complete") == "true", fin.findtext(f"{{{RSM}}}set/{{{RSM}}}first"),
            fin.findtext(f"{{{RSM}}}set/{{{RSM}}}last"),
            fin.findtext(f"{{{RSM}}}set/{{{RSM}}}count"))


def condition(iq: Element) -> str | None:
    assert iq.get("type") == "error", tostring(iq)
    error = iq.find("{jabber:client}error")
    assert error is not None
    return next(etree.QName(c).localname for c in error if etree.QName(c).localname != "text")


async def account_features(client: RawClient, bare: str) -> set[str]:
    reply = await client.iq("<query xmlns='http://jabber.org/protocol/disco#info'/>", to=bare,
                            timeout=10)
    return {f.get("var") for f in reply.iter("{http://jabber.org/protocol/disco#info}feature")}


def test_the_proxy_archives_pages_and_keeps_the_archive(make_proxy, accounts) -> None:
    alice, bob, carol = accounts("alice"), accounts("bob"), accounts("carol")
    proxy: ProxyProcess = make_proxy(archive={"counts": True})
    sent = [f"m{k}" for k in range(6)]  # even: alice -> bob, odd: bob -> alice
    delivered_ids: dict[str, str] = {}

    async def conversation() -> None:
        a = await login(proxy, alice, "phone")
        b = await login(proxy, bob, "desk")
        try:
            assert {MAM, MAM + "#extended"} <= await account_features(a, alice[0])
            for k, body in enumerate(sent):
                sender, receiver, to = ((a, b, bob[0] + "/desk") if k % 2 == 0
                                        else (b, a, alice[0] + "/phone"))
                spoof = (f"<stanza-id xmlns='{SID}' by={quoteattr(alice[0])} id='spoofed'/>"
                         if body == "m1" else "")
                send_chat(sender, to, body, spoof)
                got = await next_message(receiver)
                assert got.findtext("{jabber:client}body") == body
                ids = [(s.get("by"), s.get("id")) for s in got.findall(f"{{{SID}}}stanza-id")]
                mine = alice[0] if receiver is a else bob[0]
                [(by, sid)] = ids  # one, by the receiver's bare JID: the spoof removed
                assert by == mine and sid != "spoofed"
                if receiver is a:
                    delivered_ids[body] = sid
            # Not archived: a message that asks not to be, and one without a body.
            send_chat(b, alice[0] + "/phone", "secret",
                      "<no-store xmlns='urn:xmpp:hints'/>")
            assert (await next_message(a)).findtext("{jabber:client}body") == "secret"
        finally:
            await a.close()
            await b.close()

    async def after_reconnect() -> None:
        a = await login(proxy, alice, "laptop")  # another device, later
        c = await login(proxy, carol, "pc")
        try:
            everything, done = await query(a)
            assert bodies(everything) == sent
            assert fin_of(done)[0] is True and fin_of(done)[3] == "6"
            ids = result_ids(everything)
            # The stanza-id each received message carried is its archive id.
            for body, sid in delivered_ids.items():
                assert ids[sent.index(body)] == sid
            # Forward paging by twos.
            walked: list[str] = []
            after = ""
            while True:
                page, done = await query(a, rsm="<max>2</max>" + (
                    f"<after>{after}</after>" if after else ""))
                complete, first, last, _ = fin_of(done)
                assert first == result_ids(page)[0]
                assert len(page) <= 2
                walked += bodies(page)
                if complete:
                    break
                assert last == result_ids(page)[-1]
                after = last or ""
            assert walked == sent
            # The last page, then the one before it.
            page, done = await query(a, rsm="<max>2</max><before/>")
            assert bodies(page) == sent[4:] and fin_of(done)[0] is False
            page, done = await query(a, rsm=f"<max>2</max><before>{ids[4]}</before>")
            assert bodies(page) == sent[2:4]
            page, done = await query(a, rsm=f"<max>3</max><before>{ids[2]}</before>")
            assert bodies(page) == sent[:2] and fin_of(done)[0] is True
            # Filters: the contact, and the ids between two known ones.
            page, _ = await query(a, fields=f"<field var='with'><value>{bob[0]}</value></field>")
            assert bodies(page) == sent
            page, _ = await query(a, fields=(
                f"<field var='after-id'><value>{ids[0]}</value></field>"
                f"<field var='before-id'><value>{ids[3]}</value></field>"))
            assert bodies(page) == sent[1:3]
            _, refused = await query(a, rsm="<after>no-such-id</after>")
            assert condition(refused) == "item-not-found"
            # Carol cannot read Alice's archive, and her own is empty.
            _, refused = await query(c, to=alice[0])
            assert condition(refused) == "forbidden"
            page, done = await query(c)
            assert page == [] and fin_of(done)[0] is True and fin_of(done)[3] == "0"
        finally:
            await a.close()
            await c.close()

    run(conversation(), 60)
    run(after_reconnect(), 90)

    proxy.stop()
    proxy.start()  # the same store file
    # start() counts "listening" in a log that already holds the first run's: wait for ours.
    loop_deadline = time.monotonic() + 15
    while proxy.log_path.read_text().count('"listening"') < 4:
        assert time.monotonic() < loop_deadline, proxy.log_tail()
        time.sleep(0.05)

    async def after_restart() -> None:
        a = await login(proxy, alice, "phone")
        b = await login(proxy, bob, "desk")
        try:
            page, done = await query(a, rsm="<max>10</max>")
            assert bodies(page) == sent and fin_of(done)[0] is True
            assert [result_ids(page)[sent.index(k)] for k in delivered_ids] == list(
                delivered_ids.values())
            page, _ = await query(b)
            assert bodies(page) == sent
        finally:
            await a.close()
            await b.close()

    run(after_restart(), 60)


def test_with_mod_mam_on_queries_pass_through_and_the_proxy_archives_nothing(
        tmp_path: Path, certs: tuple[Path, Path]) -> None:
    server = LegacyProsody(tmp_path / "prosody", mam=True)
    server.start()
    proxy = ProxyProcess(tmp_path / "proxy", server, *certs)
    try:
        alice = (server.register("alice", "pw-alice"), "pw-alice")
        bob = (server.register("bob", "pw-bob"), "pw-bob")
        proxy.start()

        async def scenario() -> None:
            a = await login(proxy, alice, "phone")
            b = await login(proxy, bob, "desk")
            try:
                assert MAM in await account_features(a, alice[0])  # the server's own
                for body in ("one", "two"):
                    send_chat(a, bob[0] + "/desk", body)
                    got = await next_message(b)
                    by = [s.get("by") for s in got.findall(f"{{{SID}}}stanza-id")]
                    assert by.count(bob[0]) <= 1  # Prosody's stanza-id, never a second
                page, done = await query(a)
                assert bodies(page) == ["one", "two"]  # once each: not doubled
                assert done.get("type") == "result"
            finally:
                await a.close()
                await b.close()

        run(scenario(), 60)
        db = proxy.workdir / "xmpp-front-archive.sqlite3"  # beside the store
        proxy.stop()
        with sqlite3.connect(db) as conn:
            assert conn.execute("SELECT count(*) FROM archive").fetchone()[0] == 0
    finally:
        proxy.stop()
        server.stop()
