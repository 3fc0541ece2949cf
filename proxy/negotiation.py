"""Client negotiation as a pure core: the proxy plays the server up to authentication.

RFC 6120 §4-§6: a stream header, STARTTLS (required unless the listener is direct TLS), a
second header, SASL PLAIN only (after TLS), then the restart. The core takes the stream's
events (a header, an element, the stream closed or broken), the results of what it asked
for (TLS started or refused, the upstream login's outcome) and the negotiation deadline;
it returns commands (``proxy/commands.py``). The shell (``proxy/net/client_side.py``) reads
the stream, does TLS and the upstream login, and carries the commands out. No sockets, no
clock: the login throttle (``proxy/abuse.py``) carries its own injected clock.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from lxml import etree

from .abuse import LoginThrottle, Refusal
from .config import domain_key
from .commands import (
    Authenticated,
    CheckLogin,
    Count,
    FailNegotiation,
    HandOver,
    Log,
    NegotiationCommand,
    Pause,
    Received,
    SendHeader,
    StartTimer,
    StartTls,
    ToClient,
)
from .features.stream_management import failed
from .xmpp import codec, ns, sasl
from .xmpp import stanza as st
from .xmpp.jid import Jid
from .xmpp.stanza import Element

MAX_AUTH_ATTEMPTS = 3  # SASL failures before the stream is closed (RFC 6120 §6.4.5 "retries")
NEGOTIATION_TIMER = "negotiation"

_STARTTLS = ns.qname(ns.TLS, "starttls")
_AUTH, _ABORT = ns.qname(ns.SASL, "auth"), ns.qname(ns.SASL, "abort")
_RESPONSE = ns.qname(ns.SASL, "response")

Phase = Literal["tls-header", "starttls", "tls", "sasl-header", "sasl", "response", "login",
                "authenticated", "bound-header", "bound", "failed"]


def violation(condition: str, text: str) -> FailNegotiation:
    return FailNegotiation(f"{condition}: {text}", codec.stream_error(condition, text))


@dataclass(frozen=True, slots=True)
class LoginOutcome:
    """What the upstream login the core asked for (``CheckLogin``) came to.

    ``ok``: the server accepted the credentials. ``refused``: it said ``condition``.
    ``loop``: the upstream turned out to be the proxy itself. ``unavailable``: the server
    could not be reached; ``vouched`` says whether a live session of the account holds this
    password (the server checked it when that session logged in)."""

    kind: Literal["ok", "refused", "loop", "unavailable"]
    condition: str = ""
    detail: str = ""
    mechanism: str | None = None
    vouched: bool = False
    upstream: tuple[str, int] | None = None  # the server tried (the chosen domain's)


class NegotiationCore:
    """One client connection from its first byte to the authenticated restart, then the
    post-authentication header; what the client sends after that is the hub's."""

    def __init__(self, domain: str, *, direct_tls: bool, timeout: float,
                 throttle: LoginThrottle | None = None, client_address: str = "?",
                 upstream_host: str = "", upstream_port: int = 0,
                 max_attempts: int = MAX_AUTH_ATTEMPTS,
                 served: Mapping[str, str] | None = None,
                 home_of: Callable[[str], int] | None = None, worker: int = 0) -> None:
        """``domain``: the default domain (our header's ``from`` until the client's header
        chose one). ``served``: every served domain, by ``domain_key`` to its name (None:
        ``domain`` alone); the first header's ``to`` chooses, later ones must repeat it.
        ``home_of`` (``workers: N``): the worker an account (a bare JID) lives in; an
        ``<auth/>`` naming an account of another is handed over to it (``HandOver``)
        instead of being checked here, the ``worker``."""
        self.domain = domain
        self.served = dict(served) if served is not None else {domain_key(domain) or domain:
                                                                domain}
        self.chosen = False  # whether the client's header chose self.domain yet
        self.direct_tls = direct_tls
        self.timeout = timeout
        self.throttle = throttle
        self.client_address = client_address
        self.upstream = (upstream_host, upstream_port)
        self.max_attempts = max_attempts
        self.phase: Phase = "sasl-header" if direct_tls else "tls-header"
        self.failures = 0
        self.account: Jid | None = None
        self._pending: tuple[Jid, str] | None = None  # (account, password) being checked
        self._bound_features: tuple[Element, ...] = ()
        self.home_of = home_of
        self.worker = worker
        self.handed_over = False  # this connection came from the worker that accepted it

    # Events ---------------------------------------------------------------------------------

    def start(self) -> list[NegotiationCommand]:
        """The connection is accepted: the whole negotiation has a deadline."""
        return [StartTimer(NEGOTIATION_TIMER, self.timeout)]

    def timed_out(self) -> list[NegotiationCommand]:
        self.phase = "failed"
        return [FailNegotiation("negotiation timeout", codec.stream_error("connection-timeout"))]

    def receive(self, event: codec.StreamEvent) -> list[NegotiationCommand]:
        """An event of the client's stream."""
        if self.phase in ("tls-header", "sasl-header", "bound-header"):
            return self._header(event)
        if isinstance(event, codec.StanzaReceived):
            return self._element(event.element)
        if isinstance(event, codec.StreamViolation):
            return self._fail(violation(event.condition, event.text))
        if isinstance(event, codec.StreamClosed):
            return self._fail(FailNegotiation("client closed the stream during negotiation"))
        return self._fail(violation("not-well-formed", "a second stream header"))

    def tls_started(self, tls_info: Mapping[str, object]) -> list[NegotiationCommand]:
        self.phase = "sasl-header"
        return [Count("tls_handshakes", ("starttls", "ok")), Log("tls_established", dict(tls_info))]

    def tls_failed(self, reason: str) -> list[NegotiationCommand]:
        """The handshake broke: nothing can be said on the stream any more."""
        return [Count("tls_handshakes", ("starttls", "failed")),
                Log("tls_handshake_failed", {"listener": "starttls", "reason": reason},
                    level="warning"),
                *self._fail(FailNegotiation(f"TLS handshake failed: {reason}"))]

    def tls_injection(self, buffered: int, events: int) -> list[NegotiationCommand]:
        """Something followed ``<starttls/>`` in the clear (CVE-2011-0411 class, by the
        client or by someone on the path) and RFC 6120 §5.4.3.3 forbids using it.
        not-authorized (§4.9.3.12): an attempt to act in the negotiation before the stream is
        secured; TLS is not started, the error goes out in the clear, the connection closes."""
        return [Log("starttls_injection", {"side": "client", "bytes": buffered,
                                           "elements": events}, level="warning"),
                *self._fail(violation("not-authorized",
                                      "data sent after <starttls/> before the TLS handshake"))]

    def taken_over(self, auth: Element, failures: int,
                   domain: str) -> list[NegotiationCommand]:
        """At the account's home: the connection another worker accepted (TLS, headers and
        features done there, its header chose ``domain``) continues from its ``<auth/>``
        as if it had been read here."""
        self.handed_over = True
        name = self.served.get(domain_key(domain) or "")
        if name is None:  # the workers run one configuration: only a reload between
            return self._fail(violation("host-unknown", "this server does not serve that "
                                        "domain"))
        self.domain, self.chosen = name, True
        self.phase = "sasl"
        self.failures = failures
        return self._sasl(auth)

    def login_result(self, outcome: LoginOutcome) -> list[NegotiationCommand]:
        """The outcome of the ``CheckLogin`` asked for."""
        assert self._pending is not None and self.phase == "login"
        account, password = self._pending
        self._pending = None
        name = str(account)
        if outcome.kind == "ok":
            if self.throttle is not None:
                self.throttle.succeeded(name)
            return self._success(account, password, Log(
                "auth_ok", {"account": name, "upstream_mechanism": outcome.mechanism}))
        if outcome.kind == "refused":
            out: list[NegotiationCommand] = [Log("auth_failed", {
                "reason": outcome.condition, "account": name})]
            if self.throttle is not None:
                delay = self.throttle.failed(name, self.client_address)
                if delay > 0:
                    out += [Log("login_throttled", {"account": name, "delay": delay,
                                                    "address": self.client_address}),
                            Pause(delay)]
            return out + self._sasl_failed(outcome.condition)
        if outcome.kind == "loop":
            host, port = outcome.upstream or self.upstream
            return [Log("loop_refused", {"detail": outcome.detail, "domain": self.domain,
                                         "upstream_host": host, "upstream_port": port},
                        level="error"),
                    *self._sasl_failed("temporary-auth-failure")]
        if outcome.vouched:
            return self._success(account, password, Log("auth_ok", {
                "account": name, "upstream_mechanism": None,
                "checked": "against a live session (the server is unreachable)"}))
        return [Log("auth_failed", {"reason": "upstream-unavailable", "account": name,
                                    "detail": outcome.detail}, level="warning"),
                *self._sasl_failed("temporary-auth-failure")]

    def open_bound_stream(self, features: list[Element]) -> None:
        """After the restart: the next header gets these features (bind, sm, ...)."""
        assert self.phase == "authenticated"
        self.phase = "bound-header"
        self._bound_features = tuple(features)

    # Decisions ------------------------------------------------------------------------------

    def _fail(self, failure: FailNegotiation) -> list[NegotiationCommand]:
        self.phase = "failed"
        return [failure]

    def _header(self, event: codec.StreamEvent) -> list[NegotiationCommand]:
        if isinstance(event, codec.StreamViolation):
            return self._fail(violation(event.condition, event.text))  # our header goes first
        if not isinstance(event, codec.StreamOpened):
            return self._fail(FailNegotiation("expected a stream header"))
        to = event.attrs.get("to", "")
        key = domain_key(to)
        name = self.served.get(key) if key is not None else None
        if name is None or (self.chosen and name != self.domain):
            # RFC 6120 §4.9.3.6: a 'to' we do not serve (or, on a restart, another domain
            # than the stream's).
            text = (f"this stream is for {self.domain}" if name is not None else
                    f"this server serves {self.domain}" if len(self.served) == 1 else
                    "this server does not serve that domain")
            return [SendHeader(event.attrs.get("from"), None),
                    Log("host_unknown", {"to": to[:256], "phase": self.phase,
                                         "address": self.client_address}, level="warning"),
                    *self._fail(violation("host-unknown", text))]
        self.domain, self.chosen = name, True
        if self.phase == "tls-header":
            starttls = st.element("starttls", namespace=ns.TLS)
            st.sub(starttls, "required")
            features: tuple[Element, ...] = (starttls,)
            self.phase = "starttls"
        elif self.phase == "sasl-header":
            mechanisms = st.element("mechanisms", namespace=ns.SASL)
            st.sub(mechanisms, "mechanism", text="PLAIN")
            features = (mechanisms,)
            self.phase = "sasl"
        else:
            features, self._bound_features = self._bound_features, ()
            self.phase = "bound"
        return [SendHeader(event.attrs.get("from"), features)]

    def _element(self, el: Element) -> list[NegotiationCommand]:
        if self.phase == "starttls":
            if el.tag != _STARTTLS:
                return self._fail(violation("policy-violation", "STARTTLS is required first"))
            self.phase = "tls"
            return [ToClient(st.element("proceed", namespace=ns.TLS)), StartTls()]
        if self.phase == "sasl":
            return self._sasl(el)
        if self.phase == "response":
            if el.tag == _ABORT:
                return self._sasl_failed("aborted")
            if el.tag != _RESPONSE:
                return self._fail(violation("not-authorized", "expected a SASL response"))
            return self._plain((el.text or "").strip())
        if self.phase == "bound":
            return [Received(el)]
        # Nothing may come while TLS starts or the login is checked (the shell reads no
        # further then); anything else is out of order.
        return self._fail(violation("not-authorized", "out of order"))

    def _sasl(self, el: Element) -> list[NegotiationCommand]:
        if el.tag != _AUTH:
            if el.tag == _ABORT:
                return [self._sasl_failure("aborted")]
            if etree.QName(el).namespace == ns.SM:
                # Stream management errors are recoverable (XEP-0198 §3): say no, go on.
                return [ToClient(failed("unexpected-request", text="authenticate first"))]
            return self._fail(violation("not-authorized", "authenticate first"))
        if el.get("mechanism") != "PLAIN":
            return [Log("auth_failed", {"reason": "invalid-mechanism",
                                        "mechanism": el.get("mechanism")}),
                    *self._sasl_failed("invalid-mechanism")]
        text = (el.text or "").strip()
        if not text:  # no initial response: ask for it with an empty challenge
            self.phase = "response"
            return [ToClient(st.element("challenge", namespace=ns.SASL, text="="))]
        return self._plain(text)

    def _plain(self, text: str) -> list[NegotiationCommand]:
        """One SASL PLAIN attempt's credentials (RFC 4616)."""
        self.phase = "sasl"
        try:
            message = base64.b64decode(text, validate=True) if text != "=" else b""
        except binascii.Error:
            return [Log("auth_failed", {"reason": "incorrect-encoding"}),
                    *self._sasl_failed("incorrect-encoding")]
        try:
            authzid, authcid, password = sasl.parse_plain(message)
            account = Jid.parse(f"{authcid}@{self.domain}")
        except (sasl.SaslError, ValueError):
            return [Log("auth_failed", {"reason": "malformed-request"}),
                    *self._sasl_failed("malformed-request")]
        if authzid and authzid.lower() not in (str(account), authcid.lower()):
            return [Log("auth_failed", {"reason": "invalid-authzid", "account": str(account)}),
                    *self._sasl_failed("invalid-authzid")]
        if self.home_of is not None:
            home = self.home_of(str(account))
            if home != self.worker:
                if self.handed_over:
                    # It came here for another account; a second hop is not made.
                    return [Log("auth_failed", {"reason": "another account's worker",
                                                "account": str(account)}),
                            *self._sasl_failed("temporary-auth-failure")]
                auth = st.element("auth", namespace=ns.SASL, text=text)
                auth.set("mechanism", "PLAIN")
                return [HandOver(account, home, auth, self.failures)]
        refusal = (self.throttle.check(str(account), self.client_address)
                   if self.throttle is not None else None)
        if refusal is not None:  # answered without asking the server: it costs no login
            return [Log("login_refused", {"account": str(account), "limit": refusal.limit,
                                          "address": self.client_address}, level="warning"),
                    *self._sasl_failed(refusal)]
        self.phase = "login"
        self._pending = (account, password)
        return [CheckLogin(account, authcid, password)]

    def _success(self, account: Jid, password: str, log: Log) -> list[NegotiationCommand]:
        self.account = account
        self.phase = "authenticated"
        return [Count("logins", "ok"), log, ToClient(st.element("success", namespace=ns.SASL)),
                Authenticated(account, password)]

    def _sasl_failed(self, why: str | Refusal) -> list[NegotiationCommand]:
        """A failed attempt: the ``<failure/>``, and the end after too many."""
        self.phase = "sasl"
        out: list[NegotiationCommand] = [
            Count("logins", "throttled" if isinstance(why, Refusal) else why),
            self._sasl_failure(why)]
        self.failures += 1
        if self.failures >= self.max_attempts:
            out += self._fail(violation("policy-violation",
                                        "too many failed authentication attempts"))
        return out

    @staticmethod
    def _sasl_failure(why: str | Refusal) -> ToClient:
        condition, text = (why.condition, why.text) if isinstance(why, Refusal) else (why, None)
        failure = st.element("failure", namespace=ns.SASL)
        st.sub(failure, condition)
        if text:
            st.sub(failure, "text", text=text).set(
                "{http://www.w3.org/XML/1998/namespace}lang", "en")
        return ToClient(failure)
