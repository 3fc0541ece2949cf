"""Reconnection delays (RFC 6120 §3.3): the first attempt after a random delay in
``[0, first_delay_max]``, so sessions cut by one server restart spread out instead of
stampeding; then truncated binary exponential backoff with full jitter on every attempt.

Pure: the random source is injected.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(slots=True)
class Backoff:
    first_delay_max: float
    base: float
    cap: float
    rng: random.Random = field(default_factory=random.Random)
    attempts: int = 0

    def next_delay(self) -> float:
        """Seconds to wait before the next connection attempt."""
        n = self.attempts
        self.attempts += 1
        if n == 0:
            return self.rng.uniform(0.0, self.first_delay_max)
        return self.rng.uniform(0.0, min(self.cap, self.base * 2 ** (n - 1)))

    def reset(self) -> None:
        self.attempts = 0
