"""Property tests of the XML stream codec (hypothesis).

- However a valid stream is cut into chunks, the same stanzas come out, in order.
- Arbitrary bytes, alone or spliced into a valid stream, never raise out of the codec; the
  events are well ordered and end, if at all, in one StreamClosed or StreamViolation whose
  condition is an RFC 6120 stream error.

Kept to a few seconds here; ``python3 -m bench.fuzz`` runs the same checks much longer.
The checks are plain functions so the bench can reuse them with its own settings.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.xmpp.codec import (
    StanzaReceived,
    StreamClosed,
    StreamEvent,
    StreamOpened,
    StreamViolation,
    XmlStreamParser,
    serialize,
)

# RFC 6120 §4.9.3: every condition a StreamViolation may carry.
STREAM_CONDITIONS = frozenset((
    "bad-format", "bad-namespace-prefix", "conflict", "connection-timeout", "host-gone",
    "host-unknown", "improper-addressing", "internal-server-error", "invalid-from",
    "invalid-namespace", "invalid-xml", "not-authorized", "not-well-formed",
    "policy-violation", "remote-connection-failed", "reset", "resource-constraint",
    "restricted-xml", "see-other-host", "system-shutdown", "undefined-condition",
    "unsupported-encoding", "unsupported-feature", "unsupported-stanza-type",
    "unsupported-version",
))

HEADER = (b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
          b"xmlns:stream='http://etherx.jabber.org/streams' to='example.com' version='1.0'>")
CLOSE = b"</stream:stream>"

FAST = settings(max_examples=100, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
# Building valid streams is the slow part: fewer of those.
STREAMS = settings(FAST, max_examples=40)

# ---------------------------------------------------------------- strategies

_text = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\ufffe\uffff",
                  min_codepoint=0x20) | st.sampled_from("\t\n\r"),
    max_size=30)


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _attr(text: str) -> str:
    return _escape(text).replace("'", "&apos;").replace('"', "&quot;")


_names = st.sampled_from(["body", "x", "item", "query", "a-b", "c.d", "_e"])


@st.composite
def elements(draw: st.DrawFn, depth: int = 0) -> str:
    name = draw(_names)
    attrs = draw(st.dictionaries(st.sampled_from(["id", "type", "to", "v"]), _text,
                                 max_size=3))
    rendered = "".join(f" {k}='{_attr(v)}'" for k, v in attrs.items())
    if depth >= 4 or draw(st.booleans()):
        return f"<{name}{rendered}/>"
    parts = draw(st.lists(
        st.one_of(_text.map(_escape),
                  _text.filter(lambda t: "]]>" not in t).map(lambda t: f"<![CDATA[{t}]]>"),
                  elements(depth + 1)), max_size=4))
    return f"<{name}{rendered}>{''.join(parts)}</{name}>"


@st.composite
def stanzas(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["message", "presence", "iq"]))
    body = draw(st.lists(elements(), max_size=3))
    ns_child = draw(st.booleans())
    extra = "<q xmlns='urn:example:q'><r/></q>" if ns_child else ""
    return f"<{kind} id='{_attr(draw(_text))}'>{''.join(body)}{extra}</{kind}>".encode()


@st.composite
def valid_streams(draw: st.DrawFn) -> bytes:
    items = draw(st.lists(st.one_of(stanzas(), st.sampled_from([b" ", b"\n", b"\r\n\t"])),
                          max_size=8))
    return HEADER + b"".join(items) + (CLOSE if draw(st.booleans()) else b"")


def cut_points(data_size: int) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(0, data_size), max_size=20).map(sorted)


# ---------------------------------------------------------------- checks

def feed_in_pieces(parser: XmlStreamParser, data: bytes, cuts: list[int]) -> list[StreamEvent]:
    events: list[StreamEvent] = []
    start = 0
    for cut in [*cuts, len(data)]:
        events += parser.feed(data[start:cut])
        start = max(start, cut)
    return events


def check_well_ordered(events: list[StreamEvent], parser: XmlStreamParser) -> None:
    """Header first, then stanzas, then at most one end (close or violation), last."""
    ends = [e for e in events if isinstance(e, StreamClosed | StreamViolation)]
    assert len(ends) <= 1, events
    if ends:
        assert events[-1] is ends[0]
        assert parser.closed
        assert parser.feed(b"<message/>") == []
    opened = [i for i, e in enumerate(events) if isinstance(e, StreamOpened)]
    assert opened in ([], [0]), events
    if any(isinstance(e, StanzaReceived) for e in events):
        assert opened == [0]
    for e in events:
        if isinstance(e, StreamViolation):
            assert e.condition in STREAM_CONDITIONS, e
            assert isinstance(e.text, str) and e.text


def check_chunking_is_invisible(data: bytes, cuts: list[int], track: bool = False) -> int:
    """Returns the number of stanzas, for the bench's figures."""
    whole = XmlStreamParser().feed(data)
    parser = XmlStreamParser(track_trailing=track)
    pieces = feed_in_pieces(parser, data, cuts)
    assert [type(e) for e in pieces] == [type(e) for e in whole]
    assert not any(isinstance(e, StreamViolation) for e in whole), whole
    out = [serialize(e.element) for e in whole if isinstance(e, StanzaReceived)]
    assert out == [serialize(e.element) for e in pieces if isinstance(e, StanzaReceived)]
    return len(out)


def check_arbitrary_bytes(data: bytes, cuts: list[int]) -> list[StreamEvent]:
    parser = XmlStreamParser(max_stanza_bytes=4096)
    events = feed_in_pieces(parser, data, cuts)
    check_well_ordered(events, parser)
    return events


def check_spliced(stream: bytes, at: int, junk: bytes, cuts: list[int]) -> list[StreamEvent]:
    at = min(at, len(stream))
    data = stream[:at] + junk + stream[at:]
    parser = XmlStreamParser()
    events = feed_in_pieces(parser, data, cuts)
    check_well_ordered(events, parser)
    return events


# ---------------------------------------------------------------- the tests

@STREAMS
@given(st.data())
def test_any_chunking_of_a_valid_stream_gives_the_same_stanzas(data: st.DataObject) -> None:
    stream = data.draw(valid_streams())
    cuts = data.draw(cut_points(len(stream)))
    check_chunking_is_invisible(stream, cuts, track=data.draw(st.booleans()))


@FAST
@given(st.binary(max_size=400), st.lists(st.integers(0, 400), max_size=10).map(sorted))
def test_arbitrary_bytes_never_raise(data: bytes, cuts: list[int]) -> None:
    check_arbitrary_bytes(data, cuts)


@FAST
@given(st.binary(max_size=300), st.lists(st.integers(0, 500), max_size=10).map(sorted))
def test_arbitrary_bytes_after_a_header_never_raise(data: bytes, cuts: list[int]) -> None:
    check_arbitrary_bytes(HEADER + data, cuts)


@STREAMS
@given(st.data())
def test_junk_spliced_into_a_valid_stream_never_raises(data: st.DataObject) -> None:
    stream = data.draw(valid_streams())
    junk = data.draw(st.one_of(
        st.binary(min_size=1, max_size=20),
        st.sampled_from([b"<!--", b"<?pi?>", b"&ent;", b"&", b"<", b"]]>", b"\xff", b"\x00",
                         b"<stream:stream>", b"</x>", b"<a b='", b"\xef\xbb\xbf",
                         b"<![CDATA[", b"&#0;", b"&#x110000;"])))
    at = data.draw(st.integers(0, len(stream)))
    cuts = data.draw(cut_points(len(stream) + len(junk)))
    check_spliced(stream, at, junk, cuts)
