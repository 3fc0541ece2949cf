"""Sampling the proxy with py-spy while it is under load, and reading the samples.

py-spy writes collapsed stacks (``--format raw``): one line per distinct stack, frames
root first separated by ``;``, then the sample count; a frame is
``function (file:line)`` with the line being executed. Idle samples (the event loop waiting
in epoll) are left out by py-spy, so shares are of the time the proxy was busy. Time spent
in C (lxml, ssl, the socket calls) is counted on the Python line that called it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
# Frames every sample has (interpreter start-up, the event loop): no information.
_PLUMBING_FILES = ("<frozen runpy>", "asyncio/base_events.py", "asyncio/events.py",
                   "asyncio/runners.py", "proxy/__main__.py", "proxy/cli.py")


def py_spy_available() -> bool:
    return shutil.which("py-spy") is not None


def start_py_spy(pid: int, seconds: float, out: Path, rate: int = 250) -> subprocess.Popen[bytes]:
    """Record ``pid`` for ``seconds`` into ``out`` (collapsed stacks with line numbers)."""
    return subprocess.Popen(
        ["py-spy", "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
         "--rate", str(rate), "--format", "raw", "--nonblocking", "--output", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)


@dataclass
class HotSpot:
    function: str
    file: str
    self_share: float  # samples with this function on top / all samples
    total_share: float  # samples with this function anywhere on the stack / all samples
    lines: list[tuple[int, float]] = field(default_factory=list)  # hottest own lines


def read_collapsed(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        stacks.append(([f.strip() for f in stack.split(";") if f.strip()], int(count)))
    return stacks


def _split(frame: str) -> tuple[str, str, int]:
    m = _FRAME.match(frame)
    if m is None:
        return frame, "", 0
    return m.group("func"), m.group("file"), int(m.group("line") or 0)


def hot_spots(path: Path, top: int = 15) -> tuple[int, list[HotSpot], list[HotSpot]]:
    """(samples, top functions by own time, top functions by inclusive time)."""
    stacks = read_collapsed(path)
    total = sum(count for _, count in stacks) or 1
    own: Counter[tuple[str, str]] = Counter()
    own_lines: defaultdict[tuple[str, str], Counter[int]] = defaultdict(Counter)
    inclusive: Counter[tuple[str, str]] = Counter()
    for frames, count in stacks:
        if not frames:
            continue
        func, file, line = _split(frames[-1])
        own[(func, file)] += count
        own_lines[(func, file)][line] += count
        for key in {_split(f)[:2] for f in frames}:
            inclusive[key] += count

    def spot(key: tuple[str, str]) -> HotSpot:
        lines = [(n, c / total) for n, c in own_lines[key].most_common(3)]
        return HotSpot(key[0], key[1], own[key] / total, inclusive[key] / total, lines)

    by_self = [spot(k) for k, _ in own.most_common(top)]
    by_total = [spot(k) for k, _ in inclusive.most_common()
                if not k[1].startswith(_PLUMBING_FILES) and k[0] != "<module>"][:top]
    return total, by_self, by_total


def format_hot_spots(path: Path, top: int = 15) -> str:
    total, by_self, by_total = hot_spots(path, top)
    lines = [f"{total} samples (busy time only; C code counted on the Python line calling "
             "it)", "", "By own time (the function itself, with its hottest lines):", "",
             "| own | incl. | function | file | hottest lines (share) |",
             "| ---: | ---: | --- | --- | --- |"]
    for s in by_self:
        hottest = ", ".join(f"{n} ({share:.1%})" for n, share in s.lines)
        lines.append(f"| {s.self_share:.1%} | {s.total_share:.1%} | `{s.function}` | "
                     f"`{s.file}` | {hottest} |")
    lines += ["", "By inclusive time (the function and what it calls):", "",
              "| incl. | own | function | file |", "| ---: | ---: | --- | --- |"]
    for s in by_total:
        lines.append(f"| {s.total_share:.1%} | {s.self_share:.1%} | `{s.function}` | "
                     f"`{s.file}` |")
    return "\n".join(lines)
