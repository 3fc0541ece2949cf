"""Preflight: everything ``run`` would trip over, found before it starts.

``xmpp-front check`` and ``xmpp-front run`` both call :func:`preflight` on a loaded
configuration. It looks past the types and ranges the loader checks (``proxy.config``): it
loads the certificate with its key and the CA file as the proxy will, resolves every listen
host, makes sure the store's folder and the capture folder can be written, cross-checks
settings that only make sense together, and (``probe=True``) tries a TCP connection to the
upstream. Each problem is a :class:`Finding` naming the key; errors stop ``check`` and
``run`` (exit 2), warnings do not.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import socket
import ssl
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .config import Config, Listener, ServedDomain, TlsConfig
from .loopcheck import is_local_address, upstream_loop_problems

# (host, port) -> the addresses asyncio would bind; raises OSError (socket.gaierror) if the
# name does not resolve.
ListenResolver = Callable[[str, int], list[str]]
Binder = Callable[[Listener, str], str | None]

PROBE_TIMEOUT = 3.0  # seconds, at most, for the upstream reachability probe
_PEM_LABEL = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----")
_SQLITE_MAGIC = b"SQLite format 3\x00"


@dataclass(frozen=True)
class Finding:
    """One problem: the configuration key it is about and what is wrong, in one line."""

    key: str
    message: str
    warning: bool = False
    event: str = "config_invalid"  # the log event ``run`` reports it as

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"

    @classmethod
    def parse(cls, text: str) -> Finding:
        """A ``key: message`` error from the loader or an older check (a YAML parser's
        message spans lines: it is folded into one)."""
        key, sep, message = _one_line(text).partition(": ")
        return cls(key, message) if sep else cls("config", key)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _error(key: str, message: str) -> Finding:
    return Finding(key, _one_line(message))


def _warning(key: str, message: str, event: str = "config_warning") -> Finding:
    return Finding(key, _one_line(message), warning=True, event=event)


def preflight(config: Config, *, probe: bool = True, bind_ports: bool = True,
              resolve_listen: ListenResolver | None = None,
              bind: Binder | None = None) -> list[Finding]:
    """Every problem found in ``config``, errors and warnings, in the order of the file.
    ``probe``: also try a TCP connection to the upstream (a warning if it fails) and, with
    ``bind_ports``, a bind of each listener's port (a warning: the port may be this very
    proxy's, already running; ``run`` binds them for real instead). Neither is tried when
    there are errors."""
    findings: list[Finding] = []
    findings += check_listeners(config, resolve_listen or resolve_listen_host)
    findings += check_tls(config)
    findings += check_upstream(config)
    findings += check_store(config)
    findings += check_capture_dir(config)
    findings += check_admin_socket(config)
    findings += check_worker_sockets(config)
    findings += check_rules(config)
    findings += cross_checks(config)
    if probe and not errors(findings):
        if bind_ports:
            findings += bind_listeners(config, bind or try_bind)
        findings += probe_upstream(config)
    return findings


def errors(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if not f.warning]


# ---------------------------------------------------------------------- listeners


def resolve_listen_host(host: str, port: int) -> list[str]:
    """The addresses ``asyncio.start_server`` binds for ``host`` ("" means every
    interface)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    return sorted({str(info[4][0]) for info in infos})


