"""A graceful stop while the server keeps sending: each of its messages reaches the client
exactly once, across the stop and the account's next login (docs/durability.md, Duplicates).

The stop asks the client for a last ack; what it acknowledges was delivered, and what comes
for it after that ``<r/>`` must be stored without being written (else it is delivered now
and again, stored, at the next login).
"""

from __future__ import annotations

import asyncio
from collections import Counter

from .playbook import Harness, playbook

BOB = "bob@localhost/desk"


@playbook(timeout=20.0)
async def test_a_stop_while_the_server_sends_delivers_each_message_once(h: Harness) -> None:
    alice = await h.client("alice", sm=True)
    alice.presence()
    conn = h.server.connection_of(alice.jid)
    pushed: list[str] = []
    stopping = asyncio.Event()

    async def server_sends() -> None:
        # Until the proxy's upstream stream is gone: everything pushed before is the proxy's
        # (it reads the stream to the server's close).
        n = 0
        while not conn.closed:
            pushed.append(h.server.push_message(alice.jid, f"n{n}", frm=BOB, id=f"n{n}"))
            n += 1
            if n == 40:
                stopping.set()
            await asyncio.sleep(0.002)

    sender = asyncio.create_task(server_sends())
    reader = asyncio.create_task(alice.expect_closed(timeout=10.0))  # answers each <r/>
    await asyncio.wait_for(stopping.wait(), 5.0)
    assert h.proxy is not None
    proxy, h.proxy = h.proxy, None
    await proxy.stop()
    await asyncio.wait_for(reader, 10.0)
    await asyncio.wait_for(sender, 5.0)

    await h._start_proxy(h.port)
    again = await h.client("alice", resource="laptop")
    again.presence()  # stored messages follow the initial presence
    while True:  # until nothing more comes for a while
        try:
            await again.expect(kind="message", from_=BOB, timeout=1.5)
        except AssertionError:
            break
    first = [el.get("id") for el in alice.received if el.get("from") == BOB]
    later = [el.get("id") for el in again.received if el.get("from") == BOB]
    seen = Counter(first + later)
    assert len(pushed) > 40 and later, (len(pushed), len(first), len(later))
    assert sorted(seen) == sorted(pushed), set(pushed) ^ set(seen)  # nothing lost
    assert [i for i, count in seen.items() if count > 1] == []  # nothing twice
    stopped = h.events("sessions_settled")
    assert stopped and stopped[-1]["s2c_stored"] >= len(later) > 0
