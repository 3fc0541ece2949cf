"""The abuse-limit core at its edges: limit-1, limit, limit+1, expiry, eviction."""

from __future__ import annotations

import dataclasses

import pytest

from proxy.abuse import ConnectionLimiter, LoginThrottle, address_key, bind_refusal
from proxy.config import AbuseConfig, ConfigError, parse_config


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def throttle(**overrides: object) -> tuple[LoginThrottle, FakeClock]:
    clock = FakeClock()
    return LoginThrottle(dataclasses.replace(AbuseConfig(), **overrides), clock), clock


ACCOUNT, ADDRESS = "alice@localhost", "192.0.2.7"


def test_defaults_are_on_and_documented_values() -> None:
    config = parse_config(None).abuse
    assert (config.max_connections, config.max_connections_per_address,
            config.max_sessions_per_account) == (10000, 50, 10)
    assert (config.login_failures_free, config.login_delay, config.login_delay_max) == (
        2, 1.0, 8.0)
    assert (config.login_failures_per_account, config.login_failures_per_address,
            config.login_lockout, config.login_failure_window) == (10, 30, 300.0, 900.0)


@pytest.mark.parametrize("key,value", [("max_connections", -1), ("login_delay", 61),
                                       ("login_lockout", 0), ("max_tracked", 99)])
def test_abuse_ranges_are_checked(key: str, value: float) -> None:
    with pytest.raises(ConfigError, match=f"abuse.{key}: must be"):
        parse_config({"abuse": {key: value}})


