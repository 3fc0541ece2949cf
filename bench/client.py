"""A minimal, fast raw XMPP client for the benchmarks.

No XML parser: negotiation reads the peer's bytes until a regular expression matches (the
peers are known: Prosody, xmpp-front and the harness's own fast upstream), and after binding
the stream is used raw: senders write pre-built batches of stanzas, receivers count
``</message>`` tokens or pull ids out with a regex. That keeps the load generator far cheaper
per stanza than the servers it measures. It must not import the `proxy` package.
"""

from __future__ import annotations

import asyncio
import base64
import re
import ssl
import time
from xml.sax.saxutils import escape, quoteattr

NS_SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
NS_TLS = "urn:ietf:params:xml:ns:xmpp-tls"
NS_BIND = "urn:ietf:params:xml:ns:xmpp-bind"
NS_SESSION = "urn:ietf:params:xml:ns:xmpp-session"
NS_SM = "urn:xmpp:sm:3"
NS_REGISTER = "jabber:iq:register"

_FEATURES = re.compile(rb"<stream:features(?:\s[^>]*)?(?:/>|>.*?</stream:features>)", re.S)
_PROCEED = re.compile(rb"<proceed[^>]*/>|<failure[^>]*xmpp-tls[^>]*/>")
_SASL_OUTCOME = re.compile(rb"<success[^>]*(?:/>|>[^<]*</success>)|<failure.*?(?:</failure>)",
                           re.S)
_ENABLED = re.compile(rb"<enabled[^>]*>|<failed.*?(?:/>|</failed>)", re.S)
_RESUMED = re.compile(rb"<resumed[^>]*>|<failed.*?(?:</failed>|/>)", re.S)
_JID = re.compile(rb"<jid>([^<]+)</jid>")
_ATTR_ID = re.compile(rb"""\sid=(?:'([^']*)'|"([^"]*)")""")
_STREAM_ERROR = re.compile(rb"<stream:error.*?</stream:error>", re.S)
MESSAGE_END = b"</message>"


class BenchProtocolError(RuntimeError):
    """The peer answered something the script did not expect."""


def client_tls_context() -> ssl.SSLContext:
    """Accepts the self-signed benchmark certificates (loopback only)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


_TLS = client_tls_context()


def _iq_pattern(iq_id: str) -> re.Pattern[bytes]:
    q = re.escape(iq_id.encode())
    return re.compile(rb"<iq\s[^>]*id=['\"]" + q + rb"['\"][^>]*(?:/>|>.*?</iq>)", re.S)


def attr(start_tag: bytes, name: bytes) -> str | None:
    m = re.search(rb"\s" + name + rb"""=(?:'([^']*)'|"([^"]*)")""", start_tag)
    if m is None:
        return None
    return (m.group(1) if m.group(1) is not None else m.group(2)).decode()


