"""``Flag`` (proxy/net/upstream_side.py): asyncio.Event's behaviour without its deque."""

from __future__ import annotations

import asyncio

from proxy.net.upstream_side import Flag


def test_wait_returns_at_once_when_set_and_blocks_until_set_otherwise() -> None:
    async def main() -> None:
        flag = Flag(True)
        await asyncio.wait_for(flag.wait(), 1)
        flag.clear()
        assert not flag.is_set()
        waiters = [asyncio.ensure_future(flag.wait()) for _ in range(3)]
        await asyncio.sleep(0.01)
        assert not any(w.done() for w in waiters)
        waiters[0].cancel()  # one waiter gone: the others still wait, then wake
        await asyncio.sleep(0.01)
        assert not any(w.done() for w in waiters[1:])
        flag.set()
        flag.clear()  # as with an Event, a set() wakes every waiter even if cleared after
        await asyncio.wait_for(asyncio.gather(*waiters[1:]), 1)
        assert waiters[0].cancelled()
        late = asyncio.ensure_future(flag.wait())
        await asyncio.sleep(0.01)
        assert not late.done()  # cleared: a new waiter waits for the next set()
        flag.set()
        await asyncio.wait_for(late, 1)
    asyncio.run(main())
