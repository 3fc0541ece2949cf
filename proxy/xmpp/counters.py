"""XEP-0198 counter arithmetic, in one place: counters are unsigned 32-bit and wrap (§4)."""

from __future__ import annotations

MOD = 2 ** 32


def wrap(value: int) -> int:
    return value % MOD


def increment(counter: int, by: int = 1) -> int:
    return (counter + by) % MOD


def since(newer: int, older: int) -> int:
    """How many counts ``newer`` is past ``older``, across a wrap (``h`` minus last ``h``)."""
    return (newer - older) % MOD


def valid(value: int) -> bool:
    return 0 <= value < MOD
