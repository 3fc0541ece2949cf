"""The client side: the proxy plays the XMPP server for one client connection.

Stream negotiation (RFC 6120 §4-§7): STARTTLS (required) unless the listener is direct TLS,
SASL PLAIN checked by logging in upstream with the same credentials, then resource binding
relayed to the legacy server and the legacy ``<session/>`` answered. The result is a bound
client stream plus its authenticated upstream link, ready for the relay.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import secrets
import ssl
from dataclasses import dataclass
from typing import Any

from lxml import etree

from ..config import Config, Listener
from ..xmpp import codec, ns, sasl
from ..xmpp import stanza as st
from ..xmpp.jid import InvalidJid, Jid
from .upstream import (
    UpstreamAuthFailed,
    UpstreamBindFailed,
    UpstreamLink,
    UpstreamUnavailable,
    connect_upstream,
)
from .xmlstream import XmlStream, features_element

Element = etree._Element

MAX_AUTH_ATTEMPTS = 3  # SASL failures before the stream is closed (RFC 6120 §6.4.5 "retries")


class NegotiationFailed(Exception):
    """The client's negotiation ended; ``error`` is the stream error already chosen for it."""

    def __init__(self, reason: str, error: bytes | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.error = error


def _violation(condition: str, text: str) -> NegotiationFailed:
    return NegotiationFailed(f"{condition}: {text}", codec.stream_error(condition, text))


@dataclass
class BoundClient:
    stream: XmlStream
    upstream: UpstreamLink
    jid: Jid


class ClientNegotiation:
    """Drives one client connection from its first byte to a bound resource."""

    def __init__(self, stream: XmlStream, listener: Listener, config: Config,
                 server_tls: ssl.SSLContext, upstream_tls: ssl.SSLContext | None,
                 log: Any) -> None:
        self.stream = stream
        self.listener = listener
        self.config = config
        self.domain = config.upstream.domain
        self.server_tls = server_tls
        self.upstream_tls = upstream_tls
        self.log = log
        self.upstream: UpstreamLink | None = None
        self.account: Jid | None = None

    async def run(self) -> BoundClient:
        try:
            return await self._negotiate()
        except BaseException:
            if self.upstream is not None:
                await self.upstream.stream.close(wait_for_peer=0)
            raise

    async def _next(self) -> Element:
        event = await self.stream.next_event()
        if isinstance(event, codec.StanzaReceived):
            return event.element
        if isinstance(event, codec.StreamViolation):
            raise _violation(event.condition, event.text)
        if isinstance(event, codec.StreamClosed):
            raise NegotiationFailed("client closed the stream during negotiation")
        raise _violation("not-well-formed", "a second stream header")

    async def _open_stream(self, *features: Element) -> None:
        """Wait for the client's header, answer with ours and the given features."""
        event = await self.stream.next_event()
        if isinstance(event, codec.StreamViolation):
            self.stream.send_bytes(codec.stream_header(from_=self.domain))
            raise _violation(event.condition, event.text)
        if not isinstance(event, codec.StreamOpened):
            raise NegotiationFailed("expected a stream header")
        self.stream.send_bytes(codec.stream_header(
            from_=self.domain, stream_id=secrets.token_urlsafe(12),
            to=event.attrs.get("from")))
        to = event.attrs.get("to", "")
        if to.lower() != self.domain:
            raise _violation("host-unknown", f"this server serves {self.domain}")
        self.stream.send(features_element(*features))

    async def _negotiate(self) -> BoundClient:
        if not self.listener.direct_tls:
            starttls = st.element("starttls", namespace=ns.TLS)
            st.sub(starttls, "required")
            await self._open_stream(starttls)
            el = await self._next()
            if el.tag != ns.qname(ns.TLS, "starttls"):
                raise _violation("policy-violation", "STARTTLS is required first")
            self.stream.send(st.element("proceed", namespace=ns.TLS))
            await self.stream.drain()
            await self.stream.start_tls(self.server_tls)
            self.log.info("tls_established", **self.stream.tls_info)

        mechanisms = st.element("mechanisms", namespace=ns.SASL)
        st.sub(mechanisms, "mechanism", text="PLAIN")
        await self._open_stream(mechanisms)
        await self._authenticate()
        self.stream.restart()

        bind = st.element("bind", namespace=ns.BIND)
        session = st.element("session", namespace=ns.SESSION)
        st.sub(session, "optional")
        await self._open_stream(bind, session)
        jid = await self._bind()
        assert self.upstream is not None
        return BoundClient(self.stream, self.upstream, jid)

    # SASL -----------------------------------------------------------------------------------

    def _sasl_failure(self, condition: str) -> None:
        failure = st.element("failure", namespace=ns.SASL)
        st.sub(failure, condition)
        self.stream.send(failure)

    async def _authenticate(self) -> None:
        failures = 0
        while True:
            el = await self._next()
            if el.tag != ns.qname(ns.SASL, "auth"):
                if el.tag == ns.qname(ns.SASL, "abort"):
                    self._sasl_failure("aborted")
                    continue
                raise _violation("not-authorized", "authenticate first")
            outcome = await self._try_plain(el)
            if outcome is None:
                self.stream.send(st.element("success", namespace=ns.SASL))
                return
            self._sasl_failure(outcome)
            failures += 1
            if failures >= MAX_AUTH_ATTEMPTS:
                raise _violation("policy-violation", "too many failed authentication attempts")

    async def _try_plain(self, auth: Element) -> str | None:
        """One SASL PLAIN attempt: None on success, else the failure condition to send."""
        if auth.get("mechanism") != "PLAIN":
            self.log.info("auth_failed", reason="invalid-mechanism",
                          mechanism=auth.get("mechanism"))
            return "invalid-mechanism"
        text = (auth.text or "").strip()
        if not text:  # no initial response: ask for it with an empty challenge
            self.stream.send(st.element("challenge", namespace=ns.SASL, text="="))
            response = await self._next()
            if response.tag == ns.qname(ns.SASL, "abort"):
                return "aborted"
            if response.tag != ns.qname(ns.SASL, "response"):
                raise _violation("not-authorized", "expected a SASL response")
            text = (response.text or "").strip()
        try:
            message = base64.b64decode(text, validate=True) if text != "=" else b""
        except binascii.Error:
            self.log.info("auth_failed", reason="incorrect-encoding")
            return "incorrect-encoding"
        try:
            authzid, authcid, password = sasl.parse_plain(message)
            account = Jid.parse(f"{authcid}@{self.domain}")
        except (sasl.SaslError, ValueError):
            self.log.info("auth_failed", reason="malformed-request")
            return "malformed-request"
        if authzid and authzid.lower() not in (str(account), authcid.lower()):
            self.log.info("auth_failed", reason="invalid-authzid", account=str(account))
            return "invalid-authzid"
        try:
            self.upstream = await connect_upstream(
                self.config.upstream, self.upstream_tls, authcid, password,
                max_stanza_bytes=self.config.limits.max_stanza_bytes)
        except UpstreamAuthFailed as exc:
            self.log.info("auth_failed", reason=exc.condition, account=str(account))
            return exc.condition
        except UpstreamUnavailable as exc:
            self.log.warning("auth_failed", reason="upstream-unavailable", account=str(account),
                             detail=str(exc))
            return "temporary-auth-failure"
        self.account = account
        self.log.info("auth_ok", account=str(account), upstream_mechanism=self.upstream.mechanism)
        return None

    # Binding ---------------------------------------------------------------------------------

    async def _bind(self) -> Jid:
        assert self.upstream is not None and self.account is not None
        while True:
            el = await self._next()
            if el.tag != st.IQ:
                raise _violation("not-authorized", "bind a resource first")
            if el.get("type") == "set" and el.find(ns.qname(ns.BIND, "bind")) is not None:
                resource_el = el.find(f"{{{ns.BIND}}}bind/{{{ns.BIND}}}resource")
                resource = (resource_el.text or "").strip() if resource_el is not None else ""
                try:
                    full = await self.upstream.bind(resource or None,
                                                    self.config.upstream.connect_timeout)
                except UpstreamBindFailed as exc:
                    reply = exc.error_reply
                    reply.set("id", el.get("id", ""))
                    for attr in ("to", "from"):
                        reply.attrib.pop(attr, None)
                    self.stream.send(reply)
                    self.log.info("bind_failed", reason=str(exc), resource=resource)
                    continue
                except UpstreamUnavailable as exc:
                    raise _violation("remote-connection-failed",
                                     "the legacy server failed during bind") from exc
                try:
                    jid = Jid.parse(full)
                except InvalidJid as exc:
                    raise _violation("internal-server-error", "bad JID from the server") from exc
                if jid.bare != self.account.bare:
                    raise _violation("internal-server-error", "the server bound another account")
                result = st.iq_result(el)
                result.attrib.pop("to", None)
                bind = st.sub(result, "bind", namespace=ns.BIND)
                st.sub(bind, "jid", text=str(jid))
                self.stream.send(result)
                self.log.info("bound", jid=str(jid))
                return jid
            # Anything else before binding is not allowed (RFC 6120 §7.1).
            self.stream.send(st.error_reply(el, "not-authorized" if el.get("type") in (
                "get", "set") else "bad-request"))


async def negotiate(stream: XmlStream, listener: Listener, config: Config,
                    server_tls: ssl.SSLContext, upstream_tls: ssl.SSLContext | None,
                    log: Any) -> BoundClient:
    negotiation = ClientNegotiation(stream, listener, config, server_tls, upstream_tls, log)
    return await asyncio.wait_for(negotiation.run(), config.limits.negotiation_timeout)
