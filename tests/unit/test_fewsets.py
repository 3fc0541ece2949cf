"""The shared empty set: ``added`` and ``removed`` behave as set operations, never change
the shared ``EMPTY`` and come back to it once a set is empty."""

from __future__ import annotations

from collections.abc import Set

from hypothesis import given
from hypothesis import strategies as hs

from proxy.fewsets import EMPTY, added, removed

OPS = hs.lists(hs.tuples(hs.booleans(), hs.sampled_from("abcde")), max_size=40)


@given(OPS)
def test_added_and_removed_follow_a_plain_set(ops: list[tuple[bool, str]]) -> None:
    kept: Set[str] = EMPTY
    model: set[str] = set()
    for add, item in ops:
        if add:
            kept = added(kept, item)
            model.add(item)
        else:
            kept = removed(kept, item)
            model.discard(item)
        assert set(kept) == model
        assert (kept is EMPTY) == (not model)  # an emptied set goes back to the shared one
    assert not EMPTY


def test_the_first_add_makes_a_set_of_its_own() -> None:
    one = added(EMPTY, "x")
    two = added(EMPTY, "y")
    assert one == {"x"} and two == {"y"} and isinstance(one, set)
    assert added(one, "z") is one  # later adds change it in place
