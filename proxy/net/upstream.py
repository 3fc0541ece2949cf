"""The upstream link's shell: the proxy logs in to the legacy server as an ordinary client.

The decisions (the connection's plan, STARTTLS required, the SASL mechanism and exchange,
the loop check, bind and session, the discovery after the bind, every timeout) are the pure
``proxy.upstream_negotiation.UpstreamNegotiation``'s; this shell connects, reads the stream's
events, writes, starts TLS (offering the last TLS session for resumption) and carries out the
core's commands, turning its failures into the exceptions below.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Container, Iterable
from typing import Any

from ..commands import (
    Connect,
    Log,
    OpenStream,
    PassOn,
    ServerDiscovered,
    StartTimer,
    StartTlsToServer,
    ToServerDirect,
    UpstreamBound,
    UpstreamCommand,
    UpstreamFailed,
    UpstreamReady,
)
from ..config import UpstreamConfig
from ..upstream_negotiation import Address, Endpoints, UpstreamNegotiation
from ..xmpp import codec
from ..xmpp.disco import ServerInfo
from ..xmpp import stanza as st
from .preamble import tls_failure_reason
from .tls_transport import start_tls
from .xmlstream import (ConnectionLost, PlaintextInjection, XmlStream, features_element,
                        open_connection)
from ..xmpp.stanza import Element

# What a link holds once its features are read: one empty element for every session.
_NO_FEATURES = features_element()

__all__ = [
    "Address",
    "Endpoints",
    "UpstreamAuthFailed",
    "UpstreamBindFailed",
    "UpstreamError",
    "UpstreamLink",
    "UpstreamLoop",
    "UpstreamUnavailable",
    "client_tls_context",
    "connect_upstream",
    "tls_session",
    "tls_session_reused",
]

Outcome = UpstreamReady | UpstreamBound | ServerDiscovered


class UpstreamError(Exception):
    pass


class UpstreamUnavailable(UpstreamError):
    """The legacy server could not be reached or did not complete the negotiation."""


class UpstreamLoop(UpstreamUnavailable):
    """The "server" answered with a stream id this proxy issued: it is talking to itself."""


class UpstreamAuthFailed(UpstreamError):
    def __init__(self, condition: str) -> None:
        super().__init__(condition)
        self.condition = condition


class UpstreamBindFailed(UpstreamError):
    def __init__(self, error_reply: Element) -> None:
        super().__init__(st.error_condition(error_reply) or "undefined-condition")
        self.error_reply = error_reply


def client_tls_context(config: UpstreamConfig, ca_path: str | None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca_path:
        context.load_verify_locations(cafile=ca_path)
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if not config.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def tls_session(stream: XmlStream) -> ssl.SSLSession | None:
    sslobj = stream.writer.get_extra_info("ssl_object")
    return sslobj.session if sslobj is not None else None


def tls_session_reused(stream: XmlStream) -> bool:
    sslobj = stream.writer.get_extra_info("ssl_object")
    return bool(sslobj is not None and sslobj.session_reused)


class UpstreamLink:
    """Our stream to the legacy server and the core that negotiates it: authenticated once
    ``connect_upstream`` returns it, then bound (``bind``) and discovered (``discover``).

    ``config`` is the one upstream configuration the link is made for (its host, domain,
    TLS and timeouts)."""

    def __init__(self, config: UpstreamConfig, negotiation: UpstreamNegotiation, *,
                 tls_context: ssl.SSLContext | None, max_stanza_bytes: int,
                 resume_tls: ssl.SSLSession | None = None, log: Any = None) -> None:
        self.config = config
        self.negotiation = negotiation
        self.tls_context = tls_context
        self.resume_tls = resume_tls  # offered for resumption by the TLS handshake
        self.max_stanza_bytes = max_stanza_bytes
        self.log = log
        # A plain attribute (read per stanza by the session), set once connected.
        self.stream: XmlStream
        self.connected = False
        self._deadline: float | None = None  # loop.time() the current wait ends at
        self.server_info = ServerInfo()  # after discover()

    @property
    def features(self) -> Element:
        """The authenticated stream's features."""
        assert self.negotiation.features is not None
        return self.negotiation.features

    def features_read(self) -> None:
        """What the session needed of the features is taken (``ServerEdge.connected``):
        the element is not kept as long as the session (about 3 KiB of libxml2)."""
        self.negotiation.features = _NO_FEATURES

    @property
    def mechanism(self) -> str:
        return self.negotiation.mechanism

    @property
    def jid(self) -> str:
        return self.negotiation.jid

    async def bind(self, resource: str | None, timeout: float | None = None) -> str:
        """Bind ``resource`` (or let the server pick); returns the full JID it bound.
        Raises UpstreamBindFailed when the server refuses, UpstreamUnavailable when the
        stream breaks or the answer does not come."""
        outcome = await self._carry_out(self.negotiation.bind(resource, timeout))
        assert isinstance(outcome, UpstreamBound)
        return outcome.jid

    async def discover(self, domain: str | None = None,
                       timeout: float | None = None) -> ServerInfo:
        """The domain's and the account's disco#info (XEP-0030), asked together after the
        bind; what else arrives meanwhile is put back for the session to relay."""
        outcome = await self._carry_out(self.negotiation.discover(domain, timeout))
        assert isinstance(outcome, ServerDiscovered)
        self.server_info = outcome.info
        return self.server_info

    # Carrying out -------------------------------------------------------------------------------

    async def _carry_out(self, commands: Iterable[UpstreamCommand]) -> Outcome:
        """The core's commands, and the events they wait for, until an outcome."""
        core = self.negotiation
        pending = deque(commands)
        passed_on: list[codec.StreamEvent] = []
        outcome: Outcome | None = None
        try:
            while True:
                while pending:
                    command = pending.popleft()
                    if isinstance(command, ToServerDirect):
                        self.stream.send(command.element)
                    elif isinstance(command, StartTimer):
                        self._deadline = asyncio.get_running_loop().time() + command.seconds
                    elif isinstance(command, OpenStream):
                        if command.restart:
                            self.stream.restart()
                        self.stream.send_header(codec.stream_header(to=command.to))
                    elif isinstance(command, Log):
                        if self.log is not None:
                            getattr(self.log, command.level)(command.event, **command.fields)
                    elif isinstance(command, PassOn):
                        passed_on.append(command.event)
                    elif isinstance(command, Connect):
                        pending.extend(await self._connect(command))
                    elif isinstance(command, StartTlsToServer):
                        pending.extend(await self._start_tls(command))
                    elif isinstance(command, UpstreamFailed):
                        raise _failure(command)
                    else:
                        outcome = command
                if outcome is not None:
                    return outcome
                pending.extend(await self._next_event(core))
        finally:
            if passed_on:
                self.stream.put_back(passed_on)

    async def _next_event(self, core: UpstreamNegotiation) -> list[UpstreamCommand]:
        timeout = None
        if self._deadline is not None:
            timeout = max(0.0, self._deadline - asyncio.get_running_loop().time())
        try:
            event = await self.stream.next_event(timeout)
        except TimeoutError:
            return core.timed_out()
        except ConnectionLost as exc:
            return core.lost(str(exc))
        return core.receive(event)

    async def _connect(self, command: Connect) -> list[UpstreamCommand]:
        context = self.tls_context if command.direct_tls else None
        writer: asyncio.StreamWriter | None = None
        try:
            # asyncio.timeout, not wait_for: in 3.11 wait_for can swallow a cancellation
            # that races with a finished connect, and an ended session would go on logging in.
            async with asyncio.timeout(command.seconds):
                reader, writer = await open_connection(command.host, command.port)
                if command.proxy_header is not None:  # the header goes first, before TLS
                    writer.write(command.proxy_header)
                if context is not None:
                    await start_tls(reader, writer, context, server_side=False,
                                    server_hostname=command.server_hostname,
                                    session=self.resume_tls, timeout=command.seconds)
        except (TimeoutError, OSError, ssl.SSLError) as exc:
            if writer is not None:
                writer.transport.abort()
            return self.negotiation.connect_failed(str(exc) or type(exc).__name__)
        # The server relays what other users send: its stanzas may nest as deep as the
        # parser allows, so one odd message from someone else cannot cut this user's link.
        self.stream = XmlStream(reader, writer, max_stanza_bytes=self.max_stanza_bytes,
                                max_depth=codec.MAX_DEPTH_LIMIT,
                                track_trailing=command.track_trailing)
        self.connected = True
        return self.negotiation.connected()

    async def _start_tls(self, command: StartTlsToServer) -> list[UpstreamCommand]:
        core = self.negotiation
        if self.tls_context is None:
            return core.tls_failed("no TLS context for the upstream")
        try:
            await self.stream.start_tls(self.tls_context, server_side=False,
                                        server_hostname=command.server_hostname,
                                        session=self.resume_tls, timeout=command.seconds)
        except PlaintextInjection as exc:
            return core.tls_injection(exc.buffered + exc.parsed, exc.events)
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            return core.tls_failed(tls_failure_reason(exc))
        return core.tls_started()