class BenchClient:
    """One XMPP client connection. Build with ``await BenchClient.connect(...)``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                 domain: str, tls: bool) -> None:
        self.reader = reader
        self.writer = writer
        self.domain = domain
        self.tls = tls
        self.buf = bytearray()
        self.features = b""
        self.jid = ""
        self.sm_id: str | None = None
        self._ids = 0

    @classmethod
    async def connect(cls, host: str, port: int, *, domain: str = "localhost",
                      direct_tls: bool = False, timeout: float = 10.0) -> BenchClient:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            host, port, ssl=_TLS if direct_tls else None,
            server_hostname=domain if direct_tls else None, limit=1 << 20), timeout)
        return cls(reader, writer, domain=domain, tls=direct_tls)

    # -- raw I/O ------------------------------------------------------------------------------

    def write(self, data: bytes | str) -> None:
        self.writer.write(data.encode() if isinstance(data, str) else data)

    async def read_until(self, pattern: re.Pattern[bytes], timeout: float = 10.0) -> bytes:
        """Read until ``pattern`` matches the unread bytes; consume through the match."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            m = pattern.search(self.buf)
            if m is not None:
                found = bytes(m.group(0))
                del self.buf[:m.end()]
                return found
            err = _STREAM_ERROR.search(self.buf)
            if err is not None:
                raise BenchProtocolError(f"stream error: {err.group(0)[:300]!r}")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"waited {timeout}s for {pattern.pattern[:40]!r}; "
                                   f"have {bytes(self.buf[-300:])!r}")
            data = await asyncio.wait_for(self.reader.read(65536), remaining)
            if not data:
                raise BenchProtocolError(f"connection closed; have {bytes(self.buf[-300:])!r}")
            self.buf += data

    def next_id(self, prefix: str) -> str:
        self._ids += 1
        return f"{prefix}{self._ids}"

    async def iq(self, payload: str, *, type: str = "get", timeout: float = 10.0) -> bytes:
        iq_id = self.next_id("q")
        self.write(f"<iq type='{type}' id='{iq_id}'>{payload}</iq>")
        return await self.read_until(_iq_pattern(iq_id), timeout)

    # -- negotiation --------------------------------------------------------------------------

    async def open_stream(self, timeout: float = 10.0) -> bytes:
        self.buf.clear()
        self.write("<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
                   "xmlns:stream='http://etherx.jabber.org/streams' "
                   f"to={quoteattr(self.domain)} version='1.0' xml:lang='en'>")
        self.features = await self.read_until(_FEATURES, timeout)
        return self.features

    async def secure(self, timeout: float = 10.0) -> None:
        """Open the stream and STARTTLS when offered (not needed on direct TLS)."""
        await self.open_stream(timeout)
        if self.tls or b"<starttls" not in self.features:
            return
        self.write(f"<starttls xmlns='{NS_TLS}'/>")
        answer = await self.read_until(_PROCEED, timeout)
        if not answer.startswith(b"<proceed"):
            raise BenchProtocolError(f"STARTTLS refused: {answer!r}")
        await asyncio.wait_for(self.writer.start_tls(_TLS, server_hostname=self.domain),
                               timeout)
        self.tls = True
        await self.open_stream(timeout)

    async def authenticate(self, user: str, password: str, timeout: float = 10.0) -> None:
        await self.secure(timeout)
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        self.write(f"<auth xmlns='{NS_SASL}' mechanism='PLAIN'>{token}</auth>")
        outcome = await self.read_until(_SASL_OUTCOME, timeout)
        if not outcome.startswith(b"<success"):
            raise BenchProtocolError(f"SASL failed for {user}: {outcome!r}")
        await self.open_stream(timeout)

    async def bind(self, resource: str, timeout: float = 10.0) -> str:
        reply = await self.iq(f"<bind xmlns='{NS_BIND}'><resource>{escape(resource)}"
                              "</resource></bind>", type="set", timeout=timeout)
        m = _JID.search(reply)
        if m is None:
            raise BenchProtocolError(f"bind failed: {reply!r}")
        self.jid = m.group(1).decode()
        if NS_SESSION.encode() in self.features and b"<optional" not in self.features:
            await self.iq(f"<session xmlns='{NS_SESSION}'/>", type="set", timeout=timeout)
        return self.jid

    async def register(self, user: str, password: str, timeout: float = 10.0) -> None:
        """XEP-0077 in-band registration on a secured, unauthenticated stream."""
        reply = await self.iq(f"<query xmlns='{NS_REGISTER}'><username>{escape(user)}"
                              f"</username><password>{escape(password)}</password></query>",
                              type="set", timeout=timeout)
        if b"type='result'" not in reply and b'type="result"' not in reply:
            raise BenchProtocolError(f"registration of {user} failed: {reply!r}")

    # -- stream management --------------------------------------------------------------------

    async def enable_sm(self, timeout: float = 10.0) -> str:
        self.write(f"<enable xmlns='{NS_SM}' resume='true'/>")
        answer = await self.read_until(_ENABLED, timeout)
        sm_id = attr(answer, b"id")
        if not answer.startswith(b"<enabled") or not sm_id:
            raise BenchProtocolError(f"enable failed: {answer!r}")
        self.sm_id = sm_id
        return sm_id

    async def resume(self, previd: str, h: int, timeout: float = 10.0) -> float:
        """Send ``<resume/>``; the seconds until ``<resumed/>`` came (only that exchange)."""
        start = time.perf_counter()
        self.write(f"<resume xmlns='{NS_SM}' previd={quoteattr(previd)} h='{h}'/>")
        answer = await self.read_until(_RESUMED, timeout)
        elapsed = time.perf_counter() - start
        if not answer.startswith(b"<resumed"):
            raise BenchProtocolError(f"resume failed: {answer!r}")
        self.sm_id = previd
        return elapsed

    # -- the end ------------------------------------------------------------------------------

    async def close(self, timeout: float = 2.0) -> None:
        """Send ``</stream:stream>`` and close without waiting for the peer's answer."""
        try:
            if not self.writer.is_closing():
                self.write(b"</stream:stream>")
                await asyncio.wait_for(self.writer.drain(), timeout)
        except (OSError, TimeoutError, ssl.SSLError):
            pass
        self.abort()

    def abort(self) -> None:
        transport = self.writer.transport
        if transport is not None and not transport.is_closing():
            transport.abort()


