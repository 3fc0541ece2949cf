"""The server edge of a session, socket-free: what the legacy server has surely handled, when
it is dead, when to try again and when to give up. Events in, commands out.

The shell (``proxy/net/upstream_side.py``) connects, reads and writes; it tells this core what
happened (a stanza or nonza from the server, silence, the connection lost, a login refused, a
bind result) and carries out the commands it returns. Decided here: the outbox and its
barriers (``proxy/outbox.py``), the server's own XEP-0198 acks, liveness pings, which stream
errors are worth a reconnect, the backoff and ``max_outage``, whether a restored session is
still the client's, and what comes back to the client when the proxy gives up.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from lxml import etree

from .backoff import Backoff
from .commands import Command, Log, ToClient
from .features.stream_management import parse_h
from .outbox import Outbox
from .session import OWN_ID_PREFIX
from .xmpp import codec, counters, ns
from .xmpp import stanza as st
from .xmpp.stanza import Element

ServerState = Literal["up", "down", "gone"]

# Stream errors after which the server may well be back soon: reconnect. Anything else
# (conflict, not-authorized, policy-violation, ...) is final and passed to the client.
TRANSIENT_STREAM_ERRORS = frozenset((
    "system-shutdown", "connection-timeout", "internal-server-error", "reset",
    "remote-connection-failed", "resource-constraint", "undefined-condition"))

_PING = ns.qname(ns.PING, "ping")


@dataclass(slots=True, unsafe_hash=True)  # per stanza: not frozen (commands.py)
class ToServer:
    """Write to the current upstream connection now."""

    element: Element


@dataclass(slots=True, unsafe_hash=True)  # per stanza: not frozen (commands.py)
class Confirmed:
    """The server confirmed part of the outbox: ``left`` stanzas have left it in all."""

    left: int


@dataclass(frozen=True, slots=True)
class ServerLost:
    """The server is gone (``reason``): drop the connection and reconnect."""

    reason: str


@dataclass(frozen=True, slots=True)
class GiveUp:
    """No reconnect: the session cannot be restored; ``error`` is the client's stream error."""

    reason: str
    error: bytes


@dataclass(frozen=True, slots=True)
class Finished:
    """A finishing session's server confirmed everything: close the stream politely."""


ServerCommand = Command | ToServer | Confirmed | ServerLost | GiveUp | Finished


@dataclass(frozen=True, slots=True)
class ServerPolicy:
    domain: str
    max_buffer: int = 1000
    barrier_every: int = 10
    ping_idle: float = 60.0
    ping_timeout: float = 20.0
    first_delay_max: float = 60.0
    base: float = 1.0
    cap: float = 60.0
    max_outage: float = 300.0


