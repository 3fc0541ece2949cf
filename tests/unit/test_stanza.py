"""Stanza helpers: kinds, building elements, error replies (RFC 6120 §8)."""

from __future__ import annotations

import pytest
from lxml import etree

from proxy.xmpp import ns
from proxy.xmpp.codec import StanzaReceived, XmlStreamParser, serialize, stream_error
from proxy.xmpp.stanza import (
    element,
    error_condition,
    error_reply,
    iq_result,
    is_stanza,
    kind,
    sub,
)

XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"
HEADER = (b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'"
          b" version='1.0'>")


def from_stream(raw: bytes) -> etree._Element:
    """One top-level element as the codec hands it out."""
    events = XmlStreamParser().feed(HEADER + raw)
    (el,) = [e.element for e in events if isinstance(e, StanzaReceived)]
    return el


def q(namespace: str, local: str) -> str:
    return ns.qname(namespace, local)


# ---------------------------------------------------------------- kinds

@pytest.mark.parametrize("raw, expected", [
    (b"<message to='a@b'><body>x</body></message>", "message"),
    (b"<presence type='unavailable'/>", "presence"),
    (b"<iq type='get' id='1'><ping xmlns='urn:xmpp:ping'/></iq>", "iq"),
])
def test_kind_of_stanzas(raw: bytes, expected: str) -> None:
    el = from_stream(raw)
    assert kind(el) == expected
    assert is_stanza(el) is True


@pytest.mark.parametrize("raw", [
    b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>",
    b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>AGEAYg==</auth>",
    b"<r xmlns='urn:xmpp:sm:3'/>",
    b"<enable xmlns='urn:xmpp:sm:3' resume='true'/>",
    b"<active xmlns='urn:xmpp:csi:0'/>",
    b"<stream:features/>",
    b"<message xmlns='jabber:server'/>",
    b"<iq xmlns='urn:other'/>",
    b"<query xmlns='jabber:iq:roster'/>",
], ids=["starttls", "sasl-auth", "sm-r", "sm-enable", "csi", "stream-features",
        "server-namespace", "other-namespace", "payload"])
def test_nonzas_have_no_kind(raw: bytes) -> None:
    el = from_stream(raw)
    assert kind(el) is None
    assert is_stanza(el) is False


def test_kind_of_an_element_without_namespace_is_none() -> None:
    el = etree.Element("message")
    assert kind(el) is None
    assert not is_stanza(el)


# ------------------------------------------------------------- building

def test_element_declares_its_namespace_as_default_not_ns0() -> None:
    el = element("message", {"to": "juliet@example.com", "type": "chat"}, text=None)
    data = etree.tostring(el)
    assert b"ns0" not in data
    assert b"xmlns:" not in data
    assert data == b'<message xmlns="jabber:client" to="juliet@example.com" type="chat"/>'
    assert el.tag == q(ns.CLIENT, "message")
    assert kind(el) == "message"


def test_element_in_another_namespace_with_text() -> None:
    el = element("ping", namespace=ns.PING)
    assert etree.tostring(el) == b'<ping xmlns="urn:xmpp:ping"/>'
    body = element("body", text="a < b & c")
    assert etree.tostring(body) == b'<body xmlns="jabber:client">a &lt; b &amp; c</body>'


def test_sub_inherits_the_parent_namespace_or_declares_its_own() -> None:
    iq = element("iq", {"type": "set", "id": "1"})
    query = sub(iq, "query", namespace=ns.ROSTER)
    item = sub(query, "item", {"jid": "nurse@example.com"})
    sub(item, "group", text="Friends")
    sub(iq, "note", text="n")
    data = etree.tostring(iq)
    assert b"ns0" not in data and b"ns1" not in data
    assert data == (b'<iq xmlns="jabber:client" type="set" id="1">'
                    b'<query xmlns="jabber:iq:roster"><item jid="nurse@example.com">'
                    b"<group>Friends</group></item></query><note>n</note></iq>")
    assert item.tag == q(ns.ROSTER, "item")
    assert iq[1].tag == q(ns.CLIENT, "note")
    assert serialize(iq).startswith(b'<iq type="set" id="1">')


