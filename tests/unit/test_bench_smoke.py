"""A quick smoke test of the benchmark harness (bench/), never the benchmarks themselves.

The fast upstream and the byte relay run in-process here; the last test runs
``python -m bench --only capacity`` with tiny sizes end to end (fast upstream, byte relays and
a real proxy process; no Prosody needed).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from bench import byterelay, fastupstream, load
from bench.client import BenchClient, login
from bench.profile import format_hot_spots, hot_spots
from bench.rules50 import write_fifty_rules
from bench.run import format_table
from proxy.rules import RuleSet
from tests.peers.util import LOCALHOST, run

REPO = Path(__file__).resolve().parents[2]


async def _pair(port: int) -> tuple[BenchClient, BenchClient]:
    a = await login(LOCALHOST, port, "alice", "x", resource="a", timeout=5)
    b = await login(LOCALHOST, port, "bob", "y", resource="b", timeout=5)
    return a, b


def test_fast_upstream_logs_in_binds_routes_and_answers_iqs() -> None:
    async def scenario() -> None:
        server, router = await fastupstream.serve(LOCALHOST, 0)
        port = server.sockets[0].getsockname()[1]
        try:
            a, b = await _pair(port)
            assert (a.jid, b.jid) == ("alice@localhost/a", "bob@localhost/b")
            a.write("<message to='bob@localhost/b' type='chat' id='m1'><body>hi</body>"
                    "</message><message to='bob@localhost' id='m2'><body>bare</body></message>"
                    "<message to='nobody@localhost/x' id='m3'><body>lost</body></message>")
            got = await b.read_until(re.compile(rb"m2.*?</message>", re.S), 5)
            assert b"bare" in got
            ping = await a.iq("<ping xmlns='urn:xmpp:ping'/>", timeout=5)
            assert b"type='result'" in ping
            roster = await a.iq("<query xmlns='jabber:iq:roster'/>", timeout=5)
            assert b"jabber:iq:roster" in roster
            assert router.routed == 2
            await a.close()
            await b.close()
        finally:
            server.close()

    run(scenario(), timeout=20)


def test_byte_relay_carries_a_session_and_counting_works() -> None:
    async def scenario() -> None:
        server, _ = await fastupstream.serve(LOCALHOST, 0)
        up_port = server.sockets[0].getsockname()[1]
        relay = await byterelay.serve(LOCALHOST, 0, LOCALHOST, up_port)
        relay_port = relay.sockets[0].getsockname()[1]
        try:
            ep = load.Endpoint("relay", LOCALHOST, relay_port)
            result = await load.throughput(ep, [("s", "x"), ("r", "x")], seconds=0.3,
                                           warmup=0.1, window=100, batch=10)
            assert result.messages_per_s > 0 and result.delivered > 0
            assert "harness" in result.cpu
            lat = await load.latency(ep, [("s", "x"), ("r", "x")], rate=200, seconds=0.3,
                                     warmup=0.1)
            assert lat.samples > 20 and 0 < lat.p50_ms <= lat.p99_ms
        finally:
            relay.close()
            server.close()

    run(scenario(), timeout=30)


def test_fifty_rules_compile(tmp_path: Path) -> None:
    path = write_fifty_rules(tmp_path / "rules50.yaml")
    assert len(RuleSet.load([path])) == 50


def test_profile_summary_and_table(tmp_path: Path) -> None:
    raw = tmp_path / "p.txt"
    raw.write_text(
        "_run_once (asyncio/base_events.py:1909);_pump (proxy/net/upstream_side.py:217);"
        "feed (proxy/xmpp/codec.py:214) 30\n"
        "_run_once (asyncio/base_events.py:1909);_pump (proxy/net/upstream_side.py:211) 10\n")
    total, own, incl = hot_spots(raw)
    assert total == 40
    assert (own[0].function, own[0].self_share, own[0].lines) == ("feed", 0.75, [(214, 0.75)])
    assert incl[0].function == "_pump" and incl[0].total_share == 1.0
    assert "proxy/xmpp/codec.py" in format_hot_spots(raw)
    table = format_table([{"case": "c", "setup": "s", "figure": "f", "value": 12345.0,
                           "unit": "", "vs": "x"}])
    assert "12,345" in table
    assert load.percentile([1, 2, 3, 4], 50) == 2 and load.percentile([1, 2, 3, 4], 99) == 4


def test_one_case_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--only", "capacity", "--pairs", "1", "--seconds",
         "0.3", "--warmup", "0.2", "--window", "200", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = {(r["setup"], r["figure"]): r["value"] for r in data["rows"]}
    assert rows[("direct fast upstream", "messages/s")] > 0
    assert rows[("proxy (TLS client leg)", "stanzas relayed/s")] > 0
    assert "== capacity" in proc.stderr and "| capacity" in proc.stdout
    assert data["machine"]["nproc"] >= 1


def test_bad_options_are_refused() -> None:
    proc = subprocess.run([sys.executable, "-m", "bench", "--only", "nosuch"], cwd=REPO,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "unknown case 'nosuch'" in proc.stderr