def test_failures_within_the_free_allowance_are_answered_at_once() -> None:
    t, _ = throttle(login_failures_free=2, login_delay=1.0, login_delay_max=8.0)
    assert t.failed(ACCOUNT, ADDRESS) == 0.0  # 1
    assert t.failed(ACCOUNT, ADDRESS) == 0.0  # 2 = the allowance
    # Past it the delay doubles each time, up to the cap.
    assert [t.failed(ACCOUNT, ADDRESS) for _ in range(6)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


def test_delay_counts_the_worse_of_account_and_address() -> None:
    t, _ = throttle(login_failures_free=1)
    t.failed("a@localhost", ADDRESS)
    t.failed("a@localhost", ADDRESS)
    # Another account, same address: the address's third failure.
    assert t.failed("b@localhost", ADDRESS) == 2.0
    # The account's second failure, from a fresh address.
    assert t.failed("b@localhost", "198.51.100.1") == 1.0


def test_delay_zero_turns_delays_off() -> None:
    t, _ = throttle(login_failures_free=0, login_delay=0.0)
    assert t.failed(ACCOUNT, ADDRESS) == 0.0


def test_account_lockout_at_exactly_the_limit() -> None:
    t, clock = throttle(login_failures_per_account=3, login_failures_per_address=0,
                        login_lockout=60.0)
    for _ in range(2):  # limit - 1
        t.failed(ACCOUNT, ADDRESS)
    assert t.check(ACCOUNT, ADDRESS) is None
    t.failed(ACCOUNT, ADDRESS)  # limit
    refusal = t.check(ACCOUNT, ADDRESS)
    assert refusal is not None and refusal.condition == "temporary-auth-failure"
    assert refusal.limit == "abuse.login_failures_per_account"
    # Only that account: another one from the same address may try.
    assert t.check("bob@localhost", ADDRESS) is None
    # Still refused just before the lockout ends, free again at its end.
    clock.now += 59.9
    assert t.check(ACCOUNT, ADDRESS) is not None
    clock.now += 0.1
    assert t.check(ACCOUNT, ADDRESS) is None


def test_one_more_failure_after_a_lockout_locks_again() -> None:
    t, clock = throttle(login_failures_per_account=3, login_failures_per_address=0,
                        login_lockout=60.0, login_failure_window=900.0)
    for _ in range(3):
        t.failed(ACCOUNT, ADDRESS)
    clock.now += 61
    assert t.check(ACCOUNT, ADDRESS) is None
    t.failed(ACCOUNT, ADDRESS)  # limit + 1
    assert t.check(ACCOUNT, ADDRESS) is not None


def test_spellings_of_one_account_share_its_count() -> None:
    t, _ = throttle(login_failures_per_account=3, login_failures_per_address=0)
    for spelling in ("alice@localhost", "ALICE@localhost", "\uff41lice@localhost"):
        t.failed(spelling, ADDRESS)
    assert t.check("Alice@localhost", ADDRESS) is not None


def test_address_lockout_covers_every_account_from_it() -> None:
    t, _ = throttle(login_failures_per_account=0, login_failures_per_address=3)
    for i in range(3):
        assert t.check(f"u{i}@localhost", ADDRESS) is None
        t.failed(f"u{i}@localhost", ADDRESS)
    refusal = t.check("fresh@localhost", ADDRESS)
    assert refusal is not None and refusal.limit == "abuse.login_failures_per_address"
    assert t.check("fresh@localhost", "198.51.100.1") is None


def test_failures_are_forgotten_after_a_quiet_window() -> None:
    t, clock = throttle(login_failures_per_account=3, login_failure_window=100.0)
    t.failed(ACCOUNT, ADDRESS)
    t.failed(ACCOUNT, ADDRESS)
    clock.now += 99.9
    assert t.by_account.count(ACCOUNT) == 2
    clock.now += 0.1
    assert t.by_account.count(ACCOUNT) == 0
    t.failed(ACCOUNT, ADDRESS)
    assert t.check(ACCOUNT, ADDRESS) is None  # 1 failure, not 3


def test_success_clears_the_account_but_not_the_address() -> None:
    t, _ = throttle(login_failures_per_account=3, login_failures_per_address=4)
    for _ in range(2):
        t.failed(ACCOUNT, ADDRESS)
    t.succeeded(ACCOUNT)
    assert t.by_account.count(ACCOUNT) == 0
    assert t.by_address.count(ADDRESS) == 2
    t.failed(ACCOUNT, ADDRESS)
    t.failed(ACCOUNT, ADDRESS)  # address at 4: locked, though the account is at 2
    assert t.check(ACCOUNT, ADDRESS) is not None


def test_memory_is_bounded_oldest_evicted_first() -> None:
    t, clock = throttle(max_tracked=100)
    for i in range(250):
        clock.now += 0.01
        t.failed(f"u{i}@localhost", f"10.0.{i // 250}.{i % 250}")
    assert len(t.by_account.entries) == 100
    assert len(t.by_address.entries) == 100
    assert "u249@localhost" in t.by_account.entries
    assert "u0@localhost" not in t.by_account.entries


def test_expired_entries_are_dropped_as_new_ones_come() -> None:
    t, clock = throttle(login_failure_window=10.0)
    t.failed("old@localhost", ADDRESS)
    clock.now += 11
    t.failed("new@localhost", "198.51.100.1")
    assert list(t.by_account.entries) == ["new@localhost"]
    assert list(t.by_address.entries) == ["198.51.100.1"]


def test_a_locked_entry_outlives_its_window() -> None:
    t, clock = throttle(login_failures_per_account=1, login_lockout=500.0,
                        login_failure_window=10.0)
    t.failed(ACCOUNT, ADDRESS)
    clock.now += 100
    t.failed("other@localhost", "198.51.100.1")  # trims expired entries
    assert t.check(ACCOUNT, ADDRESS) is not None


@pytest.mark.parametrize("host,key", [
    ("192.0.2.7", "192.0.2.7"),
    ("::ffff:192.0.2.7", "192.0.2.7"),
    ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:ffff::1", "2001:db8:1:2::/64"),
    ("fe80::1%eth0", "fe80::/64"),
    ("?", "?"),
])
def test_address_key(host: str, key: str) -> None:
    assert address_key(host) == key


def limiter(**overrides: object) -> ConnectionLimiter:
    return ConnectionLimiter(dataclasses.replace(AbuseConfig(), **overrides))


def test_connections_per_address_at_the_limit() -> None:
    c = limiter(max_connections_per_address=3, max_connections=100)
    assert [c.admit(ADDRESS) for _ in range(3)] == [None, None, None]  # up to the limit
    refusal = c.admit(ADDRESS)  # limit + 1
    assert refusal is not None and refusal.condition == "policy-violation"
    assert refusal.limit == "abuse.max_connections_per_address"
    assert c.admit("198.51.100.1") is None  # others are not affected
    c.release(ADDRESS)
    assert c.admit(ADDRESS) is None  # a slot came free
    assert c.by_address[ADDRESS] == 3


def test_connections_in_total_at_the_limit() -> None:
    c = limiter(max_connections_per_address=0, max_connections=2)
    assert c.admit("10.0.0.1") is None
    assert c.admit("10.0.0.2") is None
    refusal = c.admit("10.0.0.3")
    assert refusal is not None and refusal.condition == "resource-constraint"
    c.release("10.0.0.1")
    assert c.admit("10.0.0.3") is None


def test_a_refused_connection_is_not_counted_and_released_addresses_are_forgotten() -> None:
    c = limiter(max_connections_per_address=1)
    assert c.admit(ADDRESS) is None
    assert c.admit(ADDRESS) is not None
    assert c.total == 1
    c.release(ADDRESS)
    assert c.by_address == {} and c.total == 0


def test_ipv6_addresses_of_one_64_share_a_limit() -> None:
    c = limiter(max_connections_per_address=1)
    assert c.admit("2001:db8::1") is None
    assert c.admit("2001:db8::2") is not None
    assert c.admit("2001:db8:0:1::1") is None


@pytest.mark.parametrize("sessions,refused", [(9, False), (10, True), (11, True)])
def test_sessions_per_account(sessions: int, refused: bool) -> None:
    refusal = bind_refusal(sessions, dataclasses.replace(AbuseConfig(),
                                                         max_sessions_per_account=10))
    assert (refusal is not None) is refused
    if refusal is not None:
        assert refusal.condition == "resource-constraint"


def test_zero_turns_a_count_limit_off() -> None:
    config = dataclasses.replace(AbuseConfig(), max_sessions_per_account=0,
                                 max_connections=0, max_connections_per_address=0)
    assert bind_refusal(10 ** 6, config) is None
    c = ConnectionLimiter(config)
    assert all(c.admit(ADDRESS) is None for _ in range(1000))
    t = LoginThrottle(dataclasses.replace(config, login_failures_per_account=0,
                                          login_failures_per_address=0), FakeClock())
    for _ in range(100):
        t.failed(ACCOUNT, ADDRESS)
    assert t.check(ACCOUNT, ADDRESS) is None
