"""The XML stream codec: RFC 6120 §4 (streams) and §11 (restricted XML)."""

from __future__ import annotations

import gc

import pytest
from lxml import etree

from proxy.xmpp import ns
from proxy.xmpp.codec import (
    DEFAULT_MAX_STANZA_BYTES,
    StanzaReceived,
    StreamClosed,
    StreamEvent,
    StreamOpened,
    StreamViolation,
    XmlStreamParser,
    document,
    serialize,
    stream_error,
    stream_header,
)

XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"
XML_DECL = b"<?xml version='1.0'?>"
OPEN_TAG = (b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'"
            b" to='example.com' version='1.0' xml:lang='en'>")
HEADER = XML_DECL + OPEN_TAG
CLOSE = b"</stream:stream>"

# None means "the whole input in one feed() call".
CHUNK_SIZES = [1, 2, 3, 7, 64, None]


def feed(parser: XmlStreamParser, data: bytes, chunk: int | None = None) -> list[StreamEvent]:
    if chunk is None:
        return parser.feed(data)
    events: list[StreamEvent] = []
    for i in range(0, len(data), chunk):
        events += parser.feed(data[i:i + chunk])
    return events


def parse(data: bytes, chunk: int | None = None, **kwargs: object) -> list[StreamEvent]:
    return feed(XmlStreamParser(**kwargs), data, chunk)  # type: ignore[arg-type]


def stanzas(events: list[StreamEvent]) -> list[etree._Element]:
    return [e.element for e in events if isinstance(e, StanzaReceived)]


def only_violation(events: list[StreamEvent]) -> StreamViolation:
    """The stream's single violation, which must be the last event."""
    violations = [e for e in events if isinstance(e, StreamViolation)]
    assert len(violations) == 1, events
    assert events[-1] is violations[0], events
    return violations[0]


def assert_same_element(a: etree._Element, b: etree._Element) -> None:
    assert a.tag == b.tag
    assert dict(a.attrib) == dict(b.attrib)
    assert (a.text or "") == (b.text or "")
    assert len(a) == len(b)
    for ca, cb in zip(a, b, strict=True):
        assert_same_element(ca, cb)
        assert (ca.tail or "") == (cb.tail or "")


def message(size: int) -> bytes:
    """A message stanza of exactly ``size`` bytes."""
    stanza = b"<message><body>" + b"x" * (size - 32) + b"</body></message>"
    assert len(stanza) == size
    return stanza


# ---------------------------------------------------------------- event flow

STANZAS = (
    b"<message to='juliet@example.com' type='chat' id='m1'><body>Hi &amp; bye</body></message>"
    b"\n  \t"
    b"<presence/>"
    b" "
    b"<iq type='get' id='r1'><query xmlns='jabber:iq:roster'/></iq>"
    b"\r\n"
)
STREAM = HEADER + STANZAS + CLOSE


@pytest.mark.parametrize("chunk", CHUNK_SIZES)
def test_header_stanzas_and_close_give_one_event_each(chunk: int | None) -> None:
    parser = XmlStreamParser()
    events = feed(parser, STREAM, chunk)
    assert [type(e) for e in events] == [
        StreamOpened, StanzaReceived, StanzaReceived, StanzaReceived, StreamClosed]
    opened = events[0]
    assert isinstance(opened, StreamOpened)
    assert opened.attrs == {"to": "example.com", "version": "1.0", XML_LANG: "en"}
    assert opened.default_ns == ns.CLIENT
    msg, pres, iq = stanzas(events)
    assert msg.tag == ns.qname(ns.CLIENT, "message")
    assert dict(msg.attrib) == {"to": "juliet@example.com", "type": "chat", "id": "m1"}
    assert msg.findtext(ns.qname(ns.CLIENT, "body")) == "Hi & bye"
    assert pres.tag == ns.qname(ns.CLIENT, "presence")
    assert len(pres) == 0
    assert iq.tag == ns.qname(ns.CLIENT, "iq")
    assert iq[0].tag == ns.qname(ns.ROSTER, "query")
    assert parser.closed


@pytest.mark.parametrize("chunk", CHUNK_SIZES)
def test_whitespace_keepalives_produce_no_events(chunk: int | None) -> None:
    parser = XmlStreamParser()
    assert [type(e) for e in feed(parser, HEADER, chunk)] == [StreamOpened]
    for keepalive in (b" ", b"\n", b"\r\n", b"\t \n  "):
        assert feed(parser, keepalive, chunk) == []
    assert [type(e) for e in feed(parser, b"<presence/>", chunk)] == [StanzaReceived]
    assert feed(parser, b"  \n " * 100, chunk) == []
    assert [type(e) for e in feed(parser, b"<presence/>", chunk)] == [StanzaReceived]
    assert not parser.closed


def test_stanza_is_emitted_as_soon_as_its_end_tag_arrives() -> None:
    parser = XmlStreamParser()
    parser.feed(HEADER)
    assert parser.feed(b"<message><body>hel") == []
    assert parser.feed(b"lo</body>") == []
    events = parser.feed(b"</message><pres")
    assert len(events) == 1
    assert stanzas(events)[0].findtext(ns.qname(ns.CLIENT, "body")) == "hello"


def test_nonzas_in_other_namespaces_are_handed_out_too() -> None:
    events = parse(HEADER + b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
                   b"<r xmlns='urn:xmpp:sm:3'/>")
    assert [el.tag for el in stanzas(events)] == [
        ns.qname(ns.TLS, "starttls"), ns.qname(ns.SM, "r")]


