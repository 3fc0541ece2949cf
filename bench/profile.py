"""Sampling the proxy with py-spy while it is under load, and reading the samples.

py-spy writes collapsed stacks (``--format raw``): one line per distinct stack, frames
root first separated by ``;``, then the sample count. With ``--function`` a frame is
``function (file:first line of the function)``. Idle samples (the event loop waiting in
epoll) are left out by py-spy, so shares are of the time the proxy was busy.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<where>[^()]*)\)$")


def py_spy_available() -> bool:
    return shutil.which("py-spy") is not None


def start_py_spy(pid: int, seconds: float, out: Path, rate: int = 250) -> subprocess.Popen[bytes]:
    """Record ``pid`` for ``seconds`` into ``out`` (collapsed stacks, by function)."""
    return subprocess.Popen(
        ["py-spy", "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
         "--rate", str(rate), "--format", "raw", "--function", "--nonblocking",
         "--output", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)


@dataclass
class HotSpot:
    function: str
    where: str
    self_share: float  # samples with this frame on top / all samples
    total_share: float  # samples with this frame anywhere on the stack / all samples


def read_collapsed(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        stacks.append((stack.split(";"), int(count)))
    return stacks


def _split(frame: str) -> tuple[str, str]:
    m = _FRAME.match(frame.strip())
    return (m.group("func"), m.group("where")) if m else (frame.strip(), "")


def hot_spots(path: Path, top: int = 15) -> tuple[int, list[HotSpot], list[HotSpot]]:
    """(samples, top by self time, top by inclusive time)."""
    stacks = read_collapsed(path)
    total = sum(count for _, count in stacks) or 1
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for frames, count in stacks:
        frames = [f for f in frames if f.strip()]
        if not frames:
            continue
        own[frames[-1].strip()] += count
        for frame in {f.strip() for f in frames}:
            inclusive[frame] += count

    def spot(frame: str) -> HotSpot:
        func, where = _split(frame)
        return HotSpot(func, where, own[frame] / total, inclusive[frame] / total)

    by_self = [spot(f) for f, _ in own.most_common(top)]
    by_total = [spot(f) for f, _ in inclusive.most_common(top * 3)
                if not f.startswith(("<module>", "run (", "run_forever", "_run_once",
                                     "_run (asyncio", "main (", "serve (", "<module> ("))]
    return total, by_self, by_total[:top]


def format_hot_spots(path: Path, top: int = 15) -> str:
    total, by_self, by_total = hot_spots(path, top)
    lines = [f"{total} samples (busy time only)", "",
             "by own time (the function itself, not what it calls):", "",
             "| own | incl. | function | file:line |", "| ---: | ---: | --- | --- |"]
    for s in by_self:
        lines.append(f"| {s.self_share:.1%} | {s.total_share:.1%} | `{s.function}` | "
                     f"`{s.where}` |")
    lines += ["", "by inclusive time (the function and what it calls):", "",
              "| incl. | own | function | file:line |", "| ---: | ---: | --- | --- |"]
    for s in by_total:
        lines.append(f"| {s.total_share:.1%} | {s.self_share:.1%} | `{s.function}` | "
                     f"`{s.where}` |")
    return "\n".join(lines)
