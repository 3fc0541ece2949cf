"""Memory of the proxy while clients that never read flood it with <r/> (issue 11, item 2).

    python3 -m bench.output_flood [--count 200000] [--clients 4] [--phase after-bind]

Starts a legacy Prosody and the proxy of this checkout (the test harness), then opens
``--clients`` connections that each write ``--count`` ``<r/>`` (or ``<enable/>``) in one go
and never read. Prints the proxy's RSS before, its peak over ``--seconds``, and the worst
ping time of a well-behaved concurrent session.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.integration.proxyproc import ProxyProcess
from tests.peers.certs import make_cert
from tests.peers.prosody import LegacyProsody
from tests.peers.rawclient import NS_SM, RawClient, q, raw_login

ELEMENTS = {"r": b"<r xmlns='urn:xmpp:sm:3'/>", "enable": b"<enable xmlns='urn:xmpp:sm:3'/>"}


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def flooder(proxy: ProxyProcess, user: str, password: str, phase: str,
                  count: int, element: bytes) -> RawClient:
    if phase == "before-sasl":
        raw = await RawClient.connect(proxy.host, proxy.port, direct_tls=False)
        await raw.secure()
    else:
        raw = await raw_login(proxy.host, proxy.port, user, password, direct_tls=False)
        raw.send(f"<enable xmlns='{NS_SM}'/>")
        await raw.read_until(q(NS_SM, "enabled"), 10)
    raw.writer.write(element * count)
    return raw


async def scenario(proxy: ProxyProcess, accounts: list[tuple[str, str]], args: argparse.Namespace
                   ) -> None:
    assert proxy.proc is not None
    pid = proxy.proc.pid
    good = await raw_login(proxy.host, proxy.port, *accounts[0], direct_tls=False)
    base = rss(pid)
    element = ELEMENTS[args.element]
    floods = [await flooder(proxy, u, p, args.phase, args.count, element)
              for u, p in accounts[1:]]
    peak, worst = base, 0.0
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline:
        await asyncio.sleep(0.25)
        peak = max(peak, rss(pid))
        started = time.monotonic()
        await good.iq("<ping xmlns='urn:xmpp:ping'/>", to="localhost", timeout=30)
        worst = max(worst, time.monotonic() - started)
    mib = 2 ** 20
    print(f"phase={args.phase} element={args.element} clients={args.clients} "
          f"count={args.count} input={len(element) * args.count * args.clients / 1e6:.1f} MB "
          f"seconds={args.seconds}")
    print(f"proxy RSS before {base / mib:.1f} MiB, peak {peak / mib:.1f} MiB, "
          f"growth {(peak - base) / mib:.1f} MiB; worst concurrent ping {worst * 1000:.0f} ms")
    overflow = len(proxy.events("output_overflow"))
    backpressure = len(proxy.events("output_backpressure"))
    print(f"output_backpressure events {backpressure}, output_overflow events {overflow}")
    for raw in [good, *floods]:
        with contextlib.suppress(Exception):
            raw.abort()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--phase", choices=["before-sasl", "after-bind"], default="after-bind")
    parser.add_argument("--element", choices=sorted(ELEMENTS), default="r")
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        server = LegacyProsody(work / "prosody", allow_registration=True)
        with server:
            accounts = [(f"flood{i}", f"pw-{i}-x") for i in range(args.clients + 1)]
            for user, password in accounts:
                server.register(user, password)
            cert, key = make_cert(work / "certs", "localhost")
            with ProxyProcess(work / "proxy", server, cert, key,
                              log={"format": "json", "level": "debug"}) as proxy:
                asyncio.run(scenario(proxy, accounts, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
