"""The XML stream codec, socket-free: bytes in, events out; elements in, bytes out.

Parsing is incremental (lxml's pull parser). Each top-level child of ``<stream:stream>`` is
handed out as one detached element with only the namespace declarations it needs, and the
parser's copy is released at once, so memory stays bounded by the largest stanza.

RFC 6120 §11 restricts the XML allowed on a stream. Before lxml sees a byte, a small scanner
rejects comments, processing instructions, DTDs and entity references beyond the five
predefined ones: lxml would otherwise stall silently on an undefined entity, and nothing must
ever be expanded. The same scanner refuses any encoding but UTF-8 (§11.6): a byte order mark
of UTF-16 or UTF-32, UTF-16 bytes, or a declaration naming another encoding. lxml is told the
input is UTF-8 whatever it says, so it can never switch to an encoding the scanner cannot read.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from xml.sax.saxutils import quoteattr

from lxml import etree

from . import ns
from .stanza import Element


DEFAULT_MAX_STANZA_BYTES = 256 * 1024
# Element nesting allowed inside a stanza (the stanza itself is depth 1). Real stanzas stay
# far below it; libxml2 refuses 256 levels on its own (counting the stream element), with a
# not-well-formed error that names a parser option, so the limit must stay under that.
DEFAULT_MAX_DEPTH = 128
MAX_DEPTH_LIMIT = 250
# Input is fed to lxml in slices, so the stanza size limit is enforced within this margin.
_SLICE_BYTES = 8192

_PREDEFINED_ENTITIES = frozenset((b"lt", b"gt", b"amp", b"quot", b"apos"))
# What the restricted-XML scanner must look at: markup declarations, PIs and references.
_UNKNOWN = -2  # the scanner's "not looked up yet" (bytes.find's -1 is "none left")
_CDATA_OPEN = b"<![CDATA["
_LONGEST_REFERENCE = 12  # "&#x10FFFF;" and the predefined names fit; anything longer is bad
_REFERENCE_NAME = re.compile(rb"#[0-9]+|#x[0-9A-Fa-f]+|[A-Za-z_:][-\w.:]*")
_XML_DECL = re.compile(rb"<\?xml\s")
_MAX_XML_DECL = 1024
_DECL_ENCODING = re.compile(rb"""\sencoding\s*=\s*(?:'([^']*)'|"([^"]*)")""")
_UTF8_BOM = b"\xef\xbb\xbf"
# libxml2's code for bytes that are not valid in the input's encoding (UTF-8 here).
_ERR_INVALID_ENCODING = 81
_STREAM_TAG = ns.qname(ns.STREAM, "stream")


@dataclass(frozen=True, slots=True)
class StreamOpened:
    """A ``<stream:stream>`` header arrived (at the start or after a restart)."""

    attrs: dict[str, str]
    default_ns: str | None


@dataclass(slots=True)  # not frozen: one per stanza, and a frozen __init__ costs twice
class StanzaReceived:
    """A complete top-level element: a stanza, or a nonza such as ``<starttls/>``."""

    element: Element


@dataclass(frozen=True, slots=True)
class StreamClosed:
    """The peer sent ``</stream:stream>``."""


@dataclass(frozen=True, slots=True)
class StreamViolation:
    """The peer broke the stream: answer with this stream error, then close.

    ``condition`` is an RFC 6120 §4.9.3 stream error condition.
    """

    condition: str
    text: str


StreamEvent = StreamOpened | StanzaReceived | StreamClosed | StreamViolation


