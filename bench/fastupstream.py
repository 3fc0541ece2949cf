"""A minimal, fast XMPP server for measuring the proxy's own capacity.

It does as little as a server can: plain TCP (or direct TLS with ``--cert``/``--key``), SASL
PLAIN accepted for any user, resource binding, and routing of ``<message/>`` (and iqs to
full JIDs) between its sessions by ``to``. iq requests to the server itself (pings, the
proxy's barriers, roster gets, ``<session/>``) get an empty result (an empty roster for a
roster get); presence and everything else is dropped.

No XML parser: top-level elements are split by a byte scanner that assumes an element does
not nest another element of its own name (true for the benchmark's traffic; not a general
XMPP server). Each read is answered with one write per destination connection.

Run on its own: ``python -m bench.fastupstream --port 5299 [--cert C --key K]``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import itertools
import re
import signal
import ssl
import sys

_HEADER = re.compile(rb"<stream:stream[^>]*>")
_AUTH = re.compile(rb"<auth[^>]*>([^<]*)</auth>")
_NAME = re.compile(rb"<(/?)([A-Za-z][\w:.-]*)")
_TO = re.compile(rb"""\sto=(?:'([^']*)'|"([^"]*)")""")
_ID = re.compile(rb"""\sid=(?:'([^']*)'|"([^"]*)")""")
_TYPE = re.compile(rb"""\stype=(?:'([^']*)'|"([^"]*)")""")
_RESOURCE = re.compile(rb"<resource>([^<]*)</resource>")
_WS = b" \t\r\n"
STREAM_CLOSE = b"</stream:stream>"


def _attr(pattern: re.Pattern[bytes], tag: bytes) -> bytes | None:
    m = pattern.search(tag)
    if m is None:
        return None
    return m.group(1) if m.group(1) is not None else m.group(2)


class Router:
    """Who is bound where: full JID -> session, bare JID -> the last bound session."""

    def __init__(self, domain: str) -> None:
        self.domain = domain.encode()
        self.full: dict[bytes, Session] = {}
        self.bare: dict[bytes, Session] = {}
        self.resources = itertools.count(1)
        self.sessions = 0
        self.routed = 0

    def lookup(self, to: bytes) -> Session | None:
        session = self.full.get(to)
        if session is None and b"/" not in to:
            session = self.bare.get(to)
        return session


