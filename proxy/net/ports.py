"""The narrow interfaces between the shell's parts, so none imports another in a circle:
the hub makes sessions (``live``), a session makes its upstream side (``upstream_side``), and
each knows the one above it only through these protocols."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Protocol

from ..ledger import Exit, Ledger
from ..session import Outputs, SessionCore
from ..xmpp.stanza import Element


class RegisteredSession(Protocol):
    """What the registry keeps of a session."""

    core: SessionCore
    sm_key: tuple[str, str] | None

    @property
    def jid(self) -> str: ...


class SessionRegistry(Protocol):
    """What a session needs of the hub."""

    # The reconnection jitter's random source, one for all sessions (a Random holds 2.5 KiB
    # of state: one per session would be a fair share of an idle session's memory).
    rng: random.Random

    def new_sm_id(self) -> str: ...

    def sm_registered(self, session: RegisteredSession, sm_id: str | None,
                      inbound: int) -> None: ...

    def session_ended(self, session: RegisteredSession) -> None: ...

    # The end that session_ended began is over: the ledger settled, or the upstream side
    # finishing (a stop waits for every end under way).
    def session_gone(self, session: RegisteredSession) -> None: ...

    def finishing(self, session: FinishingSession) -> None: ...

    def wake(self, session_id: str) -> None: ...

    def to_account(self, sender: RegisteredSession, kind: str, payload: Element) -> None: ...

    def ledger_settled(self, summary: dict[str, dict[str, int]]) -> None: ...


class FinishingSession(RegisteredSession, Protocol):
    """An ended session whose upstream side still waits for the server."""

    @property
    def ledger(self) -> Ledger: ...

    def log_ledger(self) -> None: ...

    def when_upstream_finished(self, callback: Callable[[], None]) -> None: ...

    async def finish(self, deadline: float) -> None: ...

    async def hand_over(self) -> list[Element]: ...


class SessionForUpstream(Protocol):
    """What the upstream side needs of its session."""

    core: SessionCore
    # The client's address and the one it connected to (the PROXY header upstream).
    client_endpoints: tuple[tuple[str, int] | None, tuple[str, int] | None]

    @property
    def jid(self) -> str: ...

    @property
    def ledger(self) -> Ledger: ...

    def c2s_taken(self, el: Element) -> bytes | None: ...

    def c2s_left(self, count: int, exit: Exit) -> None: ...

    def proxy_to_client(self, el: Element) -> None: ...

    def to_client(self, el: Element) -> None: ...

    def write(self, out: Outputs) -> None: ...

    def from_server(self, el: Element) -> None: ...

    def settle_from_server(self, el: Element) -> None: ...

    def bounce_to_sender(self, error: Element) -> bool: ...

    def client_congested(self) -> bool: ...

    async def client_drain(self) -> None: ...

    async def end(self, reason: str, *, client_error: bytes | None = None,
                  upstream_dead: bool = False) -> None: ...
