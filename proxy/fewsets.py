"""Sets that most sessions never fill share one empty frozenset until their first add: an
empty ``set()`` is 216 bytes, and an idle session kept several (issue 16's census).

Pure helpers: ``added`` and ``removed`` return the set to keep (assign it back)."""

from __future__ import annotations

from collections.abc import Set

EMPTY: frozenset[str] = frozenset()


def added(items: Set[str], item: str) -> set[str]:
    """``items`` with ``item``: the shared empty set becomes a set of its own."""
    if isinstance(items, set):
        items.add(item)
        return items
    return {*items, item}


def removed(items: Set[str], item: str) -> Set[str]:
    """``items`` without ``item``; the shared empty set once nothing is left."""
    if item not in items:
        return items
    if isinstance(items, set) and len(items) > 1:
        items.discard(item)
        return items
    return items - {item} or EMPTY
