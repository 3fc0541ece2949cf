"""Machine instructions the proxy spends per relayed stanza, counted, not timed.

``python -m bench.instructions [--features off] [--durability memory] [--messages N]``

On a shared machine the capacity case's CPU-seconds drift by 10-30% from run to run (other
processes take the core's caches and its other hyperthread), too much to see a change of a
few percent. This runs the proxy under valgrind's callgrind in front of the fast upstream,
relays a fixed number of messages through it (pairs of clients, TLS on the client leg, as in
the capacity case) and reads the instruction count callgrind reports when it exits. Two
runs, with ``N`` and ``3N`` messages per pair, cancel out start-up, logins and shutdown:

    instructions per stanza = (I(3N) - I(N)) / (2 stanzas * pairs * 2N)

The count is the same from run to run to within a fraction of a percent, whatever else the
machine does. It is not a time: a cache miss counts as one instruction. Needs valgrind.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.peers.certs import make_cert

from . import procs
from .load import Endpoint, _Pair, _receive, abort_all, login_many

BODY = "x" * 40  # about the capacity case's message
_COLLECTED = re.compile(rb"Collected : (\d+)")
FEATURES = ("carbons", "archive", "blocking", "push")


async def relay(port: int, pairs: int, messages: int, *, batch: int = 25,
                window: int = 500, timeout: float = 600.0) -> None:
    """``messages`` chat messages from each sender to its receiver, all delivered."""
    accounts = [(f"ir{i}", "any") for i in range(2 * pairs)]
    clients = await login_many(Endpoint("proxy", "127.0.0.1", port), accounts,
                               resource="bench", concurrency=4, timeout=timeout)
    links = [_Pair(clients[i], clients[i + 1]) for i in range(0, len(clients), 2)]
    readers = [asyncio.ensure_future(_receive(p)) for p in links]
    try:
        deadline = time.monotonic() + timeout
        for p in links:
            p.sent = 0
        while any(p.received < messages for p in links):
            if time.monotonic() > deadline:
                raise TimeoutError(f"delivered {[p.received for p in links]} of {messages}")
            for p in links:
                while p.sent < messages and p.sent - p.received <= window - batch:
                    count = min(batch, messages - p.sent)
                    prefix = f"<message to='{p.receiver.jid}' type='chat' id='i"
                    p.sender.writer.write("".join(
                        f"{prefix}{p.sent + k:x}'><body>{BODY}</body></message>"
                        for k in range(count)).encode())
                    p.sent += count
            await asyncio.sleep(0.01)
    finally:
        for t in readers:
            t.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        abort_all(clients)


def count_run(workdir: Path, cert: Path, key: Path, upstream: procs.Child, messages: int,
              pairs: int, overrides: dict[str, Any], tag: str,
              profile: Path | None = None) -> int:
    """The proxy's instruction count over its whole life, ``messages`` relayed per pair;
    with ``profile``, callgrind's data goes to ``profile/TAG.callgrind``."""
    proxy = procs.Proxy(workdir / tag, cert, key, {
        "port": upstream.port, "domain": "localhost", "tls": "none"}, name=tag, **overrides)
    out = profile / f"{tag}.callgrind" if profile is not None else "/dev/null"
    proxy.argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *proxy.argv]
    proxy.start(timeout=300)
    try:
        asyncio.run(relay(proxy.port, pairs, messages))
    finally:
        proxy.stop(timeout=120)
    found = _COLLECTED.findall(proxy.log_path.read_bytes())
    if not found:
        raise RuntimeError(f"no instruction count in {proxy.log_path}:\n{proxy.log_tail()}")
    return int(found[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=2000, help="N, per pair (2000)")
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--durability", choices=("memory", "journal"), default=None,
                   help="durability.mode (default: the proxy's own default)")
    p.add_argument("--features", choices=("on", "off"), default="on",
                   help="off: carbons, archive, blocking and push off, as bench --features")
    p.add_argument("--off", action="append", choices=FEATURES, default=[], metavar="FEATURE",
                   help="turn this feature off (repeatable; e.g. --off archive: what it costs)")
    p.add_argument("--workdir", metavar="DIR", help="keep configs and logs here")
    p.add_argument("--profile", metavar="DIR",
                   help="keep callgrind's data of both runs here (callgrind_annotate "
                        "DIR/large.callgrind: where the instructions go, by C function)")
    opts = p.parse_args(argv)
    profile = Path(opts.profile).resolve() if opts.profile else None
    if profile is not None:
        profile.mkdir(parents=True, exist_ok=True)
    if shutil.which("valgrind") is None:
        print("bench.instructions needs valgrind", file=sys.stderr)
        return 2
    overrides: dict[str, Any] = {}
    if opts.durability:
        overrides["durability"] = {"mode": opts.durability}
    if opts.features == "off":
        overrides["features"] = {k: "off" for k in FEATURES}
    elif opts.off:
        overrides["features"] = {k: "off" for k in opts.off}
    workdir = Path(opts.workdir or tempfile.mkdtemp(prefix="xmpp-front-ir-")).resolve()
    cert, key = make_cert(workdir / "certs", "localhost")
    upstream = procs.fast_upstream(workdir)
    upstream.start()
    try:
        small = count_run(workdir, cert, key, upstream, opts.messages, opts.pairs, overrides,
                          "small", profile)
        large = count_run(workdir, cert, key, upstream, 3 * opts.messages, opts.pairs,
                          overrides, "large", profile)
    finally:
        upstream.stop()
    stanzas = 2 * opts.pairs * 2 * opts.messages
    per = (large - small) / stanzas
    print(f"{per:,.0f} instructions per relayed stanza ({small:,} and {large:,} in all; "
          f"{stanzas:,} stanzas apart; features {opts.features}"
          f"{''.join(f' but {k} off' for k in opts.off if opts.features == 'on')}, durability "
          f"{opts.durability or 'default'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
