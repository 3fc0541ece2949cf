"""Abuse limits: failed logins, connections per address and in total, sessions per account.

A pure core (no sockets, the clock injected): the shell asks it before each costly step and
tells it what happened. It follows XEP-0205 (Best Practices to Discourage Denial of Service
Attacks): §4.1 simultaneous connections, §4.4 simultaneous resources, and for failed logins
the growing delay and then the refusal it suggests.

Failed logins are counted per account and per client address. The first few are answered at
once; then each failure answer is delayed, the delay doubling up to a cap; at the limit the
key is locked out: attempts are refused without asking the legacy server (a refused attempt
costs no upstream login). A key's count is forgotten after a quiet period; a successful login
clears the account's count but not the address's (an attacker with one good account could
otherwise reset their address between guesses). Memory is bounded: each table keeps at most
``max_tracked`` keys, least recently touched evicted first, expired ones dropped as met.
"""

from __future__ import annotations

import ipaddress
import time
import unicodedata
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from .config import AbuseConfig

Clock = Callable[[], float]

# An IPv6 user gets a whole /64 from any provider: one address per /64 is one "address".
IPV6_PREFIX = 64


def address_key(host: str) -> str:
    """The key a client address counts under: the IPv4 address, or the IPv6 /64."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host  # not an IP (a Unix socket, a test double): counted as it is
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/{IPV6_PREFIX}", strict=False))
    return str(ip)


def account_key(account: str) -> str:
    """The key an account counts under. The legacy server maps spellings of one account
    together (nodeprep/PRECIS: width, case, compatibility forms); so must the counting, or
    ``ＶICTIM`` would be a fresh account to guess at. Folding too much only merges counts."""
    return unicodedata.normalize("NFKC", account).casefold()


@dataclass(frozen=True)
class Refusal:
    """Why something is refused: the RFC condition to answer with and a text for the peer."""

    condition: str
    text: str
    limit: str  # the config key, for the log


@dataclass
class _Failures:
    count: int = 0
    last: float = 0.0
    locked_until: float = 0.0


class _FailureTable:
    """Failed logins per key (an account or an address), bounded and expiring."""

    def __init__(self, limit: int, config: AbuseConfig, clock: Clock) -> None:
        self.limit = limit
        self.config = config
        self.clock = clock
        self.entries: OrderedDict[str, _Failures] = OrderedDict()

    def _live(self, key: str, now: float) -> _Failures | None:
        entry = self.entries.get(key)
        if entry is not None and self._expired(entry, now):
            del self.entries[key]
            return None
        return entry

    def _expired(self, entry: _Failures, now: float) -> bool:
        return (now >= entry.locked_until
                and now - entry.last >= self.config.login_failure_window)

    def locked(self, key: str) -> bool:
        now = self.clock()
        entry = self._live(key, now)
        return entry is not None and now < entry.locked_until

    def count(self, key: str) -> int:
        entry = self._live(key, self.clock())
        return entry.count if entry is not None else 0

    def record(self, key: str) -> _Failures:
        now = self.clock()
        entry = self._live(key, now) or _Failures()
        entry.count += 1
        entry.last = now
        if self.limit and entry.count >= self.limit:
            # Refused attempts never reach record(), so a lockout is not prolonged by them;
            # the count stays at the limit, so one more failure within the window after the
            # lockout locks again at once.
            entry.locked_until = now + self.config.login_lockout
        self.entries[key] = entry
        self.entries.move_to_end(key)
        self._trim(now)
        return entry

    def clear(self, key: str) -> None:
        self.entries.pop(key, None)

    def _trim(self, now: float) -> None:
        # Oldest first: drop what has expired, then whatever is over the cap.
        while self.entries:
            oldest_key, oldest = next(iter(self.entries.items()))
            if len(self.entries) > self.config.max_tracked or self._expired(oldest, now):
                del self.entries[oldest_key]
            else:
                break


class LoginThrottle:
    """Failed-login accounting for one proxy process."""

    def __init__(self, config: AbuseConfig, clock: Clock = time.monotonic) -> None:
        self.config = config
        self.by_account = _FailureTable(config.login_failures_per_account, config, clock)
        self.by_address = _FailureTable(config.login_failures_per_address, config, clock)

    def reconfigure(self, config: AbuseConfig) -> None:
        """New limits (a reload); the failures counted so far are kept."""
        self.config = config
        for table, limit in ((self.by_account, config.login_failures_per_account),
                             (self.by_address, config.login_failures_per_address)):
            table.limit, table.config = limit, config

    def check(self, account: str, address: str) -> Refusal | None:
        """Before an attempt: None to go ahead (ask the server), or the refusal.

        RFC 6120 §6.5.11 ``temporary-auth-failure`` ("advisable ... to try again later"), not
        §6.5.10 ``not-authorized``: the password was not checked, and telling a user with
        the right password that it is wrong would make clients drop saved credentials. It
        also says nothing about whether the password was right.
        """
        if self.by_account.locked(account_key(account)):
            return Refusal("temporary-auth-failure",
                           "too many failed logins for this account; try again later",
                           "abuse.login_failures_per_account")
        if self.by_address.locked(address_key(address)):
            return Refusal("temporary-auth-failure",
                           "too many failed logins from this address; try again later",
                           "abuse.login_failures_per_address")
        return None

    def failed(self, account: str, address: str) -> float:
        """The server rejected the credentials: record it; returns the seconds to wait
        before answering (XEP-0205: slow down whoever keeps guessing)."""
        counts = (self.by_account.record(account_key(account)).count,
                  self.by_address.record(address_key(address)).count)
        return self.delay_for(max(counts))

    def delay_for(self, failures: int) -> float:
        over = failures - self.config.login_failures_free
        if over <= 0 or self.config.login_delay <= 0:
            return 0.0
        # 2 ** over grows past any cap long before it could overflow; bound it anyway.
        return min(self.config.login_delay_max,
                   self.config.login_delay * 2.0 ** min(over - 1, 32))

    def succeeded(self, account: str) -> None:
        self.by_account.clear(account_key(account))


class ConnectionLimiter:
    """Open client connections, per address and in total (XEP-0205 §4.1)."""

    def __init__(self, config: AbuseConfig) -> None:
        self.config = config
        self.by_address: dict[str, int] = {}  # only addresses with an open connection
        self.total = 0

    def admit(self, address: str) -> Refusal | None:
        """A connection was accepted: None if it may stay (it is then counted and must be
        released), else the refusal.

        RFC 6120 §4.9.3: one address over its share broke a local policy (§4.9.3.14
        ``policy-violation``); everyone together over the total means the server lacks the
        resources to serve another stream (§4.9.3.17 ``resource-constraint``).
        """
        key = address_key(address)
        per_address = self.config.max_connections_per_address
        if per_address and self.by_address.get(key, 0) >= per_address:
            return Refusal("policy-violation", "too many connections from your address",
                           "abuse.max_connections_per_address")
        if self.config.max_connections and self.total >= self.config.max_connections:
            return Refusal("resource-constraint", "the server is full; try again later",
                           "abuse.max_connections")
        self.by_address[key] = self.by_address.get(key, 0) + 1
        self.total += 1
        return None

    def release(self, address: str) -> None:
        key = address_key(address)
        left = self.by_address.get(key, 0) - 1
        if left > 0:
            self.by_address[key] = left
        else:
            self.by_address.pop(key, None)
        self.total = max(0, self.total - 1)


def bind_refusal(sessions_of_account: int, config: AbuseConfig) -> Refusal | None:
    """Before binding one more resource: RFC 6120 §7.6.2.1, an account at its limit of
    simultaneous resources gets ``resource-constraint`` (type ``wait``)."""
    limit = config.max_sessions_per_account
    if limit and sessions_of_account >= limit:
        return Refusal("resource-constraint",
                       f"this account already has {sessions_of_account} sessions",
                       "abuse.max_sessions_per_account")
    return None