class _RestrictedXmlScanner:
    """Finds what RFC 6120 §11.1 forbids in raw bytes, across chunk boundaries."""

    __slots__ = ("_in_cdata", "_in_prolog", "_pending", "_sniffed")

    def __init__(self) -> None:
        self._pending = b""  # an incomplete token carried over from the last chunk
        self._in_cdata = False
        self._in_prolog = True  # only an XML declaration may look like a PI, and only first
        self._sniffed = False  # the first bytes were checked for a non-UTF-8 encoding

    @property
    def idle(self) -> bool:
        """No partial token or CDATA section carried over."""
        return not self._pending and not self._in_cdata

    def scan(self, data: bytes) -> tuple[StreamViolation, int] | None:
        """None if ``data`` is clean so far; else the violation and how many bytes of
        ``data`` come before it (those may still be parsed)."""
        carried = len(self._pending)
        buf = self._pending + data if carried else data
        self._pending = b""

        def bad(condition: str, text: str, at: int) -> tuple[StreamViolation, int]:
            return StreamViolation(condition, text), max(0, at - carried)

        i, end = 0, len(buf)
        if not self._sniffed:
            # RFC 6120 §11.6: UTF-8 only. No UTF-8 document starts with 0xFE, 0xFF or NUL,
            # and a NUL second byte is UTF-16 (or UTF-32) without a byte order mark.
            if buf[:1] in (b"\x00", b"\xfe", b"\xff") or (end >= 2 and buf[1] == 0):
                return bad("unsupported-encoding", "only UTF-8 streams are supported", 0)
            if end < 2 or (end < len(_UTF8_BOM) and _UTF8_BOM.startswith(buf)):
                self._pending = buf  # too little to tell, or a UTF-8 BOM cut short
                return None
            self._sniffed = True
        if self._in_prolog:
            # A UTF-8 byte order mark is redundant but harmless: lxml skips it too.
            start = len(_UTF8_BOM) if buf.startswith(_UTF8_BOM) else 0
            stripped = buf[start:].lstrip()
            if not stripped:
                if start:
                    self._pending = buf
                return None
            if len(stripped) < 6 and b"<?xml ".startswith(stripped[:5]):
                self._pending = buf
                return None
            if _XML_DECL.match(stripped):
                close = buf.find(b"?>")
                if close < 0:
                    if len(buf) > _MAX_XML_DECL:
                        return bad("not-well-formed", "an overlong XML declaration", 0)
                    self._pending = buf
                    return None
                declared = _DECL_ENCODING.search(buf, 0, close)
                if declared is not None:
                    name = declared.group(1) or declared.group(2) or b""
                    if name.lower() != b"utf-8":
                        return bad("unsupported-encoding",
                                   "only UTF-8 streams are supported, not "
                                   + name[:40].decode("ascii", "replace"), 0)
                i = close + 2
            self._in_prolog = False
        # Where the next "&", "<!" and "<?" are (-1: none left): bytes.find runs at memchr
        # speed, where a regular expression stopped at every "<"; each is looked up again
        # only once the scan has passed it.
        amp = bang = query = _UNKNOWN
        while i < end:
            if self._in_cdata:
                close = buf.find(b"]]>", i)
                if close < 0:
                    self._pending = buf[max(i, end - 2):]
                    return None
                i, self._in_cdata = close + 3, False
                continue
            if amp < i and amp != -1:  # passed, or not looked up yet
                amp = buf.find(b"&", i)
            if bang < i and bang != -1:  # passed, or not looked up yet
                bang = buf.find(b"<!", i)
            if query < i and query != -1:  # passed, or not looked up yet
                query = buf.find(b"<?", i)
            k = end
            for at in (amp, bang, query):
                if 0 <= at < k:
                    k = at
            if k == end:
                if buf[end - 1] == 0x3C:  # a "<" at the very end: maybe "<!" cut short
                    self._pending = buf[end - 1:]
                return None
            if buf[k] == 0x3C:  # "<"
                head = buf[k:k + len(_CDATA_OPEN)]
                if head == _CDATA_OPEN:
                    i, self._in_cdata = k + len(_CDATA_OPEN), True
                    continue
                if _CDATA_OPEN.startswith(head):  # cut short by the end of the chunk
                    self._pending = buf[k:]
                    return None
                if head.startswith(b"<?"):
                    return bad("restricted-xml", "processing instructions are not allowed", k)
                return bad("restricted-xml", "comments, DTDs and declarations are not allowed",
                           k)
            semi = buf.find(b";", k + 1, k + _LONGEST_REFERENCE)
            if semi < 0:
                if end - k < _LONGEST_REFERENCE:
                    self._pending = buf[k:]
                    return None
                return bad("not-well-formed", "a bare '&' or an overlong reference", k)
            name = buf[k + 1:semi]
            if not _REFERENCE_NAME.fullmatch(name):
                return bad("not-well-formed", "a bare '&'", k)
            if name not in _PREDEFINED_ENTITIES and name[0] != 0x23:  # "#"
                return bad("restricted-xml",
                           "entity references other than the five predefined ones are not "
                           "allowed", k)
            i = semi + 1
        return None


