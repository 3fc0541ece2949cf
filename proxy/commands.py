"""Commands: what the pure cores ask the asyncio shell to do. Socket-free.

A core takes an event (a stanza for the client, a nonza from it, a timer that fired, the
connection gone, ...) and returns a list of these; the shell carries them out in order and
decides nothing. Each is a small value, so a test can compare what a core asked for
with what it expected (a playbook: events in, commands out). Frozen, except the few made for
every relayed stanza (``ToClient``, ``JournalPut``, ``JournalCut``, the server edge's
``ToServer`` and ``Confirmed``): a frozen dataclass sets each field through
``object.__setattr__``, four times the cost of a plain one; those are hashable all the same,
and nothing changes a command once made.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from .archive_store import ArchivedMessage, ArchiveRequest, Direction
from .xmpp.stanza import Element

if TYPE_CHECKING:
    from .session import Outputs


@dataclass(slots=True, unsafe_hash=True)  # per stanza: not frozen (commands.py)
class ToClient:
    """Write to the client's connection now (a stanza already tracked, or a nonza).
    ``own``: the proxy made it (for the inspection log). ``document``: the element as
    ``codec.document`` made it for the journal just now, so the write does not serialize
    it again."""

    element: Element
    own: bool = False
    document: bytes | None = None


@dataclass(frozen=True, slots=True)
class ToServerDirect:
    """Write to the server outside the outbox (an answer or a bounce of the proxy's, or a
    step of our negotiation with it)."""

    element: Element


@dataclass(frozen=True, slots=True)
class AckWhenDurable:
    """Write this ``<a h/>`` once the journal holds every stanza it acknowledges."""

    element: Element


@dataclass(frozen=True, slots=True)
class StartTimer:
    """(Re)start the session's timer ``name``; when it fires the core hears of it."""

    name: str
    seconds: float


@dataclass(frozen=True, slots=True)
class CancelTimer:
    name: str


@dataclass(frozen=True, slots=True)
class Log:
    event: str
    fields: Mapping[str, Any] = field(default_factory=dict)
    level: Literal["debug", "info", "warning", "error"] = "info"


@dataclass(frozen=True, slots=True)
class CloseClient:
    """Let go of the client's connection: ``error`` (a stream error) first; ``hard``: drop
    it at once (lost or replaced), else close it and give the peer ``grace`` seconds to
    close its side (RFC 6120 §4.4)."""

    error: bytes | None = None
    hard: bool = False
    grace: float = 0.0


@dataclass(frozen=True, slots=True)
class AbortClient:
    """The link is dead: drop it at once, unsent bytes and all; its reader reports it gone."""

    reason: str


@dataclass(frozen=True, slots=True)
class ClientLeaves:
    """What the client did ends its connection and session (with ``error``, if any)."""

    reason: str
    error: bytes | None = None


@dataclass(frozen=True, slots=True)
class EndSession:
    reason: str
    client_error: bytes | None = None


@dataclass(frozen=True, slots=True)
class StoreOffline:
    """Keep a stanza for the account's next login (serialized, namespace declared)."""

    stanza: bytes
    expires_at: float


@dataclass(frozen=True, slots=True)
class StorePending:
    """Client stanzas for the server, to be sent first at the account's next login."""

    stanzas: tuple[bytes, ...]
    expires_at: float


@dataclass(slots=True, unsafe_hash=True)  # per stanza: not frozen (commands.py)
class JournalPut:
    lane: str
    number: int
    stanza: bytes
    queued_at: float


@dataclass(slots=True, unsafe_hash=True)  # per stanza: not frozen (commands.py)
class JournalCut:
    lane: str
    left: int


@dataclass(frozen=True, slots=True)
class SmRegister:
    """Stream management was enabled (``sm_id``, resumable) or switched off (None, with the
    last ``inbound`` count for a late resumption): the registry of sessions follows."""

    sm_id: str | None
    inbound: int = 0


@dataclass(frozen=True, slots=True)
class RulesMatched:
    """From the rules feature: the rules a stanza matched and the log events they asked for
    (the shell adds the stanza's context and writes them, and the inspection log)."""

    names: tuple[str, ...]
    events: tuple[Mapping[str, Any], ...] = ()


@dataclass(frozen=True, slots=True)
class CatchUp:
    """Another session (by its id) is owed output because this one changed state they
    share (the roster cache): the shell soon asks that session's features for it."""

    session_id: str


@dataclass(frozen=True, slots=True)
class ToAccount:
    """For the account's other live sessions (hibernating ones included, not this one):
    each one's features hear of it (``Feature.from_account``) with its own copy of
    ``payload``; ``kind`` says what it is (a carbon copy, a blocklist push, ...)."""

    kind: str
    payload: Element


