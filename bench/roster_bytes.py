"""Bytes a client receives at login with an unchanged roster: roster versioning against none.

Starts a legacy Prosody (no roster versioning, see tests/peers/prosody.py) and xmpp-front in
front of it, gives one account N contacts in mixed groups (none, one, several, non-ASCII),
then logs in three ways and counts the bytes the client reads on its TLS stream after
decryption (a counting wrapper around the raw client's reader), from the TLS handshake to
the roster result (the login, bind and roster get), and then on to the echo of its initial
presence:

- directly against the legacy server (no versioning: the full roster);
- through the proxy without ``ver`` (the full roster);
- through the proxy with the current ``ver`` (an empty result: nothing changed).

Run from the repository root:

    python bench/roster_bytes.py [--items 500] [--repeat 3] [--json out.json]

Everything started is stopped by its PID. A direct connection of the account stays open
while measuring, so the legacy server keeps the roster loaded and sends each item's groups
in the same order every time (Prosody keeps groups in a hash; reloaded, their order may
change, and the proxy then takes the items for changed: see tests/integration/test_roster.py,
test_unchanged_roster_reloaded_by_the_server_keeps_its_version).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

REPO = Path(__file__).resolve().parents[1]
# Run as a script, sys.path[0] is bench/ (whose modules must not shadow the standard
# library's, e.g. bench/profile.py): the repository root instead.
if sys.path and Path(sys.path[0] or ".").resolve() == REPO / "bench":
    sys.path[0] = str(REPO)
elif str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.integration.proxyproc import ProxyProcess
from tests.peers.certs import make_cert
from tests.peers.prosody import LegacyProsody
from tests.peers.rawclient import NS_CLIENT, NS_ROSTER, RawClient, q, raw_login

GROUP_MIX: list[list[str]] = [[], ["Friends"], ["Família", "友達"], ["Ελλάδα", "Work", "Family"],
                              ["Coworkers"]]
USER, PASSWORD = "alice", "alice-bench-pw"
IQ, PRESENCE = q(NS_CLIENT, "iq"), q(NS_CLIENT, "presence")
QUERY = q(NS_ROSTER, "query")


class CountingReader:
    """Wraps an asyncio StreamReader; counts the bytes read (decrypted, once TLS is on)."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.inner = reader
        self.count = 0

    async def read(self, n: int = -1) -> bytes:
        data = await self.inner.read(n)
        self.count += len(data)
        return data


def contact_items(count: int) -> list[str]:
    items = []
    for n in range(count):
        name = "" if n % 3 == 0 else f" name={quoteattr(f'Contact {n} ✓')}"
        groups = "".join(f"<group>{escape(g)}</group>" for g in GROUP_MIX[n % len(GROUP_MIX)])
        items.append(f"<item jid='contact{n}@example.net'{name}>{groups}</item>")
    return items


async def fill(client: RawClient, items: list[str], timeout: float = 60.0) -> None:
    """Roster sets pipelined in one write, directly on the legacy server."""
    ids = [client.next_id("fill") for _ in items]
    client.send("".join(f"<iq type='set' id='{i}'><query xmlns='{NS_ROSTER}'>{x}</query></iq>"
                        for i, x in zip(ids, items, strict=True)))
    waiting = set(ids)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while waiting:
        el = await client.read_element(max(0.0, deadline - loop.time()))
        if el.tag == IQ and el.get("id") in waiting:
            if el.get("type") != "result":
                raise RuntimeError(f"roster set refused: {el.get('type')}")
            waiting.discard(el.get("id"))


async def login_bytes(host: str, port: int, ver: str | None, resource: str) -> dict[str, Any]:
    """One login: STARTTLS, SASL PLAIN, bind, roster get (with ``ver`` unless None), then
    initial presence; bytes read on the TLS stream up to the roster result and up to the
    echo of the presence, and what the roster answer held."""
    started = time.monotonic()
    client = await RawClient.connect(host, port, direct_tls=False, timeout=10)
    counter = CountingReader(client.reader)
    client.reader = counter  # type: ignore[assignment]
    try:
        await client.open_stream(timeout=10)
        await client.starttls(timeout=10)
        plaintext = counter.count  # before TLS: the first stream header and <proceed/>
        await client.login_plain(USER, PASSWORD, timeout=10)
        jid = await client.bind(resource, timeout=10)
        attr = "" if ver is None else f" ver={quoteattr(ver)}"
        client.send(f"<iq type='get' id='roster'><query xmlns='{NS_ROSTER}'{attr}/></iq>")
        result = await client.read_until(IQ, 30, id="roster")
        until_result = counter.count - plaintext
        elapsed = time.monotonic() - started
        query = result.find(QUERY)
        client.send("<presence/>")
        pushes = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while True:  # roster pushes after an empty result would come before the echo
            el = await client.read_element(max(0.0, deadline - loop.time()))
            if el.tag == IQ and el.get("type") == "set" and el.find(QUERY) is not None:
                pushes += 1
                client.send(f"<iq type='result' id={quoteattr(el.get('id', ''))}/>")
            elif el.tag == PRESENCE and el.get("from") == jid:
                break
        return {
            "result_type": result.get("type"),
            "items_in_result": len(query) if query is not None else 0,
            "ver_returned": query.get("ver") if query is not None else None,
            "pushes_after_result": pushes,
            "bytes_until_roster_result": until_result,
            "bytes_until_presence_echo": counter.count - plaintext,
            "bytes_before_tls": plaintext,
            "ms_until_roster_result": round(elapsed * 1000, 1),
        }
    finally:
        client.abort()


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out = dict(runs[-1])
    for key in ("bytes_until_roster_result", "bytes_until_presence_echo", "bytes_before_tls",
                "ms_until_roster_result"):
        out[key] = statistics.median(r[key] for r in runs)
    out["pushes_after_result"] = max(r["pushes_after_result"] for r in runs)
    return out


