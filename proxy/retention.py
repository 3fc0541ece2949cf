"""Transcript retention: the capture folder does not grow without end.

Transcripts hold what users wrote; an operator says how long they are kept
(``log.capture_max_age_days``) and how much disk they may take in all
(``log.capture_max_total_bytes``). The oldest go first. A transcript still being written
(its session is live) is never removed: only files not written for a while are candidates.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PRUNE_EVERY = 3600.0  # seconds between two passes while the proxy runs
IDLE_BEFORE_REMOVAL = 300.0  # a transcript written within this many seconds is in use


@dataclass(frozen=True)
class Pruned:
    files: int
    bytes: int
    kept: int


def prune_transcripts(folder: Path, *, max_age_days: float | None,
                      max_total_bytes: int | None, now: float) -> Pruned:
    """Remove what is past the age limit, then the oldest until the rest fits the total."""
    entries: list[tuple[float, int, Path]] = []
    try:
        names = list(folder.iterdir())
    except FileNotFoundError:
        return Pruned(0, 0, 0)
    for path in names:
        if path.suffix != ".xml":
            continue
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        entries.append((st.st_mtime, st.st_size, path))
    entries.sort()  # oldest first
    total = sum(size for _, size, _ in entries)
    removed = removed_bytes = 0
    for mtime, size, path in entries:
        if now - mtime < IDLE_BEFORE_REMOVAL:
            break  # this one and the newer ones may be live
        too_old = max_age_days is not None and now - mtime > max_age_days * 86400
        too_big = max_total_bytes is not None and total > max_total_bytes
        if not (too_old or too_big):
            break
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        total -= size
        removed += 1
        removed_bytes += size
    return Pruned(removed, removed_bytes, len(entries) - removed)