class XmlStreamParser:
    """One direction of an XML stream, as events. Call :meth:`reset` on a stream restart.

    ``expected_ns`` is the content namespace the header must declare as default.
    ``max_depth`` bounds element nesting inside a stanza (the stanza itself is depth 1).
    With ``track_trailing`` the parser knows exactly how many bytes came after the last
    complete top-level element (:attr:`trailing_bytes`); that costs a feed per ``>``, so it
    is meant for the few bytes before STARTTLS, where anything after ``<starttls/>`` or
    ``<proceed/>`` must be refused (RFC 6120 §5.4.3.3).
    After a :class:`StreamViolation` or :class:`StreamClosed` the parser takes no more input.
    """

    def __init__(self, *, max_stanza_bytes: int = DEFAULT_MAX_STANZA_BYTES,
                 expected_ns: str = ns.CLIENT, max_depth: int = DEFAULT_MAX_DEPTH,
                 track_trailing: bool = False) -> None:
        if not 1 <= max_depth <= MAX_DEPTH_LIMIT:
            raise ValueError(f"max_depth must be between 1 and {MAX_DEPTH_LIMIT}")
        self.max_stanza_bytes = max_stanza_bytes
        self.expected_ns = expected_ns
        self.max_depth = max_depth
        self.track_trailing = track_trailing
        self._slice = max(1, min(_SLICE_BYTES, max_stanza_bytes))
        # Made when bytes come (_prime), dropped while the stream is idle (release).
        self._parser: etree.XMLPullParser | None = None
        self.reset()

    def reset(self) -> None:
        if self._parser is not None:
            _finish(self._parser, self._context)
        self._parser = None
        # The header's start tag with only its namespace declarations: what a fresh parser
        # is fed first when the stream's own was released, so it parses in the same context.
        self._context: bytes | None = None
        self._between = False  # nothing fed since the last complete tag but whitespace
        self._scanner = _RestrictedXmlScanner()
        self._root: Element | None = None
        self._depth = 0
        # Bytes fed since the last top-level element ended: bounds a stanza, its start tag
        # and the stream header alike.
        self._unfinished_bytes = 0
        self._tag_closed = True  # the last non-blank byte fed was ">"
        self._boundaries = 0  # top-level elements completed (and headers opened)
        self._trailing = 0  # non-blank bytes fed after the last boundary (track_trailing)
        self._done = False

    @property
    def closed(self) -> bool:
        return self._done

    @property
    def trailing_bytes(self) -> int:
        """Non-whitespace bytes fed after the last complete top-level element or header.
        Exact only with ``track_trailing``."""
        return self._trailing

    @property
    def holds_parser(self) -> bool:
        """An lxml parser is held (False once :meth:`release` dropped it)."""
        return self._parser is not None

    def feed(self, data: bytes) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        if self._done:
            return events
        # The piece ending at the last ">" goes to lxml on its own: if a top-level element
        # (or the header) ends in it, it ended at that ">" and lxml holds nothing unparsed
        # but the whitespace after it (what release needs to know).
        last = _last_tag_piece(data)
        if last is not None and len(data) - last > self._slice:
            last = None
        end = len(data) if last is None else last
        step = self._slice
        for offset in range(0, end, step):
            if not self._feed_slice(data[offset:min(offset + step, end)], events):
                return events
        if last is None:
            if data.strip(_XML_SPACE):  # only whitespace changes nothing
                self._between = False
            return events
        before = self._boundaries
        if self._feed_slice(data[last:], events):
            self._between = self._boundaries != before and self._depth == 1
        return events

    def release(self) -> bool:
        """Drop the lxml parser while the stream is between stanzas: an idle stream then
        holds none (its libxml2 context is about 11 KiB). Only when lxml holds nothing
        unparsed: the last bytes fed ended a top-level element (or the header), with nothing
        but whitespace after it (lxml keeps a partial tag or character data until it can
        parse it), and the scanner carries no partial token. The next bytes get a fresh
        parser primed with the header's namespace declarations (:meth:`_prime`), so the
        events are the same. True if dropped."""
        if (self._parser is None or self._done or self._context is None
                or self._depth != 1 or not self._between or self.track_trailing
                or not self._scanner.idle):
            return False
        _finish(self._parser, self._context)
        self._parser = None
        self._root = None
        return True

    def _prime(self) -> etree.XMLPullParser:
        """A parser for the next bytes: a new one, or after a release one already inside
        a stream element with the same namespace declarations (its events are discarded:
        the peer's header was reported when it came)."""
        # encoding="utf-8" overrides whatever the document declares (RFC 6120 §11.6).
        parser = etree.XMLPullParser(
            events=("start", "end"), resolve_entities=False, no_network=True,
            load_dtd=False, huge_tree=False, remove_comments=False, encoding="utf-8")
        if self._context is not None:
            parser.feed(self._context)
            for _action, root in parser.read_events():
                self._root = root
        self._parser = parser
        return parser

    def _fail(self, events: list[StreamEvent], condition: str, text: str) -> bool:
        if not self._done:
            events.append(StreamViolation(condition, text))
            self._done = True
        return False

    def _feed_slice(self, data: bytes, events: list[StreamEvent]) -> bool:
        found = self._scanner.scan(data)
        if found is not None:
            violation, clean = found
            # What came before the bad markup is still delivered, as if fed separately.
            if clean and not self._parse_slice(data[:clean], events):
                return False
            return self._fail(events, violation.condition, violation.text)
        return self._parse_slice(data, events)

    def _parse_slice(self, data: bytes, events: list[StreamEvent]) -> bool:
        if not self.track_trailing:
            return self._parse(data, events)
        # lxml reports an element's end as soon as it has the end tag's ">": fed in pieces
        # that each end at a ">", a piece that completes an element has nothing after it.
        start = 0
        while start < len(data):
            stop = data.find(b">", start)
            stop = len(data) if stop < 0 else stop + 1
            piece = data[start:stop]
            start = stop
            before = self._boundaries
            if not self._parse(piece, events):
                return False
            if self._boundaries != before:
                self._trailing = 0
            else:
                self._trailing += len(piece.strip())
        return True

    def _parse(self, data: bytes, events: list[StreamEvent]) -> bool:
        last = data[-1:]
        if last == b">":
            self._tag_closed = True
        else:
            blank = data.rstrip() if last.isspace() else data
            if blank:
                self._tag_closed = blank[-1] == 0x3E  # ">"
            elif self._depth == 1 and self._tag_closed:
                return True  # whitespace keepalive between stanzas: nothing to parse or count
        self._unfinished_bytes += len(data)
        try:
            (self._parser or self._prime()).feed(data)
        except etree.XMLSyntaxError as exc:
            # Events lxml produced before the error still count (a stanza, a clean close).
            if not self._drain(events):
                return False
            if exc.code == _ERR_INVALID_ENCODING:
                # RFC 6120 §4.9.3.22: bytes that break the rules of UTF-8.
                return self._fail(events, "unsupported-encoding", "invalid UTF-8")
            return self._fail(events, "not-well-formed", exc.msg or "malformed XML")
        if not self._drain(events):
            return False
        if self._unfinished_bytes > self.max_stanza_bytes and not (
                self._depth == 1 and self._tag_closed):
            return self._fail(events, "policy-violation",
                              f"stanza larger than {self.max_stanza_bytes} bytes")
        return True

    def _drain(self, events: list[StreamEvent]) -> bool:
        # The hot loop of the proxy: one pass per element, so locals and no calls where
        # the common case allows.
        depth = self._depth
        root = self._root
        deepest = self.max_depth + 1  # the stream element is depth 1
        assert self._parser is not None  # fed just before
        finished = 0  # top-level elements completed in this pass
        for action, el in self._parser.read_events():
            if action == "start":
                depth += 1
                tag = el.tag
                # lxml accepts undeclared prefixes (as "a:b" names): namespace
                # well-formedness is checked here, on element and attribute names.
                # A "}" in a namespace name (never valid in a URI) makes lxml's Clark
                # notation ambiguous, and lxml itself raises on such names later.
                keys = el.keys()  # cheaper than el.attrib, which builds a proxy object
                if (tag.count("}") > 1 if tag[0] == "{" else ":" in tag) or (
                        keys and _suspect_names(keys)):
                    self._depth = depth
                    return self._fail(events, "not-well-formed",
                                      "undeclared namespace prefix or invalid namespace name")
                if depth > 2:
                    if depth > deepest:
                        self._depth = depth
                        return self._fail(events, "policy-violation",
                                          f"elements nested deeper than {self.max_depth}")
                elif depth == 1:
                    self._depth = depth
                    self._unfinished_bytes = 0
                    self._boundaries += 1
                    if not self._on_stream_open(el, events):
                        return False
                    root = self._root
                elif tag == _STREAM_TAG:
                    # A header where a stanza belongs: only a restart (after TLS or SASL,
                    # with a fresh parser) may open a stream. As an element it is a
                    # first-level child no server supports (RFC 6120 §4.9.3.24).
                    self._depth = depth
                    return self._fail(events, "unsupported-stanza-type",
                                      "a stream header inside the stream (no restart "
                                      "is due here)")
                continue
            depth -= 1
            if depth == 1:
                # The copy carries only the namespace declarations it uses, so it
                # serializes on its own as it came (no xmlns:stream, no ns0: prefix, which
                # is what lxml makes of a default namespace when an element is detached).
                stanza = el.__deepcopy__(None)
                stanza.tail = None
                events.append(StanzaReceived(stanza))
                finished += 1
                self._unfinished_bytes = 0
                self._boundaries += 1
            elif depth == 0:
                self._depth = depth
                events.append(StreamClosed())
                self._done = True
                return False
        self._depth = depth
        if finished:
            # The parser's copies go once the events are consumed: with no Python object
            # left on them, lxml frees them outright instead of moving each one to a
            # document of its own (a walk of its tree) as removing it one by one would.
            el = None
            assert root is not None
            del root[:finished]
            root.text = None  # whitespace keepalives between stanzas
        return True

    def _on_stream_open(self, el: Element, events: list[StreamEvent]) -> bool:
        docinfo = el.getroottree().docinfo
        if docinfo.doctype or docinfo.internalDTD is not None:
            return self._fail(events, "restricted-xml", "DTDs are not allowed")
        if el.tag != _STREAM_TAG:
            if el.tag.rpartition("}")[2] == "stream":
                return self._fail(events, "invalid-namespace",
                                  "the stream element must be in " + ns.STREAM)
            return self._fail(events, "not-well-formed", "expected <stream:stream>")
        default_ns = el.nsmap.get(None)
        if default_ns != self.expected_ns:
            return self._fail(events, "invalid-namespace",
                              f"the default namespace must be {self.expected_ns}")
        if not _is_xmpp_1(el.get("version")):
            return self._fail(events, "unsupported-version", "only XMPP 1.0 streams")
        self._root = el
        self._context = _context_tag(el)
        events.append(StreamOpened(dict(el.attrib), default_ns))
        return True