@dataclass(frozen=True, slots=True)
class WhenStored:
    """A reply that promises "stored": carry out ``then`` (stanzas for the client and
    commands, as a feature's ``Outputs``) once the store's writer has committed everything
    handed to it so far (the writes the feature just made among them); if a commit attempt
    of those writes fails first, ``failed`` instead (the writer goes on trying them). The
    shell adds the writer's ``error`` to the ``Log`` commands of ``failed``. Nothing else
    of the session waits: only what is inside."""

    then: Outputs
    failed: Outputs


@dataclass(frozen=True, slots=True)
class MoreStored:
    """The client acknowledged enough: the next part of its stored backlog can go out."""


@dataclass(frozen=True, slots=True)
class Count:
    """Add one to the /metrics counter ``table`` (a ``proxy.metrics.Counters`` table: logins,
    tls_handshakes, resumes) under ``key``."""

    table: str
    key: Any


# Client negotiation (``proxy/negotiation.py``) ---------------------------------------------


@dataclass(frozen=True, slots=True)
class SendHeader:
    """Answer the client's stream header with ours (a fresh stream id, ``to`` the client's
    ``from``) and these stream features (None: the header only, an error follows)."""

    to: str | None
    features: tuple[Element, ...] | None


@dataclass(frozen=True, slots=True)
class StartTls:
    """Start TLS on the client's connection (``<proceed/>`` was just sent); the core hears
    ``tls_started`` or ``tls_injection``."""


@dataclass(frozen=True, slots=True)
class CheckLogin:
    """Check these SASL PLAIN credentials by logging in upstream; the core hears the
    outcome (``login_result``)."""

    account: Any  # proxy.xmpp.jid.Jid
    authcid: str
    password: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class Pause:
    """Wait before carrying out the next command (a delayed answer to a failed login)."""

    seconds: float


@dataclass(frozen=True, slots=True)
class FailNegotiation:
    """The negotiation is over: ``error`` (a stream error) to the client, then the close."""

    reason: str
    error: bytes | None = None


@dataclass(frozen=True, slots=True)
class Authenticated:
    """SASL succeeded: restart the stream; the client is ``account``."""

    account: Any  # proxy.xmpp.jid.Jid
    password: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class Received:
    """An element after the post-authentication header: the hub's to handle."""

    element: Element


@dataclass(frozen=True, slots=True)
class HandOver:
    """``workers: N``: the account this ``<auth/>`` names lives in another worker; hand the
    connection to it (``home``), which continues the negotiation from ``auth`` (a PLAIN
    ``<auth/>`` with the credentials as its initial response) after ``failures`` failed
    attempts."""

    account: Any  # proxy.xmpp.jid.Jid
    home: int
    auth: Element
    failures: int


NegotiationCommand = (SendHeader | StartTls | CheckLogin | Pause | FailNegotiation
                      | Authenticated | Received | ToClient | Log | Count | StartTimer
                      | HandOver)


# Our negotiation toward the server as a client (``proxy/upstream_negotiation.py``) ------


@dataclass(frozen=True, slots=True)
class Connect:
    """Open the TCP connection to ``host``:``port`` within ``seconds``: ``proxy_header``
    (a PROXY protocol header) first if any, then TLS at once when ``direct_tls``, checked
    against ``server_hostname``. ``track_trailing``: the stream will be upgraded with
    STARTTLS (its parser must know what follows the boundary). The core hears
    ``connected`` or ``connect_failed``."""

    host: str
    port: int
    seconds: float
    direct_tls: bool
    server_hostname: str
    proxy_header: bytes | None = None
    track_trailing: bool = False


@dataclass(frozen=True, slots=True)
class OpenStream:
    """Send our stream header to ``to``; ``restart``: a fresh stream first (after SASL
    success; TLS restarts the stream by itself)."""

    to: str
    restart: bool = False


@dataclass(frozen=True, slots=True)
class StartTlsToServer:
    """Start TLS as the client on the server's connection (``<proceed/>`` came), the
    certificate checked against ``server_hostname``, within ``seconds``; the core hears
    ``tls_started``, ``tls_failed`` or ``tls_injection``."""

    server_hostname: str
    seconds: float


@dataclass(frozen=True, slots=True)
class PassOn:
    """An event read from the server that is not the negotiation's (a stanza or the stream
    ending while the discovery waited): the session's pump gets it, in order."""

    event: Any  # proxy.xmpp.codec.StreamEvent


@dataclass(frozen=True, slots=True)
class UpstreamReady:
    """Authenticated with ``mechanism``; ``features`` are the restarted stream's."""

    mechanism: str
    features: Element