# -------------------------------------------------- detached stanza elements

ROUND_TRIP_STANZAS = [
    b"<message to='juliet@example.com' from='romeo@example.net/orchard' type='chat' id='a1'"
    b" xml:lang='en'><body>Wherefore &lt;art&gt; thou &amp; &quot;why&quot;?</body>"
    b"<thread>t1</thread></message>",
    b"<iq type='set' id='r2'><query xmlns='jabber:iq:roster' ver='v1'>"
    b"<item jid='nurse@example.com' name='N&apos;urse'><group>Friends</group>"
    b"<group>Family</group></item></query></iq>",
    b"<presence><show>away</show><status>mixed <b xmlns='urn:x'>bold</b> tail</status>"
    b"<c xmlns='http://jabber.org/protocol/caps' hash='sha-1' node='n' ver='v'/></presence>",
    b"<iq xmlns:foo='urn:foo' type='get' id='p1'><foo:q foo:attr='1'/></iq>",
    b"<message><body>\xc3\xa9t\xc3\xa9 \xe2\x9c\x93</body></message>",
]


@pytest.mark.parametrize("raw", ROUND_TRIP_STANZAS)
def test_serialized_stanza_round_trips_through_a_fresh_stream(raw: bytes) -> None:
    (el,) = stanzas(parse(HEADER + raw + b"\n "))
    data = serialize(el)
    (again,) = stanzas(parse(HEADER + data))
    assert_same_element(el, again)
    assert b"xmlns:stream" not in data


def test_detached_stanza_has_no_stray_declarations_or_tail() -> None:
    events = parse(HEADER + b"<message to='a@b'><body>x</body></message>\n\t  <presence/>  ")
    msg, pres = stanzas(events)
    for el in (msg, pres):
        assert el.getparent() is None
        assert el.tail is None
        assert "stream" not in el.nsmap
        data = serialize(el)
        assert b"xmlns:stream" not in data
        assert ns.STREAM.encode() not in data
        assert b"jabber:client" not in data  # the stream's default namespace is inherited
        assert data == data.rstrip()
    assert serialize(msg) == b'<message to="a@b"><body>x</body></message>'
    assert serialize(pres) == b"<presence/>"


def test_detached_stanza_keeps_foreign_children_with_their_own_xmlns() -> None:
    (iq,) = stanzas(parse(HEADER + b"<iq type='get' id='1'><query xmlns='jabber:iq:roster'/>"
                                   b"</iq>"))
    data = serialize(iq)
    assert data.startswith(b'<iq type="get" id="1">')
    assert b'<query xmlns="jabber:iq:roster"/>' in data
    assert b"xmlns:stream" not in data


def test_detached_stanza_survives_the_parser_moving_on_and_resetting() -> None:
    parser = XmlStreamParser()
    (first,) = stanzas(parser.feed(HEADER + b"<message id='1'><body>one</body></message>"))
    before = serialize(first)
    parser.feed(b"<message id='2'><body>two</body></message>" * 5)
    parser.reset()
    parser.feed(HEADER + b"<presence/>")
    del parser
    gc.collect()
    assert serialize(first) == before
    assert first.findtext(ns.qname(ns.CLIENT, "body")) == "one"


# What a stanza taken out of the parser's tree serializes to: only the declarations it
# uses (those made on the header included), never the header's xmlns:stream, never an
# ns0: prefix for the default namespace (what lxml makes of it when an element is detached
# from its parent instead of copied).
OUT_OF_THE_TREE = [
    (b"<message to='a@b' id='1'><body>caf\xc3\xa9 &amp; &lt;3</body></message>",
     b'<message to="a@b" id="1"><body>caf\xc3\xa9 &amp; &lt;3</body></message>'),
    (b"<message><h:x h:a='1'/></message>",
     b'<message xmlns:h="urn:from-the-header"><h:x h:a="1"/></message>'),
    (b"<c:iq xmlns:c='jabber:client' type='get'><c:query xmlns='jabber:iq:version'/></c:iq>",
     b'<c:iq xmlns:c="jabber:client" type="get"><c:query xmlns="jabber:iq:version"/></c:iq>'),
    (b"<presence xml:lang='de'><status>x</status><c xmlns='urn:caps'/></presence>",
     b'<presence xml:lang="de"><status>x</status><c xmlns="urn:caps"/></presence>'),
    (b"<message><x xmlns='urn:y'><body xmlns='jabber:client'>in</body></x></message>",
     b'<message><x xmlns="urn:y"><body xmlns="jabber:client">in</body></x></message>'),
    (b"<stream:features><h:x/><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/>"
     b"</stream:features>",
     b'<stream:features xmlns:h="urn:from-the-header"><h:x/>'
     b'<bind xmlns="urn:ietf:params:xml:ns:xmpp-bind"/></stream:features>'),
    (b"<r xmlns='urn:xmpp:sm:3'/>", b'<r xmlns="urn:xmpp:sm:3"/>'),
    (b"<message><![CDATA[a<b]]></message>", b"<message>a&lt;b</message>"),
]


@pytest.mark.parametrize("chunk", [None, 5])
def test_a_stanza_out_of_the_tree_serializes_as_it_came(chunk: int | None) -> None:
    header = HEADER.replace(b" to=", b" xmlns:h='urn:from-the-header' to=")
    parser = XmlStreamParser()
    events = feed(parser, header + b"\n ".join(raw for raw, _ in OUT_OF_THE_TREE) + b"\n",
                  chunk)
    assert [serialize(el) for el in stanzas(events)] == [out for _, out in OUT_OF_THE_TREE]
    for el in stanzas(events):
        assert el.getparent() is None and el.tail is None
    root = parser._root
    assert root is not None and len(root) == 0  # the parser keeps none of them


