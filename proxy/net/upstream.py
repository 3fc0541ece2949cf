"""The upstream side: the proxy logs in to the legacy server as an ordinary client.

Connect (plain, STARTTLS or direct TLS), authenticate with the client's own credentials using
the best SASL mechanism the server offers, then bind and open a session when asked to.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import ssl
import uuid
from collections.abc import Container
from dataclasses import dataclass, field
from typing import Any

from lxml import etree

from .. import proxyproto
from ..config import UpstreamConfig
from ..xmpp import codec, disco, ns, sasl
from ..xmpp.disco import DiscoInfo, ServerInfo
from ..xmpp.jid import Jid
from ..xmpp import stanza as st
from .xmlstream import ConnectionLost, PlaintextInjection, UnexpectedEvent, XmlStream
from ..xmpp.stanza import Element


Address = tuple[str, int]
Endpoints = tuple[Address | None, Address | None]  # (the client's, the one it connected to)

# SASL failures from the server that mean "these credentials will not do"; the client is told
# the same condition. Anything else is the proxy's or the server's trouble.
_CREDENTIAL_FAILURES = frozenset(("not-authorized", "account-disabled", "credentials-expired"))


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


# The TLS session to offer on the connection being opened in this task (RFC 5077 / TLS 1.3
# resumption). asyncio has no ``session=`` argument, but it builds every TLS object through
# ``SSLContext.wrap_bio``, in the task that opens the connection: that is where it goes in.
_RESUME_SESSION: contextvars.ContextVar[ssl.SSLSession | None] = contextvars.ContextVar(
    "xmpp_front_tls_session", default=None)


class ResumableTlsContext(ssl.SSLContext):
    def wrap_bio(self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO,
                 server_side: bool = False, server_hostname: str | bytes | None = None,
                 session: ssl.SSLSession | None = None) -> ssl.SSLObject:
        if session is None and not server_side:
            session = _RESUME_SESSION.get()
        try:
            return super().wrap_bio(incoming, outgoing, server_side=server_side,
                                    server_hostname=server_hostname, session=session)
        except (ValueError, ssl.SSLError):
            # A session from another context or an expired one: a full handshake instead.
            return super().wrap_bio(incoming, outgoing, server_side=server_side,
                                    server_hostname=server_hostname)


def client_tls_context(config: UpstreamConfig, ca_path: str | None) -> ssl.SSLContext:
    context = ResumableTlsContext(ssl.PROTOCOL_TLS_CLIENT)
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


@dataclass
class UpstreamLink:
    """An authenticated upstream stream, after the post-SASL restart."""

    stream: XmlStream
    features: Element
    mechanism: str
    jid: str = ""
    server_info: ServerInfo = field(default_factory=ServerInfo)  # after discover()

    def _needs_session(self) -> bool:
        session = self.features.find(ns.qname(ns.SESSION, "session"))
        return session is not None and session.find(ns.qname(ns.SESSION, "optional")) is None

    async def bind(self, resource: str | None, timeout: float) -> str:
        """Bind ``resource`` (or let the server pick); returns the full JID it bound."""
        iq = st.element("iq", {"type": "set", "id": "bind-" + uuid.uuid4().hex[:8]})
        bind = st.sub(iq, "bind", namespace=ns.BIND)
        if resource:
            st.sub(bind, "resource", text=resource)
        reply = await self._request(iq, timeout)
        if reply.get("type") != "result":
            raise UpstreamBindFailed(reply)
        jid_el = reply.find(f"{{{ns.BIND}}}bind/{{{ns.BIND}}}jid")
        if jid_el is None or not jid_el.text:
            raise UpstreamUnavailable("the server's bind result carries no JID")
        self.jid = jid_el.text
        if self._needs_session():
            iq = st.element("iq", {"type": "set", "id": "sess-" + uuid.uuid4().hex[:8]})
            st.sub(iq, "session", namespace=ns.SESSION)
            reply = await self._request(iq, timeout)
            if reply.get("type") != "result":
                raise UpstreamBindFailed(reply)
        return self.jid

    async def discover(self, domain: str, timeout: float) -> ServerInfo:
        """The domain's and the account's disco#info (XEP-0030), asked together after the
        bind; what else arrives meanwhile is put back for the session to relay. An entity
        that answers an error or not in time is unknown (None), not fatal."""
        account = Jid.parse(self.jid).bare if self.jid else None
        asked: dict[str, str] = {}
        for target in (domain, str(account) if account else None):
            if target:
                iq_id = "disco-" + uuid.uuid4().hex[:8]
                asked[iq_id] = target
                self.stream.send(disco.info_query(target, iq_id))
        answers: dict[str, DiscoInfo | None] = {}
        other: list[codec.StreamEvent] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while len(answers) < len(asked):
                event = await self.stream.next_event(max(0.0, deadline - loop.time()))
                el = event.element if isinstance(event, codec.StanzaReceived) else None
                if el is not None and el.tag == st.IQ and el.get("id") in asked \
                        and el.get("type") in ("result", "error"):
                    answers[asked[el.get("id", "")]] = disco.parse_info(el)
                else:
                    other.append(event)
                    if not isinstance(event, codec.StanzaReceived):
                        break  # the stream closed or broke: the session's pump will see it
        except TimeoutError:
            pass
        except ConnectionLost as exc:
            raise UpstreamUnavailable(f"lost during discovery: {exc!r}") from exc
        finally:
            self.stream.put_back(other)
        self.server_info = ServerInfo(domain=answers.get(domain),
                                      account=answers.get(str(account)) if account else None)
        return self.server_info

    async def _request(self, iq: Element, timeout: float) -> Element:
        self.stream.send(iq)
        try:
            while True:
                el = await self.stream.next_element(timeout)
                if el.tag == st.IQ and el.get("id") == iq.get("id"):
                    return el
        except (ConnectionLost, UnexpectedEvent, TimeoutError) as exc:
            raise UpstreamUnavailable(f"lost during bind: {exc!r}") from exc


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
    _RESUME_SESSION.set(resume_tls)
    timeout = config.connect_timeout
    try:
        # asyncio.timeout, not wait_for: in 3.11 wait_for can swallow a cancellation that
        # races with a finished connect, and an ended session would go on logging in.
        async with asyncio.timeout(timeout):
            if config.proxy_protocol == "off":
                reader, writer = await asyncio.open_connection(
                    config.host, config.port,
                    ssl=tls_context if config.tls == "direct" else None,
                    server_hostname=config.domain if config.tls == "direct" else None)
            else:  # the header goes first, before TLS
                reader, writer = await asyncio.open_connection(config.host, config.port)
                encode = proxyproto.encode_v1 if config.proxy_protocol == "v1" \
                    else proxyproto.encode_v2
                writer.write(encode(*client))
                if config.tls == "direct" and tls_context is not None:
                    await writer.start_tls(tls_context, server_hostname=config.domain)
    except (TimeoutError, OSError, ssl.SSLError) as exc:
        raise UpstreamUnavailable(f"cannot connect to {config.host}:{config.port}: "
                                  f"{exc or type(exc).__name__}") from exc
    # The server relays what other users send: its stanzas may nest as deep as the parser
    # allows, so one odd message from someone else cannot cut this user's link.
    stream = XmlStream(reader, writer, max_stanza_bytes=max_stanza_bytes,
                       max_depth=codec.MAX_DEPTH_LIMIT, track_trailing=config.tls == "starttls")
    try:
        return await _negotiate(stream, config, tls_context, username, password, timeout,
                                own_stream_ids, log)
    except UpstreamError:
        stream.abort()
        raise
    except (TimeoutError, ConnectionLost, UnexpectedEvent, ssl.SSLError, OSError) as exc:
        stream.abort()
        raise UpstreamUnavailable(f"negotiation with the server failed: {exc!r}") from exc


async def _open(stream: XmlStream, domain: str, timeout: float,
                own_stream_ids: Container[str] = frozenset()) -> Element:
    """Send our header and return the server's stream features."""
    stream.send_header(codec.stream_header(to=domain))
    event = await stream.next_event(timeout)
    if not isinstance(event, codec.StreamOpened):
        raise UpstreamUnavailable(f"the server did not open a stream: {event}")
    if event.attrs.get("id") in own_stream_ids:
        raise UpstreamLoop("the upstream answered with this proxy's own stream id: "
                           "upstream.host/upstream.port lead back to this proxy")
    features = await stream.next_element(timeout)
    if features.tag == ns.qname(ns.STREAM, "error"):
        raise UpstreamUnavailable(f"stream error from the server: {st.error_condition(features)}")
    if features.tag != ns.qname(ns.STREAM, "features"):
        raise UpstreamUnavailable(f"expected stream features, got {features.tag}")
    return features