def _finish(parser: etree.XMLPullParser, context: bytes | None) -> None:
    """End a parser's document before it is dropped. Elements handed out may keep it alive
    (lxml gives a copy's document a reference to the parser of the original), and a parser
    whose document ended frees most of its libxml2 state (13 KiB down to 3)."""
    with contextlib.suppress(etree.XMLSyntaxError):
        if context is not None:  # "<p:stream ...>": its end tag
            parser.feed(b"</" + context[1:context.index(b" ")] + b">")
        parser.close()
    for _event in parser.read_events():  # the last events hold the stream's document
        pass


def _context_tag(stream: Element) -> bytes:
    """The stream element's start tag with its namespace declarations and nothing else."""
    declared = " ".join(("xmlns" if prefix is None else f"xmlns:{prefix}") + "=" + quoteattr(uri)
                        for prefix, uri in stream.nsmap.items())
    return f"<{stream.prefix}:stream {declared}>".encode()


_XML_SPACE = b" \t\r\n"


def _last_tag_piece(data: bytes) -> int | None:
    """Where the piece of ``data`` ending at its last ``>`` starts (just after the ``>``
    before it), when nothing but XML whitespace follows that last ``>``; else None."""
    end = len(data)
    while end and data[end - 1] in _XML_SPACE:
        end -= 1
    if not end or data[end - 1] != 0x3E:  # ">"
        return None
    return data.rfind(b">", 0, end - 1) + 1


