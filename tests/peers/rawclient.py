"""A raw-XML scripted XMPP client for wire cases no library will send.

Self-contained on purpose: it must not import the `proxy` package (the thing under test).
One lxml XMLPullParser per XML stream (a new one after STARTTLS and after SASL success);
top-level children of <stream:stream> come out one by one as standalone lxml elements.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import copy
import itertools
import ssl
from typing import TypeAlias
from xml.sax.saxutils import escape, quoteattr

from lxml import etree

NS_STREAM = "http://etherx.jabber.org/streams"
NS_CLIENT = "jabber:client"
NS_TLS = "urn:ietf:params:xml:ns:xmpp-tls"
NS_SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
NS_BIND = "urn:ietf:params:xml:ns:xmpp-bind"
NS_SESSION = "urn:ietf:params:xml:ns:xmpp-session"
NS_STREAM_ERRORS = "urn:ietf:params:xml:ns:xmpp-streams"
NS_STANZA_ERRORS = "urn:ietf:params:xml:ns:xmpp-stanzas"
NS_ROSTER = "jabber:iq:roster"
NS_ROSTERVER = "urn:xmpp:features:rosterver"
NS_REGISTER = "jabber:iq:register"
NS_SM = "urn:xmpp:sm:3"
NS_CSI = "urn:xmpp:csi:0"

Element: TypeAlias = etree._Element


def q(ns: str, name: str) -> str:
    """Clark notation, as lxml spells tags: {ns}name."""
    return f"{{{ns}}}{name}"


def tostring(element: Element) -> str:
    return etree.tostring(element, encoding="unicode")


def feature_namespaces(features: Element) -> set[str]:
    """Namespaces of the children of a <stream:features/> element."""
    return {etree.QName(child).namespace or "" for child in features}


def stream_error_condition(element: Element) -> str | None:
    """The condition of a <stream:error/>, or None if `element` is not one."""
    if element.tag != q(NS_STREAM, "error"):
        return None
    for child in element:
        qname = etree.QName(child)
        if qname.namespace == NS_STREAM_ERRORS and qname.localname != "text":
            return qname.localname
    return ""


class RawProtocolError(RuntimeError):
    """The peer sent something the script did not expect (or malformed XML)."""


class RawAuthError(RawProtocolError):
    def __init__(self, condition: str, element: Element) -> None:
        super().__init__(f"SASL failure: {condition}: {tostring(element)}")
        self.condition = condition
        self.element = element


class StreamClosed(RawProtocolError):
    """The peer closed the stream (</stream:stream>) or the connection."""


def unverified_context() -> ssl.SSLContext:
    """TLS client context that accepts the self-signed test certificates."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class RawClient:
    """A byte-level XMPP client; build it with `await RawClient.connect(...)`."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        host: str,
        port: int,
        tls: bool,
        server_hostname: str,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.host = host
        self.port = port
        self.tls = tls
        self.server_hostname = server_hostname
        self.stream_attrs: dict[str, str] = {}  # attributes of the peer's current header
        self.features: Element | None = None  # last <stream:features/> seen
        self.authenticated = False
        self.jid: str | None = None
        self.stream_closed = False  # peer sent </stream:stream>
        self.eof = False  # TCP connection ended (FIN, RST or TLS error)
        self.closed_by_reset = False
        self.close_reason: str | None = None  # how the connection ended, for messages
        self.seen_before_close: list[Element] = []  # elements expect_closed() skipped
        self._pending: collections.deque[Element] = collections.deque()
        self._parser: etree.XMLPullParser | None = None
        self._root: Element | None = None
        self._depth = 0
        self._ids = itertools.count(1)

    # -- connection ----------------------------------------------------------------------

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        direct_tls: bool,
        server_hostname: str = "localhost",
        timeout: float = 10.0,
    ) -> RawClient:
        """Open TCP (and TLS at once if `direct_tls`) to host:port."""
        ssl_ctx = unverified_context() if direct_tls else None
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                host, port, ssl=ssl_ctx,
                server_hostname=server_hostname if direct_tls else None,
            ),
            timeout,
        )
        return cls(reader, writer, host=host, port=port, tls=direct_tls,
                   server_hostname=server_hostname)

    def send(self, data: bytes | str) -> None:
        """Write raw bytes (or UTF-8 text) as is: no framing, no checks."""
        self.writer.write(data.encode() if isinstance(data, str) else data)

    async def drain(self, timeout: float = 5.0) -> None:
        await asyncio.wait_for(self.writer.drain(), timeout)

    async def close(self, *, end_stream: bool = True, timeout: float = 2.0) -> None:
        """Polite close: send </stream:stream> (unless told not to), then close TCP."""
        if end_stream and not self.writer.is_closing():
            try:
                self.send("</stream:stream>")
                await self.drain(timeout)
            except (TimeoutError, ConnectionError, OSError):
                pass
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), timeout)
        except (TimeoutError, ConnectionError, OSError, ssl.SSLError):
            pass

    def abort(self) -> None:
        """Drop the connection at once, no stream close (a client 'network drop')."""
        self.writer.transport.abort()

    # -- parsing -------------------------------------------------------------------------

    def _new_parser(self) -> None:
        # Each stream (initial, after STARTTLS, after SASL) is a new XML document.
        self._parser = etree.XMLPullParser(
            events=("start", "end"), resolve_entities=False, no_network=True,
            remove_blank_text=False,
        )
        self._root = None
        self._depth = 0
        self.stream_closed = False

    def _feed(self, data: bytes) -> None:
        if self._parser is None or self.stream_closed:
            return  # bytes after </stream:stream> (or before any header of ours): ignore
        try:
            self._parser.feed(data)
            events = list(self._parser.read_events())
        except etree.XMLSyntaxError as exc:
            raise RawProtocolError(f"malformed XML from peer: {exc}: {data!r}") from exc
        for event, element in events:
            if event == "start":
                if self._depth == 0:
                    self._root = element
                    self.stream_attrs = {str(k): str(v) for k, v in element.attrib.items()}
                self._depth += 1
            else:
                self._depth -= 1
                if self._depth == 0:
                    self.stream_closed = True
                elif self._depth == 1:
                    self._pending.append(copy.deepcopy(element))
                    # Keep the tree small: drop children already handed out.
                    while element.getprevious() is not None:
                        del element.getparent()[0]

    async def _read_more(self, timeout: float) -> None:
        try:
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
        except TimeoutError:
            raise  # a subclass of OSError since 3.11: not an EOF
        except (ConnectionResetError, BrokenPipeError) as exc:
            self.eof = True
            self.closed_by_reset = True
            self.close_reason = repr(exc)
            return
        except (ssl.SSLError, OSError) as exc:
            self.eof = True
            self.close_reason = repr(exc)
            return
        if not data:
            self.eof = True
            self.close_reason = "EOF"
            return
        self._feed(data)

    async def read_element(self, timeout: float = 5.0) -> Element:
        """The next top-level child of the peer's stream (stanza, nonza, features, error).

        Raises TimeoutError if none within `timeout`, StreamClosed if the stream ends first.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self._pending:
            if self.stream_closed or self.eof:
                raise StreamClosed(
                    "peer closed the stream" if self.stream_closed
                    else f"connection ended: {self.close_reason}"
                )
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"no element from {self.host}:{self.port} in {timeout}s")
            try:
                await self._read_more(remaining)
            except TimeoutError:
                raise TimeoutError(
                    f"no element from {self.host}:{self.port} in {timeout}s"
                ) from None
        return self._pending.popleft()

    async def read_until(self, tag: str, timeout: float = 5.0, **attrs: str) -> Element:
        """Read until an element with this Clark tag (and attributes) comes; others dropped."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            element = await self.read_element(max(0.0, deadline - loop.time()))
            if element.tag == tag and all(element.get(k) == v for k, v in attrs.items()):
                return element

    async def expect_closed(self, timeout: float = 5.0, *, reply: bool = True) -> bool:
        """True once the peer ends the stream (</stream:stream>) or the connection.

        Elements read meanwhile go to `seen_before_close`. With `reply`, answer a stream
        close with our own </stream:stream> and close the socket (a peer that closes
        without an error waits up to its close timeout for that). False on timeout.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not (self.stream_closed or self.eof):
            while self._pending:
                self.seen_before_close.append(self._pending.popleft())
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            try:
                await self._read_more(remaining)
            except TimeoutError:
                return False
        while self._pending:
            self.seen_before_close.append(self._pending.popleft())
        if reply:
            await self.close(end_stream=self.stream_closed and not self.eof, timeout=1.0)
        return True

    # -- stream negotiation ---------------------------------------------------------------

    def stream_header(self, to: str) -> str:
        return (
            "<?xml version='1.0'?>"
            f"<stream:stream xmlns='{NS_CLIENT}' xmlns:stream='{NS_STREAM}' "
            f"to={quoteattr(to)} version='1.0' xml:lang='en'>"
        )

    async def open_stream(self, to: str = "localhost", timeout: float = 5.0) -> Element:
        """Send a stream header (new parser) and return the peer's <stream:features/>."""
        self._new_parser()
        self._pending.clear()
        self.send(self.stream_header(to))
        element = await self.read_element(timeout)
        if element.tag != q(NS_STREAM, "features"):
            raise RawProtocolError(f"expected stream features, got {tostring(element)}")
        self.features = element
        return element

    async def starttls(self, timeout: float = 10.0) -> None:
        """<starttls/> → <proceed/> → TLS handshake (the stream must then be reopened)."""
        self.send(f"<starttls xmlns='{NS_TLS}'/>")
        element = await self.read_element(timeout)
        if element.tag != q(NS_TLS, "proceed"):
            raise RawProtocolError(f"STARTTLS refused: {tostring(element)}")
        await asyncio.wait_for(
            self.writer.start_tls(unverified_context(), server_hostname=self.server_hostname),
            timeout,
        )
        self.tls = True
        self._parser = None  # nothing may be parsed until our next header

    async def secure(self, to: str = "localhost", timeout: float = 10.0) -> Element:
        """Open the stream (unless open), STARTTLS when needed; returns features after TLS."""
        if self._parser is None or self.features is None:
            features = await self.open_stream(to, timeout)
        else:
            features = self.features
        if not self.tls:
            if features.find(q(NS_TLS, "starttls")) is None:
                raise RawProtocolError(f"no STARTTLS offered: {tostring(features)}")
            await self.starttls(timeout)
            features = await self.open_stream(to, timeout)
        return features

    def mechanisms(self) -> list[str]:
        """SASL mechanisms in the last features."""
        if self.features is None:
            return []
        mechs = self.features.find(q(NS_SASL, "mechanisms"))
        if mechs is None:
            return []
        return [str(m.text) for m in mechs.findall(q(NS_SASL, "mechanism"))]

    async def login_plain(
        self, user: str, password: str, *, to: str = "localhost", timeout: float = 10.0,
        authzid: str = "",
    ) -> Element:
        """Secure the stream if needed, SASL PLAIN, restart; returns the post-auth features.

        Raises RawAuthError(condition) on a SASL <failure/>.
        """
        await self.secure(to, timeout)
        if "PLAIN" not in self.mechanisms():
            raise RawProtocolError(f"PLAIN not offered: {self.mechanisms()}")
        token = base64.b64encode(f"{authzid}\0{user}\0{password}".encode()).decode()
        self.send(f"<auth xmlns='{NS_SASL}' mechanism='PLAIN'>{token}</auth>")
        element = await self.read_element(timeout)
        if element.tag == q(NS_SASL, "failure"):
            condition = next(
                (etree.QName(c).localname for c in element if etree.QName(c).localname != "text"),
                "",
            )
            raise RawAuthError(condition, element)
        if element.tag != q(NS_SASL, "success"):
            raise RawProtocolError(f"unexpected SASL answer: {tostring(element)}")
        self.authenticated = True
        return await self.open_stream(to, timeout)

    def next_id(self, prefix: str = "raw") -> str:
        return f"{prefix}{next(self._ids)}"

    async def iq(
        self, payload: str, *, type: str = "get", to: str | None = None,
        timeout: float = 5.0,
    ) -> Element:
        """Send an <iq/> with `payload` (raw XML) and return the reply with the same id.

        Other elements arriving meanwhile are dropped: use read_element() when they matter.
        """
        iq_id = self.next_id("iq")
        to_attr = f" to={quoteattr(to)}" if to else ""
        self.send(f"<iq type='{type}' id='{iq_id}'{to_attr}>{payload}</iq>")
        return await self.read_until(q(NS_CLIENT, "iq"), timeout, id=iq_id)

    async def bind(self, resource: str | None = None, timeout: float = 5.0) -> str:
        """Resource binding (plus a legacy <session/> if it is not optional); full JID."""
        res = f"<resource>{escape(resource)}</resource>" if resource else ""
        reply = await self.iq(f"<bind xmlns='{NS_BIND}'>{res}</bind>", type="set",
                              timeout=timeout)
        jid = reply.findtext(f"{q(NS_BIND, 'bind')}/{q(NS_BIND, 'jid')}")
        if reply.get("type") != "result" or not jid:
            raise RawProtocolError(f"bind failed: {tostring(reply)}")
        self.jid = jid
        session = self.features.find(q(NS_SESSION, "session")) if self.features is not None \
            else None
        if session is not None and session.find(q(NS_SESSION, "optional")) is None:
            reply = await self.iq(f"<session xmlns='{NS_SESSION}'/>", type="set",
                                  timeout=timeout)
            if reply.get("type") != "result":
                raise RawProtocolError(f"session failed: {tostring(reply)}")
        return jid

    async def register(
        self, user: str, password: str, *, to: str = "localhost", timeout: float = 10.0,
    ) -> None:
        """In-band registration (XEP-0077) on a fresh connection, before auth."""
        await self.secure(to, timeout)
        reply = await self.iq(
            f"<query xmlns='{NS_REGISTER}'><username>{escape(user)}</username>"
            f"<password>{escape(password)}</password></query>",
            type="set", timeout=timeout,
        )
        if reply.get("type") != "result":
            raise RawProtocolError(f"registration of {user} failed: {tostring(reply)}")


async def raw_login(
    host: str, port: int, user: str, password: str, *, direct_tls: bool,
    resource: str | None = "raw", to: str = "localhost", timeout: float = 10.0,
) -> RawClient:
    """Connect, log in with PLAIN and bind: a RawClient ready for stanzas."""
    client = await RawClient.connect(host, port, direct_tls=direct_tls, server_hostname=to,
                                     timeout=timeout)
    try:
        await client.login_plain(user, password, to=to, timeout=timeout)
        await client.bind(resource, timeout)
    except BaseException:
        client.abort()
        raise
    return client

