"""A quick smoke test of the benchmark harness (bench/), never the benchmarks themselves.

The fast upstream and the byte relay run in-process here; the last test runs
``python -m bench --only capacity`` with tiny sizes end to end (fast upstream, byte relays and
a real proxy process; no Prosody needed).
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench import byterelay, fastupstream, load, procs
from bench.client import BenchClient, collect_latencies, login
from bench.profile import format_hot_spots, hot_spots
from bench.rules50 import write_fifty_rules
from bench.run import format_table, parse_args, proxy_label
from tests.peers.certs import make_cert
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


def test_latency_ids_are_read_wherever_the_id_attribute_is() -> None:
    """Prosody's attribute order changes from run to run: id may come first."""
    async def scenario() -> list[int]:
        reader = asyncio.StreamReader()
        reader.feed_data(b"<message id='L5' to='a'><body/></message>"
                         b"<message to='b' type='chat' id=\"L7\"><body/></message>")
        reader.feed_eof()
        samples: list[tuple[int, int]] = []
        await collect_latencies(reader, samples)
        return [sent for sent, _ in samples]

    assert run(scenario(), timeout=5) == [5, 7]


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
         "0.3", "--warmup", "0.2", "--window", "200", "--durability", "journal",
         "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = {(r["setup"], r["figure"]): r["value"] for r in data["rows"]}
    assert rows[("direct fast upstream", "messages/s")] > 0
    assert rows[("proxy (TLS client leg)", "stanzas relayed/s")] > 0
    assert rows[("proxy, fast upstream, journal", "journal commits/s")] > 0
    assert "== capacity" in proc.stderr and "| capacity" in proc.stdout
    assert data["machine"]["nproc"] >= 1


def test_sm_and_journal_counters_through_a_real_proxy(tmp_path: Path) -> None:
    """The SM variant of the throughput load through a proxy in journal mode (in front of
    an in-process fast upstream): clients enable SM, receivers answer the proxy's <r/>,
    senders' <r/> get their <a/>, and bench.proxystats reports the journal's work."""
    async def scenario() -> None:
        server, _ = await fastupstream.serve(LOCALHOST, 0)
        up_port = server.sockets[0].getsockname()[1]
        cert, key = make_cert(tmp_path / "certs", "localhost")
        proxy = procs.Proxy(tmp_path / "proxy", cert, key, {
            "port": up_port, "domain": "localhost", "tls": "none"}, stats=True,
            durability={"mode": "journal", "fsync": "normal"})
        await asyncio.to_thread(proxy.start)
        try:
            assert proxy.store_path.parent == tmp_path / "proxy"  # a file: the journal is on
            ep = load.Endpoint("proxy", LOCALHOST, proxy.port, watch={"proxy": proxy.pid})
            result = await load.throughput(ep, [("s", "x"), ("r", "x")], seconds=0.5,
                                           warmup=0.3, window=200, batch=10, sm=True,
                                           sample=proxy.journal_stats)
        finally:
            await asyncio.to_thread(proxy.stop)
            server.close()
        assert result.delivered > 0 and result.ack_ms
        assert result.sampled["commits"] > 0
        # Both lanes are journaled with SM: the sender's stanzas in the outbox, the
        # receiver's in its SM queue.
        assert result.sampled["rows_written"] > result.delivered
        assert proxy.journal_stats() == {}  # stopped: nothing to ask

    run(scenario(), timeout=60)


def test_durability_options() -> None:
    opts = parse_args(["--cases", "throughput,latency", "--durability",
                       "journal,memory,journal:full", "--sm", "off,on", "--repeat", "2"])
    assert opts.only == ["throughput", "latency"] and opts.repeat == 2
    assert opts.durability == [("journal", "normal"), ("memory", None), ("journal", "full")]
    assert opts.sm == [False, True]
    assert parse_args([]).durability is None and parse_args([]).sm == [False]
    assert proxy_label((None, None), False) == "via proxy"
    assert proxy_label(("journal", "full"), True) == "via proxy, journal fsync=full, SM"
    for bad in (["--durability", "disk"], ["--durability", "memory:full"], ["--sm", "yes"],
                ["--repeat", "0"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_bad_options_are_refused() -> None:
    proc = subprocess.run([sys.executable, "-m", "bench", "--only", "nosuch"], cwd=REPO,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "unknown case 'nosuch'" in proc.stderr
