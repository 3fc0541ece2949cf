"""Configuration: YAML in, validated frozen dataclasses out.

Each section is a dataclass whose field types are the schema: the loader checks every key
against them, so adding a section or an option is adding a field with its default. Errors name
the key path (``upstream.port``) and the problem.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """An invalid configuration; the message names the key and the problem."""


@dataclass(frozen=True)
class Listener:
    host: str = "127.0.0.1"
    port: int = 5222
    direct_tls: bool = False  # XEP-0368: TLS from the first byte instead of STARTTLS
    # A PROXY protocol header (v1 or v2) is required first on each connection, before TLS:
    # the listener is behind a load balancer, whose header names the client.
    proxy_protocol: bool = False
    # Networks (CIDR) the header is taken from; a connection from elsewhere is closed.
    # Empty: from any peer (then only the balancer must be able to reach the listener).
    proxy_protocol_from: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TlsConfig:
    cert: str = "cert.pem"
    key: str = "key.pem"


@dataclass(frozen=True)
class UpstreamConfig:
    host: str = "127.0.0.1"
    port: int = 5222
    domain: str = "localhost"
    tls: Literal["starttls", "direct", "none"] = "starttls"
    verify: bool = True
    ca: str | None = None
    connect_timeout: float = 10.0  # seconds for TCP + TLS + stream negotiation steps
    # Send a PROXY protocol header (v1 text, v2 binary) first on each upstream connection,
    # naming the client's address, for a server that accepts it (its logs, per-address
    # limits and ACLs then see the user, not the proxy). off: the server sees the proxy.
    proxy_protocol: Literal["off", "v1", "v2"] = "off"
    # After each bind the proxy asks the server's disco#info (domain and account); a login
    # waits at most this long for the answers (an entity that does not answer offers nothing).
    discovery_timeout: float = 3.0
    ping_idle: float = 60.0  # seconds of silence from the server before a liveness ping
    ping_timeout: float = 20.0  # seconds that ping may go unanswered: the server is dead
    max_buffer: int = 1000  # client stanzas held per session while unconfirmed or down
    barrier_every: int = 10  # a confirming barrier iq at least every this many stanzas


@dataclass(frozen=True)
class DomainConfig:
    """One more domain the proxy serves (``domains:``), beside ``upstream.domain``.

    ``upstream`` is built from the top-level ``upstream:`` section with this entry's own
    ``upstream:`` keys over it (a key the entry does not give is inherited: two virtual
    hosts of one server need only their names). ``tls``: this domain's own certificate and
    key, given to a client whose TLS ClientHello names the domain (SNI); null: the default
    ``tls:`` pair."""

    domain: str = ""
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    tls: TlsConfig | None = None


@dataclass(frozen=True)
class ReconnectConfig:
    first_delay_max: float = 60.0  # the first attempt waits a random time in [0, this]
    base: float = 1.0  # then full jitter in [0, min(cap, base * 2^n)]
    cap: float = 60.0
    max_outage: float = 300.0  # give up (errors to the client) after this long down
    # After a restore, contacts' "unavailable" waits this long for them to come back
    # (no flap to offline while the server restores everyone); null: first_delay_max + 5.
    settle_presence: float | None = None


@dataclass(frozen=True)
class Limits:
    max_stanza_bytes: int = 262144
    negotiation_timeout: float = 30.0  # seconds a client may take from connect to bound
    proxy_header_timeout: float = 5.0  # seconds for a PROXY protocol header, where required
    # Decrypted bytes asyncio reads per TLS call, per connection. Python's default (256 KiB,
    # allocated for every TLS connection) would dominate the memory of an idle session.
    tls_read_buffer: int = 16896
    # Element nesting inside a stanza (the stanza is depth 1); deeper is policy-violation.
    max_depth: int = 128
    # Bytes queued for a client (ours + the transport's) above which nothing more is read
    # from it until they drain: a client that never reads cannot make the proxy answer and
    # buffer without end. One read's worth of answers may go over it.
    output_soft_bytes: int = 262144
    # Bytes queued for a client above which, if they do not shrink within a second, it is
    # cut off with policy-violation (a burst to a client that reads is let through).
    output_hard_bytes: int = 4194304


@dataclass(frozen=True)
class AbuseConfig:
    """XEP-0205 limits; a count of 0 turns that limit off. See docs/security.md."""

    max_connections: int = 10000  # open client connections in total
    max_connections_per_address: int = 50  # per IPv4 address or IPv6 /64
    max_sessions_per_account: int = 10  # bound resources (hibernated ones count)
    login_failures_free: int = 2  # failed logins (per account or address) answered at once
    login_delay: float = 1.0  # seconds before answering the next failure, doubling each time
    login_delay_max: float = 8.0
    login_failures_per_account: int = 10  # then the account's logins are refused a while
    login_failures_per_address: int = 30  # then that address's logins are refused a while
    login_lockout: float = 300.0  # seconds logins are refused after reaching a limit
    login_failure_window: float = 900.0  # seconds without failures: the count is forgotten
    max_tracked: int = 100000  # accounts and addresses remembered (each table)


@dataclass(frozen=True)
class LogConfig:
    format: Literal["json", "console"] = "json"
    level: Literal["debug", "info", "warning", "error"] = "info"
    stanzas: bool = False  # one "stanza" event per stanza (metadata only)
    redact: list[str] = field(default_factory=lambda: ["body"])  # masked in transcripts
    capture_dir: str | None = None  # per-session XML transcripts go here
    capture_max_bytes: int = 1048576  # per transcript file
    capture_max_age_days: float | None = 30  # transcripts older than this are removed
    capture_max_total_bytes: int | None = 1 << 30  # then the oldest, until the rest fit


@dataclass(frozen=True)
class StreamManagementConfig:
    resume_timeout: int = 300  # seconds a session waits for its client when it asks no max
    max_resume_timeout: int = 600  # the most a client may ask for
    ack_timeout: float = 60.0  # seconds without an answer to our <r/>: the connection is dead
    max_queue: int = 1000  # unacknowledged stanzas kept per session; beyond it the session ends
    on_timeout: Literal["store", "bounce"] = "store"  # what happens to undelivered messages
    stored_ttl: int = 604800  # seconds a stored message waits for its account to log in
    # Testing only: both counters start here instead of 0, to exercise the 2^32 wrap on the
    # wire. Real clients expect 0; never set it in production.
    debug_counter_start: int = 0


@dataclass(frozen=True)
class RosterConfig:
    max_changes: int = 1000  # roster changes remembered per account for versioned fetches


@dataclass(frozen=True)
class StoreConfig:
    path: str = "xmpp-front.sqlite3"  # SQLite file (relative to the config file); ":memory:"


@dataclass(frozen=True)
class MetricsConfig:
    # "host:port" for /metrics (Prometheus), /healthz and /readyz over plain HTTP; null: off.
    # Keep it on loopback or a management network: it says who is logged in, in numbers.
    listen: str | None = None


@dataclass(frozen=True)
class AdminConfig:
    # The local admin socket (`xmpp-front sessions`, `xmpp-front kick`): a Unix socket,
    # mode 0600 in a folder only the proxy's user can use. "auto": `admin.sock` in a folder
    # `<store name>-admin` beside the store (beside the configuration file for a ":memory:"
    # store); a path: there (its folder must exist or is made 0700); null: no admin socket.
    socket: str | None = "auto"


@dataclass(frozen=True)
class CsiConfig:
    # XEP-0352 toward clients: while one says it is inactive, presence updates and chat
    # states wait (latest per sender) until it is active again or this many are held.
    enabled: bool = True
    max_held: int = 100


FeatureMode = Literal["auto", "on", "off"]


@dataclass(frozen=True)
class FeaturesConfig:
    # What the proxy provides for a server that lacks it. auto: only when the server's
    # disco#info (its domain's and the account's, asked after each bind) does not list it;
    # on: always (the proxy then handles the protocol itself and never passes it on, so
    # nothing is doubled); off: never (the server's, if any, passes through).
    carbons: FeatureMode = "auto"    # XEP-0280 message carbons
    archive: FeatureMode = "auto"    # XEP-0313 message archive management
    blocking: FeatureMode = "auto"   # XEP-0191 blocking command
    push: FeatureMode = "auto"       # XEP-0357 push notifications


@dataclass(frozen=True)
class ArchiveConfig:
    # The message archive the proxy keeps when it emulates XEP-0313 (features.archive).
    max_age_days: float = 365.0              # older messages are deleted; 0: no age limit
    max_messages_per_account: int = 100000   # the newest kept per account; 0: no limit
    max_page: int = 100                      # results per query page at most (RSM max)
    default_prefs: Literal["always", "never", "roster"] = "always"  # until a client sets its own
    counts: bool = False                     # RSM <count/> and first index (costly at 1M)
    # The messages' own SQLite file; null: beside the store (front.sqlite3 ->
    # front-archive.sqlite3). Apart from the store so archiving never delays the journal.
    path: str | None = None


@dataclass(frozen=True)
class CarbonsConfig:
    # XEP-0280 as the proxy provides it (features.carbons): a message the server routed to
    # the bare JID may reach several of the account's sessions; the copies for the others
    # wait this long, so a session that got the message itself gets no copy of it too.
    bare_wait: float = 0.3


@dataclass(frozen=True)
class BlockingConfig:
    # XEP-0191 as the proxy provides it (features.blocking): the most JIDs one account may
    # block (a block beyond it is refused with policy-violation).
    max_items: int = 1000


@dataclass(frozen=True)
class PushConfig:
    # XEP-0357 notifications the proxy publishes (features.push): at most one per app server
    # and node every min_interval seconds (what comes meanwhile is counted into the next).
    min_interval: float = 10.0
    include_body: bool = False  # the message body goes to a third party: off by default
    max_body: int = 256  # characters of the body sent, with include_body
    max_registrations: int = 5  # app server nodes per account; the oldest goes first
    max_errors: int = 3  # transient (wait) publish errors in a row before one is disabled


def emulates(mode: FeatureMode, server_has: bool) -> bool:
    """Whether the proxy provides a feature itself, by its mode and what the server has."""
    return mode == "on" or (mode == "auto" and not server_has)


@dataclass(frozen=True)
class DurabilityConfig:
    # journal: every ledger change is committed to the store before the client is acked,
    # so a crash loses nothing acknowledged. memory: faster, a crash loses the ledgers.
    mode: Literal["journal", "memory"] = "journal"
    # SQLite's synchronous setting for the journal: normal survives a crash of the process,
    # full also a power cut (an fsync per commit), off neither reliably.
    fsync: Literal["normal", "full", "off"] = "normal"
    pending_ttl: int = 86400  # seconds client stanzas wait for their account's next login
    # Give each journaled client message with an id and no XEP-0359 origin-id one of the
    # same value. Off: a replay after a crash keeps its id, which the receiver's duplicate
    # filter matches as well, and a legacy server does less work per message (Prosody: an
    # eighth less CPU per small message, measured).
    origin_id: bool = False


@dataclass(frozen=True)
class ShutdownConfig:
    # A graceful stop (SIGTERM) gets this long to collect acks from clients, let the server
    # confirm what it was sent and read what it already sent, before the rest is stored.
    drain_timeout: float = 5.0
    ack_wait: float = 1.0  # of that, how long clients get to acknowledge what they have


@dataclass(frozen=True)
class Config:
    listen: list[Listener] = field(default_factory=lambda: [Listener()])
    tls: TlsConfig = field(default_factory=TlsConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    # Further served domains, each with its own upstream (and certificate); the stream
    # header's "to" chooses. upstream.domain is served too, with upstream: and tls:.
    domains: list[DomainConfig] = field(default_factory=list)
    reconnect: ReconnectConfig = field(default_factory=ReconnectConfig)
    limits: Limits = field(default_factory=Limits)
    abuse: AbuseConfig = field(default_factory=AbuseConfig)
    log: LogConfig = field(default_factory=LogConfig)
    stream_management: StreamManagementConfig = field(default_factory=StreamManagementConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    roster: RosterConfig = field(default_factory=RosterConfig)
    durability: DurabilityConfig = field(default_factory=DurabilityConfig)
    csi: CsiConfig = field(default_factory=CsiConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    carbons: CarbonsConfig = field(default_factory=CarbonsConfig)
    blocking: BlockingConfig = field(default_factory=BlockingConfig)
    push: PushConfig = field(default_factory=PushConfig)
    archive: ArchiveConfig = field(default_factory=ArchiveConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    shutdown: ShutdownConfig = field(default_factory=ShutdownConfig)
    rules: list[str] = field(default_factory=list)  # rule files, applied in order
    # Worker processes sharing the listeners (each account lives in one of them); 1: the
    # single process; "auto": one per CPU.
    workers: int | Literal["auto"] = 1
    # Relative paths in the file are resolved against the file's own folder.
    base_dir: Path = field(default=Path("."), metadata={"internal": True})

    def path(self, value: str) -> Path:
        if value == ":memory:":
            return Path(value)
        p = Path(value)
        return p if p.is_absolute() else self.base_dir / p

    @functools.cached_property
    def served(self) -> dict[str, ServedDomain]:
        """Every served domain by its normalised name (``domain_key``), the default first."""
        served = {domain_key(self.upstream.domain) or self.upstream.domain: ServedDomain(
            jid_domain(self.upstream.domain), None, self, self.tls, own_tls=True)}
        for i, entry in enumerate(self.domains):
            # The view's own ``served`` is not this one's: ask the full configuration.
            view = dataclasses.replace(self, upstream=entry.upstream)
            key = domain_key(entry.domain) or entry.domain
            if key in served:  # refused at load; a reload's kept upstream.domain may meet it
                continue
            served[key] = ServedDomain(
                jid_domain(entry.domain), i, view, entry.tls or self.tls,
                own_tls=entry.tls is not None)
        return served

    def domain(self, name: str) -> ServedDomain | None:
        """The served domain a stream header's ``to`` (or a TLS server name) names."""
        key = domain_key(name)
        return self.served.get(key) if key is not None else None

    @property
    def default_domain(self) -> ServedDomain:
        return next(iter(self.served.values()))


