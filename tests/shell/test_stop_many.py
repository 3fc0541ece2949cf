"""A graceful stop of many sessions at once (docs/operations.md, "Graceful stop").

Every session waits for something that does not come: its client's last ack (the clients
never answer ``<r/>``) or the server's close of its stream (the server stops answering). The
stop must work on them all at once, so that it costs the deadline once, not once per
session, and it must still settle every session, also those whose end was under way when
the stop began (their clients had just dropped): the ledger of each is logged once, with
nothing left held.
"""

from __future__ import annotations

import asyncio
import time

from .playbook import PASSWORD, Client, Harness, playbook

RESUMABLE = 100  # stream management, never acking: the stop's <r/> goes unanswered
PLAIN = 50  # no stream management
UNCONFIRMED = 25  # sent a message the server never confirms, then dropped: finishing
DROPPED = 25  # dropped: their ends wait for the server's close when the stop begins
SESSIONS = RESUMABLE + PLAIN + UNCONFIRMED + DROPPED
DRAIN = 1.0  # shorter than an ended session's own wait for the server's close
ACK_WAIT = 0.5


@playbook(timeout=90.0, accounts={f"user{i}": PASSWORD for i in range(SESSIONS)},
          shutdown={"drain_timeout": DRAIN, "ack_wait": ACK_WAIT},
          abuse={"max_connections_per_address": 0},  # every client is 127.0.0.1
          # 200 logins at once on a loaded machine; and no ping nor ack timeout may end a
          # session or its upstream link before the stop does
          upstream={"connect_timeout": 5, "ping_idle": 120},
          stream_management={"resume_timeout": 60, "ack_timeout": 120},
          log={"format": "json", "level": "info"})
async def test_a_stop_settles_every_session_at_once(h: Harness) -> None:
    gate = asyncio.Semaphore(4)  # few logins at a time: each has 2 s (the playbook's)

    async def one(i: int) -> Client:
        async with gate:
            if i < RESUMABLE:
                return await h.client(f"user{i}", sm=True, auto_ack=False)
            if i < RESUMABLE + PLAIN:
                return await h.client(f"user{i}")
            if i < RESUMABLE + PLAIN + UNCONFIRMED:
                return await h.client(f"user{i}", sm=True, resume=False, auto_ack=False)
            return await h.client(f"user{i}")

    clients = await asyncio.gather(*(one(i) for i in range(SESSIONS)))
    unconfirmed = clients[RESUMABLE + PLAIN:RESUMABLE + PLAIN + UNCONFIRMED]
    dropped = clients[RESUMABLE + PLAIN + UNCONFIRMED:]
    for c in clients:
        h.server.push_message(c.jid, "for you", id=f"m-{c.jid}")
    for c in clients:
        await c.expect(kind="message", body="for you", timeout=10.0)
    for conn in h.server.conns:
        conn.dead = True  # no answer to anything from now on, stream closes included
    for c in unconfirmed:
        c.message("bob@localhost", "never confirmed")
        await c.request_ack(timeout=5.0)  # the proxy has it (journaled, not confirmed)
    for c in (*unconfirmed, *dropped):
        c.cut()
    await h.log.changes.until(
        lambda: len([e for e in h.events("session_ended")
                     if e.get("reason", "").startswith("client connection lost")])
        >= UNCONFIRMED + DROPPED or None, 10.0, "the dropped clients' sessions ending")

    assert h.proxy is not None
    proxy, h.proxy = h.proxy, None
    began = time.monotonic()
    # Each session's waits are bounded by a few seconds; one session after another they
    # would take SESSIONS times that.
    await asyncio.wait_for(proxy.stop(), timeout=30.0)
    took = time.monotonic() - began

    ledgers = {e["session"]: e for e in h.events("ledger")}
    assert len(ledgers) == SESSIONS, len(ledgers)  # every session's account, once each
    assert len(h.events("ledger")) == SESSIONS
    held = [e for e in ledgers.values() if e["s2c"]["held"] or e["c2s"]["held"]]
    assert held == []
    # What the server never confirmed waits in the pending queue for the next login; what
    # the SM clients never acknowledged is stored for it.
    assert sum(e["c2s"]["stored"] for e in ledgers.values()) == UNCONFIRMED
    assert sum(e["s2c"]["stored"] for e in ledgers.values()) == RESUMABLE + UNCONFIRMED
    (settled,) = h.events("sessions_settled")
    assert settled["sessions"] == SESSIONS
    assert settled["c2s_stored"] == UNCONFIRMED
    (stopped,) = h.events("stopped")
    assert stopped["sessions"] == SESSIONS
    assert 0 < stopped["seconds"] <= took
