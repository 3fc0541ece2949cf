"""Transcript retention: by age, then by total size, oldest first, never a live one."""

from __future__ import annotations

import os
from pathlib import Path

from proxy.retention import IDLE_BEFORE_REMOVAL, prune_transcripts

NOW = 1_000_000_000.0
DAY = 86400.0


def make(folder: Path, name: str, size: int, age: float) -> Path:
    path = folder / name
    path.write_bytes(b"x" * size)
    os.utime(path, (NOW - age, NOW - age))
    return path


def test_age_limit_removes_only_the_old(tmp_path: Path) -> None:
    old = make(tmp_path, "a-1.xml", 10, 40 * DAY)
    young = make(tmp_path, "b-2.xml", 10, 2 * DAY)
    other = make(tmp_path, "notes.txt", 10, 400 * DAY)  # not a transcript
    pruned = prune_transcripts(tmp_path, max_age_days=30, max_total_bytes=None, now=NOW)
    assert (pruned.files, pruned.bytes, pruned.kept) == (1, 10, 1)
    assert not old.exists() and young.exists() and other.exists()


def test_total_limit_removes_oldest_first_and_spares_live_files(tmp_path: Path) -> None:
    first = make(tmp_path, "a-1.xml", 100, 3 * DAY)
    second = make(tmp_path, "a-2.xml", 100, 2 * DAY)
    third = make(tmp_path, "a-3.xml", 100, DAY)
    live = make(tmp_path, "a-4.xml", 500, IDLE_BEFORE_REMOVAL / 2)  # being written
    pruned = prune_transcripts(tmp_path, max_age_days=None, max_total_bytes=650, now=NOW)
    # 800 bytes: the two oldest go (600 left); the live one stays even though it is big.
    assert pruned.files == 2 and not first.exists() and not second.exists()
    assert third.exists() and live.exists()
    pruned = prune_transcripts(tmp_path, max_age_days=None, max_total_bytes=100, now=NOW)
    assert pruned.files == 1 and not third.exists() and live.exists()


def test_no_limits_and_missing_folder(tmp_path: Path) -> None:
    make(tmp_path, "a-1.xml", 10, 400 * DAY)
    assert prune_transcripts(tmp_path, max_age_days=None, max_total_bytes=None,
                             now=NOW).files == 0
    assert prune_transcripts(tmp_path / "gone", max_age_days=1, max_total_bytes=1,
                             now=NOW).files == 0
