"""Our negotiation toward the legacy server as a pure core: the proxy plays the client.

RFC 6120 §4-§7 from the initiating side, with the credentials of the client it logs in
for: the connection (a PROXY protocol header first when ``upstream.proxy_protocol`` says so,
TLS at once for ``upstream.tls: direct``), our stream header, the server's (its stream id
must not be one this proxy issued: ``proxy/loopcheck.py``), STARTTLS when ``upstream.tls:
starttls`` (required: a server that does not offer it, or refuses it, is not used), SASL
with the best mechanism offered (``proxy/xmpp/sasl.py``; the server's SCRAM signature or
DIGEST-MD5 ``rspauth`` verified), the restart; then, when asked, the resource bind, the
RFC 3921 session where the server needs one, and the disco#info discovery of the domain
and the account (XEP-0030). Every wait for the server is bounded (``StartTimer``):
``connect_timeout`` per step, ``discovery_timeout`` for the whole discovery.

XEP-0198 toward the server is not negotiated here: the server edge
(``proxy/server_edge.py``) enables it from the features this core hands over.

Events in: ``start``, ``connected``/``connect_failed``, ``receive`` (a stream event),
``tls_started``/``tls_failed``/``tls_injection``, ``lost``, ``timed_out``, and the requests
``bind`` and ``discover``. Commands out (``proxy/commands.py``): ``Connect``,
``OpenStream``, ``ToServerDirect``, ``StartTlsToServer``, ``StartTimer``, ``Log``,
``PassOn``, and the outcomes ``UpstreamReady``, ``UpstreamBound``, ``ServerDiscovered``,
``UpstreamFailed``. The shell (``proxy/net/upstream.py``) connects, reads, writes, starts TLS
and carries the commands out. No sockets, no clock; the id and nonce sources are injected.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from collections.abc import Callable, Container
from typing import Literal

from lxml import etree

from . import proxyproto
from .commands import (
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
    UpstreamFailure,
    UpstreamReady,
)
from .config import UpstreamConfig
from .xmpp import codec, disco, ns, sasl
from .xmpp import stanza as st
from .xmpp.disco import DiscoInfo, ServerInfo
from .xmpp.jid import InvalidJid, Jid
from .xmpp.stanza import Element

Address = tuple[str, int]
Endpoints = tuple[Address | None, Address | None]  # (the client's, the one it connected to)

UPSTREAM_TIMER = "upstream"  # the one wait for the server at a time

# SASL failures from the server that mean "these credentials will not do"; the client is told
# the same condition. Anything else is the proxy's or the server's trouble.
CREDENTIAL_FAILURES = frozenset(("not-authorized", "account-disabled", "credentials-expired"))

_FEATURES = ns.qname(ns.STREAM, "features")
_STREAM_ERROR = ns.qname(ns.STREAM, "error")
_STARTTLS, _PROCEED = ns.qname(ns.TLS, "starttls"), ns.qname(ns.TLS, "proceed")
_CHALLENGE, _SUCCESS = ns.qname(ns.SASL, "challenge"), ns.qname(ns.SASL, "success")
_FAILURE = ns.qname(ns.SASL, "failure")
_MECHANISM = f"{{{ns.SASL}}}mechanisms/{{{ns.SASL}}}mechanism"
_BOUND_JID = f"{{{ns.BIND}}}bind/{{{ns.BIND}}}jid"
_SESSION, _OPTIONAL = ns.qname(ns.SESSION, "session"), ns.qname(ns.SESSION, "optional")

# Where the negotiation is: what the next event from the server must be.
Phase = Literal["idle", "connecting", "header", "features", "proceed", "tls", "sasl",
                "ready", "bind", "session", "discovery", "failed"]
# Which stream the next features belong to.
Stage = Literal["plain", "tls", "authenticated"]
_STAGE_NAMES: dict[Stage, str] = {"plain": "the stream negotiation",
                                  "tls": "the stream negotiation after TLS",
                                  "authenticated": "the restart after SASL"}


def new_iq_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _b64(data: bytes | None) -> str:
    """A SASL payload: "=" for an empty one, nothing for none (RFC 6120 §6.4.2)."""
    if data is None:
        return ""
    return base64.b64encode(data).decode() if data else "="


class UpstreamNegotiation:
    """One upstream stream from the TCP connect to the bound, discovered resource."""

    def __init__(self, config: UpstreamConfig, username: str, password: str, *,
                 own_stream_ids: Container[str] = frozenset(),
                 client: Endpoints = (None, None),
                 new_id: Callable[[str], str] = new_iq_id,
                 nonce: Callable[[], str] | None = None) -> None:
        self.config = config
        self._username = username
        self._password = password
        self._own_stream_ids = own_stream_ids
        self._client = client
        self._new_id = new_id
        self._nonce = nonce
        self.phase: Phase = "idle"
        self._stage: Stage = "plain"
        self._mechanism: sasl.ClientMechanism | None = None
        self.mechanism = ""  # its name, once chosen
        self.features: Element | None = None  # the authenticated stream's
        self.jid = ""  # once bound
        self._request_id = ""  # the bind's or the session's iq
        self._request_timeout: float | None = None
        self._domain_asked = config.domain
        self._asked: dict[str, str] = {}  # discovery: iq id -> the entity asked
        self._answers: dict[str, DiscoInfo | None] = {}

    # Events ---------------------------------------------------------------------------------

    def start(self) -> list[UpstreamCommand]:
        config = self.config
        header = None
        if config.proxy_protocol != "off":  # the header goes first, before TLS
            encode = proxyproto.encode_v1 if config.proxy_protocol == "v1" \
                else proxyproto.encode_v2
            header = encode(*self._client)
        self.phase = "connecting"
        return [Connect(config.host, config.port, config.connect_timeout,
                        direct_tls=config.tls == "direct", server_hostname=config.domain,
                        proxy_header=header, track_trailing=config.tls == "starttls")]

    def connected(self) -> list[UpstreamCommand]:
        return self._open()

    def connect_failed(self, detail: str) -> list[UpstreamCommand]:
        config = self.config
        return self._fail(f"cannot connect to {config.host}:{config.port}: {detail}")

    def receive(self, event: codec.StreamEvent) -> list[UpstreamCommand]:
        """An event of the server's stream."""
        if self.phase == "discovery":
            return self._discovery(event)
        if self.phase == "header":
            return self._header(event)
        if not isinstance(event, codec.StanzaReceived):
            what = "closed the stream" if isinstance(event, codec.StreamClosed) else \
                f"broke the stream ({getattr(event, 'condition', type(event).__name__)})"
            return self._fail(f"the server {what} during {self._step()}")
        el = event.element
        if self.phase == "features":
            return self._features(el)
        if self.phase == "proceed":
            if el.tag != _PROCEED:
                return self._fail("the server refused STARTTLS")
            self.phase = "tls"
            return [StartTlsToServer(self.config.domain, self.config.connect_timeout)]
        if self.phase == "sasl":
            return self._sasl(el)
        if self.phase in ("bind", "session"):
            return self._answer(el)
        return self._fail(f"unexpected <{etree.QName(el).localname}/> during {self._step()}")

    def tls_started(self) -> list[UpstreamCommand]:
        self._stage = "tls"
        return self._open()

    def tls_failed(self, reason: str) -> list[UpstreamCommand]:
        return self._fail(f"TLS with the server failed: {reason}")

    def tls_injection(self, buffered: int, events: int) -> list[UpstreamCommand]:
        """Bytes followed ``<proceed/>`` in the clear: RFC 6120 §5.4.3.3, the initiating
        side, nothing after it may be used; TLS is not started, the server not used."""
        return [Log("starttls_injection", {"side": "upstream", "bytes": buffered,
                                           "elements": events}, level="warning"),
                *self._fail(f"starttls_injection: {buffered} plaintext bytes and {events} "
                            "elements after the STARTTLS boundary")]

    def lost(self, detail: str) -> list[UpstreamCommand]:
        """The connection ended under us."""
        return self._fail(f"lost during {self._step()}: {detail}")

    def timed_out(self) -> list[UpstreamCommand]:
        """The wait the last ``StartTimer`` bounded is over."""
        if self.phase == "discovery":
            return [Log("upstream_discovery_timeout", {"missing": sorted(
                set(self._asked.values()) - set(self._answers))}, level="debug"),
                    *self._discovered()]
        return self._fail(f"the server did not answer in time during {self._step()}")

    # Requests -------------------------------------------------------------------------------

    def bind(self, resource: str | None, timeout: float | None = None) -> list[UpstreamCommand]:
        """Bind ``resource`` (None or "": the server's choice) on the authenticated stream."""
        assert self.phase == "ready", self.phase
        iq = st.element("iq", {"type": "set", "id": self._new_id("bind")})
        bind = st.sub(iq, "bind", namespace=ns.BIND)
        if resource:
            st.sub(bind, "resource", text=resource)
        return self._request(iq, "bind", timeout)

    def discover(self, domain: str | None = None,
                 timeout: float | None = None) -> list[UpstreamCommand]:
        """The domain's and the account's disco#info, asked together after the bind."""
        assert self.phase == "ready", self.phase
        domain = domain or self.config.domain
        self._asked, self._answers = {}, {}
        out: list[UpstreamCommand] = []
        for target in (domain, self._account()):
            if target:
                iq_id = self._new_id("disco")
                self._asked[iq_id] = target
                out.append(ToServerDirect(disco.info_query(target, iq_id)))
        self._domain_asked = domain
        if not self._asked:
            return self._discovered()
        self.phase = "discovery"
        seconds = self.config.discovery_timeout if timeout is None else timeout
        return [*out, StartTimer(UPSTREAM_TIMER, seconds)]

    # Decisions ------------------------------------------------------------------------------

    def _step(self) -> str:
        """Where we are, for a failure's reason."""
        if self.phase in ("bind", "session", "discovery"):
            return self.phase
        if self.phase == "sasl":
            return "SASL"
        return _STAGE_NAMES[self._stage]

    def _fail(self, reason: str, kind: UpstreamFailure = "unavailable", condition: str = "",
              error_reply: Element | None = None) -> list[UpstreamCommand]:
        self.phase = "failed"
        return [UpstreamFailed(kind, reason, condition, error_reply)]

    def _wait(self, seconds: float | None = None) -> StartTimer:
        return StartTimer(UPSTREAM_TIMER, self.config.connect_timeout
                          if seconds is None else seconds)

    def _open(self) -> list[UpstreamCommand]:
        """Our header: first, after TLS, or after SASL (with a restart)."""
        self.phase = "header"
        return [OpenStream(self.config.domain, restart=self._stage == "authenticated"),
                self._wait()]

    def _header(self, event: codec.StreamEvent) -> list[UpstreamCommand]:
        if not isinstance(event, codec.StreamOpened):
            return self._fail(f"the server did not open a stream: {event}")
        if event.attrs.get("id") in self._own_stream_ids:
            return self._fail("the upstream answered with this proxy's own stream id: "
                              "upstream.host/upstream.port lead back to this proxy", "loop")
        self.phase = "features"
        return [self._wait()]

    def _features(self, el: Element) -> list[UpstreamCommand]:
        if el.tag == _STREAM_ERROR:
            return self._fail(f"stream error from the server: {st.error_condition(el)}")
        if el.tag != _FEATURES:
            return self._fail(f"expected stream features, got {el.tag}")
        if self._stage == "authenticated":
            self.phase, self.features = "ready", el
            return [UpstreamReady(self.mechanism, el)]
        if self._stage == "plain" and self.config.tls == "starttls":
            if el.find(_STARTTLS) is None:
                return self._fail("the server does not offer STARTTLS")
            self.phase = "proceed"
            return [ToServerDirect(st.element("starttls", namespace=ns.TLS)), self._wait()]
        offered = [m.text or "" for m in el.iterfind(_MECHANISM)]
        name = sasl.choose_mechanism(offered)
        if name is None:
            return self._fail(f"no usable SASL mechanism among {offered}")
        try:
            mechanism = sasl.client_mechanism(name, self._username, self._password,
                                              domain=self.config.domain, nonce=self._nonce)
            initial = mechanism.initial_response()
        except (ValueError, sasl.SaslError) as exc:
            return self._fail(f"cannot use SASL {name} with these credentials: {exc}")
        self._mechanism, self.mechanism = mechanism, name
        self.phase = "sasl"
        auth = st.element("auth", {"mechanism": name}, namespace=ns.SASL,
                          text=_b64(initial) or None)
        return [ToServerDirect(auth), self._wait()]

    def _sasl(self, el: Element) -> list[UpstreamCommand]:
        mechanism = self._mechanism
        assert mechanism is not None
        try:
            text = "".join((el.text or "").split())
            data = base64.b64decode(text) if text and text != "=" else b""
        except binascii.Error:
            data = None
        if el.tag == _CHALLENGE:
            try:
                if data is None:
                    raise sasl.SaslError("a challenge that is not base64")
                response = mechanism.respond(data)
            except sasl.SaslError as exc:
                return [ToServerDirect(st.element("abort", namespace=ns.SASL)),
                        *self._fail(f"SASL exchange broken by the server: {exc}")]
            return [ToServerDirect(st.element("response", namespace=ns.SASL,
                                              text=_b64(response) or None)), self._wait()]
        if el.tag == _SUCCESS:
            try:
                if data is None:
                    raise sasl.SaslError("additional data that is not base64")
                mechanism.verify_success(data or None)
            except sasl.SaslError as exc:
                return self._fail(f"the server failed SASL mutual auth: {exc}")
            self._stage = "authenticated"
            return self._open()
        if el.tag == _FAILURE:
            condition = st.error_condition(el) or "not-authorized"
            if condition in CREDENTIAL_FAILURES:
                return self._fail(f"the server refused the credentials: {condition}", "auth",
                                  condition)
            return self._fail(f"SASL failure from the server: {condition}")
        return self._fail(f"unexpected <{etree.QName(el).localname}/> during SASL")

    def _request(self, iq: Element, phase: Literal["bind", "session"],
                 timeout: float | None) -> list[UpstreamCommand]:
        self.phase, self._request_id = phase, iq.get("id", "")
        self._request_timeout = timeout
        return [ToServerDirect(iq), self._wait(timeout)]

    def _answer(self, el: Element) -> list[UpstreamCommand]:
        if el.tag != st.IQ or el.get("id") != self._request_id:
            # Nothing is bound yet: no stanza for anyone can come; what does is not ours.
            return [Log("upstream_ignored", {"kind": st.kind(el), "during": self.phase},
                        level="debug")]
        if el.get("type") != "result":
            # The stream stays usable (RFC 6120 §7.6.2): the client may ask for another bind.
            condition = st.error_condition(el) or "undefined-condition"
            refused, self.phase = self.phase, "ready"
            return [UpstreamFailed("bind", f"the server refused the {refused}: {condition}",
                                   condition, el)]
        if self.phase == "session":
            self.phase = "ready"
            return [UpstreamBound(self.jid)]
        jid_el = el.find(_BOUND_JID)
        if jid_el is None or not jid_el.text:
            return self._fail("the server's bind result carries no JID")
        self.jid = jid_el.text
        if self._needs_session():
            iq = st.element("iq", {"type": "set", "id": self._new_id("sess")})
            st.sub(iq, "session", namespace=ns.SESSION)
            return self._request(iq, "session", self._request_timeout)
        self.phase = "ready"
        return [UpstreamBound(self.jid)]

    def _needs_session(self) -> bool:
        """RFC 3921 §3: a server that offers ``<session/>`` without ``<optional/>``
        (RFC 6121 Appendix E) needs one opened after the bind."""
        session = self.features.find(_SESSION) if self.features is not None else None
        return session is not None and session.find(_OPTIONAL) is None

    def _account(self) -> str | None:
        try:
            return str(Jid.parse(self.jid).bare) if self.jid else None
        except InvalidJid:
            return None

    def _discovery(self, event: codec.StreamEvent) -> list[UpstreamCommand]:
        """An answer to one of our questions, or the session's (passed on): a stanza in
        order, or the stream's end, which stops the discovery (the pump will see it)."""
        if not isinstance(event, codec.StanzaReceived):
            return [PassOn(event), *self._discovered()]
        el = event.element
        iq_id = el.get("id")
        if el.tag == st.IQ and iq_id in self._asked and el.get("type") in ("result", "error"):
            self._answers[self._asked[iq_id]] = disco.parse_info(el)
            if len(self._answers) == len(self._asked):
                return self._discovered()
            return []
        return [PassOn(event)]

    def _discovered(self) -> list[UpstreamCommand]:
        self.phase = "ready"
        account = self._account()
        info = ServerInfo(domain=self._answers.get(self._domain_asked),
                          account=self._answers.get(account) if account else None)
        return [ServerDiscovered(info)]
