"""xmpp-front with its memory readable from outside, for the memory case's breakdown.

``python -m bench.memtrace run -c FILE`` runs the proxy exactly as ``python -m proxy run``
does, with tracemalloc on from the start (``$BENCH_MEMTRACE_FRAMES`` frames per allocation,
8 unless set). On SIGUSR2 it writes, to the folder named by ``$BENCH_MEMTRACE_DIR``, a
tracemalloc snapshot (``snap-N.pickle``) and what glibc's allocator holds (``heap-N.json``:
``mallinfo2``), so that what Python allocates can be told from what the C libraries do
(OpenSSL, libxml2). tracemalloc costs memory and time of its own: the RSS of this process is
not the figure of the memory case, only its breakdown (``analyse`` below, used by the harness).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import os
import signal
import sys
import tracemalloc
from pathlib import Path
from typing import Any

_seq = 0
# Python hands blocks above this size to the C allocator (PyMem_RawMalloc, i.e. malloc);
# smaller ones live in its own arenas (mmap, outside malloc's figures).
_SMALL_REQUEST_THRESHOLD = 512


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def heap() -> dict[str, int]:
    """glibc's figures: bytes malloc handed out and still in use (``in_use``: small and
    mmapped blocks), bytes it holds free (``free``), and tracemalloc's own share."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return {"in_use": info.uordblks + info.hblkhd, "free": info.fordblks,
            "arena": info.arena, "mmapped": info.hblkhd,
            "tracemalloc_own": tracemalloc.get_tracemalloc_memory()}


def parsers() -> dict[str, int]:
    """The stream parsers alive, and how many hold an lxml parser (and why they keep it)."""
    from proxy.xmpp.codec import XmlStreamParser
    counts: dict[str, int] = {"streams": 0, "holding": 0}
    for obj in gc.get_objects():
        if isinstance(obj, XmlStreamParser):
            counts["streams"] += 1
            if obj.holds_parser:
                counts["holding"] += 1
                why = ("inside an element" if obj._depth != 1 else
                       "no header" if obj._context is None else
                       "before STARTTLS" if obj.track_trailing else
                       "unparsed bytes" if not obj._between else "idle, not released yet")
                counts[why] = counts.get(why, 0) + 1
    return counts


def object_census() -> dict[str, list[int]]:
    """The objects the collector tracks, by type: [count, bytes by sys.getsizeof]."""
    census: dict[str, list[int]] = {}
    for obj in gc.get_objects():
        cls = type(obj)
        entry = census.setdefault(f"{cls.__module__}.{cls.__qualname__}", [0, 0])
        entry[0] += 1
        entry[1] += sys.getsizeof(obj)
    return census


def _dump(signum: int, frame: object) -> None:
    global _seq
    folder = os.environ.get("BENCH_MEMTRACE_DIR")
    if not folder:
        return
    _seq += 1
    snapshot = tracemalloc.take_snapshot()
    snapshot.dump(str(Path(folder) / f"snap-{_seq}.pickle"))
    info = heap()
    tmp = Path(folder) / f"heap-{_seq}.json.tmp"
    tmp.write_text(json.dumps({"seq": _seq, **info, "parsers": parsers(),
                               "objects": object_census()}) + "\n")
    os.replace(tmp, Path(folder) / f"heap-{_seq}.json")


def _first_frame_in(trace: tracemalloc.Traceback, prefix: str) -> str:
    for fr in reversed(trace):  # most recent call last
        if fr.filename.startswith(prefix):
            return f"{fr.filename[len(prefix):]}:{fr.lineno}"
    return "(outside the proxy)"


