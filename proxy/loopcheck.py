"""The proxy must never be its own upstream (issue: with the defaults, listen and upstream
are both 127.0.0.1:5222, and one login nested thousands of connections).

Two checks. At ``check`` and ``run``: the upstream's host and port, resolved, must not be one
of the proxy's listeners (``upstream_loop_problems``). At run time, for loops the
configuration cannot show (a port forward, a NAT, a DNS name that changes): the proxy
remembers the stream ids it is issuing to clients still negotiating (``OwnStreamIds``), and
an upstream connection whose server answers with one of them is talking to this very
process. A stream id survives any TCP forwarder, where an address check would see only the
forwarder's address.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable

from .config import Config, Listener

Resolve = Callable[[str, int], set[str]]
IsLocal = Callable[[str], bool]


def resolve(host: str, port: int) -> set[str]:
    """Every address ``host`` resolves to (empty if it does not resolve)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return set()
    return {_normal(str(info[4][0])) for info in infos}


def is_local_address(address: str) -> bool:
    """True if this machine has ``address`` (binding to it succeeds)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if ip.is_loopback:
        return True
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((address, 0))
    except OSError:
        return False
    return True


def _normal(address: str) -> str:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def _wildcard_families(host: str) -> set[int] | None:
    """The IP versions a wildcard listener host accepts on, or None if not a wildcard.
    asyncio binds "" to every family, and an IPv6 socket with IPV6_V6ONLY set."""
    if host in ("", "*"):
        return {4, 6}
    if host == "0.0.0.0":
        return {4}
    if host in ("::", "[::]"):
        return {6}
    return None


def _listener_catches(listener: Listener, upstream_addresses: set[str], resolver: Resolve,
                      is_local: IsLocal) -> bool:
    families = _wildcard_families(listener.host)
    if families is not None:
        return any(ipaddress.ip_address(a).version in families and is_local(a)
                   for a in upstream_addresses if _is_ip(a))
    return bool(resolver(listener.host, listener.port) & upstream_addresses)


def _is_ip(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True


def upstream_loop_problems(config: Config, resolver: Resolve = resolve,
                           is_local: IsLocal = is_local_address,
                           key: str = "upstream") -> list[str]:
    """Configuration problems: the upstream is one of the proxy's own listeners.
    ``key``: where ``config.upstream`` is in the file (a domain's: ``domains[i].upstream``)."""
    upstream = config.upstream
    listeners = [(i, li) for i, li in enumerate(config.listen) if li.port == upstream.port]
    if not listeners:
        return []  # the common case: no resolving at all
    addresses = resolver(upstream.host, upstream.port)
    return [f"{key}.host/{key}.port: {upstream.host}:{upstream.port} is this proxy's "
            f"own listener listen[{i}] ({listener.host or '*'}:{listener.port}); the proxy "
            f"would log in to itself. Set {key}.host and {key}.port to the legacy "
            f"server's address, or move listen[{i}].port."
            for i, listener in listeners
            if _listener_catches(listener, addresses, resolver, is_local)]


class OwnStreamIds:
    """Stream ids this process issued to clients that are still negotiating.

    Bounded by the connections in negotiation (an id is retired when its negotiation ends).
    """

    def __init__(self) -> None:
        self._ids: set[str] = set()

    def issued(self, stream_id: str) -> None:
        self._ids.add(stream_id)

    def retire(self, stream_ids: Iterable[str]) -> None:
        self._ids.difference_update(stream_ids)

    def __contains__(self, stream_id: object) -> bool:
        return stream_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)
