"""The ledger: what a session is responsible for, and how each stanza left it. Socket-free.

An acknowledgement is a promise. A client stanza enters the session's ledger when the proxy
takes it (counted for the client's XEP-0198 ``h``, or read on a stream without stream
management) and a server stanza when the proxy reads it for the client. Each leaves by one
named exit:

- ``delivered``: the server confirmed it (a barrier reply or its own XEP-0198 ack), or the
  client acknowledged it (or it was written to a client without stream management);
- ``stored``: kept in the store for later delivery (offline messages for the account, or
  client stanzas queued for the server at the account's next login);
- ``bounced``: returned to its sender as an RFC 6120 error;
- ``discarded``: a stanza that means nothing once its session is gone (presence broadcasts,
  iq results and errors for a session that ended, the proxy's own requests), counted.

Both lanes are first in, first out: the client-to-server lane is the session's outbox
(confirmations come in stream order, RFC 6120 §10.1), the server-to-client lane its stream
management queue (acks come in order). So a lane needs no per-stanza bookkeeping beyond two
counters: the stanzas numbered ``left .. entered - 1`` are the ones still held, and that is
also how the journal (the store's crash-proof copy) names them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

Exit = Literal["delivered", "stored", "bounced", "discarded"]
EXITS: tuple[Exit, ...] = ("delivered", "stored", "bounced", "discarded")
LaneName = Literal["c2s", "s2c"]


class LedgerError(Exception):
    """More left a lane than had entered it: a bookkeeping bug, never a peer's fault."""


@dataclass(slots=True)
class Lane:
    name: LaneName
    entered: int = 0
    left: int = 0
    exits: Counter[str] = field(default_factory=Counter)

    @property
    def held(self) -> int:
        return self.entered - self.left

    def enter(self) -> int:
        """One more stanza taken on; returns its number in this lane."""
        number = self.entered
        self.entered += 1
        return number

    def leave(self, count: int, exit: Exit) -> int:
        """``count`` stanzas left from the front by ``exit``; returns the new ``left``."""
        if count < 0 or count > self.held:
            raise LedgerError(f"{self.name}: {count} cannot leave, {self.held} held")
        self.left += count
        if count:
            self.exits[exit] += count
        return self.left

    def passed(self, exit: Exit) -> None:
        """One stanza entered and left at once (relayed without being held): ``enter``
        then ``leave(1, exit)`` in one step, for the relay path."""
        self.entered += 1
        self.left += 1
        self.exits[exit] += 1

    def summary(self) -> dict[str, int]:
        return {"entered": self.entered, "held": self.held,
                **{name: self.exits[name] for name in EXITS}}


@dataclass(slots=True)
class Ledger:
    c2s: Lane = field(default_factory=lambda: Lane("c2s"))
    s2c: Lane = field(default_factory=lambda: Lane("s2c"))

    @property
    def empty(self) -> bool:
        return self.c2s.held == 0 and self.s2c.held == 0

    def summary(self) -> dict[str, dict[str, int]]:
        return {"c2s": self.c2s.summary(), "s2c": self.s2c.summary()}
