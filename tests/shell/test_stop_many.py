"""A graceful stop of many sessions at once (docs/operations.md, "Graceful stop").

Every session waits for something that does not come: its client's last ack (the clients
never answer ``<r/>``) or the server's close of its stream (the server stops answering). The
stop must work on them all at once, so that it costs the deadline once, not once per
session, and it must still settle every session, also those whose end was already under way
when the stop began (their clients had just dropped).
"""

from __future__ import annotations

import asyncio
import time

from .playbook import PASSWORD, Client, Harness, playbook

SESSIONS = 200
DROPPED = 50  # of the plain clients: their sessions end on their own just before the stop
DRAIN = 2.0
ACK_WAIT = 0.5


@playbook(timeout=90.0, accounts={f"user{i}": PASSWORD for i in range(SESSIONS)},
          shutdown={"drain_timeout": DRAIN, "ack_wait": ACK_WAIT},
          abuse={"max_connections_per_address": 0},  # every client is 127.0.0.1
          upstream={"connect_timeout": 5},  # 200 logins at once on a loaded machine
          log={"format": "json", "level": "info"})
async def test_a_stop_settles_every_session_at_once(h: Harness) -> None:
    gate = asyncio.Semaphore(16)

    async def one(i: int) -> Client:
        async with gate:
            return await h.client(f"user{i}", sm=i % 2 == 0, auto_ack=False)

    clients = await asyncio.gather(*(one(i) for i in range(SESSIONS)))
    for c in clients:
        h.server.push_message(c.jid, "for you", id=f"m-{c.jid}")
    for c in clients:
        await c.expect(kind="message", body="for you", timeout=10.0)
    plain = [c for c in clients if not c.sm]
    dropped = plain[:DROPPED]
    for c in dropped:
        c.cut()
    await h.log.changes.until(
        lambda: len([e for e in h.events("session_ended")
                     if e.get("reason", "").startswith("client connection lost")])
        >= DROPPED or None, 10.0, "the dropped clients' sessions ending")
    for conn in h.server.conns:
        conn.dead = True  # no answer to any stream close from now on

    assert h.proxy is not None
    proxy, h.proxy = h.proxy, None
    began = time.monotonic()
    # One session's waits (ack_wait, then the server's close until drain_timeout) are
    # bounded by DRAIN; one after another they would be SESSIONS times that.
    await asyncio.wait_for(proxy.stop(), timeout=DRAIN * 10)
    took = time.monotonic() - began

    ledgers = {e["session"]: e for e in h.events("ledger")}
    assert len(ledgers) == SESSIONS, len(ledgers)  # every session's account, once each
    held = [e for e in ledgers.values() if e["s2c"]["held"] or e["c2s"]["held"]]
    assert held == []
    # The SM clients never acked their message: stored for their next login.
    assert sum(e["s2c"]["stored"] for e in ledgers.values()) == SESSIONS // 2
    (settled,) = h.events("sessions_settled")
    assert settled["sessions"] == SESSIONS
    assert settled["s2c_stored"] == SESSIONS // 2
    (stopped,) = h.events("stopped")
    assert stopped["sessions"] == SESSIONS
    assert 0 < stopped["seconds"] <= took
