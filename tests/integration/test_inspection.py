"""The inspection log and the per-session transcripts, from a real session through the proxy
in front of the legacy Prosody: a raw client behind the proxy (whose every stanza is known),
a peer straight on Prosody."""

from __future__ import annotations

import base64
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from tests.integration.proxyproc import ProxyProcess
from tests.peers.prosody import LegacyProsody
from tests.peers.rawclient import RawClient, raw_login
from tests.peers.util import run

pytestmark = pytest.mark.integration

CLIENT = "jabber:client"
MESSAGE, PRESENCE, IQ = f"{{{CLIENT}}}message", f"{{{CLIENT}}}presence", f"{{{CLIENT}}}iq"
STANZA_TAGS = {MESSAGE, PRESENCE, IQ}

RULES = """\
- name: insp-tag
  match: {kind: message, body: "^tagged"}
- name: insp-drop
  direction: c2s
  match: {kind: message, body: "^dropme"}
  actions: [drop]
- name: insp-refuse
  direction: c2s
  match: {kind: message, body: "^refuse"}
  actions: [{error: not-acceptable}]
"""

MakeProxy = Callable[..., ProxyProcess]
MakeAccount = Callable[..., tuple[str, str]]


def user(jid: str) -> str:
    return jid.split("@")[0]


def key(el: etree._Element) -> tuple[str, str | None, str | None]:
    """What the log says of a stanza: kind, type, id."""
    return etree.QName(el).localname, el.get("type"), el.get("id")


def event_key(event: dict[str, Any]) -> tuple[str, str | None, str | None]:
    return event["kind"], event["type"], event["id"]


@dataclass
class Session:
    """What one scripted session sent and received (stanzas only, after binding)."""

    jid: str = ""
    sent: list[etree._Element] = field(default_factory=list)
    received: list[etree._Element] = field(default_factory=list)
    bodies: list[str] = field(default_factory=list)
    token: str = ""  # in every body


class Recorder:
    """A raw client whose stanzas in both directions are recorded."""

    def __init__(self, raw: RawClient, session: Session) -> None:
        self.raw = raw
        self.session = session
        session.jid = raw.jid or ""

    def send(self, xml: str) -> None:
        self.session.sent.append(etree.fromstring(xml))
        self.raw.send(xml)

    async def until(self, tag: str, timeout: float = 10, **attrs: str) -> etree._Element:
        while True:
            el = await self.raw.read_element(timeout)
            if el.tag in STANZA_TAGS:
                self.session.received.append(el)
            if el.tag == tag and all(el.get(k) == v for k, v in attrs.items()):
                return el