def _suspect_names(keys: list[str]) -> bool:
    """An attribute name with an undeclared prefix or an ambiguous namespace. Most stanzas
    have only plain names (to, from, id, type): one join and two finds settle those."""
    joined = "".join(keys)
    if ":" not in joined and "}" not in joined:
        return False
    return any((key[0] != "{" and ":" in key) or key.count("}") > 1 for key in keys)


def _is_xmpp_1(version: str | None) -> bool:
    """RFC 6120 §4.7.5: major version 1; leading zeros are ignored; no version is 0.9."""
    try:
        return version is not None and int(version.split(".")[0]) == 1
    except ValueError:
        return False


def detached(el: Element) -> Element:
    """A copy of ``el`` for keeping long: a stanza the parser handed out keeps that stream
    parser alive (lxml gives a copy's document a reference to the parser of the original),
    about 3 KiB once the parser is released; this copy is parsed afresh and keeps none."""
    return etree.fromstring(etree.tostring(el))


_STREAM_PREFIX_DECL = ' xmlns:stream="' + ns.STREAM + '"'
_STREAM_TAG_PREFIX = "{" + ns.STREAM + "}"
# How lxml starts a stanza in a stream's default namespace (``<message
# xmlns="jabber:client"``), and the declaration to cut from it: made once for the tags that
# make up nearly all traffic; others are worked out per call (nothing is cached at run time).
_STANZA_NAMES = ("message", "presence", "iq")


