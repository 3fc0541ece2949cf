"""xmpp-front with its journal's counters readable from outside, for the benchmarks.

``python -m bench.proxystats run -c FILE`` runs the proxy exactly as ``python -m proxy run``
does, with two additions that cost nothing per stanza: every :class:`proxy.journal.Journal`
created is remembered (and its writer thread's native id noted), and on SIGUSR1 the process
writes the journals' counters (commits, rows written) as one JSON line to the file named by
``$BENCH_STATS_FILE``. The harness signals at the start and the end of a measured window and
reads the difference; the thread id lets it read the writer thread's CPU time from /proc.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from typing import Any

from proxy import journal as journal_module
from proxy.cli import main

_journals: list[Any] = []
_seq = 0


def _install() -> None:
    cls = journal_module.Journal
    original_init, original_run = cls.__init__, cls._run

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        _journals.append(self)

    def run(self: Any) -> None:
        self._bench_tid = threading.get_native_id()
        original_run(self)

    cls.__init__ = init  # type: ignore[method-assign]
    cls._run = run  # type: ignore[method-assign]


def _dump(signum: int, frame: object) -> None:
    global _seq
    path = os.environ.get("BENCH_STATS_FILE")
    if not path:
        return
    _seq += 1
    stats = {"seq": _seq, "journals": len(_journals),
             "commits": sum(j.commits for j in _journals),
             "rows_written": sum(j.rows_written for j in _journals),
             # batches handed to the writer thread and not yet committed (a backlog)
             "in_flight": sum(j._in_flight for j in _journals),
             "tids": [getattr(j, "_bench_tid", None) for j in _journals]}
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(stats) + "\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    _install()
    signal.signal(signal.SIGUSR1, _dump)
    sys.exit(main())