def _failure(command: UpstreamFailed) -> UpstreamError:
    if command.kind == "auth":
        return UpstreamAuthFailed(command.condition)
    if command.kind == "loop":
        return UpstreamLoop(command.reason)
    if command.kind == "bind" and command.error_reply is not None:
        return UpstreamBindFailed(command.error_reply)
    return UpstreamUnavailable(command.reason)


async def connect_upstream(config: UpstreamConfig, tls_context: ssl.SSLContext | None,
                           username: str, password: str, *, max_stanza_bytes: int,
                           resume_tls: ssl.SSLSession | None = None,
                           own_stream_ids: Container[str] = frozenset(),
                           client: Endpoints = (None, None),
                           log: Any = None) -> UpstreamLink:
    """Open and authenticate a stream to the legacy server as ``username``.

    ``resume_tls``: a TLS session of an earlier connection, offered for resumption.
    ``client``: the client's address and the one it connected to, for the PROXY protocol
    header (``upstream.proxy_protocol``) that tells the server who the user really is.
    ``own_stream_ids``: stream ids this proxy is issuing to its clients; a server header
    with one of them raises UpstreamLoop (see proxy/loopcheck.py).
    Raises UpstreamAuthFailed when the server rejects the credentials and
    UpstreamUnavailable for everything else (refused, TLS failure, timeout, stream error).
    """
    core = UpstreamNegotiation(config, username, password, own_stream_ids=own_stream_ids,
                               client=client)
    link = UpstreamLink(config, core, tls_context=tls_context,
                        max_stanza_bytes=max_stanza_bytes, resume_tls=resume_tls, log=log)
    try:
        await link._carry_out(core.start())
    except BaseException as exc:
        if link.connected:
            link.stream.abort()
        if isinstance(exc, (ssl.SSLError, OSError)):
            raise UpstreamUnavailable(f"negotiation with the server failed: {exc!r}") from exc
        raise
    return link