async def _negotiate(stream: XmlStream, config: UpstreamConfig,
                     tls_context: ssl.SSLContext | None, username: str, password: str,
                     timeout: float, own_stream_ids: Container[str],
                     log: Any = None) -> UpstreamLink:
    features = await _open(stream, config.domain, timeout, own_stream_ids)
    if config.tls == "starttls":
        if features.find(ns.qname(ns.TLS, "starttls")) is None:
            raise UpstreamUnavailable("the server does not offer STARTTLS")
        stream.send(st.element("starttls", namespace=ns.TLS))
        answer = await stream.next_element(timeout)
        if answer.tag != ns.qname(ns.TLS, "proceed"):
            raise UpstreamUnavailable("the server refused STARTTLS")
        assert tls_context is not None
        try:
            await stream.start_tls(tls_context, server_hostname=config.domain, timeout=timeout)
        except PlaintextInjection as exc:
            # RFC 6120 §5.4.3.3, the initiating side: nothing after <proceed/> may be used.
            if log is not None:
                log.warning("starttls_injection", side="upstream", bytes=exc.buffered
                            + exc.parsed, elements=exc.events)
            raise UpstreamUnavailable(f"starttls_injection: {exc}") from None
        features = await _open(stream, config.domain, timeout)

    offered = [m.text or "" for m in features.iterfind(
        f"{{{ns.SASL}}}mechanisms/{{{ns.SASL}}}mechanism")]
    name = sasl.choose_mechanism(offered)
    if name is None:
        raise UpstreamUnavailable(f"no usable SASL mechanism among {offered}")
    mechanism = sasl.client_mechanism(name, username, password, domain=config.domain)
    await _authenticate(stream, mechanism, timeout)
    stream.restart()
    features = await _open(stream, config.domain, timeout)
    return UpstreamLink(stream=stream, features=features, mechanism=name)


