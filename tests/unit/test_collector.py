"""The running proxy's cyclic collector (``proxy.server.tune_collector``): what the start made
is frozen out of every later pass, and the youngest generation is large enough that a login
burst's temporaries die there instead of starting full passes over every session."""

from __future__ import annotations

import gc
from collections import deque
from collections.abc import Iterator

import pytest

from proxy.server import COLLECTOR_THRESHOLDS, tune_collector


@pytest.fixture
def collector() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


def test_the_start_is_frozen_and_the_thresholds_set(collector: None) -> None:
    gc.unfreeze()
    kept_from_the_start = [object(), {}]  # noqa: F841  (alive through the freeze)
    tune_collector()
    assert gc.get_threshold() == COLLECTOR_THRESHOLDS
    assert gc.get_freeze_count() > 0


def test_a_burst_of_short_lived_cycles_starts_no_full_pass(collector: None) -> None:
    """What logins under way make and drop a little later (cycles: objects referring to each
    other, alive while a few thousand others are made) is freed by the young passes; with
    Python's thresholds the same burst outlives two young passes, reaches the oldest
    generation and starts full passes."""
    full_passes: list[int] = []

    def count(phase: str, info: dict[str, int]) -> None:
        if phase == "stop" and info["generation"] == 2:
            full_passes.append(info["collected"])

    def burst() -> None:
        under_way: deque[dict[str, object]] = deque(maxlen=3_000)
        for _ in range(300_000):
            a: dict[str, object] = {}
            a["self"] = [a]  # a cycle: only the collector frees it
            under_way.append(a)  # dropped 3,000 later

    gc.callbacks.append(count)
    try:
        gc.set_threshold(700, 10, 10)
        gc.collect()
        full_passes.clear()
        burst()
        with_pythons = len(full_passes)
        tune_collector()
        full_passes.clear()
        burst()
        tuned = len(full_passes)
    finally:
        gc.callbacks.remove(count)
    assert with_pythons > 0
    assert tuned == 0