@dataclass(frozen=True)
class ServedDomain:
    """A domain as the proxy serves it: the name its JIDs carry, ``domains[index]`` (None
    for ``upstream.domain``), the configuration as its sessions see it (``config.upstream``
    is this domain's) and the certificate its clients get."""

    name: str  # lower case, as in the accounts' JIDs
    index: int | None
    config: Config = field(repr=False)
    tls: TlsConfig
    own_tls: bool  # tls is the domain's own pair, not the default one it falls back to

    @property
    def key_prefix(self) -> str:
        """Where its settings are in the file: ``upstream`` or ``domains[i].upstream``."""
        return "upstream" if self.index is None else f"domains[{self.index}].upstream"

    @property
    def tls_prefix(self) -> str:
        return "tls" if self.index is None or not self.own_tls else f"domains[{self.index}].tls"


def jid_domain(name: str) -> str:
    """A configured domain as the JIDs of its accounts carry it (as ``Jid.parse`` makes it)."""
    return name.strip().rstrip(".").lower()


def domain_key(name: str) -> str | None:
    """A domain name as compared: lower case, no trailing dot, internationalised labels in
    their ASCII form (IDNA: a stream's ``to`` may carry U-labels, SNI carries A-labels).
    None for a name that is not a valid domain."""
    name = name.strip().rstrip(".").lower()
    if not name or len(name) > 1023:
        return None
    if name.isascii():
        return name
    try:
        return name.encode("idna").decode("ascii").lower()
    except UnicodeError:
        return None


