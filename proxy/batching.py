"""What a writer thread takes from its queue at once: the item it waited for and everything
queued behind it, so one transaction (one commit, one fsync) covers however far the disk fell
behind. ``None`` in the queue means "stop after this batch". No I/O."""

from __future__ import annotations

import queue
from typing import TypeVar

T = TypeVar("T")


def take_queued(q: queue.Queue[T | None], first: T) -> tuple[list[T], bool]:
    """``first`` and what is queued behind it, without waiting; and whether a stop was met."""
    batch = [first]
    while True:
        try:
            more = q.get_nowait()
        except queue.Empty:
            return batch, False
        if more is None:
            return batch, True
        batch.append(more)