async def scripted_session(proxy: ProxyProcess, prosody: LegacyProsody,
                           alice: tuple[str, str], bob: tuple[str, str],
                           messages: int = 3, body_size: int = 0) -> Session:
    """Login, roster get, presence, messages both ways (plus one tagged by a rule, one
    dropped, one refused, one long), logout. Bob is straight on Prosody."""
    session = Session()
    raw = await raw_login(proxy.host, proxy.port, user(alice[0]), alice[1],
                          direct_tls=False, resource="insp")
    peer = await raw_login(prosody.host, prosody.c2s_port, user(bob[0]), bob[1],
                           direct_tls=False, resource="peer")
    a = Recorder(raw, session)
    token = session.token = secrets.token_hex(6)
    try:
        a.send("<iq type='get' id='roster-1'><query xmlns='jabber:iq:roster'/></iq>")
        await a.until(IQ, id="roster-1")
        a.send("<presence id='pres-1'/>")
        await a.until(PRESENCE, id="pres-1")  # Prosody echoes it (and keeps the id)
        padding = "x" * body_size
        for n in range(messages):
            body = f"alice-says-{token}-{n}{padding}"
            session.bodies.append(body)
            a.send(f"<message to='{peer.jid}' id='a-{n}' type='chat'><body>{body}</body>"
                   "</message>")
            assert (await peer.read_until(MESSAGE, 10)).get("id") == f"a-{n}"
            body = f"bob-says-{token}-{n}{padding}"
            session.bodies.append(body)
            peer.send(f"<message to='{raw.jid}' id='b-{n}' type='chat'><body>{body}</body>"
                      "</message>")
            await a.until(MESSAGE, id=f"b-{n}")
        session.bodies.append(f"tagged-by-bob-{token}")
        peer.send(f"<message to='{raw.jid}' id='b-tagged'><body>{session.bodies[-1]}</body>"
                  "</message>")
        await a.until(MESSAGE, id="b-tagged")
        for kind in ("tagged", "dropme", "refuse"):
            body = f"{kind}-{token}"
            session.bodies.append(body)
            a.send(f"<message to='{peer.jid}' id='{kind}' type='chat'><body>{body}</body>"
                   "</message>")
        await a.until(MESSAGE, id="refuse", type="error")
        session.bodies.append(f"long-{token}-" + "L" * 1500)
        a.send(f"<message to='{peer.jid}' id='long' type='chat'><body>{session.bodies[-1]}"
               "</body></message>")
        # Bob gets the tagged and the long message, never the dropped or refused one.
        assert (await peer.read_until(MESSAGE, 10)).get("id") == "tagged"
        assert (await peer.read_until(MESSAGE, 10)).get("id") == "long"
        await raw.close()  # logout
    finally:
        raw.abort()
        peer.abort()
    return session


def stanza_events(proxy: ProxyProcess, account: str) -> list[dict[str, Any]]:
    return [e for e in proxy.events("stanza") if e.get("account") == account]


def assert_no_secrets(path: Path, user_name: str, password: str) -> None:
    text = path.read_text(errors="replace")
    token = base64.b64encode(f"\0{user_name}\0{password}".encode()).decode()
    assert password not in text
    assert token not in text and token.rstrip("=")[:-2] not in text
    assert base64.b64encode(password.encode()).decode().rstrip("=") not in text


TRANSCRIPT_ENTRY = re.compile(
    r"<!-- (?P<stamp>\S+) (?P<direction>c2s|s2c) \((?P<note>[^)]*)\) -->\n(?P<xml>.*)\n")


def transcript_entries(path: Path) -> list[tuple[str, bool, etree._Element]]:
    """(direction, forwarded, stanza) for each entry of a transcript, in order."""
    text = path.read_text()
    entries = []
    end = 0
    for m in TRANSCRIPT_ENTRY.finditer(text):
        assert m.start() == end, f"unexpected text in the transcript: {text[end:m.start()]!r}"
        end = m.end()
        entries.append((m["direction"], "kept by the proxy" not in m["note"],
                        etree.fromstring(m["xml"])))
    assert text[end:] == "" or text[end:].startswith("<!-- "), text[end:]
    return entries


