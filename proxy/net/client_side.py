"""The client side's shell: the proxy plays the XMPP server for one client connection.

The decisions (STARTTLS required unless the listener is direct TLS, SASL PLAIN only after
TLS, three failures close the stream, the negotiation deadline) are the pure
``proxy.negotiation.NegotiationCore``'s; this shell reads the stream's events, starts TLS,
logs in upstream with the client's credentials (which checks them) and carries out the
core's commands. The result is an authenticated client stream plus its upstream link.
"""

from __future__ import annotations

import asyncio
import secrets
import ssl
from dataclasses import dataclass, field
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeAlias

from ..abuse import LoginThrottle
from ..commands import (
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
from ..config import Config, Listener, ServedDomain
from ..loopcheck import OwnStreamIds
from ..metrics import Counters
from ..negotiation import LoginOutcome, NegotiationCore
from ..xmpp import codec
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


# The TLS context for each served domain's upstream, by its name (None: upstream.tls none).
UpstreamTls: TypeAlias = Mapping[str, ssl.SSLContext | None]


class HandOverNeeded(Exception):
    """``workers: N``: the client's ``<auth/>`` names an account of another worker."""

    def __init__(self, command: HandOver) -> None:
        super().__init__(f"{command.account} lives in worker {command.home}")
        self.command = command


class NegotiationFailed(Exception):
    """The client's negotiation ended; ``error`` is the stream error already chosen for it."""

    def __init__(self, reason: str, error: bytes | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.error = error


@dataclass
class AuthenticatedClient:
    """A client past SASL (stream restarted), with the upstream link its login opened."""

    stream: XmlStream
    account: Jid
    # None when the server was unreachable and a live session of the account vouched for
    # the password: such a client can resume or take over, not bind anew.
    upstream: UpstreamLink | None
    password: str = field(repr=False)  # kept to log in again after an upstream outage
    # The domain the stream's header chose: its upstream is the session's server, reached
    # with this TLS context (the one the login used) for every reconnection.
    domain: ServedDomain | None = None
    upstream_tls: ssl.SSLContext | None = None

    @property
    def config(self) -> Config:
        """The configuration as this client's session sees it (its domain's upstream)."""
        assert self.domain is not None
        return self.domain.config


class ClientNegotiation:
    """Drives one client connection from its first byte to a bound resource: the stream's
    events go to the ``NegotiationCore``, its commands are carried out here."""

    def __init__(self, stream: XmlStream, listener: Listener, config: Config,
                 server_tls: ssl.SSLContext, upstream_tls: UpstreamTls,
                 log: Any, *, throttle: LoginThrottle | None = None,
                 own_stream_ids: OwnStreamIds | None = None,
                 vouch: Callable[[str, str], bool] | None = None,
                 counters: Counters | None = None,
                 home_of: Callable[[str], int] | None = None, worker: int = 0) -> None:
        self.stream = stream
        # While the server is unreachable: does a live session of this account hold this
        # password (so a client whose link dropped can still resume)?
        self.vouch = vouch
        self.listener = listener
        self.config = config
        self.server_tls = server_tls
        self.upstream_tls = upstream_tls
        self.log = log
        self.upstream: UpstreamLink | None = None
        # Ids we issue before authentication, so our own upstream can tell it reached us.
        self.own_stream_ids = own_stream_ids
        self._issued_ids: list[str] = []
        self.counters = counters  # for /metrics: logins by result, STARTTLS handshakes
        default = config.default_domain
        self.core = NegotiationCore(
            default.name, direct_tls=listener.direct_tls,
            timeout=config.limits.negotiation_timeout, throttle=throttle,
            # The socket's peer, or the client a PROXY protocol header named.
            client_address=stream.peer_host,
            upstream_host=config.upstream.host, upstream_port=config.upstream.port,
            served={key: served.name for key, served in config.served.items()},
            home_of=home_of, worker=worker)
        self.deadline: float | None = None  # seconds, from the core's timer
        self._authenticated: Authenticated | None = None
        self._received: list[Element] = []
        self.header: dict[str, str] = {}  # the attributes of the client's last header

    def start(self) -> float:
        """The negotiation's time limit in seconds (the caller bounds the whole of it)."""
        self._execute_now(self.core.start())
        assert self.deadline is not None
        return self.deadline

    def timed_out(self) -> NegotiationFailed:
        """The deadline passed: what to close the stream with."""
        (failure,) = [c for c in self.core.timed_out() if isinstance(c, FailNegotiation)]
        return NegotiationFailed(failure.reason, failure.error)

    async def run(self) -> AuthenticatedClient:
        try:
            while self._authenticated is None:
                await self._step()
            self.stream.restart()
            auth = self._authenticated
            return AuthenticatedClient(self.stream, auth.account, self.upstream, auth.password,
                                       domain=self.domain,
                                       upstream_tls=self.upstream_tls.get(self.domain.name))
        except BaseException:
            if self.upstream is not None:
                await self.upstream.stream.close(wait_for_peer=0)
            raise
        finally:
            if self.own_stream_ids is not None:
                self.own_stream_ids.retire(self._issued_ids)

    async def take_over(self, auth: Element, failures: int, domain: str) -> None:
        """At the account's home: go on from the ``<auth/>`` the accepting worker read."""
        await self._execute(self.core.taken_over(auth, failures, domain))

    @property
    def domain(self) -> ServedDomain:
        """The served domain the client's header chose (the default one before it)."""
        served = self.config.domain(self.core.domain)
        assert served is not None  # the core chooses among config.served only
        return served

    async def open_bound_stream(self, features: list[Element]) -> None:
        """The post-authentication stream header and features (bind, sm, ...)."""
        self.core.open_bound_stream(features)
        await self._step()

    async def next_element(self) -> Element:
        while not self._received:
            await self._step()
        return self._received.pop(0)

    # Carrying out ----------------------------------------------------------------------------

    async def _step(self) -> None:
        """One event of the client's stream through the core."""
        event = await self.stream.next_event()
        if isinstance(event, codec.StreamOpened):
            self.header = event.attrs  # for a handover to another worker
        await self._execute(self.core.receive(event))

    def _execute_now(self, commands: Sequence[NegotiationCommand]) -> None:
        for command in commands:
            if isinstance(command, StartTimer):
                self.deadline = command.seconds
            elif isinstance(command, Log):
                getattr(self.log, command.level)(command.event, **command.fields)
            else:
                raise AssertionError(f"not at start: {command!r}")

    async def _execute(self, commands: Sequence[NegotiationCommand]) -> None:
        for command in commands:
            if isinstance(command, ToClient):
                self.stream.send(command.element)
            elif isinstance(command, SendHeader):
                self._send_header(command)
            elif isinstance(command, Log):
                getattr(self.log, command.level)(command.event, **command.fields)
            elif isinstance(command, Count):
                if self.counters is not None:
                    self.counters.count(getattr(self.counters, command.table), command.key)
            elif isinstance(command, FailNegotiation):
                raise NegotiationFailed(command.reason, command.error)
            elif isinstance(command, StartTls):
                await self._execute(await self._start_tls())
            elif isinstance(command, CheckLogin):
                await self._execute(self.core.login_result(await self._login(command)))
            elif isinstance(command, Pause):
                await asyncio.sleep(command.seconds)
            elif isinstance(command, Authenticated):
                self._authenticated = command
            elif isinstance(command, Received):
                self._received.append(command.element)
            elif isinstance(command, StartTimer):
                self.deadline = command.seconds
            elif isinstance(command, HandOver):
                raise HandOverNeeded(command)

    def _send_header(self, command: SendHeader) -> None:
        stream_id = secrets.token_urlsafe(12)
        if self.own_stream_ids is not None and self.core.account is None:
            self.own_stream_ids.issued(stream_id)
            self._issued_ids.append(stream_id)
        self.stream.send_header(codec.stream_header(
            from_=self.core.domain, stream_id=stream_id, to=command.to))
        if command.features is not None:
            self.stream.send(features_element(*command.features))

    async def _start_tls(self) -> list[NegotiationCommand]:
        try:
            await self.stream.start_tls(self.server_tls)
        except (ssl.SSLError, ConnectionError, TimeoutError) as exc:
            return self.core.tls_failed(tls_failure_reason(exc))
        except PlaintextInjection as exc:
            return self.core.tls_injection(exc.buffered + exc.parsed, exc.events)
        return self.core.tls_started(self.stream.tls_info)

    async def _login(self, check: CheckLogin) -> LoginOutcome:
        """The upstream login that checks the client's credentials."""
        served = self.domain
        upstream = served.config.upstream
        try:
            self.upstream = await connect_upstream(
                upstream, self.upstream_tls.get(served.name), check.authcid, check.password,
                client=self.stream.endpoints(),
                max_stanza_bytes=self.config.limits.max_stanza_bytes, log=self.log,
                own_stream_ids=(self.own_stream_ids if self.own_stream_ids is not None
                                else frozenset()))
        except UpstreamAuthFailed as exc:
            return LoginOutcome("refused", condition=exc.condition)
        except UpstreamLoop as exc:
            return LoginOutcome("loop", detail=str(exc), upstream=(upstream.host, upstream.port))
        except UpstreamUnavailable as exc:
            vouched = self.vouch is not None and self.vouch(str(check.account), check.password)
            return LoginOutcome("unavailable", detail=str(exc), vouched=vouched)
        return LoginOutcome("ok", mechanism=self.upstream.mechanism)
