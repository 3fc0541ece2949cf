"""The long chaos soak (issue 11) from the command line:

    python -m bench.soak --seconds 180 --clients 6 --seed 7

Same engine as tests/integration/test_chaos.py (tests/integration/chaos.py): raw SM clients
send numbered messages to each other through a real proxy process while their connections
are cut and resumed, the legacy Prosody is killed and restarted, the proxy-server link is
reset, one client never reads and a canary pings the server's domain every 0.5 s. Prints a
summary; exit status 1 if an acknowledged message was lost, a message came again after the
client had acknowledged it, a message came out of order (other than late from the legacy
server's own offline store), or the canary took more than a second outside a fault.

Needs prosody on PATH (apt-get install -y prosody). Keeps its work directory (logs of the
proxy and Prosody) with --keep, otherwise a temporary one.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

from tests.integration.chaos import SoakConfig, run_soak


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=120.0, help="length of the chaos phase")
    ap.add_argument("--clients", type=int, default=6, help="talking clients")
    ap.add_argument("--seed", type=int, default=None, help="default: from the clock (printed)")
    ap.add_argument("--rate", type=float, default=10.0, help="messages/s per client")
    ap.add_argument("--settle", type=float, default=40.0,
                    help="the most the quiet phase may take")
    ap.add_argument("--max-queue", type=int, default=None,
                    help="the proxy's stream_management.max_queue (default: its default)")
    ap.add_argument("--to-sink", type=float, default=0.2,
                    help="share of messages sent to the client that never reads")
    ap.add_argument("--keep", type=Path, default=None, help="work directory to keep")
    ap.add_argument("--verbose", "-v", action="store_true")
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else int(time.time()) % 100000
    print(f"seed {seed}", flush=True)
    cfg = SoakConfig(seconds=args.seconds, clients=args.clients, seed=seed, rate=args.rate,
                     settle=args.settle, verbose=args.verbose, max_queue=args.max_queue,
                     to_sink=args.to_sink)
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="xmpp-front-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    log = (lambda msg: print(f"  {msg}", flush=True)) if args.verbose else None
    try:
        result, soak = asyncio.run(asyncio.wait_for(
            run_soak(workdir, cfg, log=log), args.seconds + args.settle + 120))
        if args.keep is not None:
            soak.dump(workdir / "books.json")
    finally:
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"work directory kept: {workdir}")
    print(result.summary())
    bad = (result.lost or result.misrouted or result.duplicated_acked or result.out_of_order
           or result.canary_over_1s_clear)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
