"""SIGHUP reloads the whole configuration file: a renewed certificate for new connections
while a live session goes on, a changed limit for new connections while live ones keep
theirs, the log level; a file that does not load or check is refused whole and the old
configuration stays. One event says what changed and what needs a restart."""

from __future__ import annotations

import asyncio
import shutil
import signal
import ssl
from pathlib import Path
from typing import Any

import yaml

import pytest

from tests.integration.proxyproc import ProxyProcess, merge_config
from tests.peers.certs import make_cert
from tests.peers.rawclient import stream_error_condition
from tests.peers.smpeer import SmPeer
from tests.peers.util import run

pytestmark = pytest.mark.integration


async def served_cert(proxy: ProxyProcess) -> bytes:
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    _, writer = await asyncio.wait_for(asyncio.open_connection(
        proxy.host, proxy.direct_tls_port, ssl=context, server_hostname="localhost"), 10)
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    return der


def der_of(path: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(path.read_text())


def test_sighup_takes_a_renewed_certificate_for_new_connections(
        tmp_path: Path, prosody, accounts) -> None:
    old_cert, old_key = make_cert(tmp_path / "old", "localhost")
    new_cert, new_key = make_cert(tmp_path / "new", "localhost")
    live = tmp_path / "live"
    live.mkdir()
    shutil.copy(old_cert, live / "cert.pem")
    shutil.copy(old_key, live / "key.pem")
    proxy = ProxyProcess(tmp_path / "proxy", prosody, live / "cert.pem", live / "key.pem")
    alice, bob = accounts("alice"), accounts("bob")
    try:
        proxy.start()

        async def scenario() -> None:
            assert await served_cert(proxy) == der_of(old_cert)
            a = await SmPeer.login(proxy.host, proxy.port, alice[0].split("@")[0], alice[1],
                                   "phone")
            b = await SmPeer.login(proxy.host, proxy.port, bob[0].split("@")[0], bob[1], "pc")
            shutil.copy(new_cert, live / "cert.pem")  # the renewal, in place
            shutil.copy(new_key, live / "key.pem")
            assert proxy.proc is not None
            proxy.proc.send_signal(signal.SIGHUP)
            await asyncio.to_thread(proxy.wait_event, "config_reloaded")
            assert await served_cert(proxy) == der_of(new_cert)
            a.message(bob[0] + "/pc", "still here")  # the live session goes on
            await b.wait_bodies(1)
            # A broken renewal (a key that is not the certificate's) is refused.
            shutil.copy(old_key, live / "key.pem")
            proxy.proc.send_signal(signal.SIGHUP)
            refused = await asyncio.to_thread(proxy.wait_event, "config_reload_refused")
            assert any(p.startswith("tls.") for p in refused["problems"]), refused
            assert await served_cert(proxy) == der_of(new_cert)
            a.abort()
            b.abort()

        run(scenario(), 60)
    finally:
        proxy.stop()


def reload_with(proxy: ProxyProcess, changes: dict[str, Any], event: str,
                count: int) -> dict[str, Any]:
    """Write the configuration with ``changes``, SIGHUP, and wait for the ``count``-th
    ``event`` (config_reloaded or config_reload_refused)."""
    proxy.config_path.write_text(yaml.safe_dump(merge_config(proxy.config, changes)))
    assert proxy.proc is not None
    proxy.proc.send_signal(signal.SIGHUP)
    deadline_events: list[dict[str, Any]] = []

    def enough() -> bool:
        deadline_events[:] = proxy.events(event)
        return len(deadline_events) >= count
    proxy.wait_event(event, lambda e: enough(), timeout=20)
    return deadline_events[count - 1]


BIG = "x" * 30000  # over 4096 by more than a read slice (8 KiB), under the default


def test_sighup_applies_a_changed_limit_to_new_connections_and_refuses_a_broken_file(
        make_proxy, accounts) -> None:
    proxy = make_proxy()
    alice, bob, carol = accounts("alice"), accounts("bob"), accounts("carol")

    async def login(account: tuple[str, str], resource: str) -> SmPeer:
        return await SmPeer.login(proxy.host, proxy.port, account[0].split("@")[0],
                                  account[1], resource)

    async def refused_big(account: tuple[str, str]) -> None:
        """A new connection sending a stanza over the limit in force is cut off."""
        peer = await login(account, "new")
        peer.message(alice[0] + "/old", BIG)
        await peer.wait_closed(20)
        assert "policy-violation" in [stream_error_condition(el) for el in peer.other]

    async def scenario() -> None:
        a = await login(alice, "old")
        c = await login(carol, "old")
        moved = proxy.port + 1 if proxy.port < 65535 else proxy.port - 1
        reloaded = await asyncio.to_thread(reload_with, proxy, {
            "limits": {"max_stanza_bytes": 4096},
            "abuse": {"max_sessions_per_account": 3},
            "listen": [{"host": proxy.host, "port": moved}],
        }, "config_reloaded", 1)
        assert reloaded["applied"] == ["limits.max_stanza_bytes",
                                       "abuse.max_sessions_per_account"], reloaded
        assert reloaded["needs_restart"] == ["listen"], reloaded
        await refused_big(bob)
        # The live sessions keep the limit they started with.
        c.message(alice[0] + "/old", BIG)
        await a.wait_bodies(1, 20)
        assert a.bodies == [BIG]
        # Still on the old port (a listener needs a restart).
        await refused_big(carol)

        # Broken files are refused whole: the limit stays 4096, not the default again.
        refused = await asyncio.to_thread(reload_with, proxy, {
            "limits": {"max_stanza_bytes": "big"}}, "config_reload_refused", 1)
        assert refused["problems"][0].startswith("limits.max_stanza_bytes: "), refused
        refused = await asyncio.to_thread(reload_with, proxy, {
            "limits": {"max_stanza_bytes": 262144},
            "tls": {"key": str(proxy.workdir / "no-such-key.pem")}},
            "config_reload_refused", 2)
        assert refused["problems"][0].startswith("tls.key: "), refused
        assert len(proxy.events("config_reloaded")) == 1
        await refused_big(bob)

        # The log level too: at warning, a new login's info events are no longer written.
        await asyncio.to_thread(reload_with, proxy, {
            "limits": {"max_stanza_bytes": 4096}, "log": {"level": "warning"}},
            "config_reloaded", 2)
        b = await login(bob, "quiet")
        b.message(alice[0] + "/old", "after the level change")
        await a.wait_bodies(2, 20)
        assert not [e for e in proxy.events("bound") if e.get("jid") == bob[0] + "/quiet"]
        for peer in (a, b, c):
            peer.abort()

    run(scenario(), 120)