def test_built_element_survives_a_trip_through_the_codec() -> None:
    msg = element("message", {"to": "a@b", "id": "x"})
    sub(msg, "body", text="hi & bye")
    sub(msg, "active", namespace="http://jabber.org/protocol/chatstates")
    again = from_stream(serialize(msg))
    assert again.tag == msg.tag
    assert dict(again.attrib) == dict(msg.attrib)
    assert [c.tag for c in again] == [q(ns.CLIENT, "body"),
                                      "{http://jabber.org/protocol/chatstates}active"]
    assert again.findtext(q(ns.CLIENT, "body")) == "hi & bye"


# --------------------------------------------------------- error replies

REQUEST = (b"<iq from='romeo@example.net/orchard' to='juliet@example.com' id='r1' type='get'>"
           b"<query xmlns='jabber:iq:roster'/></iq>")


def test_error_reply_swaps_addresses_and_keeps_id() -> None:
    reply = error_reply(from_stream(REQUEST), "service-unavailable")
    assert reply.tag == q(ns.CLIENT, "iq")
    assert reply.get("type") == "error"
    assert reply.get("id") == "r1"
    assert reply.get("to") == "romeo@example.net/orchard"
    assert reply.get("from") == "juliet@example.com"
    (err,) = reply  # the request's payload is not echoed
    assert err.tag == q(ns.CLIENT, "error")
    assert err.get("type") == "cancel"
    assert [c.tag for c in err] == [q(ns.STANZA_ERRORS, "service-unavailable")]
    assert error_condition(reply) == "service-unavailable"


def test_error_reply_keeps_the_stanza_kind() -> None:
    msg = from_stream(b"<message from='a@b/c' to='d@e' id='m'><body>x</body></message>")
    pres = from_stream(b"<presence from='a@b/c' to='d@e' type='subscribe'/>")
    assert error_reply(msg, "recipient-unavailable").tag == q(ns.CLIENT, "message")
    pres_reply = error_reply(pres, "not-allowed")
    assert pres_reply.tag == q(ns.CLIENT, "presence")
    assert pres_reply.get("type") == "error"
    assert pres_reply.get("id") is None


def test_error_reply_without_addresses_or_id_sets_none() -> None:
    reply = error_reply(from_stream(b"<iq type='get'><ping xmlns='urn:xmpp:ping'/></iq>"),
                        "feature-not-implemented")
    assert reply.get("to") is None
    assert reply.get("from") is None
    assert reply.get("id") is None


def test_error_reply_keeps_an_empty_id() -> None:
    reply = error_reply(from_stream(b"<iq type='get' id=''/>"), "bad-request")
    assert reply.get("id") == ""


# RFC 6120 §8.3.3: the error type each defined condition SHOULD carry.
RFC_DEFAULT_TYPES = [
    ("bad-request", "modify"),
    ("conflict", "cancel"),
    ("feature-not-implemented", "cancel"),
    ("forbidden", "auth"),
    ("gone", "cancel"),
    ("internal-server-error", "cancel"),
    ("item-not-found", "cancel"),
    ("jid-malformed", "modify"),
    ("not-acceptable", "modify"),
    ("not-allowed", "cancel"),
    ("not-authorized", "auth"),
    ("policy-violation", "modify"),
    ("recipient-unavailable", "wait"),
    ("remote-server-not-found", "cancel"),
    ("remote-server-timeout", "wait"),
    ("resource-constraint", "wait"),
    ("service-unavailable", "cancel"),
    ("undefined-condition", "cancel"),
    ("unexpected-request", "wait"),
    ("redirect", "modify"),
    ("registration-required", "auth"),
    ("subscription-required", "auth"),
]


@pytest.mark.parametrize("condition, error_type", RFC_DEFAULT_TYPES)
def test_error_reply_default_type_per_rfc_6120(condition: str, error_type: str) -> None:
    reply = error_reply(from_stream(REQUEST), condition)
    err = reply.find(q(ns.CLIENT, "error"))
    assert err is not None
    assert err.get("type") == error_type
    assert err[0].tag == q(ns.STANZA_ERRORS, condition)


def test_error_reply_with_explicit_type_and_by() -> None:
    reply = error_reply(from_stream(REQUEST), "item-not-found", error_type="wait",
                        by="example.com")
    err = reply.find(q(ns.CLIENT, "error"))
    assert err is not None
    assert err.get("type") == "wait"
    assert err.get("by") == "example.com"


