"""The chaos soak, short (issue 11): four raw SM clients send numbered messages to each other
through the proxy while their connections are cut and resumed at random, the legacy Prosody is
killed (SIGKILL) or stopped (SIGTERM) and restarted, the proxy-server link is reset, a fifth
client never reads, and a canary pings the server's domain every 0.5 s. One run (about 40 s)
feeds every test below; the long version is ``python -m bench.soak`` (tests/integration/chaos.py
is the engine).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.integration.chaos import Soak, SoakConfig, SoakResult, run_soak

pytestmark = pytest.mark.integration

SEED = 11
CONFIG = SoakConfig(seconds=25, clients=4, seed=SEED, settle=20)


@pytest.fixture(scope="module")
def soak(tmp_path_factory: pytest.TempPathFactory,
         certs: tuple[Path, Path]) -> tuple[SoakResult, Soak]:
    workdir = tmp_path_factory.mktemp("chaos")
    result, engine = asyncio.run(asyncio.wait_for(run_soak(workdir, CONFIG, certs), 120))
    print(result.summary())
    return result, engine


def test_the_soak_injected_every_kind_of_fault(soak) -> None:
    r, _ = soak
    for kind in ("client_cut", "non_reader_cut", "server_kill", "server_stop", "link_reset"):
        assert r.faults[kind] >= 1, (kind, r.faults)
    assert r.sent > 500 and r.sink_bodies > 50, r.summary()
    assert r.resumes >= r.faults["client_cut"], r.summary()


def test_every_acknowledged_message_was_delivered_or_bounced(soak) -> None:
    r, _ = soak
    assert r.unacked == 0, r.summary()  # the quiet phase got every message acknowledged
    assert r.lost == [], r.summary()
    assert r.bounced_acked_and_delivered == [], r.summary()


def test_no_message_was_delivered_twice(soak) -> None:
    r, _ = soak
    assert r.duplicated == {}, r.summary()


def test_messages_arrive_in_order_per_sender(soak) -> None:
    r, _ = soak
    assert r.out_of_order == [], r.summary()


def test_the_canary_never_waited_a_second(soak) -> None:
    """Measured: every ping's round trip through the proxy. Pings in flight at the instant
    of a kill, stop or reset are replayed after the restore (their round trip includes the
    outage) and are only counted; those sent while the server is down are answered by the
    proxy itself and must be as quick as the rest."""
    r, _ = soak
    assert r.canary_pings >= CONFIG.seconds * 2 - 2, r.summary()
    assert r.canary_unanswered == 0, r.summary()
    assert r.canary_over_1s_clear == 0 and r.canary_max_rtt_clear < 1.0, r.summary()


def test_the_proxys_memory_is_back_near_its_baseline(soak) -> None:
    r, _ = soak
    assert r.rss_final_kib <= r.rss_baseline_kib + 20 * 1024, r.summary()


def test_every_session_ledger_settled_through_named_exits(soak) -> None:
    _, engine = soak
    assert engine.proxy is not None
    ledgers = engine.proxy.events("ledger")
    assert ledgers
    for event in ledgers:
        for lane in ("c2s", "s2c"):
            counts = event[lane]
            exits = sum(counts[name] for name in ("delivered", "stored", "bounced", "discarded"))
            assert counts["held"] == 0 and counts["entered"] == exits, (lane, event)
    assert not engine.proxy.events("connection_failed")