@dataclass(frozen=True, slots=True)
class UpstreamBound:
    """The server bound ``jid`` (and opened the RFC 3921 session it needed)."""

    jid: str


@dataclass(frozen=True, slots=True)
class ServerDiscovered:
    """The disco#info discovery after the bind is over; ``info`` holds what answered (an
    entity that answered an error or not in time is None: unknown, not fatal)."""

    info: Any  # proxy.xmpp.disco.ServerInfo


UpstreamFailure = Literal["unavailable", "auth", "loop", "bind"]


@dataclass(frozen=True, slots=True)
class UpstreamFailed:
    """The negotiation with the server failed. ``kind``: ``auth`` (the server refused the
    credentials with ``condition``), ``loop`` (the upstream is this proxy), ``bind`` (the
    server answered the bind or the session with ``error_reply``), ``unavailable``
    (anything else: unreachable, TLS, a timeout, a broken exchange)."""

    kind: UpstreamFailure
    reason: str
    condition: str = ""
    error_reply: Element | None = None


UpstreamCommand = (Connect | OpenStream | ToServerDirect | StartTlsToServer | StartTimer | Log
                   | PassOn | UpstreamReady | UpstreamBound | ServerDiscovered
                   | UpstreamFailed)


# The hub's decisions before bind (``proxy/registry.py``) ------------------------------------


@dataclass(frozen=True, slots=True)
class LookUpResume:
    """Find the account's live session under ``previd`` and check ``h`` with its client
    edge; the registry hears what was found (``Registry.resume``)."""

    previd: str
    h: int


@dataclass(frozen=True, slots=True)
class LookUpBind:
    """Find what is bound to ``resource`` ("" for none asked), the account's live session
    count, and a finishing session of the resource; the registry hears it (``bind``)."""

    resource: str


@dataclass(frozen=True, slots=True)
class Resume:
    """Resume the session found under ``previd``, the client having handled ``h``."""

    previd: str
    h: int


@dataclass(frozen=True, slots=True)
class TakeOver:
    """Hand the live session of ``jid`` to this connection; ``result`` answers the bind."""

    jid: str
    result: Element


@dataclass(frozen=True, slots=True)
class BindUpstream:
    """Bind ``resource`` (None: the server's choice) on the client's upstream link, after
    the finishing session of ``hand_over_from`` (a full JID) handed over what it owes."""

    resource: str | None
    hand_over_from: str | None = None


@dataclass(frozen=True, slots=True)
class ReplacePrevious:
    """End the session registered under ``jid``: the new one takes its place."""

    jid: str
    reason: str


@dataclass(frozen=True, slots=True)
class NewSession:
    """Make the session of ``jid`` and register it; ``result`` answers the bind."""

    jid: Any  # proxy.xmpp.jid.Jid
    result: Element


RegistryCommand = (LookUpResume | LookUpBind | Resume | TakeOver | BindUpstream
                   | ReplacePrevious | NewSession | ToClient | Log | Count | FailNegotiation)


class ArchivePut:
    """Archive a message in the session's account's archive (XEP-0313; the shell adds the
    account, so a session writes its own archive only). Batched per loop turn and written
    on the archive's thread. ``row``: the message's fields in ``ArchivedMessage``'s order
    (a plain tuple: the writer's batch takes it as it is). ``element``: the message itself,
    when the row's stanza is left for the shell to fill in: it stores the bytes it
    serialized the element into for the wire (the journal's and the write's, after every
    later feature), so an archived message is serialized once, not once more for the
    archive.

    A plain slotted class, not a frozen dataclass around a named tuple: one is made for
    every archived message on the event loop (a fifth of the cost). Not to be changed once
    made, like the other commands."""

    __slots__ = ("element", "row")

    def __init__(self, row: tuple[str, float, Direction, str, str, bytes, int | None,
                                  int | None],
                 element: Element | None = None) -> None:
        self.row = row
        self.element = element

    @property
    def message(self) -> ArchivedMessage:
        return ArchivedMessage(*self.row)

    def __repr__(self) -> str:
        return f"ArchivePut({self.message!r}, {self.element!r})"


@dataclass(frozen=True, slots=True)
class ArchiveQuery:
    """Run a query on the session's account's archive (the shell adds the account) off the
    loop, after every ``ArchivePut`` before it; the result comes back to the features as
    ``Feature.store_result(session, token, result, out)``."""

    token: str
    request: ArchiveRequest


Command = (ToClient | ToServerDirect | AckWhenDurable | StartTimer | CancelTimer | Log
           | CloseClient | AbortClient | ClientLeaves | EndSession | StoreOffline | StorePending
           | JournalPut | JournalCut | SmRegister | RulesMatched | CatchUp | ToAccount | MoreStored
           | ArchivePut | ArchiveQuery | WhenStored)
