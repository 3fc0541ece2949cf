"""A long run of the codec's property tests (tests/unit/test_fuzz_codec.py).

    python3 -m bench.fuzz [--examples 20000] [--seed 0]

Runs each property with ``--examples`` examples and prints how many ran, how long they
took, how many stanzas came out and which stream errors were found. Any failure is a bug:
hypothesis prints the smallest input it could find.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from proxy.xmpp.codec import StanzaReceived, StreamClosed, StreamEvent, StreamViolation
from tests.unit.test_fuzz_codec import (
    HEADER,
    check_arbitrary_bytes,
    check_chunking_is_invisible,
    check_spliced,
    cut_points,
    valid_streams,
)


class Tally:
    def __init__(self) -> None:
        self.examples = 0
        self.stanzas = 0
        self.ends: collections.Counter[str] = collections.Counter()

    def events(self, events: list[StreamEvent]) -> None:
        self.examples += 1
        self.stanzas += sum(isinstance(e, StanzaReceived) for e in events)
        for e in events:
            if isinstance(e, StreamViolation):
                self.ends[e.condition] += 1
            elif isinstance(e, StreamClosed):
                self.ends["(closed)"] += 1
        if not any(isinstance(e, StreamClosed | StreamViolation) for e in events):
            self.ends["(open)"] += 1


def properties(tally: dict[str, Tally]) -> dict[str, Callable[[], None]]:
    def chunking(data: st.DataObject) -> None:
        stream = data.draw(valid_streams())
        cuts = data.draw(cut_points(len(stream)))
        t = tally["chunking"]
        t.examples += 1
        t.stanzas += check_chunking_is_invisible(stream, cuts, track=data.draw(st.booleans()))

    def arbitrary(data: st.DataObject) -> None:
        raw = data.draw(st.binary(max_size=2000))
        prefix = HEADER if data.draw(st.booleans()) else b""
        cuts = data.draw(cut_points(len(prefix) + len(raw)))
        tally["arbitrary"].events(check_arbitrary_bytes(prefix + raw, cuts))

    def spliced(data: st.DataObject) -> None:
        stream = data.draw(valid_streams())
        junk = data.draw(st.binary(min_size=1, max_size=40))
        at = data.draw(st.integers(0, len(stream)))
        cuts = data.draw(cut_points(len(stream) + len(junk)))
        tally["spliced"].events(check_spliced(stream, at, junk, cuts))

    return {"chunking": chunking, "arbitrary": arbitrary, "spliced": spliced}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    tally = {name: Tally() for name in ("chunking", "arbitrary", "spliced")}
    failed = False
    for name, body in properties(tally).items():
        runner: Any = seed(args.seed)(settings(
            max_examples=args.examples, deadline=None, database=None,
            suppress_health_check=list(HealthCheck))(given(st.data())(body)))
        started = time.perf_counter()
        try:
            runner()
        except Exception as exc:  # hypothesis has printed the falsifying example
            failed = True
            print(f"{name}: FAILED: {exc!r}")
        elapsed = time.perf_counter() - started
        t = tally[name]
        ends = ", ".join(f"{k} {v}" for k, v in t.ends.most_common())
        print(f"{name}: {t.examples} examples in {elapsed:.1f} s, {t.stanzas} stanzas"
              + (f"; ends: {ends}" if ends else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