def test_error_reply_with_text() -> None:
    reply = error_reply(from_stream(REQUEST), "policy-violation", text="Too <many> & more")
    err = reply.find(q(ns.CLIENT, "error"))
    assert err is not None
    condition, text = err
    assert condition.tag == q(ns.STANZA_ERRORS, "policy-violation")
    assert text.tag == q(ns.STANZA_ERRORS, "text")
    assert text.text == "Too <many> & more"
    assert text.get(XML_LANG) == "en"
    assert error_condition(reply) == "policy-violation"


def test_error_reply_serializes_cleanly_and_parses_back() -> None:
    reply = error_reply(from_stream(REQUEST), "forbidden", text="no")
    data = serialize(reply)
    assert b"ns0" not in data and b"ns1" not in data
    assert data.startswith(b'<iq type="error"')
    assert b'<forbidden xmlns="urn:ietf:params:xml:ns:xmpp-stanzas"/>' in data
    again = from_stream(data)
    assert again.get("to") == "romeo@example.net/orchard"
    assert error_condition(again) == "forbidden"
    err = again.find(q(ns.CLIENT, "error"))
    assert err is not None and err.get("type") == "auth"


# ------------------------------------------------------------ iq results

def test_iq_result_swaps_addresses_and_keeps_id() -> None:
    result = iq_result(from_stream(REQUEST))
    assert result.tag == q(ns.CLIENT, "iq")
    assert dict(result.attrib) == {"type": "result", "id": "r1",
                                   "to": "romeo@example.net/orchard",
                                   "from": "juliet@example.com"}
    assert len(result) == 0
    assert serialize(result) == (b'<iq type="result" id="r1" to="romeo@example.net/orchard"'
                                 b' from="juliet@example.com"/>')


def test_iq_result_with_payload_and_no_addresses() -> None:
    payload = element("query", {"ver": "v2"}, namespace=ns.ROSTER)
    result = iq_result(from_stream(b"<iq type='get' id='q'/>"), payload)
    assert result.get("to") is None and result.get("from") is None
    assert result.get("id") == "q"
    (child,) = result
    assert child.tag == q(ns.ROSTER, "query")
    assert child.get("ver") == "v2"
    assert b'<query xmlns="jabber:iq:roster" ver="v2"/>' in serialize(result)


# ------------------------------------------------------- error conditions

def test_error_condition_of_a_stanza_error() -> None:
    el = from_stream(b"<message type='error' from='a@b' id='1'><body>x</body>"
                     b"<error type='cancel'>"
                     b"<item-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>"
                     b"<text xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'>gone</text>"
                     b"<nope xmlns='urn:example:app'/></error></message>")
    assert error_condition(el) == "item-not-found"


def test_error_condition_skips_a_leading_text_element() -> None:
    el = from_stream(b"<iq type='error' id='1'><error type='auth'>"
                     b"<text xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'>first</text>"
                     b"<forbidden xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>")
    assert error_condition(el) == "forbidden"


def test_error_condition_of_a_stanza_without_error_is_none() -> None:
    assert error_condition(from_stream(b"<message><body>fine</body></message>")) is None
    assert error_condition(from_stream(b"<iq type='result' id='1'/>")) is None
    assert error_condition(from_stream(b"<presence type='error'/>")) is None


def test_error_condition_of_a_stream_error() -> None:
    el = from_stream(stream_error("host-unknown", "no such host"))
    assert el.tag == q(ns.STREAM, "error")
    assert error_condition(el) == "host-unknown"
    raw = from_stream(b"<stream:error><text xmlns='urn:ietf:params:xml:ns:xmpp-streams'>t"
                      b"</text><conflict xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>"
                      b"</stream:error>")
    assert error_condition(raw) == "conflict"


def test_error_condition_of_a_sasl_failure() -> None:
    el = from_stream(b"<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>"
                     b"<account-disabled/><text xml:lang='en'>Call 212-555-1212</text>"
                     b"</failure>")
    assert error_condition(el) == "account-disabled"
    bare = from_stream(b"<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>"
                       b"<not-authorized/></failure>")
    assert error_condition(bare) == "not-authorized"


def test_error_condition_of_an_sm_failure() -> None:
    el = from_stream(b"<failed xmlns='urn:xmpp:sm:3' h='3'>"
                     b"<item-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></failed>")
    assert error_condition(el) == "item-not-found"


def test_error_condition_of_an_empty_failure_is_none() -> None:
    el = from_stream(b"<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>")
    assert error_condition(el) is None