def test_the_wire_form_made_from_a_document_is_the_serialization() -> None:
    """What the journal keeps (a document of its own, UTF-8) gives the same bytes on the
    wire as serializing the element, and parses back to the same element."""
    header = HEADER.replace(b" to=", b" xmlns:h='urn:from-the-header' to=")
    for el in stanzas(parse(header + b"".join(raw for raw, _ in OUT_OF_THE_TREE))):
        doc = document(el)
        assert serialize(el, document=doc) == serialize(el)
        (again,) = stanzas(parse(HEADER + serialize(el, document=doc)))
        assert_same_element(el, again)
        assert_same_element(el, etree.fromstring(doc))


def test_stream_prefixed_element_relies_on_the_header_for_its_prefix() -> None:
    raw = (b"<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/>"
           b"</starttls><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>"
           b"<mechanism>PLAIN</mechanism></mechanisms></stream:features>")
    (features,) = stanzas(parse(HEADER + raw))
    data = serialize(features)
    assert data.startswith(b"<stream:features>")
    assert b"xmlns:stream" not in data
    (again,) = stanzas(parse(HEADER + data))
    assert_same_element(features, again)


def test_serialize_for_another_default_namespace() -> None:
    parser = XmlStreamParser(expected_ns="jabber:server")
    (el,) = stanzas(parser.feed(HEADER.replace(b"jabber:client", b"jabber:server")
                                + b"<message id='s'/>"))
    assert el.tag == "{jabber:server}message"
    assert serialize(el, default_ns="jabber:server") == b'<message id="s"/>'
    # Written on a jabber:client stream it must keep its own namespace.
    assert b'xmlns="jabber:server"' in serialize(el)


# ---------------------------------------------------------- restricted XML

RESTRICTED = {
    "comment-before-stanza": HEADER + b"<!-- hello --><message/>",
    "comment-inside-stanza": HEADER + b"<message><!-- hello --><body>x</body></message>",
    "comment-in-prolog": XML_DECL + b"<!-- hi -->" + OPEN_TAG + b"<message/>",
    "pi-at-the-very-start": b"<?foo bar?>" + OPEN_TAG + b"<message/>",
    "pi-inside-stream": HEADER + b"<?foo bar?><message/>",
    "pi-inside-stanza": HEADER + b"<message><?foo bar?><body>x</body></message>",
    "second-xml-declaration": HEADER + b"<?xml version='1.0'?><message/>",
    "pi-after-xml-declaration": XML_DECL + b"<?xml-stylesheet href='s.xsl'?>" + OPEN_TAG,
    "doctype-with-entity": XML_DECL + b"<!DOCTYPE stream:stream [<!ENTITY foo 'bar'>]>"
                           + OPEN_TAG + b"<message><body>&foo;</body></message>",
    "doctype-without-xml-declaration": b"<!DOCTYPE stream:stream>" + OPEN_TAG + b"<message/>",
    "entity-declaration-in-stream": HEADER + b"<!ENTITY foo 'bar'><message/>",
    "undefined-entity-in-text": HEADER + b"<message><body>a &foo; b</body></message>",
    "undefined-entity-in-attribute": HEADER + b"<message to='&foo;'><body>x</body></message>",
    "entity-after-cdata-section": HEADER + b"<message><body><![CDATA[ok]]>&foo;</body></message>",
}


@pytest.mark.parametrize("chunk", CHUNK_SIZES)
@pytest.mark.parametrize("data", list(RESTRICTED.values()), ids=list(RESTRICTED))
def test_restricted_xml_is_a_stream_violation(data: bytes, chunk: int | None) -> None:
    parser = XmlStreamParser()
    events = feed(parser, data, chunk)
    assert only_violation(events).condition == "restricted-xml"
    assert stanzas(events) == []
    assert not any(isinstance(e, StreamClosed) for e in events)
    assert parser.closed
    assert parser.feed(b"<message/>" + CLOSE) == []


@pytest.mark.parametrize("first, second", [
    (b"<message><body>a<!", b"-- c --></body></message>"),
    (b"<message><body>a<", b"!-- c --></body></message>"),
    (b"<message><body>a &fo", b"o; b</body></message>"),
    (b"<message to='&fo", b"o;'/>"),
    (b"<message><body>a &", b"foo; b</body></message>"),
    (b"<", b"?foo?><message/>"),
    (b"<message/><!", b"ENTITY foo 'bar'>"),
])
def test_restricted_xml_split_across_feeds_is_caught_when_completed(
        first: bytes, second: bytes) -> None:
    parser = XmlStreamParser()
    events = parser.feed(HEADER + first)
    assert not any(isinstance(e, StreamViolation) for e in events)
    events = parser.feed(second)
    assert only_violation(events).condition == "restricted-xml"
    assert stanzas(events) == []


@pytest.mark.parametrize("chunk", [1, 2, 3, 4, 5, 9, None])
def test_doctype_split_before_header_is_caught(chunk: int | None) -> None:
    events = parse(b"<!DOC" + b"TYPE stream:stream [<!ENTITY x SYSTEM 'file:///etc/passwd'>]>"
                   + OPEN_TAG + b"<message><body>&x;</body></message>", chunk)
    assert only_violation(events).condition == "restricted-xml"
    assert not any(isinstance(e, StreamOpened) for e in events)