class ServerEdge:
    __slots__ = (
        "backoff", "clock", "down_since", "finishing", "outbox", "policy", "probing",
        "sm_counting", "sm_inbound", "state",
    )

    def __init__(self, policy: ServerPolicy, *, new_id: Callable[[], str],
                 rng: random.Random | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self.clock = clock
        self.outbox = Outbox(domain=policy.domain, max_buffer=policy.max_buffer,
                             barrier_every=policy.barrier_every, new_id=new_id, connected=True)
        self.backoff = Backoff(policy.first_delay_max, policy.base, policy.cap,
                               rng or random.Random())
        self.state: ServerState = "up"
        self.down_since: float | None = None
        self.probing = False  # a liveness ping is unanswered
        self.sm_inbound = 0  # stanzas from the server since its <enabled/> (XEP-0198)
        # The server counts what it sends after its <enabled/>; what it sent before (a
        # message routed to the new resource while our <enable/> was on its way) it does
        # not, so neither may we, or our <a h/> is too high (undefined-condition).
        self.sm_counting = False
        # The session ended while the server still owed confirmations: keep going until it
        # confirmed everything, or max_outage.
        self.finishing = False

    # Writing ------------------------------------------------------------------------------------

    def submit(self, el: Element) -> list[ServerCommand] | Element:
        """A stanza for the server. Returns an answer for the client instead when the proxy
        answers itself (a ping to the server while it is away), else what to write now."""
        if self.state != "up" and self._is_server_ping(el):
            return st.iq_result(el)
        written = self.outbox.submit(el)
        if len(written) == 1:  # the relay path: no comprehension (a function call) per stanza
            return [ToServer(written[0])]
        return [ToServer(out) for out in written]

    def _is_server_ping(self, el: Element) -> bool:
        return (el.tag == st.IQ and el.get("type") == "get" and el.find(_PING) is not None
                and el.get("to") in (None, "", self.policy.domain))

    def barrier_due(self) -> list[ServerCommand]:
        """A batch is done (or the session ends): a barrier for what is unconfirmed."""
        if self.state == "up" and self.outbox.unbarriered:
            return [ToServer(self.outbox.barrier())]
        return []

    def connected(self, features: Element) -> list[ServerCommand]:
        """A new connection's post-login features: real stream management upstream when the
        server offers it (its acks confirm, no barrier pings needed)."""
        self.sm_counting = False
        if features.find(ns.qname(ns.SM, "sm")) is None:
            return []
        self.sm_inbound = 0
        return [ToServer(self.outbox.sm_enable())]

    # Reading ------------------------------------------------------------------------------------

    def read_timeout(self) -> float:
        return self.policy.ping_timeout if self.probing else self.policy.ping_idle

    def silence(self) -> list[ServerCommand]:
        """Nothing from the server for ``read_timeout()``: ping it, or declare it dead."""
        if self.probing:
            return [ServerLost(f"no answer to a ping within {self.policy.ping_timeout:g}s")]
        self.probing = True
        return [ToServer(self.outbox.barrier())]  # a liveness ping that also confirms

    def heard(self) -> None:
        self.probing = False  # anything at all from the server: it is alive

    def stream_error(self, el: Element) -> list[ServerCommand]:
        condition = st.error_condition(el) or "undefined-condition"
        if condition in TRANSIENT_STREAM_ERRORS:
            return [ServerLost(f"stream error: {condition}")]
        return [GiveUp(f"stream error: {condition}", codec.serialize(el))]

    def stream_violation(self, event: codec.StreamViolation) -> tuple[bytes, ServerLost]:
        """The server broke the stream: our stream error for it, then reconnect."""
        return (codec.stream_error(event.condition, event.text),
                ServerLost(f"stream violation: {event.condition}"))

    def server_nonza(self, el: Element) -> list[ServerCommand]:
        """The server's XEP-0198 elements (it offered SM and we enabled it)."""
        local = etree.QName(el).localname
        out: list[ServerCommand] = []
        if local == "a":
            h = parse_h(el)
            if h is not None:
                self.outbox.on_sm_ack(h)
                out.append(Confirmed(self.outbox.left))
        elif local == "r":
            out.append(ToServer(st.element("a", {"h": str(self.sm_inbound)},
                                            namespace=ns.SM)))
        elif local == "enabled":
            self.sm_counting, self.sm_inbound = True, 0
            out.append(Log("upstream_sm_enabled"))
        elif local == "failed":
            self.sm_counting = False
            out += [Log("upstream_sm_refused"), ToServer(self.outbox.sm_failed())]
        return out + self._finished_if_done()

    def server_stanza(self, el: Element) -> list[ServerCommand] | None:
        """A stanza from the server: None to relay it to the session, else what it meant to
        the proxy (a barrier reply, never for the client)."""
        if self.sm_counting:
            self.sm_inbound = counters.increment(self.sm_inbound)
        if not self.outbox.on_reply(el):
            return None
        return [Confirmed(self.outbox.left), *self._finished_if_done()]

    def _finished_if_done(self) -> list[ServerCommand]:
        return [Finished()] if self.finishing and not self.outbox.size else []

    def finish(self) -> list[ServerCommand]:
        """The session ended with stanzas unconfirmed: keep working for them."""
        self.finishing = True
        return [Log("upstream_finishing", {"unconfirmed": self.outbox.size,
                                           "state": self.state}), *self.barrier_due()]

    # Outages ------------------------------------------------------------------------------------

    def lost(self, reason: str) -> list[ServerCommand]:
        """The connection is gone: nothing written is confirmed any more; the client's iq
        requests the server had confirmed but not answered get errors (no request hangs)."""
        self.state = "down"
        self.down_since = self.clock()
        self.probing = False
        out: list[ServerCommand] = [ToClient(reply, own=True)
                                    for reply in self.outbox.connection_lost()]
        self.backoff.reset()
        out.append(Log("upstream_down", {"reason": reason, "buffered": self.outbox.size},
                       "warning"))
        return out

    def next_attempt(self) -> float | GiveUp:
        """Seconds to wait before the next connection attempt, or the end past max_outage
        (the caller still waits out what is left of it first: ``outage_left``)."""
        assert self.down_since is not None
        delay = self.backoff.next_delay()
        if delay >= self.outage_left():
            max_outage = self.policy.max_outage
            return GiveUp(f"the server was unreachable for {max_outage:g}s",
                          codec.stream_error("remote-connection-failed",
                                             "the legacy server has been unreachable for "
                                             "too long"))
        return delay

    def outage_left(self) -> float:
        assert self.down_since is not None
        return max(0.0, self.policy.max_outage - (self.clock() - self.down_since))

    @staticmethod
    def login_refused(condition: str) -> GiveUp:
        return GiveUp(f"the server refused the credentials ({condition})",
                      codec.stream_error("not-authorized", "the legacy server refused the login"))

    @staticmethod
    def bind_refused(resource: str, detail: str) -> GiveUp:
        return GiveUp(f"the server refused to bind {resource!r} again ({detail})",
                      codec.stream_error("conflict", "the legacy server would not bind this "
                                                     "resource again"))

    @staticmethod
    def bound_check(full: str, expected: str) -> GiveUp | None:
        """Never silently change the client's JID."""
        if full == expected:
            return None
        return GiveUp(f"the server bound {full} instead of {expected}",
                      codec.stream_error("conflict", "the legacy server bound another "
                                                     "resource after reconnecting"))

    def restored(self) -> float:
        """Back up (bound again): how long the outage lasted."""
        outage = self.clock() - (self.down_since or self.clock())
        self.state = "up"
        self.down_since = None
        return outage

    def replay(self) -> list[Element]:
        """What the server never confirmed, to write again in order (with a barrier), after
        stream management is enabled and the session's state restored."""
        return self.outbox.reconnected()

    def give_up(self) -> tuple[list[Element], int]:
        """Whatever the client sent that the server never confirmed: error replies for its
        messages and requests (the caller returns them to the sender), and how many were
        nothing to return (the proxy's own, results, errors)."""
        self.state = "gone"
        errors: list[Element] = []
        discarded = 0
        for el in self.outbox.drain():
            if (not el.get("id", "").startswith(OWN_ID_PREFIX)
                    and st.kind(el) in ("message", "iq")
                    and el.get("type") not in ("error", "result")):
                errors.append(st.error_reply(el, "remote-server-timeout", error_type="wait",
                                             text="the legacy server could not be reached"))
            else:
                discarded += 1
        return errors, discarded