def _redundant_start(tag: str, default_ns: str) -> tuple[str, str] | None:
    if not tag.startswith("{" + default_ns + "}"):
        return None
    declaration = ' xmlns="' + default_ns + '"'
    return "<" + tag[len(default_ns) + 2:] + declaration, declaration


_REDUNDANT: dict[str, dict[str, tuple[str, str]]] = {
    space: {ns.qname(space, name): start for name in _STANZA_NAMES
            if (start := _redundant_start(ns.qname(space, name), space)) is not None}
    for space in (ns.CLIENT,)}
_tostring = etree.tostring


def document(el: Element) -> bytes:
    """``el`` as a document of its own (every namespace it uses declared), in UTF-8: what
    the journal and the store keep. ``serialize(el, document=...)`` derives the wire form
    from it, so a stanza that is both journaled and sent is serialized once."""
    # lxml's text output encoded here is the same UTF-8 as its bytes output (non-ASCII
    # stays text, not &#NNN; references), and cheaper: lxml's own encoder is slower.
    return _tostring(el, encoding="unicode").encode()


def serialize(el: Element, default_ns: str = ns.CLIENT, *,
              document: bytes | None = None) -> bytes:
    """One element as it goes on a stream whose default namespace is ``default_ns``.

    Declarations the stream header already made are left out: a stanza's own
    ``xmlns="jabber:client"`` and, on ``stream:``-prefixed elements, ``xmlns:stream``.
    ``document``: ``el`` as :func:`document` made it, unchanged since (it is not
    serialized again).
    """
    text: str = (_tostring(el, encoding="unicode") if document is None
                 else document.decode())
    tag = el.tag
    if not isinstance(tag, str):
        return document if document is not None else text.encode()
    by_tag = _REDUNDANT.get(default_ns)
    redundant = by_tag.get(tag) if by_tag is not None else None
    if redundant is None:
        redundant = _redundant_start(tag, default_ns)
    if redundant is not None:
        start, declaration = redundant
        if text.startswith(start):
            # The first occurrence is the one in the start tag, right after the name.
            return text.replace(declaration, "", 1).encode()
    elif tag.startswith(_STREAM_TAG_PREFIX):
        end_of_tag = text.find(">")
        at = text.find(_STREAM_PREFIX_DECL, 0, end_of_tag)
        if at >= 0:
            return (text[:at] + text[at + len(_STREAM_PREFIX_DECL):]).encode()
    return document if document is not None else text.encode()


def stream_header(*, to: str | None = None, from_: str | None = None,
                  stream_id: str | None = None, lang: str = "en",
                  default_ns: str = ns.CLIENT) -> bytes:
    attrs = [("xmlns", default_ns), ("xmlns:stream", ns.STREAM), ("version", "1.0"),
             ("xml:lang", lang)]
    for name, value in (("to", to), ("from", from_), ("id", stream_id)):
        if value is not None:
            attrs.append((name, value))
    rendered = " ".join(f"{name}={quoteattr(value)}" for name, value in attrs)
    return f"<?xml version='1.0'?><stream:stream {rendered}>".encode()


STREAM_CLOSE = b"</stream:stream>"


def stream_error_element(condition: str, text: str | None = None, *,
                         app_condition: Element | None = None) -> Element:
    """A ``<stream:error/>`` (RFC 6120 §4.9)."""
    err = etree.Element(ns.qname(ns.STREAM, "error"), nsmap={"stream": ns.STREAM})
    etree.SubElement(err, ns.qname(ns.STREAMS_ERRORS, condition), nsmap={None: ns.STREAMS_ERRORS})
    if text:
        t = etree.SubElement(err, ns.qname(ns.STREAMS_ERRORS, "text"),
                             nsmap={None: ns.STREAMS_ERRORS})
        t.set("{http://www.w3.org/XML/1998/namespace}lang", "en")
        t.text = text
    if app_condition is not None:
        err.append(app_condition)
    return err


def stream_error(condition: str, text: str | None = None, *,
                 app_condition: Element | None = None) -> bytes:
    """A ``<stream:error/>`` ready to write."""
    return serialize(stream_error_element(condition, text, app_condition=app_condition))