def test_stanza_log_has_every_relayed_stanza_in_order_and_no_secret(
        make_proxy: MakeProxy, accounts: MakeAccount, prosody: LegacyProsody,
        tmp_path: Path) -> None:
    (tmp_path / "insp.yaml").write_text(RULES)
    proxy = make_proxy(rules=[str(tmp_path / "insp.yaml")], log={
        "stanzas": True, "format": "json", "level": "info", "redact": ["body"],
        "capture_dir": str(tmp_path / "captures")})
    alice, bob = accounts("alice"), accounts("bob")

    session = run(scripted_session(proxy, prosody, alice, bob), 40)
    ended = proxy.wait_event("session_ended", lambda e: e.get("jid") == session.jid)
    events = stanza_events(proxy, alice[0])
    assert events, proxy.log_tail()

    # One connection, one session: the ids of the connection's life events.
    auth = proxy.wait_event("auth_ok", lambda e: e.get("account") == alice[0])
    assert {e["conn"] for e in events} == {auth["conn"]}
    assert {e["session"] for e in events} == {ended["session"]}
    for e in events:
        assert e["direction"] in ("c2s", "s2c") and e["level"] == "info"
        assert isinstance(e["size"], int) and e["size"] > 0, e
        assert isinstance(e["proxy_ms"], int | float) and 0 <= e["proxy_ms"] < 5000, e
        assert isinstance(e["forwarded"], bool) and isinstance(e["rules"], list), e
        assert "body" not in e and "xml" not in e

    # Everything the client sent, in order, exactly.
    c2s = [e for e in events if e["direction"] == "c2s" and e["origin"] == "peer"]
    assert [event_key(e) for e in c2s] == [key(el) for el in session.sent]
    # With their addresses: the client's own "to", and the "from" the proxy stamped.
    assert [e["to"] for e in c2s] == [el.get("to") for el in session.sent]
    assert {e["from"] for e in c2s} == {session.jid}
    by_id = {e["id"]: e for e in c2s}
    assert by_id["tagged"]["rules"] == ["insp-tag"] and by_id["tagged"]["forwarded"]
    assert by_id["dropme"]["rules"] == ["insp-drop"] and not by_id["dropme"]["forwarded"]
    assert by_id["refuse"]["rules"] == ["insp-refuse"] and not by_id["refuse"]["forwarded"]
    assert by_id["a-0"]["rules"] == [] and by_id["a-0"]["forwarded"]
    assert by_id["long"]["size"] >= by_id["a-0"]["size"] + 1400

    # Everything the server sent that reached the client, in order; what the proxy kept
    # for itself (answers to its own requests) is marked so.
    s2c = [e for e in events if e["direction"] == "s2c" and e["origin"] == "peer"]
    answered_by_proxy = {e["id"] for e in c2s if not e["forwarded"]}
    relayed = [key(el) for el in session.received if el.get("id") not in answered_by_proxy
               and el.get("type") != "error"]
    assert [event_key(e) for e in s2c if e["forwarded"]] == relayed
    assert all(e["id"].startswith("xf-") for e in s2c if not e["forwarded"])
    assert ("message", "chat", "b-2") in relayed
    [tagged] = [e for e in s2c if e["id"] == "b-tagged"]
    assert tagged["rules"] == ["insp-tag"] and tagged["forwarded"]
    assert all(e["rules"] == [] for e in s2c if e["id"] != "b-tagged")

    # No password, no SASL payload, no body text anywhere in the log.
    assert_no_secrets(proxy.log_path, user(alice[0]), alice[1])
    log_text = proxy.log_path.read_text()
    assert session.token not in log_text

    # The transcript: the same stanzas in the same order, bodies masked.
    transcript = tmp_path / "captures" / f"{alice[0]}-{ended['session']}.xml"
    assert transcript.is_file(), list((tmp_path / "captures").iterdir())
    entries = transcript_entries(transcript)
    assert [(d, f, key(el)) for d, f, el in entries] == [
        (e["direction"], e["forwarded"], event_key(e)) for e in events]
    text = transcript.read_text()
    assert session.token not in text  # not even a piece of a body
    bodies = [el.findtext("body") for _, _, el in entries if el.find("body") is not None]
    assert bodies and set(bodies) == {"[redacted]"}
    assert len(bodies) == len(session.bodies)
    assert_no_secrets(transcript, user(alice[0]), alice[1])


def test_stanza_log_has_every_stanza_the_client_received(
        make_proxy: MakeProxy, accounts: MakeAccount, prosody: LegacyProsody,
        tmp_path: Path) -> None:
    (tmp_path / "insp.yaml").write_text(RULES)
    proxy = make_proxy(rules=[str(tmp_path / "insp.yaml")], log={
        "stanzas": True, "level": "info", "capture_dir": str(tmp_path / "captures")})
    alice, bob = accounts("alice"), accounts("bob")
    session = run(scripted_session(proxy, prosody, alice, bob, messages=1), 40)
    proxy.wait_event("session_ended", lambda e: e.get("jid") == session.jid)
    # Relayed from the server, or made by the proxy itself (a cached roster result, a
    # rule's error reply): everything the client received, in order.
    s2c = [e for e in stanza_events(proxy, alice[0])
           if e["direction"] == "s2c" and e["forwarded"] and not e["id"].startswith("xf-")]
    assert [event_key(e) for e in s2c] == [key(el) for el in session.received]
    assert {e["origin"] for e in s2c} == {"peer", "proxy"}