# Checks beyond types: (section, key) -> (predicate, what it must be).
_RANGES: dict[tuple[str, str], tuple[typing.Callable[[Any], bool], str]] = {
    ("listen", "port"): (lambda v: 0 <= v <= 65535, "a port number 0-65535"),
    ("listen", "proxy_protocol_from"): (lambda v: _networks(v), "a list of networks "
                                        "(CIDR), e.g. [10.0.0.0/8]"),
    ("limits", "proxy_header_timeout"): (lambda v: v > 0, "a positive number of seconds"),
    ("upstream", "port"): (lambda v: 1 <= v <= 65535, "a port number 1-65535"),
    ("upstream", "connect_timeout"): (lambda v: v > 0, "a positive number of seconds"),
    ("upstream", "discovery_timeout"): (lambda v: 0 < v <= 60, "between 0 and 60 seconds"),
    ("upstream", "ping_idle"): (lambda v: v > 0, "a positive number of seconds"),
    ("upstream", "ping_timeout"): (lambda v: v > 0, "a positive number of seconds"),
    ("upstream", "max_buffer"): (lambda v: v >= 1, "at least 1"),
    ("upstream", "barrier_every"): (lambda v: v >= 1, "at least 1"),
    ("reconnect", "first_delay_max"): (lambda v: v >= 0, "zero or more seconds"),
    ("reconnect", "base"): (lambda v: v > 0, "a positive number of seconds"),
    ("reconnect", "cap"): (lambda v: v > 0, "a positive number of seconds"),
    ("reconnect", "max_outage"): (lambda v: v > 0, "a positive number of seconds"),
    ("reconnect", "settle_presence"): (lambda v: 0 <= v <= 600, "between 0 and 600 seconds"),
    ("limits", "max_stanza_bytes"): (lambda v: 1024 <= v <= 64 * 1024 * 1024,
                                     "between 1024 and 67108864 bytes"),
    ("limits", "tls_read_buffer"): (lambda v: 4096 <= v <= 1048576,
                                    "between 4096 and 1048576 bytes"),
    ("limits", "negotiation_timeout"): (lambda v: v > 0, "a positive number of seconds"),
    ("log", "capture_max_age_days"): (lambda v: v > 0, "a positive number of days"),
    ("log", "capture_max_total_bytes"): (lambda v: v >= 1048576, "at least 1048576 bytes"),
    ("limits", "max_depth"): (lambda v: 1 <= v <= 250, "between 1 and 250"),
    ("limits", "output_soft_bytes"): (lambda v: 16384 <= v <= 1 << 30,
                                      "between 16384 and 1073741824 bytes"),
    ("limits", "output_hard_bytes"): (lambda v: 16384 <= v <= 1 << 30,
                                      "between 16384 and 1073741824 bytes"),
    ("stream_management", "resume_timeout"): (lambda v: v > 0, "a positive number of seconds"),
    ("stream_management", "max_resume_timeout"): (lambda v: v > 0,
                                                  "a positive number of seconds"),
    ("stream_management", "ack_timeout"): (lambda v: v > 0, "a positive number of seconds"),
    ("stream_management", "max_queue"): (lambda v: v >= 1, "at least 1"),
    ("stream_management", "stored_ttl"): (lambda v: v > 0, "a positive number of seconds"),
    ("stream_management", "debug_counter_start"): (lambda v: 0 <= v < 2 ** 32,
                                                   "between 0 and 2^32-1"),
    ("abuse", "max_connections"): (lambda v: v >= 0, "zero (no limit) or more"),
    ("abuse", "max_connections_per_address"): (lambda v: v >= 0, "zero (no limit) or more"),
    ("abuse", "max_sessions_per_account"): (lambda v: v >= 0, "zero (no limit) or more"),
    ("abuse", "login_failures_free"): (lambda v: v >= 0, "zero or more"),
    ("abuse", "login_delay"): (lambda v: 0 <= v <= 60, "between 0 and 60 seconds"),
    ("abuse", "login_delay_max"): (lambda v: 0 <= v <= 60, "between 0 and 60 seconds"),
    ("abuse", "login_failures_per_account"): (lambda v: v >= 0, "zero (no limit) or more"),
    ("abuse", "login_failures_per_address"): (lambda v: v >= 0, "zero (no limit) or more"),
    ("abuse", "login_lockout"): (lambda v: v > 0, "a positive number of seconds"),
    ("abuse", "login_failure_window"): (lambda v: v > 0, "a positive number of seconds"),
    ("abuse", "max_tracked"): (lambda v: v >= 100, "at least 100"),
    ("log", "capture_max_bytes"): (lambda v: v >= 1024, "at least 1024 bytes"),
    ("roster", "max_changes"): (lambda v: v >= 1, "at least 1"),
    ("store", "path"): (lambda v: bool(v), "a file path or ':memory:'"),
    ("metrics", "listen"): (lambda v: _host_port(v), "host:port, e.g. 127.0.0.1:9105"),
    ("carbons", "bare_wait"): (lambda v: 0 <= v <= 5, "between 0 and 5 seconds"),
    ("blocking", "max_items"): (lambda v: 1 <= v <= 100000, "between 1 and 100000"),
    ("admin", "socket"): (lambda v: bool(v), "a socket path, \"auto\" or null"),
    ("csi", "max_held"): (lambda v: 1 <= v <= 100000, "between 1 and 100000"),
    ("push", "min_interval"): (lambda v: 0 <= v <= 86400, "between 0 and 86400 seconds"),
    ("push", "max_body"): (lambda v: 0 <= v <= 4096, "between 0 and 4096 characters"),
    ("push", "max_registrations"): (lambda v: 1 <= v <= 100, "between 1 and 100"),
    ("push", "max_errors"): (lambda v: 1 <= v <= 100, "between 1 and 100"),
    ("durability", "pending_ttl"): (lambda v: v > 0, "a positive number of seconds"),
    ("shutdown", "drain_timeout"): (lambda v: 0 <= v <= 600, "between 0 and 600 seconds"),
    ("archive", "max_age_days"): (lambda v: v >= 0, "zero (no limit) or more days"),
    ("archive", "max_messages_per_account"): (lambda v: v >= 0, "zero (no limit) or more"),
    ("archive", "max_page"): (lambda v: 1 <= v <= 1000, "between 1 and 1000"),
    ("shutdown", "ack_wait"): (lambda v: v >= 0, "zero or more seconds"),
    ("", "workers"): (lambda v: v == "auto" or 1 <= v <= 256, "1 to 256, or \"auto\""),
}