def analyse(before: Path, after: Path, heap_before: dict[str, Any], heap_after: dict[str, Any],
            sessions: int, repo: Path, top: int = 25) -> dict[str, Any]:
    """Per session, between two snapshots ``sessions`` sessions apart: Python's allocations
    by file:line (the innermost frame) and by the innermost frame in the repository, and the
    C allocator's in-use bytes that are not Python's (OpenSSL, libxml2, ...)."""
    old = tracemalloc.Snapshot.load(str(before))
    new = tracemalloc.Snapshot.load(str(after))

    def large(snap: tracemalloc.Snapshot) -> int:
        return sum(t.size for t in snap.traces if t.size > _SMALL_REQUEST_THRESHOLD)

    py_total = sum(s.size for s in new.statistics("filename")) - sum(
        s.size for s in old.statistics("filename"))
    py_large = large(new) - large(old)
    malloc = heap_after["in_use"] - heap_before["in_use"]
    own = heap_after["tracemalloc_own"] - heap_before["tracemalloc_own"]
    outside = malloc - py_large - own
    by_line = [(f"{s.traceback[0].filename.rsplit('/lib/python3', 1)[-1]}:"
                f"{s.traceback[0].lineno}", s.size_diff / sessions, s.count_diff / sessions)
               for s in new.compare_to(old, "lineno")[:top]]
    prefix = str(repo) + "/"
    grouped: dict[str, list[int]] = {}
    old_grouped: dict[str, list[int]] = {}
    for snap, into in ((new, grouped), (old, old_grouped)):
        for stat in snap.statistics("traceback"):
            key = _first_frame_in(stat.traceback, prefix)
            acc = into.setdefault(key, [0, 0])
            acc[0] += stat.size
            acc[1] += stat.count
    by_proxy_line = sorted(
        ((k, (v[0] - old_grouped.get(k, [0, 0])[0]) / sessions,
          (v[1] - old_grouped.get(k, [0, 0])[1]) / sessions) for k, v in grouped.items()),
        key=lambda row: -row[1])[:top]
    objects = [(name, (n - heap_before.get("objects", {}).get(name, [0, 0])[0]) / sessions,
                (size - heap_before.get("objects", {}).get(name, [0, 0])[1]) / sessions)
               for name, (n, size) in heap_after.get("objects", {}).items()]
    objects.sort(key=lambda row: -row[2])
    return {"sessions": sessions, "python_bytes": py_total / sessions,
            "objects": objects[:top],
            "python_large_bytes": py_large / sessions,
            "malloc_in_use_bytes": malloc / sessions,
            "outside_python_bytes": outside / sessions,
            "by_line": by_line, "by_proxy_line": by_proxy_line}


def report(result: dict[str, Any]) -> str:
    kib = 1024
    lines = [f"per session, over {result['sessions']} sessions:",
             f"  Python objects (tracemalloc): {result['python_bytes'] / kib:.1f} KiB "
             f"({result['python_large_bytes'] / kib:.1f} KiB of it in blocks > 512 bytes)",
             f"  C allocator in use: {result['malloc_in_use_bytes'] / kib:.1f} KiB, of which "
             f"not Python's: {result['outside_python_bytes'] / kib:.1f} KiB "
             "(OpenSSL, libxml2)", "", "by the innermost frame (KiB, blocks):"]
    lines += [f"  {kib_:8.2f} {n:7.1f}  {where}" for where, kib_, n in
              ((w, b / kib, n) for w, b, n in result["by_line"])]
    lines += ["", "by the innermost frame in the repository (KiB, blocks):"]
    lines += [f"  {kib_:8.2f} {n:7.1f}  {where}" for where, kib_, n in
              ((w, b / kib, n) for w, b, n in result["by_proxy_line"])]
    lines += ["", "objects the collector tracks, by type (bytes by sys.getsizeof, count):"]
    lines += [f"  {size:8.0f} {n:7.1f}  {name}" for name, n, size in result["objects"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    tracemalloc.start(int(os.environ.get("BENCH_MEMTRACE_FRAMES", "8")))
    signal.signal(signal.SIGUSR2, _dump)
    from proxy.cli import main
    sys.exit(main())
