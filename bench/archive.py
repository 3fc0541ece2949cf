"""The message archive (XEP-0313): query time at 100k and 1M archived messages, and the
throughput cost of archiving.

    python3 -m bench.archive                  # both parts
    python3 -m bench.archive --sizes 100000   # query part only at one size
    python3 -m bench.archive --no-throughput

Query part: one account's archive filled directly through the store API (ArchiveArea, in
one SQLite file like the proxy's, with ids as the proxy hands them out), then each query
shape timed through ArchiveArea.search, the call the archive's thread makes (median of
--repeat runs, milliseconds). Throughput part: bench/run.py's throughput case (pairs of
accounts chatting as fast as a window allows through a real proxy in front of a real
Prosody), with the archive on and off, alternated in the same run; besides messages/s, the
messages per proxy CPU-second (much steadier than the rate on a machine shared with other
work).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from proxy.archive_store import (ArchiveArea, ArchivedMessage, ArchiveFilter, ArchiveSearch,
                                 PageRequest, open_archive_connection)


ACCOUNT = "alice@localhost"
CONTACTS = 50


def fill(area: ArchiveArea, n: int, batch: int = 20000) -> dict[int, str]:
    """``n`` messages with the proxy's own ids (as ``ArchiveIds.new`` hands them out);
    returns the ids of a few positions (0, the middle, the last)."""
    body = b"<message xmlns='jabber:client' type='chat'><body>" + b"x" * 80 + b"</body></message>"
    t = 1.6e9
    marks = {0: "", n // 2: "", n - 1: ""}
    for start in range(0, n, batch):
        rows = []
        for k in range(start, min(n, start + batch)):
            other = f"c{k % CONTACTS}@localhost"
            archive_id, seq, nonce = area.ids.new()
            if k in marks:
                marks[k] = archive_id
            rows.append((ACCOUNT, ArchivedMessage(archive_id, t + k, "in" if k % 2 else "out",
                                                  other, other + "/r", body, seq, nonce)))
        area.conn.execute("BEGIN")
        area.put(rows)
        area.conn.execute("COMMIT")
    return marks


def timed(area: ArchiveArea, search: ArchiveSearch, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        area.search(ACCOUNT, search)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def query_figures(n: int, repeat: int, workdir: Path) -> dict[str, float]:
    path = workdir / f"archive-{n}.sqlite3"
    conn = open_archive_connection(str(path))
    area = ArchiveArea(conn)
    t0 = time.perf_counter()
    marks = fill(area, n)
    fill_s = time.perf_counter() - t0
    middle = marks[n // 2]
    shapes = {
        "first page (max 50)": ArchiveSearch(page=PageRequest(50)),
        "last page (<before/>, max 50)": ArchiveSearch(page=PageRequest(50, before="")),
        "page after an id in the middle": ArchiveSearch(page=PageRequest(50, after=middle)),
        "with one contact, last page": ArchiveSearch(ArchiveFilter(with_jid="c7@localhost"),
                                                      PageRequest(50, before="")),
        "start/end one hour in the middle": ArchiveSearch(ArchiveFilter(
            start=1.6e9 + n // 2, end=1.6e9 + n // 2 + 3600), PageRequest(50)),
        "after-id in the middle": ArchiveSearch(ArchiveFilter(after_id=middle),
                                                PageRequest(50)),
    }
    figures = {"fill seconds": round(fill_s, 1)}
    for name, search in shapes.items():
        figures[f"{name} ms"] = round(timed(area, search, repeat), 2)
        nocount = ArchiveSearch(search.filter, search.page, counts=False)
        figures[f"{name}, no counts ms"] = round(timed(area, nocount, repeat), 2)
    conn.close()
    path.unlink()
    return figures


async def throughput_figures(opts: argparse.Namespace) -> dict[str, Any]:
    from bench import load
    from bench.run import Bench, parse_args
    bench_opts = parse_args(["--only", "throughput", "--pairs", str(opts.pairs), "--seconds",
                             str(opts.seconds)])
    bench = Bench(bench_opts)
    try:
        await bench.prosody_server()
        accounts = await bench.prosody_accounts(2 * opts.pairs)
        results: dict[str, list[float]] = {"on": [], "off": []}
        # Proxy CPU-seconds per message: on a machine shared with other work the rate
        # swings with the neighbours' load; what the proxy spends per message much less.
        cpu_per_msg: dict[str, list[float]] = {"on": [], "off": []}
        for run in range(opts.rounds):
            for mode in ("on", "off"):
                proxy = await bench.started(bench.proxy_before_prosody(
                    f"proxy-archive-{mode}-{run + 1}", features={"archive": mode}))
                try:
                    r = await load.throughput(bench.ep(f"archive {mode}", proxy.port,
                                                       watch=proxy), accounts,
                                              seconds=opts.seconds, warmup=1.0,
                                              progress=bench.progress)
                    results[mode].append(r.messages_per_s)
                    share = r.cpu.get(proxy.name)
                    if share is not None and r.messages_per_s:
                        cpu_per_msg[mode].append(share / r.messages_per_s)
                finally:
                    await bench.stopped(proxy)
        on, off = statistics.median(results["on"]), statistics.median(results["off"])
        out: dict[str, Any] = {"archive on messages/s": round(on),
                               "archive off messages/s": round(off),
                               "on/off": round(on / off, 3), "runs": results}
        if cpu_per_msg["on"] and cpu_per_msg["off"]:
            con, coff = (statistics.median(cpu_per_msg[m]) for m in ("on", "off"))
            out.update({"archive on messages per proxy CPU-second": round(1 / con),
                        "archive off messages per proxy CPU-second": round(1 / coff),
                        "per CPU-second on/off": round(coff / con, 3)})
        return out
    finally:
        bench.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m bench.archive", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="100000,1000000")
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--no-throughput", action="store_true")
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", help="write the figures here too")
    opts = p.parse_args(argv)
    out: dict[str, Any] = {"queries": {}}
    with tempfile.TemporaryDirectory(prefix="xmpp-front-archive-bench-") as tmp:
        for n in (int(s) for s in opts.sizes.split(",") if s):
            print(f"filling and querying {n} messages...", file=sys.stderr, flush=True)
            out["queries"][n] = query_figures(n, opts.repeat, Path(tmp))
            for name, value in out["queries"][n].items():
                print(f"{n:>8}  {name:<45} {value}")
    if not opts.no_throughput:
        out["throughput"] = asyncio.run(throughput_figures(opts))
        for name, value in out["throughput"].items():
            print(f"throughput  {name:<35} {value}")
    if opts.json:
        Path(opts.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