class Session(asyncio.Protocol):
    def __init__(self, router: Router) -> None:
        self.router = router
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.state = "header"  # header -> auth -> header2 -> bound
        self.user = b""
        self.jid = b""
        self.bare_jid = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.router.sessions += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.router.sessions -= 1
        if self.jid and self.router.full.get(self.jid) is self:
            del self.router.full[self.jid]
        if self.bare_jid and self.router.bare.get(self.bare_jid) is self:
            del self.router.bare[self.bare_jid]
        self.transport = None

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def _header(self, features: bytes) -> None:
        self.write(b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
                   b"xmlns:stream='http://etherx.jabber.org/streams' version='1.0' "
                   b"from='" + self.router.domain + b"' id='fast'><stream:features>"
                   + features + b"</stream:features>")

    def data_received(self, data: bytes) -> None:
        self.buf = self.buf + data if self.buf else data
        if self.state != "bound":
            self._negotiate()
            if self.state != "bound":
                return
        self._stanzas()

    def _negotiate(self) -> None:
        while self.state != "bound":
            if self.state in ("header", "header2"):
                m = _HEADER.search(self.buf)
                if m is None:
                    return
                self.buf = self.buf[m.end():]
                if self.state == "header":
                    self._header(b"<mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>"
                                 b"<mechanism>PLAIN</mechanism></mechanisms>")
                    self.state = "auth"
                else:
                    self._header(b"<bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/>")
                    self.state = "bound"
            elif self.state == "auth":
                m = _AUTH.search(self.buf)
                if m is None:
                    return
                self.buf = self.buf[m.end():]
                try:
                    parts = base64.b64decode(m.group(1)).split(b"\0")
                    self.user = parts[1]
                except (ValueError, IndexError):
                    self.write(b"<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>"
                               b"<malformed-request/></failure>")
                    continue
                self.write(b"<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>")
                self.state = "header2"

    def _stanzas(self) -> None:
        buf = self.buf
        n = len(buf)
        pos = 0
        out: dict[Session, list[bytes]] = {}
        while pos < n:
            lt = buf.find(b"<", pos)
            if lt < 0:
                pos = n
                break
            pos = lt
            m = _NAME.match(buf, pos)
            if m is None:
                break  # need more bytes
            if m.group(1):  # a closing tag at the top level: </stream:stream>
                if buf.startswith(STREAM_CLOSE, pos):
                    self.write(STREAM_CLOSE)
                    if self.transport is not None:
                        self.transport.close()
                    pos = n
                break
            name = m.group(2)
            gt = buf.find(b">", m.end())
            if gt < 0:
                break
            if buf[gt - 1] == 0x2F:  # "/>"
                end = gt + 1
            else:
                close = buf.find(b"</" + name + b">", gt)
                if close < 0:
                    break
                end = close + len(name) + 3
            start_tag = buf[pos:gt + 1]
            if name == b"message":
                to = _attr(_TO, start_tag)
                dest = self.router.lookup(to) if to else None
                if dest is not None:
                    out.setdefault(dest, []).append(buf[pos:end])
                    self.router.routed += 1
            elif name == b"iq":
                self._iq(buf[pos:end], start_tag, out)
            pos = end
        self.buf = buf[pos:] if pos < n else b""
        for dest, chunks in out.items():
            dest.write(chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def _iq(self, element: bytes, start_tag: bytes, out: dict[Session, list[bytes]]) -> None:
        to = _attr(_TO, start_tag)
        typ = _attr(_TYPE, start_tag) or b""
        if to and to != self.router.domain and to != self.bare_jid:
            dest = self.router.lookup(to)
            if dest is not None:
                out.setdefault(dest, []).append(element)
            return
        if typ not in (b"get", b"set"):
            return
        iq_id = _attr(_ID, start_tag) or b""
        if b"urn:ietf:params:xml:ns:xmpp-bind" in element and not self.jid:
            m = _RESOURCE.search(element)
            resource = m.group(1) if m and m.group(1) else b"r%d" % next(self.router.resources)
            self.bare_jid = self.user + b"@" + self.router.domain
            self.jid = self.bare_jid + b"/" + resource
            self.router.full[self.jid] = self
            self.router.bare[self.bare_jid] = self
            reply = (b"<iq type='result' id='" + iq_id + b"'><bind xmlns='urn:ietf:params:xml"
                     b":ns:xmpp-bind'><jid>" + self.jid + b"</jid></bind></iq>")
        elif b"jabber:iq:roster" in element and typ == b"get":
            reply = (b"<iq type='result' id='" + iq_id + b"' to='" + self.jid
                     + b"'><query xmlns='jabber:iq:roster'/></iq>")
        else:
            reply = (b"<iq type='result' id='" + iq_id + b"' from='" + self.router.domain
                     + b"' to='" + self.jid + b"'/>")
        out.setdefault(self, []).append(reply)


def tls_server_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


async def serve(host: str, port: int, domain: str = "localhost",
                tls: ssl.SSLContext | None = None) -> tuple[asyncio.Server, Router]:
    router = Router(domain)
    server = await asyncio.get_running_loop().create_server(
        lambda: Session(router), host, port, ssl=tls, backlog=4096)
    return server, router


async def _main(args: argparse.Namespace) -> None:
    tls = tls_server_context(args.cert, args.key) if args.cert else None
    server, router = await serve(args.host, args.port, args.domain, tls)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"fastupstream listening on {args.host}:{server.sockets[0].getsockname()[1]}",
          flush=True)
    await stop.wait()
    server.close()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(server.wait_closed(), 2)
    print(f"fastupstream stopped; routed {router.routed}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--domain", default="localhost")
    parser.add_argument("--cert")
    parser.add_argument("--key")
    args = parser.parse_args(argv)
    asyncio.run(_main(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
