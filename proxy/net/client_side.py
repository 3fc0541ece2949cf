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
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any

from lxml import etree

from ..abuse import LoginThrottle, Refusal
from ..config import Config, Listener
from ..loopcheck import OwnStreamIds
from ..metrics import Counters
from ..features.stream_management import failed
from ..xmpp import codec, ns, sasl
from ..xmpp import stanza as st
from ..xmpp.jid import Jid
from .upstream import (
    UpstreamAuthFailed,
    UpstreamLink,
    UpstreamLoop,
    UpstreamUnavailable,
    connect_upstream,
)
from .preamble import tls_failure_reason
from .xmlstream import PlaintextInjection, XmlStream, features_element
from ..xmpp.stanza import Element


MAX_AUTH_ATTEMPTS = 3  # SASL failures before the stream is closed (RFC 6120 §6.4.5 "retries")


class NegotiationFailed(Exception):
    """The client's negotiation ended; ``error`` is the stream error already chosen for it."""

    def __init__(self, reason: str, error: bytes | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.error = error


def violation(condition: str, text: str) -> NegotiationFailed:
    return NegotiationFailed(f"{condition}: {text}", codec.stream_error(condition, text))


@dataclass
class AuthenticatedClient:
    """A client past SASL (stream restarted), with the upstream link its login opened."""

    stream: XmlStream
    account: Jid
    # None when the server was unreachable and a live session of the account vouched for
    # the password: such a client can resume or take over, not bind anew.
    upstream: UpstreamLink | None
    password: str = field(repr=False)  # kept to log in again after an upstream outage


class ClientNegotiation:
    """Drives one client connection from its first byte to a bound resource."""

    def __init__(self, stream: XmlStream, listener: Listener, config: Config,
                 server_tls: ssl.SSLContext, upstream_tls: ssl.SSLContext | None,
                 log: Any, *, throttle: LoginThrottle | None = None,
                 own_stream_ids: OwnStreamIds | None = None,
                 vouch: Callable[[str, str], bool] | None = None,
                 counters: Counters | None = None) -> None:
        self.stream = stream
        # While the server is unreachable: does a live session of this account hold this
        # password (so a client whose link dropped can still resume)?
        self.vouch = vouch
        self.listener = listener
        self.config = config
        self.domain = config.upstream.domain
        self.server_tls = server_tls
        self.upstream_tls = upstream_tls
        self.log = log
        self.upstream: UpstreamLink | None = None
        self.account: Jid | None = None
        self._password = ""
        self.throttle = throttle
        # Ids we issue before authentication, so our own upstream can tell it reached us.
        self.own_stream_ids = own_stream_ids
        self._issued_ids: list[str] = []
        # The socket's peer, or the client a PROXY protocol header named.
        self.client_address = stream.peer_host
        self.counters = counters  # for /metrics: logins by result, STARTTLS handshakes

    async def run(self) -> AuthenticatedClient:
        try:
            return await self._negotiate()
        except BaseException:
            if self.upstream is not None:
                await self.upstream.stream.close(wait_for_peer=0)
            raise
        finally:
            if self.own_stream_ids is not None:
                self.own_stream_ids.retire(self._issued_ids)

    async def _next(self) -> Element:
        event = await self.stream.next_event()
        if isinstance(event, codec.StanzaReceived):
            return event.element
        if isinstance(event, codec.StreamViolation):
            raise violation(event.condition, event.text)
        if isinstance(event, codec.StreamClosed):
            raise NegotiationFailed("client closed the stream during negotiation")
        raise violation("not-well-formed", "a second stream header")

    async def _open_stream(self, *features: Element) -> None:
        """Wait for the client's header, answer with ours and the given features."""
        event = await self.stream.next_event()
        if isinstance(event, codec.StreamViolation):
            raise violation(event.condition, event.text)  # close() sends our header first
        if not isinstance(event, codec.StreamOpened):
            raise NegotiationFailed("expected a stream header")
        stream_id = secrets.token_urlsafe(12)
        if self.own_stream_ids is not None and self.account is None:
            self.own_stream_ids.issued(stream_id)
            self._issued_ids.append(stream_id)
        self.stream.send_header(codec.stream_header(
            from_=self.domain, stream_id=stream_id, to=event.attrs.get("from")))
        to = event.attrs.get("to", "")
        if to.lower() != self.domain:
            raise violation("host-unknown", f"this server serves {self.domain}")
        self.stream.send(features_element(*features))

    async def _negotiate(self) -> AuthenticatedClient:
        if not self.listener.direct_tls:
            starttls = st.element("starttls", namespace=ns.TLS)
            st.sub(starttls, "required")
            await self._open_stream(starttls)
            el = await self._next()
            if el.tag != ns.qname(ns.TLS, "starttls"):
                raise violation("policy-violation", "STARTTLS is required first")
            self.stream.send(st.element("proceed", namespace=ns.TLS))
            try:
                await self.stream.start_tls(self.server_tls)
            except (ssl.SSLError, ConnectionError, TimeoutError) as exc:
                # Nothing can be said on the stream now: the handshake is what broke.
                self._count_tls("failed")
                self.log.warning("tls_handshake_failed", listener="starttls",
                                 reason=tls_failure_reason(exc))
                raise NegotiationFailed(f"TLS handshake failed: {tls_failure_reason(exc)}",
                                        None) from exc
            except PlaintextInjection as exc:
                # CVE-2011-0411 class: whatever followed <starttls/> was sent in the clear
                # (by the client or by someone on the path) and RFC 6120 §5.4.3.3 forbids
                # using it. not-authorized (§4.9.3.12): it is an attempt to act in the
                # negotiation before the stream is secured; TLS is not started, so the
                # error goes out in the clear, and the connection is closed.
                self.log.warning("starttls_injection", side="client", bytes=exc.buffered
                                 + exc.parsed, elements=exc.events)
                raise violation("not-authorized",
                                "data sent after <starttls/> before the TLS handshake") from None
            self._count_tls("ok")
            self.log.info("tls_established", **self.stream.tls_info)

        mechanisms = st.element("mechanisms", namespace=ns.SASL)
        st.sub(mechanisms, "mechanism", text="PLAIN")
        await self._open_stream(mechanisms)
        await self._authenticate()
        self.stream.restart()
        assert self.account is not None
        return AuthenticatedClient(self.stream, self.account, self.upstream, self._password)

    async def open_bound_stream(self, features: list[Element]) -> None:
        """The post-authentication stream header and features (bind, sm, ...)."""
        await self._open_stream(*features)

    async def next_element(self) -> Element:
        return await self._next()

    def _count_tls(self, result: str) -> None:
        if self.counters is not None:
            self.counters.count(self.counters.tls_handshakes, ("starttls", result))

    # SASL -----------------------------------------------------------------------------------

    def _sasl_failure(self, condition: str, text: str | None = None) -> None:
        failure = st.element("failure", namespace=ns.SASL)
        st.sub(failure, condition)
        if text:
            st.sub(failure, "text", text=text).set(
                "{http://www.w3.org/XML/1998/namespace}lang", "en")
        self.stream.send(failure)

    async def _authenticate(self) -> None:
        failures = 0
        while True:
            el = await self._next()
            if el.tag != ns.qname(ns.SASL, "auth"):
                if el.tag == ns.qname(ns.SASL, "abort"):
                    self._sasl_failure("aborted")
                    continue
                if etree.QName(el).namespace == ns.SM:
                    # Stream management errors are recoverable (XEP-0198 §3): say no, go on.
                    self.stream.send(failed("unexpected-request", text="authenticate first"))
                    continue
                raise violation("not-authorized", "authenticate first")
            outcome = await self._try_plain(el)
            if self.counters is not None:
                self.counters.count(self.counters.logins, "ok" if outcome is None else
                                    "throttled" if isinstance(outcome, Refusal) else outcome)
            if outcome is None:
                self.stream.send(st.element("success", namespace=ns.SASL))
                return
            if isinstance(outcome, Refusal):
                self._sasl_failure(outcome.condition, outcome.text)
            else:
                self._sasl_failure(outcome)
            failures += 1
            if failures >= MAX_AUTH_ATTEMPTS:
                raise violation("policy-violation", "too many failed authentication attempts")

    async def _try_plain(self, auth: Element) -> str | Refusal | None:
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
                raise violation("not-authorized", "expected a SASL response")
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
        refusal = (self.throttle.check(str(account), self.client_address)
                   if self.throttle is not None else None)
        if refusal is not None:  # answered without asking the server: it costs no login
            self.log.warning("login_refused", account=str(account), limit=refusal.limit,
                             address=self.client_address)
            return refusal
        try:
            self.upstream = await connect_upstream(
                self.config.upstream, self.upstream_tls, authcid, password,
                max_stanza_bytes=self.config.limits.max_stanza_bytes, log=self.log,
                own_stream_ids=(self.own_stream_ids if self.own_stream_ids is not None
                                else frozenset()))
        except UpstreamAuthFailed as exc:
            self.log.info("auth_failed", reason=exc.condition, account=str(account))
            if self.throttle is not None:
                delay = self.throttle.failed(str(account), self.client_address)
                if delay > 0:
                    self.log.info("login_throttled", account=str(account), delay=delay,
                                  address=self.client_address)
                    await asyncio.sleep(delay)
            return exc.condition
        except UpstreamLoop as exc:
            self.log.error("loop_refused", detail=str(exc), upstream_host=self.config.upstream.host,
                           upstream_port=self.config.upstream.port)
            return "temporary-auth-failure"
        except UpstreamUnavailable as exc:
            if self.vouch is not None and self.vouch(str(account), password):
                # The server checked this password when the live session logged in.
                self.account, self._password = account, password
                self.log.info("auth_ok", account=str(account), upstream_mechanism=None,
                              checked="against a live session (the server is unreachable)")
                return None
            self.log.warning("auth_failed", reason="upstream-unavailable", account=str(account),
                             detail=str(exc))
            return "temporary-auth-failure"
        self.account = account
        self._password = password
        if self.throttle is not None:
            self.throttle.succeeded(str(account))
        self.log.info("auth_ok", account=str(account), upstream_mechanism=self.upstream.mechanism)
        return None