@pytest.mark.parametrize("chunk", CHUNK_SIZES)
def test_xml_declaration_at_the_very_start_is_allowed(chunk: int | None) -> None:
    for prefix in (XML_DECL, b'<?xml version="1.0" encoding="UTF-8"?>', b""):
        events = parse(prefix + OPEN_TAG + b"<presence/>", chunk)
        assert [type(e) for e in events] == [StreamOpened, StanzaReceived]


@pytest.mark.parametrize("chunk", CHUNK_SIZES)
def test_predefined_entities_and_character_references_are_decoded(chunk: int | None) -> None:
    events = parse(HEADER + b"<message to='a&amp;b&#x41;&#66;'><body>"
                            b"&lt;&gt;&amp;&quot;&apos;&#65;&#x41;&#x10FFFF;</body></message>",
                   chunk)
    (msg,) = stanzas(events)
    assert not any(isinstance(e, StreamViolation) for e in events)
    assert msg.get("to") == "a&bAB"
    assert msg.findtext(ns.qname(ns.CLIENT, "body")) == "<>&\"'AA\U0010ffff"


@pytest.mark.parametrize("chunk", CHUNK_SIZES)
def test_cdata_section_is_text_not_markup(chunk: int | None) -> None:
    events = parse(HEADER + b"<message><body>a<![CDATA[&foo; <!-- no --> <?pi?> ]] ]>]]>"
                            b"b</body></message><presence/>", chunk)
    assert [type(e) for e in events] == [StreamOpened, StanzaReceived, StanzaReceived]
    msg = stanzas(events)[0]
    assert msg.findtext(ns.qname(ns.CLIENT, "body")) == "a&foo; <!-- no --> <?pi?> ]] ]>b"


def test_cdata_split_at_its_opening_and_closing_is_still_cdata() -> None:
    parser = XmlStreamParser()
    assert len(parser.feed(HEADER + b"<message><body><![CD")) == 1
    assert parser.feed(b"ATA[&foo; <!") == []
    assert parser.feed(b"-- ]") == []
    assert parser.feed(b"]") == []
    (msg,) = stanzas(parser.feed(b"></body></message>"))
    assert msg.findtext(ns.qname(ns.CLIENT, "body")) == "&foo; <!-- "


# ------------------------------------------------------------ malformed XML

MALFORMED = {
    "mismatched-end-tag": HEADER + b"<message><body>x</message></body>",
    "invalid-character": HEADER + b"<message><body>a\x01b</body></message>",
    "undeclared-element-prefix": HEADER + b"<a:b/>",
    "undeclared-prefix-in-stanza": HEADER + b"<message><a:b/></message>",
    "bare-ampersand": HEADER + b"<message><body>fish & chips and more</body></message>",
    "ampersand-at-end-of-name": HEADER + b"<message><body>fish &amp chips</body></message>",
    "invalid-character-reference": HEADER + b"<message><body>&#0;</body></message>",
    "stray-end-tag": HEADER + b"</presence>",
}