def test_transcript_keeps_bodies_with_empty_redact(
        make_proxy: MakeProxy, accounts: MakeAccount, prosody: LegacyProsody,
        tmp_path: Path) -> None:
    (tmp_path / "insp.yaml").write_text(RULES)
    proxy = make_proxy(rules=[str(tmp_path / "insp.yaml")], log={
        "redact": [], "capture_dir": "captures"})  # relative: beside the config file
    alice, bob = accounts("alice"), accounts("bob")
    session = run(scripted_session(proxy, prosody, alice, bob), 40)
    ended = proxy.wait_event("session_ended", lambda e: e.get("jid") == session.jid)
    assert proxy.events("stanza") == []  # transcripts without the stanza log

    transcript = proxy.config_path.parent / "captures" / f"{alice[0]}-{ended['session']}.xml"
    entries = transcript_entries(transcript)
    sent = [(d, el.get("id"), el.findtext("body")) for d, _, el in entries
            if el.tag == "message" and d == "c2s"]
    received = [(d, el.get("id"), el.findtext("body")) for d, _, el in entries
                if el.tag == "message" and d == "s2c"]
    assert [body for _, _, body in sent] == [
        el.findtext("body") for el in session.sent if el.tag == "message"]  # as written
    assert [(i, body) for _, i, body in received] == [
        (el.get("id"), el.findtext(f"{{{CLIENT}}}body")) for el in session.received
        if el.tag == MESSAGE]
    assert "[redacted]" not in transcript.read_text()
    assert_no_secrets(transcript, user(alice[0]), alice[1])
    assert_no_secrets(proxy.log_path, user(alice[0]), alice[1])  # at debug level too


def test_transcript_stops_at_capture_max_bytes(
        make_proxy: MakeProxy, accounts: MakeAccount, prosody: LegacyProsody,
        tmp_path: Path) -> None:
    (tmp_path / "insp.yaml").write_text(RULES)
    proxy = make_proxy(rules=[str(tmp_path / "insp.yaml")], log={"stanzas": True, "redact": [],
                            "capture_dir": str(tmp_path / "captures"),
                            "capture_max_bytes": 2048})
    alice, bob = accounts("alice"), accounts("bob")
    session = run(scripted_session(proxy, prosody, alice, bob, messages=8, body_size=100),
                  60)
    ended = proxy.wait_event("session_ended", lambda e: e.get("jid") == session.jid)
    transcript = tmp_path / "captures" / f"{alice[0]}-{ended['session']}.xml"
    data = transcript.read_bytes()
    text = data.decode()
    last = text.rstrip("\n").splitlines()[-1]
    assert re.fullmatch(r"<!-- \S+ transcript truncated at 2048 bytes -->", last), last
    assert len(data) <= 2048 + len(last.encode()) + 1
    assert len(data) > 2048 - 600  # it was filled up to about the limit first
    assert text.count("truncated") == 1

    # Complete entries up to there, the first stanzas of the session in order.
    entries = transcript_entries(transcript)
    events = stanza_events(proxy, alice[0])
    assert len(events) > len(entries) > 3
    assert [(d, key(el)) for d, _, el in entries] == [
        (e["direction"], event_key(e)) for e in events[:len(entries)]]
    # The session went on past the limit: the last messages were relayed and logged.
    assert events[-1]["id"] in ("long", "refuse", "b-7")
    assert "bob-says" in text and session.bodies[-1] not in text