async def measure(server: LegacyProsody, proxy: ProxyProcess, items: int,
                  repeat: int) -> list[dict[str, Any]]:
    holder = await raw_login(server.host, server.c2s_port, USER, PASSWORD, direct_tls=False,
                             resource="holder")
    try:
        t = time.monotonic()
        await fill(holder, contact_items(items))
        print(f"{items} contacts created upstream in {time.monotonic() - t:.1f} s",
              file=sys.stderr)
        # Learn the current version through the proxy (not measured).
        warm = await raw_login(proxy.host, proxy.port, USER, PASSWORD, direct_tls=False,
                               resource="warmup")
        try:
            reply = await warm.iq(f"<query xmlns='{NS_ROSTER}' ver=''/>", timeout=30)
            query = reply.find(QUERY)
            if query is None or not query.get("ver") or len(query) != items:
                raise RuntimeError("the proxy did not answer with the full roster and a ver")
            ver = str(query.get("ver"))
        finally:
            warm.abort()
        ways = [("legacy server directly", server.host, server.c2s_port, None),
                ("proxy, no ver", proxy.host, proxy.port, None),
                ("proxy, current ver", proxy.host, proxy.port, ver)]
        results = []
        for n, (label, host, port, way_ver) in enumerate(ways):
            runs = [await login_bytes(host, port, way_ver, f"m{n}r{r}") for r in range(repeat)]
            results.append({"way": label, "ver_sent": way_ver, **median_of(runs)})
        return results
    finally:
        holder.abort()


def table(results: list[dict[str, Any]]) -> str:
    head = ("| login | items in result | pushes after | bytes to roster result "
            "| bytes to presence echo | ms to roster |")
    lines = [head, "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        lines.append(f"| {r['way']} | {r['items_in_result']} | {r['pushes_after_result']} "
                     f"| {r['bytes_until_roster_result']:.0f} "
                     f"| {r['bytes_until_presence_echo']:.0f} "
                     f"| {r['ms_until_roster_result']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=500, help="contacts in the roster")
    parser.add_argument("--repeat", type=int, default=3, help="logins per way (median)")
    parser.add_argument("--json", type=Path, help="write the results there as JSON")
    args = parser.parse_args(argv)
    if args.items < 1 or args.repeat < 1:
        parser.error("--items and --repeat must be at least 1")
    command = "python bench/roster_bytes.py " + shlex.join(
        sys.argv[1:] if argv is None else argv)

    with tempfile.TemporaryDirectory(prefix="roster-bytes-") as tmp:
        work = Path(tmp)
        server = LegacyProsody(work / "prosody")
        proxy: ProxyProcess | None = None
        try:
            server.start()
            server.register(USER, PASSWORD)
            cert, key = make_cert(work / "certs", "localhost")
            proxy = ProxyProcess(work / "proxy", server, cert, key,
                                 store={"path": str(work / "front.sqlite3")},
                                 log={"format": "json", "level": "info"}).start()
            started = time.monotonic()
            results = asyncio.run(asyncio.wait_for(
                measure(server, proxy, args.items, args.repeat), 120))
            seconds = time.monotonic() - started
        finally:
            if proxy is not None:
                proxy.stop()
            server.stop()

    full, versioned = results[1], results[2]
    saved = full["bytes_until_roster_result"] - versioned["bytes_until_roster_result"]
    report = {
        "command": command.strip(),
        "items": args.items,
        "repeat": args.repeat,
        "results": results,
        "bytes_saved_with_ver": saved,
        "ratio_with_ver_to_without": round(versioned["bytes_until_roster_result"]
                                           / full["bytes_until_roster_result"], 4),
        "seconds": round(seconds, 1),
    }
    print(f"$ {report['command']}")
    print(f"roster of {args.items} contacts, unchanged; bytes read by the client on its TLS "
          f"stream (median of {args.repeat} logins):")
    print(table(results))
    print(f"with versioning the client reads {versioned['bytes_until_roster_result']:.0f} "
          f"bytes instead of {full['bytes_until_roster_result']:.0f} to know its roster "
          f"({saved:.0f} fewer, {100 * report['ratio_with_ver_to_without']:.1f} %)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        print(f"JSON written to {args.json}")
    if versioned["items_in_result"] or versioned["pushes_after_result"]:
        print("warning: the versioned login was not an empty result", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