def _is_wildcard(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_unspecified
    except ValueError:
        return False


def check_listeners(config: Config, resolve: ListenResolver) -> list[Finding]:
    findings: list[Finding] = []
    seen: dict[tuple[str, int], int] = {}
    for i, listener in enumerate(config.listen):
        key = f"listen[{i}].host"
        try:
            addresses = resolve(listener.host, listener.port)
        except (OSError, UnicodeError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            findings.append(_error(key, f"cannot resolve {listener.host!r}: {reason}"))
            continue
        if not addresses:
            findings.append(_error(key, f"{listener.host!r} resolves to no address"))
            continue
        for address in addresses:
            if not _is_wildcard(address) and not is_local_address(address):
                shown = address if address == listener.host else \
                    f"{address} (from {listener.host!r})"
                findings.append(_error(key, f"{shown} is not an address of this machine: "
                                            f"the proxy cannot listen on it"))
                break
        if listener.port:
            for address in addresses:
                first = seen.setdefault((address, listener.port), i)
                if first != i:
                    findings.append(_error(f"listen[{i}]", (
                        f"{address}:{listener.port} is already listen[{first}]")))
                    break
    return findings


def try_bind(listener: Listener, address: str) -> str | None:
    """Bind (and close at once) a socket as asyncio would; the error, or None."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            if hasattr(socket, "SO_REUSEADDR"):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((address, listener.port))
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def bind_listeners(config: Config, bind: Binder) -> list[Finding]:
    findings: list[Finding] = []
    for i, listener in enumerate(config.listen):
        if not listener.port:
            continue
        try:
            addresses = resolve_listen_host(listener.host, listener.port)
        except (OSError, UnicodeError):
            continue  # reported by check_listeners
        for address in addresses:
            problem = bind(listener, address)
            if problem is not None:
                findings.append(_warning(f"listen[{i}].port", (
                    f"cannot listen on {address}:{listener.port} now: {problem} (another "
                    f"process has it, or this proxy is already running)")))
                break
    return findings


# ---------------------------------------------------------------------- TLS files


def _read(config: Config, key: str, value: str) -> bytes | Finding:
    path = config.path(value)
    if not path.exists():
        return _error(key, f"no such file: {path}")
    if not path.is_file():
        return _error(key, f"not a file: {path}")
    try:
        return path.read_bytes()
    except OSError as exc:
        return _error(key, f"cannot read {path}: {exc.strerror or exc}")


def _labels(data: bytes) -> set[str]:
    return {m.decode() for m in _PEM_LABEL.findall(data)}


def _has_key(labels: set[str]) -> bool:
    return any(label.endswith("PRIVATE KEY") for label in labels)


def _ssl_reason(exc: ssl.SSLError) -> str:
    return str(exc.reason or exc.strerror or exc).replace("_", " ").lower()


def check_tls(config: Config) -> list[Finding]:
    """Every certificate clients may see (the default ``tls:`` pair and each domain's own)
    and its key; then, for each served domain, whether the certificate its clients get
    names it."""
    findings = check_pair(config, config.tls, "tls")
    pairs = {"tls": findings}
    for served in config.served.values():
        if served.index is not None and served.own_tls:
            pairs[served.tls_prefix] = check_pair(config, served.tls, served.tls_prefix)
            findings += pairs[served.tls_prefix]
    for served in config.served.values():
        if not pairs[served.tls_prefix]:
            findings += check_certificate_use(config, served)
    return findings


def _server_probe(config: Config, tls: TlsConfig) -> ssl.SSLContext:
    probe = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)  # as the server makes it
    probe.load_cert_chain(str(config.path(tls.cert)), str(config.path(tls.key)),
                          password=lambda: b"")
    return probe


def check_pair(config: Config, tls: TlsConfig, prefix: str) -> list[Finding]:
    """One certificate and its key (``prefix``: ``tls`` or ``domains[i].tls``): files that
    exist, can be read, are PEM, hold what their key says, are not swapped, and belong
    together."""
    cert_key, key_key = f"{prefix}.cert", f"{prefix}.key"
    cert_path, key_path = config.path(tls.cert), config.path(tls.key)
    cert = _read(config, cert_key, tls.cert)
    key = _read(config, key_key, tls.key)
    if isinstance(cert, Finding) or isinstance(key, Finding):
        return [f for f in (cert, key) if isinstance(f, Finding)]
    problems: list[Finding] = []
    cert_labels, key_labels = _labels(cert), _labels(key)
    if ("CERTIFICATE" not in cert_labels and _has_key(cert_labels)
            and "CERTIFICATE" in key_labels and not _has_key(key_labels)):
        return [_error(cert_key, f"{cert_path} holds a private key and {key_key} ({key_path}) "
                                 f"a certificate: {cert_key} and {key_key} are swapped")]
    if not cert_labels:
        problems.append(_error(cert_key, f"not a PEM file: {cert_path} (expected "
                                         "-----BEGIN CERTIFICATE-----)"))
    elif "CERTIFICATE" not in cert_labels:
        what = "a private key" if _has_key(cert_labels) else ", ".join(sorted(cert_labels))
        problems.append(_error(cert_key, f"{cert_path} holds {what}, not a certificate"))
    if not key_labels:
        problems.append(_error(key_key, f"not a PEM file: {key_path} (expected "
                                        "-----BEGIN PRIVATE KEY-----)"))
    elif not _has_key(key_labels):
        what = "a certificate" if "CERTIFICATE" in key_labels else \
            ", ".join(sorted(key_labels))
        problems.append(_error(key_key, f"{key_path} holds {what}, not a private key"))
    elif "ENCRYPTED PRIVATE KEY" in key_labels or b"Proc-Type: 4,ENCRYPTED" in key:
        problems.append(_error(key_key, f"{key_path} is encrypted with a passphrase: "
                                        "the proxy needs an unencrypted key (owner-only "
                                        "readable)"))
    if problems:
        return problems
    probe = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)  # as the server makes it
    try:
        probe.load_verify_locations(cafile=str(cert_path))
    except ssl.SSLError as exc:
        return [_error(cert_key, f"{cert_path} is not a valid certificate: "
                                 f"{_ssl_reason(exc)}")]
    try:
        # What the server does at start; the password callback only runs for an encrypted
        # key, and keeps OpenSSL from prompting on the terminal.
        probe.load_cert_chain(str(cert_path), str(key_path), password=lambda: b"")
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            return [_error(key_key, f"{key_path} is not the key of the certificate in "
                                    f"{cert_key} ({cert_path}; its first certificate must be "
                                    "the server's own)")]
        return [_error(key_key, f"{key_path} cannot be loaded with {cert_key}: "
                                f"{_ssl_reason(exc)}")]
    return []


# What a client verifying the certificate for upstream.domain would refuse it for
# (OpenSSL's X509_V_ERR_* codes); anything else (a private CA, a self-signed certificate)
# is between the operator and the clients.
_CLIENT_REFUSALS = {9: "is not valid yet", 10: "has expired", 62: "does not name"}


def handshake_in_memory(client: ssl.SSLContext, server: ssl.SSLContext,
                        server_name: str | None) -> ssl.SSLObject:
    """A TLS handshake between two contexts through memory buffers, no socket; the client's
    end (``getpeercert``). Raises what the client or the server refused with."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(c_in, c_out, server_hostname=server_name)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(8):  # a handshake takes two or three flights each way
        done = True
        for side in (c, s):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                done = False
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if done:
            break
    return c


def check_certificate_use(config: Config, served: ServedDomain) -> list[Finding]:
    """A TLS handshake in memory, as a client connecting for the served domain that trusts
    the certificate it gets (its own, else the default): warnings for an expired
    certificate or one that does not name the domain (clients will refuse it)."""
    try:
        server = _server_probe(config, served.tls)
    except (ssl.SSLError, OSError):
        return []  # check_pair reports it
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(cafile=str(config.path(served.tls.cert)))
    client.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # the leaf itself is trusted
    domain = served.name
    where = "upstream.domain" if served.index is None else f"domains[{served.index}].domain"
    try:
        handshake_in_memory(client, server, domain)
    except ssl.SSLCertVerificationError as exc:
        what = _CLIENT_REFUSALS.get(exc.verify_code)
        if what is None:
            return []
        text = (f"does not name {where} {domain!r}" if exc.verify_code == 62 else what)
        return [_warning(f"{served.tls_prefix}.cert", (
            f"{config.path(served.tls.cert)} {text}: clients verifying it will refuse it"))]
    except ssl.SSLError:
        return []  # not this check's business: the proxy loaded the pair
    return []


# ---------------------------------------------------------------------- upstream


def check_upstream(config: Config) -> list[Finding]:
    """Each served domain's upstream: the CA file the server is verified with (loaded
    whenever TLS is on), the loop check, and settings that do nothing or send passwords in
    clear."""
    findings = _check_one_upstream(config, "upstream")
    for served in config.served.values():
        if served.index is None:
            continue
        # What a domain inherits (or repeats) was checked, and is named, as upstream's.
        own = {f.name for f in dataclasses.fields(config.upstream)
               if getattr(served.config.upstream, f.name) != getattr(config.upstream, f.name)}
        prefix = served.key_prefix
        findings += [f for f in _check_one_upstream(served.config, prefix)
                     if own & _CHECKED_BY.get(f.key.replace(prefix + ".", ""), set())]
    return findings


# The upstream keys each finding of _check_one_upstream depends on.
_CHECKED_BY: dict[str, set[str]] = {
    "ca": {"ca", "tls", "verify"}, "tls": {"tls", "host"}, "host/port": {"host", "port"},
}


def _check_one_upstream(config: Config, prefix: str) -> list[Finding]:
    upstream = config.upstream
    findings: list[Finding] = []
    if upstream.ca is not None:
        if upstream.tls == "none":
            findings.append(_warning(f"{prefix}.ca", f"not used: {prefix}.tls is none"))
        else:
            findings += _check_ca(config, upstream.ca, f"{prefix}.ca")
            if not upstream.verify and not findings:
                findings.append(_warning(f"{prefix}.ca", f"not used: {prefix}.verify is false"))
    findings += [Finding.parse(p) for p in upstream_loop_problems(config, key=prefix)]
    if upstream.tls == "none":
        try:
            addresses = {str(info[4][0]) for info in socket.getaddrinfo(
                upstream.host, upstream.port, type=socket.SOCK_STREAM)}
        except (OSError, UnicodeError):
            addresses = set()
        if addresses and not all(is_local_address(a) for a in addresses):
            findings.append(_warning(f"{prefix}.tls", (
                f"none: passwords go in clear to {upstream.host}, which is not this machine")))
    return findings


def _check_ca(config: Config, value: str, key: str = "upstream.ca") -> list[Finding]:
    path = config.path(value)
    data = _read(config, key, value)
    if isinstance(data, Finding):
        return [data]
    labels = _labels(data)
    if "CERTIFICATE" not in labels:
        held = (" (it holds a private key)" if _has_key(labels) else
                f" (it holds {', '.join(sorted(labels))})" if labels else
                " (expected -----BEGIN CERTIFICATE-----)")
        return [_error(key, f"not a PEM file of CA certificates: {path}{held}")]
    try:
        ssl.create_default_context().load_verify_locations(cafile=str(path))
    except ssl.SSLError as exc:
        return [_error(key, f"{path} cannot be loaded: {_ssl_reason(exc)}")]
    return []


def probe_upstream(config: Config, timeout: float | None = None) -> list[Finding]:
    """A warning for each served domain whose server a TCP connection fails to now (the
    proxy still starts: that domain's logins fail with ``temporary-auth-failure`` until
    its server is up). A server several domains share is tried once."""
    findings: list[Finding] = []
    tried: dict[tuple[str, int], str | None] = {}
    for served in config.served.values():
        upstream = served.config.upstream
        address = (upstream.host, upstream.port)
        if address not in tried:
            tried[address] = _probe(served.config, timeout)
        reason = tried[address]
        if reason is None:
            continue
        key = served.key_prefix
        findings.append(_warning(f"{key}.host/{key}.port", (
            f"cannot connect to {upstream.host}:{upstream.port} now ({reason}): logins "
            f"to {served.name} will fail with temporary-auth-failure until the server is "
            "reachable"), event="upstream_unreachable"))
    return findings


def _probe(config: Config, timeout: float | None) -> str | None:
    """Why a TCP connection to ``config.upstream`` fails now, or None."""
    upstream = config.upstream
    timeout = min(upstream.connect_timeout, PROBE_TIMEOUT) if timeout is None else timeout
    try:
        with socket.create_connection((upstream.host, upstream.port), timeout=timeout):
            pass
    except TimeoutError:
        return f"no answer within {timeout:g} s"
    except (OSError, UnicodeError) as exc:
        return getattr(exc, "strerror", None) or str(exc)
    return None


# ---------------------------------------------------------------------- folders


def _writable_folder(folder: Path) -> str | None:
    """Why files cannot be created in ``folder`` (tried for real), or None."""
    try:
        fd, name = tempfile.mkstemp(prefix=".xmpp-front-check-", dir=folder)
    except OSError as exc:
        return exc.strerror or str(exc)
    os.close(fd)
    os.unlink(name)
    return None


def check_store(config: Config) -> list[Finding]:
    """The store's folder exists and can be written (SQLite creates ``-wal`` and ``-shm``
    files beside the store); an existing store is a readable, writable SQLite file."""
    key = "store.path"
    value = config.store.path
    if value == ":memory:" or value.startswith("file:"):
        findings = []
        if value == ":memory:" and config.durability.mode == "journal":
            findings.append(_warning("durability.mode", (
                "journal needs a store file: with store.path ':memory:' the journal is off "
                "and a crash loses what was acknowledged")))
        return findings
    path = config.path(value)
    folder = path.parent
    if not folder.exists():
        return [_error(key, f"the folder {folder} does not exist (create it, owned by the "
                            "proxy's user)")]
    if not folder.is_dir():
        return [_error(key, f"{folder} is not a folder")]
    if path.exists():
        if not path.is_file():
            return [_error(key, f"{path} is not a file")]
        try:
            with open(path, "r+b") as f:
                head = f.read(len(_SQLITE_MAGIC))
        except OSError as exc:
            return [_error(key, f"cannot open {path} for reading and writing: "
                                f"{exc.strerror or exc}")]
        if head and head != _SQLITE_MAGIC:
            return [_error(key, f"{path} is not an SQLite database")]
    problem = _writable_folder(folder)
    if problem is not None:
        return [_error(key, f"cannot create files in {folder} ({problem}): the store and "
                            "its -wal and -shm files live there")]
    return []


def _first_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_capture_dir(config: Config) -> list[Finding]:
    """``log.capture_dir`` is a folder that can be written, or one the proxy can create."""
    if config.log.capture_dir is None:
        return []
    key = "log.capture_dir"
    folder = config.path(config.log.capture_dir)
    existing = _first_existing(folder)
    if not existing.is_dir():
        return [_error(key, f"{existing} is not a folder")]
    problem = _writable_folder(existing)
    if problem is None:
        return []
    if existing == folder:
        return [_error(key, f"cannot write transcripts in {folder}: {problem}")]
    return [_error(key, f"cannot create {folder}: {existing} is not writable ({problem})")]


MAX_UNIX_PATH = 107  # bytes in sockaddr_un.sun_path, less the terminating NUL (Linux)


def check_admin_socket(config: Config) -> list[Finding]:
    """``admin.socket`` fits a Unix socket address, and a chosen one's folder exists or can
    be made (the folder's ownership and mode are checked when the proxy binds it)."""
    from .admin_protocol import socket_path

    path = socket_path(config)
    if path is None:
        return []
    key = "admin.socket"
    if len(str(path).encode()) > MAX_UNIX_PATH:
        return [_error(key, f"{path} is longer than a Unix socket path may be "
                            f"({MAX_UNIX_PATH} bytes): name a shorter one")]
    folder = path.parent
    if config.admin.socket == "auto":
        return []  # beside the store, whose folder check_store checks
    if folder.exists():
        return [] if folder.is_dir() else [_error(key, f"{folder} is not a folder")]
    if not folder.parent.is_dir():
        return [_error(key, f"cannot create {folder}: {folder.parent} is not a folder")]
    problem = _writable_folder(folder.parent)
    return [] if problem is None else [
        _error(key, f"cannot create {folder}: {folder.parent} is not writable ({problem})")]


def check_worker_sockets(config: Config) -> list[Finding]:
    """``workers`` above 1: the workers' own sockets (beside the store) fit a Unix socket
    address."""
    from .workers import resolve_workers, worker_paths

    count = resolve_workers(config.workers)
    if count <= 1:
        return []
    longest = worker_paths(config).admin(count - 1)
    if len(str(longest).encode()) > MAX_UNIX_PATH:
        return [_error("workers", f"the workers' sockets would be in {longest.parent}, longer "
                                  f"than a Unix socket path may be ({MAX_UNIX_PATH} bytes): "
                                  "put the store in a shorter folder")]
    return []


def check_rules(config: Config) -> list[Finding]:
    if not config.rules:
        return []
    from .rules_cli import check_rule_files

    missing = [p for p in config.rules if not config.path(p).is_file()]
    if missing:
        return [_error("rules", f"no such file: {config.path(p)}") for p in missing]
    return [_error("rules", p) for p in check_rule_files([config.path(p) for p in config.rules])]


# ---------------------------------------------------------------------- cross-checks


def _seconds(value: float) -> str:
    return f"{value:g} s"


def cross_checks(config: Config) -> list[Finding]:
    """Settings that are each in range but do not make sense together."""
    return list(_cross_checks(config))


def _cross_checks(config: Config) -> Iterator[Finding]:
    abuse, limits, sm = config.abuse, config.limits, config.stream_management
    reconnect, shutdown, upstream = config.reconnect, config.shutdown, config.upstream
    if abuse.login_delay > 0 and abuse.login_delay_max >= limits.negotiation_timeout:
        yield _error("abuse.login_delay_max", (
            f"{_seconds(abuse.login_delay_max)} must be below limits.negotiation_timeout "
            f"({_seconds(limits.negotiation_timeout)}): a delayed answer to a failed login "
            "would come after the client's negotiation timed out"))
    if abuse.login_delay > abuse.login_delay_max > 0:
        yield _warning("abuse.login_delay", (
            f"{_seconds(abuse.login_delay)} is above abuse.login_delay_max "
            f"({_seconds(abuse.login_delay_max)}): every delay is login_delay_max"))
    if sm.resume_timeout > sm.max_resume_timeout:
        yield _error("stream_management.resume_timeout", (
            f"{_seconds(sm.resume_timeout)} must not exceed "
            f"stream_management.max_resume_timeout ({_seconds(sm.max_resume_timeout)})"))
    if shutdown.ack_wait > shutdown.drain_timeout:
        yield _error("shutdown.ack_wait", (
            f"{_seconds(shutdown.ack_wait)} must not exceed shutdown.drain_timeout "
            f"({_seconds(shutdown.drain_timeout)}): it is a part of it"))
    if reconnect.base > reconnect.cap:
        yield _error("reconnect.base", (
            f"{_seconds(reconnect.base)} must not exceed reconnect.cap "
            f"({_seconds(reconnect.cap)})"))
    if reconnect.first_delay_max >= reconnect.max_outage:
        yield _error("reconnect.first_delay_max", (
            f"{_seconds(reconnect.first_delay_max)} must be below reconnect.max_outage "
            f"({_seconds(reconnect.max_outage)}): sessions would give up before their first "
            "reconnection attempt"))
    elif reconnect.cap >= reconnect.max_outage:
        yield _warning("reconnect.cap", (
            f"{_seconds(reconnect.cap)} is not below reconnect.max_outage "
            f"({_seconds(reconnect.max_outage)}): a session may give up after one wait"))
    for served in config.served.values():
        timeout = served.config.upstream.connect_timeout
        inherited = served.index is not None and timeout == upstream.connect_timeout
        if timeout >= limits.negotiation_timeout and not inherited:  # said once, where set
            yield _warning(f"{served.key_prefix}.connect_timeout", (
                f"{_seconds(timeout)} is not below limits.negotiation_timeout "
                f"({_seconds(limits.negotiation_timeout)}): a slow server ends a client's "
                "login with connection-timeout instead of temporary-auth-failure"))
    for i, listener in enumerate(config.listen):
        if listener.proxy_protocol and not listener.proxy_protocol_from:
            yield _warning(f"listen[{i}].proxy_protocol_from", (
                "empty: a PROXY header is believed from any peer, so anyone who can reach "
                "this listener can claim any client address; name the balancer's networks"))
    if sm.debug_counter_start:
        yield _warning("stream_management.debug_counter_start",
                       "testing only: real clients expect their counters to start at 0")
    if (abuse.max_connections and abuse.max_connections_per_address
            and abuse.max_connections_per_address > abuse.max_connections):
        yield _warning("abuse.max_connections_per_address", (
            f"{abuse.max_connections_per_address} is above abuse.max_connections "
            f"({abuse.max_connections}): it can never be reached"))