async def login(host: str, port: int, user: str, password: str, *, resource: str,
                domain: str = "localhost", direct_tls: bool = False,
                timeout: float = 15.0) -> BenchClient:
    """Connect, STARTTLS (if offered), SASL PLAIN, bind: a client ready for stanzas."""
    client = await BenchClient.connect(host, port, domain=domain, direct_tls=direct_tls,
                                       timeout=timeout)
    try:
        await client.authenticate(user, password, timeout)
        await client.bind(resource, timeout)
    except BaseException:
        client.abort()
        raise
    return client


async def register_many(host: str, port: int, accounts: list[tuple[str, str]], *,
                        domain: str = "localhost", connections: int = 8,
                        timeout: float = 60.0) -> None:
    """In-band registration of many accounts over a few connections (several per stream)."""
    if not accounts:
        return
    chunks = [accounts[i::connections] for i in range(min(connections, len(accounts)))]

    async def one(chunk: list[tuple[str, str]]) -> None:
        client = await BenchClient.connect(host, port, domain=domain, timeout=timeout)
        try:
            await client.secure(timeout)
            for user, password in chunk:
                await client.register(user, password, timeout)
        finally:
            client.abort()

    await asyncio.wait_for(asyncio.gather(*(one(c) for c in chunks)), timeout)


async def count_messages(reader: asyncio.StreamReader, counter: list[int]) -> None:
    """Add the number of ``</message>`` tokens read to ``counter[0]`` until EOF."""
    carry = b""
    keep = len(MESSAGE_END) - 1
    while True:
        data = await reader.read(1 << 18)
        if not data:
            return
        chunk = carry + data if carry else data
        counter[0] += chunk.count(MESSAGE_END)
        carry = chunk[-keep:]


_SM_R = re.compile(rb"<r[\s/]")


async def collect_latencies(reader: asyncio.StreamReader, latencies: list[tuple[int, int]],
                            prefix: bytes = b"L",
                            sm_writer: asyncio.StreamWriter | None = None) -> None:
    """For messages with ``id='L<perf_counter_ns at send>'``: append (send, receive - send),
    in nanoseconds. ``sm_writer``: stream management is on; each ``<r/>`` read is answered
    there with ``<a h/>``, h the messages received so far (errs low, never high)."""
    # id may be the first attribute (Prosody's attribute order changes from run to run)
    pattern = re.compile(rb"<message\s(?:[^>]*\s)?id=['\"]" + re.escape(prefix)
                         + rb"(\d+)['\"]")
    pending = tail = b""
    handled = 0
    while True:
        data = await reader.read(1 << 16)
        now = time.perf_counter_ns()
        if not data:
            return
        if sm_writer is not None:
            # The tail (shorter than </message>) catches what a read boundary splits; an
            # <r/> in it is answered twice at most, which is harmless.
            joined = tail + data
            handled += joined.count(MESSAGE_END)
            if _SM_R.search(joined) is not None:
                sm_writer.write(f"<a xmlns='{NS_SM}' h='{handled % 2**32}'/>".encode())
            tail = joined[-(len(MESSAGE_END) - 1):]
        pending += data
        end = pending.rfind(MESSAGE_END)
        if end < 0:
            continue
        complete, pending = pending[:end + len(MESSAGE_END)], pending[end + len(MESSAGE_END):]
        for m in pattern.finditer(complete):
            sent = int(m.group(1))
            latencies.append((sent, now - sent))
