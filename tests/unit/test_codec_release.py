"""The codec drops its lxml parser while a stream is idle (``XmlStreamParser.release``) and
primes a fresh one with the header's namespace context when bytes come: the events must be
exactly those of one parser that was never dropped, however the stream is cut, whatever
junk it carries, with every limit where it was.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from lxml import etree

from proxy.xmpp.codec import (
    StanzaReceived,
    StreamEvent,
    StreamOpened,
    StreamViolation,
    XmlStreamParser,
    detached,
)
from tests.unit.test_fuzz_codec import FAST, STREAMS, cut_points, stanzas

STREAM_NS = "http://etherx.jabber.org/streams"


@st.composite
def headers(draw: st.DrawFn) -> tuple[bytes, str, str]:
    """A stream header with its own choice of prefix for the stream namespace and,
    sometimes, more namespace declarations that stanzas may rely on."""
    prefix = draw(st.sampled_from(["stream", "s"]))
    extra = draw(st.sampled_from(["", " xmlns:x='urn:example:x'",
                                  " xmlns:db='jabber:server:dialback' xmlns:x='urn:example:x'"]))
    decl = draw(st.sampled_from(["", "<?xml version='1.0'?>"]))
    return (f"{decl}<{prefix}:stream xmlns='jabber:client' xmlns:{prefix}='{STREAM_NS}'"
            f"{extra} to='example.com' version='1.0' xml:lang='en'>").encode(), prefix, extra


@st.composite
def streams(draw: st.DrawFn) -> bytes:
    header, prefix, extra = draw(headers())
    prefixed = [b"<x:item xmlns:x='urn:example:x'/>"]
    if extra:  # stanzas relying on the header's own declarations
        prefixed = [b"<message><x:item a='1'/></message>", b"<iq type='get'><x:q/></iq>"]
    items = draw(st.lists(st.one_of(
        stanzas(), st.sampled_from([b" ", b"\n", b"\r\n\t"]), st.sampled_from(prefixed),
        st.just(f"<{prefix}:features><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/>"
                f"</{prefix}:features>".encode())), max_size=8))
    # at least one stanza that needs the header's context, somewhere
    items.insert(draw(st.integers(0, len(items))), draw(st.sampled_from(prefixed)))
    close = f"</{prefix}:stream>".encode() if draw(st.booleans()) else b""
    return header + b"".join(items) + close


JUNK = st.one_of(
    st.binary(min_size=1, max_size=12),
    st.sampled_from([b"junk", b"]]>", b"a>", b"\x01", b"\x0c", b"\xff", b"&", b"&amp;", b"<",
                     b"</x>", b"<a b='", b"<![CDATA[x]]>", b"<y/>", b"\xc3", b"<stream:stream>",
                     b"</stream:stream>", b"<!--", b"x<z/>"]))


def idle_cuts(data: bytes) -> st.SearchStrategy[list[int]]:
    """Cut points, many of them right after a ``>`` (where a stream may be idle)."""
    ends = [i + 1 for i, byte in enumerate(data) if byte == 0x3E]
    after_tags = st.lists(st.sampled_from(ends), max_size=12) if ends else st.just([])
    return st.tuples(after_tags, cut_points(len(data))).map(
        lambda both: sorted({*both[0], *both[1]}))


def described(events: list[StreamEvent]) -> list[object]:
    """Events as comparable values: a stanza by its serialization and namespace map."""
    out: list[object] = []
    for e in events:
        if isinstance(e, StanzaReceived):
            out.append(("stanza", etree.tostring(e.element), sorted(
                (k or "", v) for k, v in e.element.nsmap.items())))
        elif isinstance(e, StreamOpened):
            out.append(("opened", sorted(e.attrs.items()), e.default_ns))
        elif isinstance(e, StreamViolation):
            out.append(("violation", e.condition))
        else:
            out.append(type(e).__name__)
    return out


def both_ways(data: bytes, cuts: list[int], **kwargs: int) -> tuple[list[object], list[object],
                                                                    int]:
    """(events of one parser kept, events with the parser dropped whenever it may be,
    how many times it was dropped)."""
    kept, dropping = XmlStreamParser(**kwargs), XmlStreamParser(**kwargs)
    whole: list[StreamEvent] = []
    pieces: list[StreamEvent] = []
    released = 0
    start = 0
    for cut in [*cuts, len(data)]:
        chunk = data[start:cut]
        start = max(start, cut)
        whole += kept.feed(chunk)
        pieces += dropping.feed(chunk)
        if dropping.release():
            released += 1
            assert not dropping.holds_parser
    assert kept.closed == dropping.closed
    return described(whole), described(pieces), released


@STREAMS
@given(st.data())
def test_a_stream_with_its_parser_dropped_whenever_idle_gives_the_same_events(
        data: st.DataObject) -> None:
    stream = data.draw(streams())
    cuts = data.draw(idle_cuts(stream))
    whole, pieces, _ = both_ways(stream, cuts)
    assert pieces == whole
    assert not any(e[0] == "violation" for e in whole if isinstance(e, tuple)), whole


@STREAMS
@given(st.data())
def test_junk_gives_the_same_events_and_violations_with_the_parser_dropped(
        data: st.DataObject) -> None:
    stream = data.draw(streams())
    junk = data.draw(JUNK)
    at = data.draw(st.integers(0, len(stream)))
    spliced = stream[:at] + junk + stream[at:]
    cuts = data.draw(idle_cuts(spliced))
    whole, pieces, _ = both_ways(spliced, cuts)
    assert pieces == whole


@FAST
@given(st.binary(max_size=300), st.lists(st.integers(0, 400), max_size=10).map(sorted))
def test_arbitrary_bytes_after_a_header_give_the_same_events_with_the_parser_dropped(
        junk: bytes, cuts: list[int]) -> None:
    header = (b"<stream:stream xmlns='jabber:client' xmlns:stream='" + STREAM_NS.encode()
              + b"' version='1.0'><message/>")
    whole, pieces, _ = both_ways(header + junk, [len(header), *[len(header) + c for c in cuts]])
    assert pieces == whole


def test_the_parser_is_dropped_between_stanzas_and_the_next_stanza_relies_on_the_header(
        ) -> None:
    parser = XmlStreamParser()
    header = (b"<s:stream xmlns='jabber:client' xmlns:s='" + STREAM_NS.encode()
              + b"' xmlns:x='urn:example:x' version='1.0'>")
    assert isinstance(parser.feed(header)[0], StreamOpened)
    assert parser.release()
    assert not parser.holds_parser
    assert not parser.release()  # nothing left to drop
    (event,) = parser.feed(b"<message to='a@b'><x:item/></message>")
    assert isinstance(event, StanzaReceived)
    assert parser.holds_parser
    item = event.element[0]
    assert item.tag == "{urn:example:x}item"
    assert event.element.tag == "{jabber:client}message"
    assert parser.release()
    assert [type(e).__name__ for e in parser.feed(b" </s:stream>")] == ["StreamClosed"]


def test_the_parser_is_kept_while_anything_is_unfinished() -> None:
    header = (b"<stream:stream xmlns='jabber:client' xmlns:stream='" + STREAM_NS.encode()
              + b"' version='1.0'>")
    for unfinished in (b"<message><body>half", b"<message", b"<message/>text",
                       b"<message/>text>", b"<message/>&am", b"<message/><![CDATA[x",
                       b"<message/>\x0c", b"<message/><x a=']]>", b"<message/><x a='a>b",
                       b"<message/><x a='<y/>"):
        parser = XmlStreamParser()
        parser.feed(header + unfinished)
        assert not parser.release(), unfinished
        assert parser.holds_parser or parser.closed
    for finished in (b"<message a='>'/>", b"<message/> \r\n", b"<message>a>b</message>"):
        parser = XmlStreamParser()
        parser.feed(header + finished)
        assert parser.release(), finished
    before_tls = XmlStreamParser(track_trailing=True)
    before_tls.feed(header)
    assert not before_tls.release()  # the STARTTLS boundary needs its exact byte counts


def test_limits_hold_across_a_release() -> None:
    header = (b"<stream:stream xmlns='jabber:client' xmlns:stream='" + STREAM_NS.encode()
              + b"' version='1.0'>")
    parser = XmlStreamParser(max_stanza_bytes=100, max_depth=3)
    parser.feed(header)
    assert parser.release()
    assert parser.feed(b"<a><b><c/></b></a>")[0].__class__ is StanzaReceived
    assert parser.release()
    (deep,) = parser.feed(b"<a><b><c><d/></c></b></a>")
    assert isinstance(deep, StreamViolation) and deep.condition == "policy-violation"
    parser = XmlStreamParser(max_stanza_bytes=100)
    parser.feed(header)
    assert parser.release()
    (big,) = parser.feed(b"<message><body>" + b"x" * 200 + b"</body></message>")
    assert isinstance(big, StreamViolation) and big.condition == "policy-violation"


def test_reset_after_a_release_takes_a_new_header() -> None:
    parser = XmlStreamParser()
    parser.feed(b"<stream:stream xmlns='jabber:client' xmlns:stream='" + STREAM_NS.encode()
                + b"' version='1.0'><message/>")
    assert parser.release()
    parser.reset()
    events = parser.feed(b"<s:stream xmlns='jabber:client' xmlns:s='" + STREAM_NS.encode()
                         + b"' version='1.0'><presence/>")
    assert [type(e).__name__ for e in events] == ["StreamOpened", "StanzaReceived"]


def test_a_detached_copy_is_equal_and_keeps_no_stream_parser_alive() -> None:
    import gc

    def lxml_parsers() -> int:
        gc.collect()
        return sum(isinstance(o, etree.XMLPullParser) for o in gc.get_objects())

    def features(keep_detached: bool) -> object:
        parser = XmlStreamParser()
        parser.feed(b"<stream:stream xmlns='jabber:client' xmlns:stream='"
                    + STREAM_NS.encode() + b"' version='1.0'>")
        (event,) = parser.feed(b"<stream:features><sm xmlns='urn:xmpp:sm:3'/>"
                               b"</stream:features>")
        assert isinstance(event, StanzaReceived)
        assert parser.release()
        kept = detached(event.element) if keep_detached else event.element
        assert etree.tostring(kept) == etree.tostring(event.element)
        return kept

    before = lxml_parsers()
    original = features(keep_detached=False)
    assert lxml_parsers() == before + 1  # the stanza as parsed keeps its parser alive
    copy = features(keep_detached=True)
    assert lxml_parsers() == before + 1  # the detached copy keeps none
    assert original is not copy