def _networks(values: list[str]) -> bool:
    try:
        for value in values:
            ipaddress.ip_network(value, strict=False)
    except ValueError:
        return False
    return True


def _host_port(value: str) -> bool:
    host, sep, port = value.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 <= int(port) <= 65535)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if typing.get_origin(tp) is list:
        return "a list"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, str(tp))


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        inner = [t for t in options if t is not type(None)]
        for option in inner[:-1]:  # the first that takes the value (e.g. 4 or "auto")
            try:
                return _convert(value, option, where)
            except ConfigError:
                pass
        return _convert(value, inner[-1], where)
    if origin is Literal:
        if isinstance(value, bool) and ("on" if value else "off") in typing.get_args(tp):
            value = "on" if value else "off"  # YAML 1.1 reads a bare on/off as a boolean
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: must be {_type_name(tp)}, not {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: must be a list")
        (item_type,) = typing.get_args(tp)
        return [_convert(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: must be a mapping")
        return _build(tp, value, where)  # type: ignore[arg-type]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (tp is int and isinstance(value, bool)) or not isinstance(value, tp):
        raise ConfigError(f"{where}: must be {_type_name(tp)}, not {value!r}")
    return value


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    public = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    unknown = sorted(set(data) - set(public))
    if unknown:
        key = f"{where}.{unknown[0]}" if where else str(unknown[0])
        raise ConfigError(f"{key}: unknown option (known: {', '.join(sorted(public))})")
    kwargs = {}
    section = where.split(".")[-1].split("[")[0]
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        converted = _convert(value, hints[name], key)
        check = _RANGES.get((section, name))
        if check and converted is not None and not check[0](converted):
            raise ConfigError(f"{key}: must be {check[1]}, not {converted!r}")
        kwargs[name] = converted
    return cls(**kwargs)


def parse_config(data: Any, base_dir: Path = Path(".")) -> Config:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("the configuration must be a YAML mapping at the top level")
    if "domains" in data:
        data = {**data, "domains": _domain_entries(data)}
    config: Config = _build(Config, data, "")
    if not config.listen:
        raise ConfigError("listen: at least one listener is required")
    if config.limits.output_soft_bytes > config.limits.output_hard_bytes:
        raise ConfigError("limits.output_soft_bytes: must not be above output_hard_bytes "
                          f"({config.limits.output_hard_bytes})")
    _check_domains(config)
    return dataclasses.replace(config, base_dir=base_dir)


def _domain_entries(data: dict[str, Any]) -> Any:
    """The ``domains:`` entries with each one's upstream keys laid over the top-level
    ``upstream:`` ones (checked first, so a bad inherited value is named where it is)."""
    entries = data["domains"]
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise ConfigError("domains: must be a list of {domain: NAME, upstream: {...}, "
                          "tls: {cert: ..., key: ...}}")
    base = data.get("upstream") or {}
    _convert(base, UpstreamConfig, "upstream")
    merged = []
    for i, entry in enumerate(entries):
        where = f"domains[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: must be a mapping with domain: NAME")
        if not isinstance(entry.get("domain"), str) or not entry["domain"].strip():
            raise ConfigError(f"{where}.domain: required: the domain name clients log in to")
        own = entry.get("upstream")
        if own is None:
            own = {}
        if not isinstance(own, dict):
            raise ConfigError(f"{where}.upstream: must be a mapping")
        if "domain" in own:
            raise ConfigError(f"{where}.upstream.domain: not an option here: the domain is "
                              f"{where}.domain")
        tls = entry.get("tls")
        if isinstance(tls, dict):
            missing = [k for k in ("cert", "key") if k not in tls]
            if missing:
                raise ConfigError(f"{where}.tls.{missing[0]}: required with {where}.tls "
                                  "(a domain's own certificate comes with its key)")
        merged.append({**entry, "upstream": {**base, **own, "domain": entry["domain"]}})
    return merged


def _check_domains(config: Config) -> None:
    """Each served domain once (compared as ``domain_key`` does), each a valid name."""
    seen = {}
    default = domain_key(config.upstream.domain)
    if default is None:
        raise ConfigError(f"upstream.domain: not a valid domain name: "
                          f"{config.upstream.domain!r}")
    seen[default] = "upstream.domain"
    for i, entry in enumerate(config.domains):
        key = domain_key(entry.domain)
        where = f"domains[{i}].domain"
        if key is None or "/" in entry.domain or "@" in entry.domain:
            raise ConfigError(f"{where}: not a valid domain name: {entry.domain!r}")
        if key in seen:
            raise ConfigError(f"{where}: {entry.domain!r} is already served ({seen[key]})")
        seen[key] = where


def load_config(path: str | Path) -> Config:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    return parse_config(data, base_dir=path.resolve().parent)


def check_files(config: Config) -> list[str]:
    """Problems with the files the configuration names (found at check and start)."""
    problems = []
    files: list[tuple[str, str | None]] = [
        ("tls.cert", config.tls.cert), ("tls.key", config.tls.key),
        ("upstream.ca", config.upstream.ca)]
    for i, entry in enumerate(config.domains):
        if entry.tls is not None:
            files += [(f"domains[{i}].tls.cert", entry.tls.cert),
                      (f"domains[{i}].tls.key", entry.tls.key)]
        files.append((f"domains[{i}].upstream.ca", entry.upstream.ca))
    for key, value in files:
        if value is not None and not config.path(value).is_file():
            problems.append(f"{key}: no such file: {config.path(value)}")
    return problems