def _b64(data: bytes | None) -> str:
    if data is None:
        return ""
    return base64.b64encode(data).decode() if data else "="


async def _authenticate(stream: XmlStream, mechanism: sasl.ClientMechanism,
                        timeout: float) -> None:
    auth = st.element("auth", {"mechanism": mechanism.name}, namespace=ns.SASL,
                      text=_b64(mechanism.initial_response()) or None)
    stream.send(auth)
    while True:
        el = await stream.next_element(timeout)
        local = etree.QName(el).localname
        data = base64.b64decode(el.text or "") if el.text and el.text != "=" else b""
        if el.tag == ns.qname(ns.SASL, "challenge"):
            try:
                response = mechanism.respond(data)
            except sasl.SaslError as exc:
                stream.send(st.element("abort", namespace=ns.SASL))
                raise UpstreamUnavailable(f"SASL exchange broken by the server: {exc}") from exc
            stream.send(st.element("response", namespace=ns.SASL, text=_b64(response) or None))
        elif el.tag == ns.qname(ns.SASL, "success"):
            try:
                mechanism.verify_success(data or None)
            except sasl.SaslError as exc:
                raise UpstreamUnavailable(f"the server failed SASL mutual auth: {exc}") from exc
            return
        elif el.tag == ns.qname(ns.SASL, "failure"):
            condition = st.error_condition(el) or "not-authorized"
            if condition in _CREDENTIAL_FAILURES:
                raise UpstreamAuthFailed(condition)
            raise UpstreamUnavailable(f"SASL failure from the server: {condition}")
        else:
            raise UpstreamUnavailable(f"unexpected <{local}/> during SASL")