@pytest.mark.parametrize("chunk", [1, 7, None])
@pytest.mark.parametrize("data", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_xml_is_not_well_formed(data: bytes, chunk: int | None) -> None:
    parser = XmlStreamParser()
    events = feed(parser, data, chunk)
    assert only_violation(events).condition == "not-well-formed"
    assert stanzas(events) == []
    assert parser.closed
    assert parser.feed(b"<presence/>") == []


def test_undeclared_attribute_prefix_is_not_well_formed() -> None:
    events = parse(HEADER + b"<message foo:bar='x'><body>hi</body></message>")
    assert only_violation(events).condition == "not-well-formed"


def test_bare_ampersand_followed_by_semicolon_is_not_well_formed() -> None:
    events = parse(HEADER + b"<message><body>salt & pepper; oil</body></message>")
    assert only_violation(events).condition == "not-well-formed"


# ----------------------------------------------------------- stanza size

@pytest.mark.parametrize("chunk", [None, 100, 1])
def test_stanza_below_limit_passes(chunk: int | None) -> None:
    events = parse(HEADER + message(900) + CLOSE, chunk, max_stanza_bytes=1000)
    assert [type(e) for e in events] == [StreamOpened, StanzaReceived, StreamClosed]
    assert len(stanzas(events)[0].findtext(ns.qname(ns.CLIENT, "body"))) == 900 - 32


@pytest.mark.parametrize("chunk", [None, 100])
def test_stanza_at_exactly_the_limit_passes(chunk: int | None) -> None:
    parser = XmlStreamParser(max_stanza_bytes=1000)
    parser.feed(HEADER)
    assert [type(e) for e in feed(parser, message(1000), chunk)] == [StanzaReceived]


@pytest.mark.parametrize("chunk", [None, 100])
def test_oversized_stanza_is_a_policy_violation(chunk: int | None) -> None:
    parser = XmlStreamParser(max_stanza_bytes=1000)
    events = feed(parser, HEADER + message(5000) + b"<presence/>" + CLOSE, chunk)
    assert only_violation(events).condition == "policy-violation"
    assert stanzas(events) == []
    assert parser.closed


def test_oversized_stanza_is_refused_before_it_is_complete() -> None:
    parser = XmlStreamParser(max_stanza_bytes=1000)
    parser.feed(HEADER)
    events = parser.feed(b"<message><body>")
    for _ in range(30):  # 3000 bytes of body; the stanza never ends
        events += parser.feed(b"x" * 100)
    assert only_violation(events).condition == "policy-violation"


def test_oversized_stanza_inside_small_nested_elements_is_refused() -> None:
    stanza = b"<iq type='set' id='x'><query xmlns='jabber:iq:roster'>" \
        + b"<item jid='a@b'/>" * 400 + b"</query></iq>"
    events = parse(HEADER + stanza, 50, max_stanza_bytes=1000)
    assert only_violation(events).condition == "policy-violation"


def test_default_limit_is_256_kib() -> None:
    assert DEFAULT_MAX_STANZA_BYTES == 256 * 1024
    assert XmlStreamParser().max_stanza_bytes == DEFAULT_MAX_STANZA_BYTES


def test_default_limit_passes_200_kib_and_refuses_300_kib() -> None:
    ok = parse(HEADER + message(200 * 1024) + CLOSE)
    assert [type(e) for e in ok] == [StreamOpened, StanzaReceived, StreamClosed]
    big = parse(HEADER + message(300 * 1024) + CLOSE)
    assert only_violation(big).condition == "policy-violation"
    assert stanzas(big) == []


@pytest.mark.parametrize("chunk", [None, 100, 7])
def test_limit_is_per_stanza_not_per_stream(chunk: int | None) -> None:
    small = message(200)  # 60 of them: 12000 bytes in total
    events = parse(HEADER + small * 60 + CLOSE, chunk, max_stanza_bytes=1000)
    assert not any(isinstance(e, StreamViolation) for e in events)
    assert len(stanzas(events)) == 60
    assert isinstance(events[-1], StreamClosed)


@pytest.mark.parametrize("chunk", [None, 100])
def test_oversized_start_tag_is_a_policy_violation(chunk: int | None) -> None:
    stanza = b"<message to='" + b"a" * 5000 + b"'/>"
    events = parse(HEADER + stanza, chunk, max_stanza_bytes=1000)
    assert only_violation(events).condition == "policy-violation"


# ------------------------------------------------------------ header checks

def header_with(**changes: bytes | None) -> bytes:
    attrs = {
        b"xmlns": b"jabber:client",
        b"xmlns:stream": ns.STREAM.encode(),
        b"to": b"example.com",
        b"version": b"1.0",
    }
    for name, value in changes.items():
        key = name.replace("_", ":").encode()
        if value is None:
            attrs.pop(key, None)
        else:
            attrs[key] = value
    rendered = b" ".join(k + b"='" + v + b"'" for k, v in attrs.items())
    return XML_DECL + b"<stream:stream " + rendered + b">"


@pytest.mark.parametrize("header, condition", [
    (header_with(xmlns_stream=b"urn:not:streams"), "invalid-namespace"),
    (header_with(xmlns=b"jabber:server"), "invalid-namespace"),
    (header_with(xmlns=b"urn:something:else"), "invalid-namespace"),
    (header_with(xmlns=None), "invalid-namespace"),
    (header_with(version=b"2.0"), "unsupported-version"),
    (header_with(version=b"0.9"), "unsupported-version"),
    (header_with(version=b"10.0"), "unsupported-version"),
    # RFC 6120 §4.7.5: no version means 0.9; this parser serves XMPP 1.0 streams only.
    (header_with(version=None), "unsupported-version"),
    (XML_DECL + b"<message xmlns='jabber:client'/>", "not-well-formed"),
], ids=["stream-ns", "jabber-server", "other-default-ns", "no-default-ns", "version-2.0",
        "version-0.9", "version-10.0", "no-version", "not-a-stream"])
def test_bad_header_is_refused(header: bytes, condition: str) -> None:
    parser = XmlStreamParser()
    events = parser.feed(header + b"<presence/>")
    assert only_violation(events).condition == condition
    assert not any(isinstance(e, StreamOpened) for e in events)
    assert stanzas(events) == []
    assert parser.closed


@pytest.mark.parametrize("version", [b"1.0", b"1.1", b"1.23"])
def test_any_1_x_version_is_accepted(version: bytes) -> None:
    events = parse(header_with(version=version))
    assert [type(e) for e in events] == [StreamOpened]
    assert events[0].attrs["version"] == version.decode()  # type: ignore[union-attr]


def test_version_leading_zeros_are_ignored() -> None:
    events = parse(header_with(version=b"01.0"))
    assert [type(e) for e in events] == [StreamOpened]


def test_expected_namespace_is_configurable() -> None:
    server = header_with(xmlns=b"jabber:server")
    events = XmlStreamParser(expected_ns="jabber:server").feed(server)
    assert [type(e) for e in events] == [StreamOpened]
    assert events[0].default_ns == "jabber:server"  # type: ignore[union-attr]
    client = XmlStreamParser(expected_ns="jabber:server").feed(header_with())
    assert only_violation(client).condition == "invalid-namespace"


def test_processing_instruction_at_the_very_start_is_restricted() -> None:
    events = parse(b"<?xml-stylesheet href='s.xsl'?>" + OPEN_TAG)
    assert only_violation(events).condition == "restricted-xml"


# ------------------------------------------------------ restart and closing

def test_reset_accepts_a_new_header_and_stanzas_flow_again() -> None:
    parser = XmlStreamParser()
    events = parser.feed(HEADER + b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
    assert [type(e) for e in events] == [StreamOpened, StanzaReceived]
    parser.reset()
    new_header = HEADER.replace(b"to='example.com'", b"to='example.com' id='2'")
    events = parser.feed(new_header + b"<iq type='get' id='b'/>")
    assert [type(e) for e in events] == [StreamOpened, StanzaReceived]
    assert events[0].attrs["id"] == "2"  # type: ignore[union-attr]
    assert stanzas(events)[0].get("id") == "b"
    events = parser.feed(b"<presence/>" + CLOSE)
    assert [type(e) for e in events] == [StanzaReceived, StreamClosed]


def test_second_header_without_reset_is_refused() -> None:
    parser = XmlStreamParser()
    parser.feed(HEADER)
    # A second XML declaration mid-stream is a processing instruction.
    events = parser.feed(HEADER)
    assert only_violation(events).condition == "restricted-xml"


def test_reset_discards_a_partial_stanza() -> None:
    parser = XmlStreamParser()
    parser.feed(HEADER + b"<message><body>half")
    parser.reset()
    events = parser.feed(HEADER + b"<presence/>")
    assert [type(e) for e in events] == [StreamOpened, StanzaReceived]


def test_reset_reopens_a_parser_after_close_or_violation() -> None:
    parser = XmlStreamParser()
    parser.feed(HEADER + b"<!-- x -->")
    assert parser.closed
    parser.reset()
    assert not parser.closed
    assert [type(e) for e in parser.feed(HEADER + b"<presence/>")] == [
        StreamOpened, StanzaReceived]


def test_feed_after_stream_closed_returns_nothing() -> None:
    parser = XmlStreamParser()
    events = parser.feed(HEADER + b"<presence/>" + CLOSE)
    assert [type(e) for e in events] == [StreamOpened, StanzaReceived, StreamClosed]
    assert parser.closed
    assert parser.feed(b"<message/>") == []
    assert parser.feed(HEADER) == []
    assert parser.feed(b"<!-- would be a violation -->") == []


def test_feed_after_violation_returns_nothing() -> None:
    parser = XmlStreamParser()
    assert [type(e) for e in parser.feed(HEADER)] == [StreamOpened]
    events = parser.feed(b"<message><body>&foo;</body></message><presence/>")
    assert [type(e) for e in events] == [StreamViolation]
    assert parser.closed
    assert parser.feed(b"<presence/>") == []
    assert parser.feed(CLOSE) == []


def kinds(events: list[StreamEvent]) -> list[str]:
    return [e.condition if isinstance(e, StreamViolation) else type(e).__name__ for e in events]


@pytest.mark.parametrize("data", [
    HEADER + b"<presence/><message><body>x</body></mess>",
    HEADER + b"<presence/><!-- comment -->",
    HEADER + b"<presence/>" + CLOSE + b"<message/>",
], ids=["syntax-error", "restricted-xml", "data-after-close"])
def test_events_before_an_error_do_not_depend_on_chunking(data: bytes) -> None:
    assert kinds(parse(data)) == kinds(parse(data, 1))


def test_closed_is_false_while_the_stream_is_open() -> None:
    parser = XmlStreamParser()
    assert not parser.closed
    parser.feed(HEADER + b"<presence/>")
    assert not parser.closed


# ------------------------------------------------------- writing the stream

def test_stream_header_is_parsed_back_with_all_attributes() -> None:
    data = stream_header(to="example.com", from_="user@example.com", stream_id="abc123",
                         lang="fr")
    assert data.startswith(b"<?xml version='1.0'?><stream:stream ")
    assert data.endswith(b">") and not data.endswith(b"/>")
    (opened,) = XmlStreamParser().feed(data)
    assert isinstance(opened, StreamOpened)
    assert opened.default_ns == ns.CLIENT
    assert opened.attrs == {"to": "example.com", "from": "user@example.com", "id": "abc123",
                            "version": "1.0", XML_LANG: "fr"}


def test_stream_header_leaves_out_absent_attributes() -> None:
    (opened,) = XmlStreamParser().feed(stream_header())
    assert isinstance(opened, StreamOpened)
    assert opened.attrs == {"version": "1.0", XML_LANG: "en"}


def test_stream_header_escapes_attribute_values() -> None:
    nasty = "a\"b'c<d>&e"
    data = stream_header(to=nasty, from_="x&y", stream_id="<id>")
    assert b"<d>" not in data and b"<id>" not in data and b"x&y" not in data
    (opened,) = XmlStreamParser().feed(data)
    assert isinstance(opened, StreamOpened)
    assert opened.attrs["to"] == nasty
    assert opened.attrs["from"] == "x&y"
    assert opened.attrs["id"] == "<id>"


def test_stream_header_for_another_namespace() -> None:
    data = stream_header(to="example.com", default_ns="jabber:server")
    (opened,) = XmlStreamParser(expected_ns="jabber:server").feed(data)
    assert isinstance(opened, StreamOpened)
    assert opened.default_ns == "jabber:server"


def test_stream_error_relies_on_the_header_for_the_stream_prefix() -> None:
    data = stream_error("not-well-formed")
    assert data.startswith(b"<stream:error>")
    assert b"xmlns:stream" not in data
    (err,) = stanzas(parse(HEADER + data))
    assert err.tag == ns.qname(ns.STREAM, "error")
    assert [c.tag for c in err] == [ns.qname(ns.STREAMS_ERRORS, "not-well-formed")]


def test_stream_error_with_text() -> None:
    data = stream_error("policy-violation", "too big <&> for us")
    assert b"xmlns:stream" not in data
    (err,) = stanzas(parse(HEADER + data))
    condition, text = err
    assert condition.tag == ns.qname(ns.STREAMS_ERRORS, "policy-violation")
    assert text.tag == ns.qname(ns.STREAMS_ERRORS, "text")
    assert text.text == "too big <&> for us"
    assert text.get(XML_LANG) == "en"


def test_stream_error_with_application_condition() -> None:
    app = etree.Element("{urn:example:errors}too-many-hats", nsmap={None: "urn:example:errors"})
    (err,) = stanzas(parse(HEADER + stream_error("undefined-condition", app_condition=app)))
    assert [c.tag for c in err] == [ns.qname(ns.STREAMS_ERRORS, "undefined-condition"),
                                    "{urn:example:errors}too-many-hats"]


def test_violation_condition_can_be_written_as_a_stream_error() -> None:
    (violation,) = [e for e in parse(HEADER + b"<!-- x -->") if isinstance(e, StreamViolation)]
    (err,) = stanzas(parse(HEADER + stream_error(violation.condition, violation.text)))
    assert err[0].tag == ns.qname(ns.STREAMS_ERRORS, "restricted-xml")
    assert err[1].text == violation.text


# ---------------------------------------------------------------- encodings (RFC 6120 §11.6)

ENCODING_CASES = {
    "declared-latin-1": b"<?xml version='1.0' encoding='ISO-8859-1'?>" + OPEN_TAG,
    "declared-utf-16-in-ascii": b'<?xml version="1.0" encoding="UTF-16"?>' + OPEN_TAG,
    "declared-ascii": b"<?xml version='1.0' encoding='US-ASCII'?>" + OPEN_TAG,
    "utf-16-le-with-bom": "\ufeff<?xml version='1.0'?><stream:stream>".encode("utf-16-le"),
    "utf-16-be-with-bom": "\ufeff<stream:stream>".encode("utf-16-be"),
    "utf-16-le-without-bom": (XML_DECL + OPEN_TAG).decode().encode("utf-16-le"),
    "utf-16-be-without-bom": (OPEN_TAG).decode().encode("utf-16-be"),
    "utf-32-le-with-bom": "\ufeff<stream:stream>".encode("utf-32-le"),
    "utf-32-be-with-bom": "\ufeff<stream:stream>".encode("utf-32-be"),
    "utf-16-with-whitespace-first": " <stream:stream>".encode("utf-16-le"),
}


@pytest.mark.parametrize("chunk", CHUNK_SIZES)
@pytest.mark.parametrize("data", list(ENCODING_CASES.values()), ids=list(ENCODING_CASES))
def test_other_encodings_are_unsupported(data: bytes, chunk: int | None) -> None:
    parser = XmlStreamParser()
    events = feed(parser, data + b"<message><body>x</body></message>", chunk)
    assert only_violation(events).condition == "unsupported-encoding"
    assert not any(isinstance(e, StreamOpened) for e in events)
    assert parser.closed


@pytest.mark.parametrize("chunk", CHUNK_SIZES)
def test_utf_16_stream_cannot_smuggle_comments_or_pis(chunk: int | None) -> None:
    # Encoded as UTF-16 the markup is invisible to a byte scanner looking for "<!" and "<?".
    text = "<?xml version='1.0' encoding='UTF-16'?>" + OPEN_TAG.decode() + (
        "<!-- hidden --><?pi x?><message><body>x</body></message>")
    for data in (text.encode("utf-16"), text.encode("utf-16-le"), text.encode("utf-16-be")):
        events = feed(XmlStreamParser(), data, chunk)
        assert only_violation(events).condition == "unsupported-encoding"
        assert stanzas(events) == []


def test_encoding_declared_on_a_restart_is_checked_again() -> None:
    parser = XmlStreamParser()
    assert [type(e) for e in parser.feed(HEADER)] == [StreamOpened]
    parser.reset()
    events = parser.feed(b"<?xml version='1.0' encoding='ISO-8859-1'?>" + OPEN_TAG
                         + "<message><body>caf\u00e9</body></message>".encode("latin-1"))
    assert only_violation(events).condition == "unsupported-encoding"
    assert stanzas(events) == []


@pytest.mark.parametrize("chunk", CHUNK_SIZES)
def test_utf_8_declared_in_any_case_and_a_utf_8_bom_are_accepted(chunk: int | None) -> None:
    for prefix in (b"<?xml version='1.0' encoding='utf-8'?>",
                   b'<?xml version="1.0" encoding = "UTF-8" ?>',
                   b"\xef\xbb\xbf", b"\xef\xbb\xbf" + XML_DECL):
        events = parse(prefix + OPEN_TAG + "<presence><status>caf\u00e9</status></presence>"
                       .encode(), chunk)
        assert [type(e) for e in events] == [StreamOpened, StanzaReceived], prefix
        assert stanzas(events)[0].findtext(ns.qname(ns.CLIENT, "status")) == "caf\u00e9"


INVALID_UTF8 = {
    "lone-continuation": b"\x80",
    "overlong-nul": b"\xc0\x80",
    "surrogate": b"\xed\xa0\x80",
    "beyond-unicode": b"\xf4\x90\x80\x80",
    "truncated-sequence": b"\xe2\x82",
    "ff-byte": b"\xff",
    "latin-1-text": "caf\u00e9 ".encode("latin-1"),
}


@pytest.mark.parametrize("chunk", CHUNK_SIZES)
@pytest.mark.parametrize("bad", list(INVALID_UTF8.values()), ids=list(INVALID_UTF8))
def test_invalid_utf_8_is_unsupported_encoding(bad: bytes, chunk: int | None) -> None:
    # RFC 6120 §4.9.3.22: "...or has otherwise improperly encoded the stream (e.g., by
    # violating the rules of the [UTF-8] encoding)".
    events = parse(HEADER + b"<presence/><message><body>a" + bad + b"b</body></message>",
                   chunk)
    assert only_violation(events).condition == "unsupported-encoding"
    assert len(stanzas(events)) == 1  # the presence before it still counts


def test_invalid_utf_8_in_an_attribute_is_unsupported_encoding() -> None:
    events = parse(HEADER + b"<message to='caf\xe9'/>")
    assert only_violation(events).condition == "unsupported-encoding"


def test_valid_multibyte_utf_8_split_anywhere_is_fine() -> None:
    text = "\u00e9\u4e2d\U0001f600"
    data = HEADER + f"<message><body>{text}</body></message>".encode()
    for chunk in (1, 2, 3):
        (msg,) = stanzas(parse(data, chunk))
        assert msg.findtext(ns.qname(ns.CLIENT, "body")) == text


# ---------------------------------------------------------------- nesting depth

def nested(depth: int) -> bytes:
    """A message whose innermost element is at ``depth`` (the message itself is 1)."""
    inner = depth - 1
    return b"<message>" + b"<x>" * inner + b"</x>" * inner + b"</message>"


@pytest.mark.parametrize("limit", [1, 5, 128, 250])
def test_depth_at_the_limit_passes_and_one_more_is_a_policy_violation(limit: int) -> None:
    (msg,) = stanzas(parse(HEADER + nested(limit), max_depth=limit))
    assert len(list(msg.iter())) == limit
    events = parse(HEADER + nested(limit + 1), max_depth=limit)
    violation = only_violation(events)
    assert violation.condition == "policy-violation"
    assert str(limit) in violation.text


def test_default_depth_limit_is_128() -> None:
    assert len(stanzas(parse(HEADER + nested(128)))) == 1
    assert only_violation(parse(HEADER + nested(129))).condition == "policy-violation"


@pytest.mark.parametrize("chunk", [None, 4096])
def test_very_deep_nesting_is_a_policy_violation_not_a_parser_error(chunk: int | None) -> None:
    events = parse(HEADER + b"<message>" + b"<x>" * 100_000, chunk)
    violation = only_violation(events)
    assert violation.condition == "policy-violation"
    assert "XML_PARSE_HUGE" not in violation.text


def test_depth_limit_outside_its_range_is_refused() -> None:
    for bad in (0, 251):
        with pytest.raises(ValueError):
            XmlStreamParser(max_depth=bad)


# ---------------------------------------------------------------- a header mid-stream

@pytest.mark.parametrize("chunk", CHUNK_SIZES)
def test_stream_header_inside_the_stream_is_refused(chunk: int | None) -> None:
    parser = XmlStreamParser()
    events = feed(parser, HEADER + b"<presence/>" + OPEN_TAG + b"<message><body>x</body>"
                  b"</message>", chunk)
    assert only_violation(events).condition == "unsupported-stanza-type"
    assert len(stanzas(events)) == 1  # the presence only: nothing after the second header
    assert parser.closed


# ---------------------------------------------------------------- trailing bytes (STARTTLS)

STARTTLS = b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"


@pytest.mark.parametrize("chunk", CHUNK_SIZES)
@pytest.mark.parametrize("after", [
    b"", b" ", b"\r\n\t ",
])
def test_nothing_after_the_last_element_leaves_no_trailing_bytes(
        after: bytes, chunk: int | None) -> None:
    parser = XmlStreamParser(track_trailing=True)
    events = feed(parser, HEADER + STARTTLS + after, chunk)
    assert [type(e) for e in events] == [StreamOpened, StanzaReceived]
    assert parser.trailing_bytes == 0


@pytest.mark.parametrize("chunk", CHUNK_SIZES)
@pytest.mark.parametrize("after", [
    OPEN_TAG, HEADER, b"<", b"<auth", b"<a x='>'", b"<a x='>", b"x", b"<a>", b"<a><b/>",
    b"<![CDATA[", b"&amp;", b"</stream:stream",
])
def test_bytes_after_the_last_element_are_counted(after: bytes, chunk: int | None) -> None:
    parser = XmlStreamParser(track_trailing=True)
    events = feed(parser, HEADER + STARTTLS + after, chunk)
    assert stanzas(events)[0].tag == "{urn:ietf:params:xml:ns:xmpp-tls}starttls"
    violation = any(isinstance(e, StreamViolation) for e in events)
    assert violation or parser.trailing_bytes > 0


def test_trailing_bytes_reset_when_the_next_element_completes() -> None:
    parser = XmlStreamParser(track_trailing=True)
    parser.feed(HEADER + b"<presence")
    assert parser.trailing_bytes == len(b"<presence")
    parser.feed(b"/>")
    assert parser.trailing_bytes == 0


@pytest.mark.parametrize("data", [
    # Found by the fuzzer: lxml's Clark name of this tag cannot be parsed back.
    HEADER.replace(b"xmlns:stream='", b"xmlns:stream='}"),
    HEADER + b"<message xmlns='urn:a}b'/>",
    HEADER + b"<message xmlns:p='urn:a}b' p:x='1'/>",
], ids=["header", "element", "attribute"])
def test_a_brace_in_a_namespace_name_is_not_well_formed(data: bytes) -> None:
    assert only_violation(parse(data)).condition == "not-well-formed"
