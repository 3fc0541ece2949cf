"""A scripted legacy XMPP server for in-process tests of the proxy's shell.

Plain TCP (the proxy's ``upstream.tls: none``), SASL PLAIN against a dict of accounts,
resource binding (the requested resource, or a generated one), RFC 3921 ``<session/>``
answered, iq pings answered (the proxy's barriers), an empty roster. It records every stanza
it receives, per connection and in one list in arrival order, and can push stanzas to a
bound resource. No stream management (a legacy server) unless made with ``sm=True``: then
it offers XEP-0198, answers ``<r/>`` with its count (``sm_acks``) and counts what it sends.

Faults, for outage cases: ``cut()`` aborts every connection (and by default refuses new
ones), ``refuse()`` closes the listener, ``blackhole()`` makes every open connection a dead
path (what it reads is dropped, nothing is answered or pushed, it never closes by itself) and
refuses new ones; ``come_back()`` listens again on the same port.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
from dataclasses import dataclass, field
from typing import Any
from xml.sax.saxutils import escape

from lxml import etree

from .xmlpeer import (NS_BIND, NS_CLIENT, NS_DISCO_INFO, NS_PING, NS_ROSTER, NS_SASL,
                      NS_SESSION, NS_SM, NS_STREAM,
                      Changes, Element, StreamReader, criteria, describe, is_ping, kind,
                      matches, q, tostring)

HOST = "127.0.0.1"


@dataclass(eq=False)
class ServerConn:
    """One upstream connection the proxy opened to the server."""

    index: int  # 0 for the first connection the server accepted, then 1, 2, ...
    writer: asyncio.StreamWriter
    user: str | None = None
    jid: str | None = None  # the full JID bound on it
    received: list[Element] = field(default_factory=list)  # stanzas, in order
    closed: bool = False
    dead: bool = False  # blackholed: reads are dropped, nothing is written
    sm: bool = False  # the proxy enabled XEP-0198 on this stream
    h_in: int = 0  # stanzas received since <enable/>
    h_out: int = 0  # stanzas sent since <enabled/>
    nonzas: list[Element] = field(default_factory=list)  # SM elements received, in order
    # The proxy's own disco#info questions right after the bind (its login discovery):
    # answered from ``ScriptedServer.disco``, kept apart from what the client sent.
    discovery: list[Element] = field(default_factory=list)

    def send(self, data: str) -> None:
        if not self.closed and not self.dead and not self.writer.is_closing():
            if self.sm and data.startswith(("<message", "<presence", "<iq")):
                self.h_out += 1
            self.writer.write(data.encode())

    def abort(self) -> None:
        self.closed = True
        self.writer.transport.abort()


@dataclass(frozen=True)
class Received:
    conn: ServerConn
    stanza: Element


class ScriptedServer:
    def __init__(self, accounts: dict[str, str] | None = None, *,
                 domain: str = "localhost", sm: bool = False) -> None:
        self.accounts = dict(accounts or {"alice": "secret", "bob": "secret"})
        self.domain = domain
        self.sm = sm
        self.sm_acks = True  # answer the proxy's <r/> (with sm)
        self.port = 0
        self.conns: list[ServerConn] = []
        self.log: list[Received] = []  # every stanza from every connection, in order
        self.binds: list[ServerConn] = []  # connections as they bound, in order
        self.answer_pings = True
        # Raw stanzas written on a connection when the proxy closes its stream, before the
        # server's own </stream:stream> (RFC 6120 §4.4 lets the server finish first).
        self.before_close: list[str] = []
        self.bind_as: str | None = None  # bind this resource whatever is asked (a conflict)
        self.extra_features = ""  # raw XML added to the post-authentication features
        # disco#info answers (the query's inner XML) for "domain" and "account"; an entity
        # not listed answers service-unavailable.
        self.disco: dict[str, str] = {}
        self.disco_silent = False  # never answer the proxy's login discovery
        # Raw stanzas pushed to a connection just before its discovery is answered (what a
        # server may route to a resource right after its bind).
        self.before_disco_answer: list[str] = []
        self._server: asyncio.Server | None = None
        self._changes = Changes()
        self._claimed: set[int] = set()  # log positions already returned by expect_stanza
        self._tasks: set[asyncio.Task[None]] = set()
        self._ids = itertools.count(1)

    # Lifecycle ----------------------------------------------------------------------------

    async def start(self) -> ScriptedServer:
        await self._listen()
        return self

    async def _listen(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._accept, HOST, self.port)
            self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        await self._stop_listening()
        for conn in self.conns:
            conn.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _stop_listening(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1)

    # Faults -------------------------------------------------------------------------------

    async def cut(self, *, refuse: bool = True) -> None:
        """Abort every connection (a crash); with ``refuse`` new ones are refused too."""
        if refuse:
            await self._stop_listening()
        for conn in self.conns:
            conn.abort()

    async def refuse(self) -> None:
        await self._stop_listening()

    async def blackhole(self) -> None:
        """The path to the server dies silently: open connections drop what they read and
        never answer (no FIN, no RST); new connections are refused."""
        await self._stop_listening()
        for conn in self.conns:
            conn.dead = True

    async def come_back(self) -> None:
        await self._listen()

    # Talking to a bound resource ------------------------------------------------------------

    def connection_of(self, jid: str) -> ServerConn:
        for conn in reversed(self.conns):
            if conn.jid == jid and not conn.closed:
                return conn
        raise AssertionError(f"no open server connection bound as {jid}")

    def push(self, to: str, stanza: str) -> None:
        """Write raw stanza XML to the connection bound as ``to`` (a full JID)."""
        self.connection_of(to).send(stanza)

    def push_message(self, to: str, body: str, *, frm: str = "bob@localhost/desk",
                     id: str | None = None, type: str = "chat") -> str:
        """A message for ``to``; returns its id."""
        mid = id or f"srv{next(self._ids)}"
        self.push(to, f"<message from='{frm}' to='{to}' type='{type}' id='{mid}'>"
                      f"<body>{escape(body)}</body></message>")
        return mid

    # Waiting and looking --------------------------------------------------------------------

    async def expect_stanza(self, *, timeout: float = 1.0, pings: bool = False,
                            **kw: Any) -> Element:
        """The first stanza received (since the start) that matches and was not returned
        before. Barrier pings are skipped unless ``pings``. Criteria: kind, type, body, id,
        to, from_, error, child, tag, where."""
        crit = criteria(kw)

        def find() -> Element | None:
            for pos, rec in enumerate(self.log):
                if pos in self._claimed or (is_ping(rec.stanza) and not pings):
                    continue
                if matches(rec.stanza, **crit):
                    self._claimed.add(pos)
                    return rec.stanza
            return None

        try:
            found: Element = await self._changes.until(find, timeout, describe(kw))
        except TimeoutError as exc:
            raise AssertionError(f"server: {exc}; it received:\n{self.transcript()}") from None
        return found

    async def expect_bind(self, resource: str | None = None, *, after: int = 0,
                          timeout: float = 1.0) -> ServerConn:
        """A connection that bound (``resource``, if given) as the ``after``-th bind or
        later: ``expect_bind(after=len(server.binds))`` waits for the next one."""
        def find() -> ServerConn | None:
            for conn in self.binds[after:]:
                if resource is None or (conn.jid or "").endswith("/" + resource):
                    return conn
            return None

        try:
            conn: ServerConn = await self._changes.until(find, timeout, f"bind of {resource}")
        except TimeoutError as exc:
            raise AssertionError(f"server: {exc}; binds so far: "
                                 f"{[c.jid for c in self.binds]}") from None
        return conn

    async def wait_open_connections(self, count: int, timeout: float = 1.0) -> None:
        """Until exactly ``count`` connections are open."""
        try:
            await self._changes.until(
                lambda: sum(not c.closed for c in self.conns) == count, timeout,
                f"{count} open connections")
        except TimeoutError as exc:
            raise AssertionError(f"server: {exc}; open: "
                                 f"{[c.jid for c in self.conns if not c.closed]}") from None

    def messages(self, *, conn: ServerConn | None = None, **kw: Any) -> list[Element]:
        """Every message received (on ``conn`` only, if given) that matches."""
        crit = criteria(kw)
        return [r.stanza for r in self.log if kind(r.stanza) == "message"
                and (conn is None or r.conn is conn) and matches(r.stanza, **crit)]

    def bodies(self, **kw: Any) -> list[str]:
        return [m.findtext(q(NS_CLIENT, "body")) or "" for m in self.messages(**kw)]

    def transcript(self) -> str:
        return "\n".join(f"  [{r.conn.index}] {tostring(r.stanza)}" for r in self.log) or "  —"

    # One connection -------------------------------------------------------------------------

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = ServerConn(len(self.conns), writer)
        self.conns.append(conn)
        task = asyncio.create_task(self._serve(conn, reader))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._changes.notify()

    async def _serve(self, conn: ServerConn, reader: asyncio.StreamReader) -> None:
        xml = StreamReader()
        try:
            while not conn.closed:
                data = await reader.read(65536)
                if not data:
                    break
                if conn.dead:
                    continue
                for el in xml.feed(data) if xml.opened is not None else self._open(conn, xml,
                                                                                    data):
                    self._handle(conn, xml, el)
                if xml.closed:
                    for stanza in self.before_close:
                        conn.send(stanza.replace("{to}", conn.jid or ""))
                    conn.send("</stream:stream>")
                    break
        except (ConnectionError, OSError, etree.XMLSyntaxError):
            pass
        finally:
            conn.closed = True
            with contextlib.suppress(Exception):
                conn.writer.close()
            self._changes.notify()

    def _open(self, conn: ServerConn, xml: StreamReader, data: bytes) -> list[Element]:
        """Feed the first bytes of a stream; answer its header with ours and features."""
        elements = xml.feed(data)
        if xml.opened is not None:
            conn.send(f"<?xml version='1.0'?><stream:stream xmlns='{NS_CLIENT}' "
                      f"xmlns:stream='{NS_STREAM}' from='{self.domain}' "
                      f"id='s{conn.index}-{next(self._ids)}' version='1.0'>")
            if conn.user is None:
                conn.send(f"<stream:features><mechanisms xmlns='{NS_SASL}'>"
                          "<mechanism>PLAIN</mechanism></mechanisms></stream:features>")
            else:
                sm = f"<sm xmlns='{NS_SM}'/>" if self.sm else ""
                conn.send(f"<stream:features><bind xmlns='{NS_BIND}'/>"
                          f"<session xmlns='{NS_SESSION}'><optional/></session>{sm}"
                          f"{self.extra_features}</stream:features>")
        return elements

    def _handle(self, conn: ServerConn, xml: StreamReader, el: Element) -> None:
        if conn.user is None:
            self._auth(conn, xml, el)
            return
        if kind(el) is None:
            if self.sm and etree.QName(el).namespace == NS_SM:
                self._sm(conn, el)
            return  # no other nonzas on a legacy server's stream
        if conn.sm:
            conn.h_in += 1
        if kind(el) == "iq" and el.get("id", "").startswith("disco-") \
                and el.find(q(NS_DISCO_INFO, "query")) is not None:
            conn.discovery.append(el)
            if not self.disco_silent:
                for raw in self.before_disco_answer:
                    conn.send(raw)
                self.before_disco_answer = []
                self._iq(conn, el)
            return
        conn.received.append(el)
        self.log.append(Received(conn, el))
        if kind(el) == "iq":
            self._iq(conn, el)
        self._changes.notify()

    def _sm(self, conn: ServerConn, el: Element) -> None:
        conn.nonzas.append(el)
        local = etree.QName(el).localname
        if local == "enable":
            conn.sm, conn.h_in, conn.h_out = True, 0, 0
            conn.send(f"<enabled xmlns='{NS_SM}'/>")
        elif local == "r" and self.sm_acks:
            conn.send(f"<a xmlns='{NS_SM}' h='{conn.h_in}'/>")
        self._changes.notify()

    async def expect_nonza(self, local: str, *, conn: ServerConn, after: int = 0,
                           timeout: float = 1.0) -> Element:
        """An SM element ``local`` received on ``conn`` at position ``after`` or later."""
        def find() -> Element | None:
            return next((el for el in conn.nonzas[after:]
                         if etree.QName(el).localname == local), None)
        try:
            found: Element = await self._changes.until(find, timeout, f"<{local}/>")
        except TimeoutError as exc:
            raise AssertionError(f"server: {exc}; nonzas: "
                                 f"{[tostring(e) for e in conn.nonzas]}") from None
        return found

    def _auth(self, conn: ServerConn, xml: StreamReader, el: Element) -> None:
        if el.tag != q(NS_SASL, "auth") or el.get("mechanism") != "PLAIN":
            conn.send(f"<failure xmlns='{NS_SASL}'><invalid-mechanism/></failure>")
            return
        try:
            _authzid, user, password = base64.b64decode(el.text or "").decode().split("\0")
        except ValueError:
            conn.send(f"<failure xmlns='{NS_SASL}'><malformed-request/></failure>")
            return
        if self.accounts.get(user) != password:
            conn.send(f"<failure xmlns='{NS_SASL}'><not-authorized/></failure>")
            return
        conn.user = user
        conn.send(f"<success xmlns='{NS_SASL}'/>")
        xml.restart()  # the next bytes are a new stream header

    def _iq(self, conn: ServerConn, el: Element) -> None:
        typ, iq_id = el.get("type"), el.get("id", "")
        to = el.get("to")
        if typ not in ("get", "set") or to not in (None, "", self.domain,
                                                   f"{conn.user}@{self.domain}"):
            return  # a reply, or for another entity: recorded only
        bind = el.find(q(NS_BIND, "bind"))
        if bind is not None and typ == "set":
            resource = (self.bind_as or bind.findtext(q(NS_BIND, "resource"))
                        or f"srv{next(self._ids)}")
            conn.jid = f"{conn.user}@{self.domain}/{resource}"
            conn.send(f"<iq type='result' id='{iq_id}'><bind xmlns='{NS_BIND}'>"
                      f"<jid>{escape(conn.jid)}</jid></bind></iq>")
            self.binds.append(conn)
        elif el.find(q(NS_PING, "ping")) is not None:
            if self.answer_pings:
                conn.send(f"<iq type='result' id='{iq_id}' from='{self.domain}'/>")
        elif el.find(q(NS_DISCO_INFO, "query")) is not None and typ == "get" \
                and (entity := "domain" if to == self.domain else "account") in self.disco:
            conn.send(f"<iq type='result' id='{iq_id}' from='{to}'><query "
                      f"xmlns='{NS_DISCO_INFO}'>{self.disco[entity]}</query></iq>")
        elif el.find(q(NS_SESSION, "session")) is not None:
            conn.send(f"<iq type='result' id='{iq_id}'/>")
        elif el.find(q(NS_ROSTER, "query")) is not None and typ == "get":
            conn.send(f"<iq type='result' id='{iq_id}'><query xmlns='{NS_ROSTER}'/></iq>")
        else:
            conn.send(f"<iq type='error' id='{iq_id}'><error type='cancel'>"
                      "<service-unavailable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>"
                      "</error></iq>")
