"""/metrics, /healthz and /readyz of a real proxy in front of the legacy Prosody: the
figures move with traffic, readiness follows the server."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from tests.integration.conftest import MakeAccount, MakeProxy
from tests.integration.proxyproc import ProxyProcess
from tests.peers.prosody import LegacyProsody
from tests.peers.rawclient import NS_TLS, RawAuthError, RawClient, raw_login
from tests.peers.smpeer import SmPeer
from tests.peers.util import LOCALHOST, free_port, run

pytestmark = pytest.mark.integration


async def get(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(LOCALHOST, port), 5)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = raw.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


def value(text: str, name: str, **labels: str) -> float:
    label_text = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(f"{name}{{{label_text}}}" if labels else name) + r" (\S+)"
    match = re.search(r"^" + pattern + r"$", text, re.M)
    assert match, f"no {name} {labels} in:\n{text}"
    return float(match.group(1))


def test_metrics_move_with_traffic_and_readiness_follows_the_server(
        tmp_path: Path, certs: tuple[Path, Path]) -> None:
    server = LegacyProsody(tmp_path / "prosody")
    server.start()
    port = free_port()
    proxy = ProxyProcess(tmp_path / "proxy", server, *certs,
                         metrics={"listen": f"{LOCALHOST}:{port}"},
                         store={"path": str(tmp_path / "front.sqlite3")},
                         reconnect={"first_delay_max": 0.5, "base": 0.2, "cap": 1.0})
    try:
        proxy.start()
        server.register("alice", "alice-pw")
        server.register("bob", "bob-pw")

        async def scenario() -> None:
            status, text = await get(port, "/metrics")
            assert status == 200
            assert value(text, "xmpp_front_sessions", state="active") == 0
            assert (await get(port, "/healthz"))[0] == 200
            assert (await get(port, "/readyz"))[0] == 200
            a = await SmPeer.login(proxy.host, proxy.port, "alice", "alice-pw", "phone")
            b = await SmPeer.login(proxy.host, proxy.port, "bob", "bob-pw", "pc")
            for n in range(5):
                a.message("bob@localhost/pc", f"m{n}")
            await a.wait_acked(6)
            await b.wait_bodies(5)
            await asyncio.sleep(0.5)  # the server's confirmation of the last ones
            text = (await get(port, "/metrics"))[1]
            assert value(text, "xmpp_front_sessions", state="active") == 2
            assert value(text, "xmpp_front_upstream_links", state="up") == 2
            assert value(text, "xmpp_front_client_connections") == 2
            assert value(text, "xmpp_front_ledger_stanzas_total", lane="c2s",
                         exit="delivered") >= 6
            assert value(text, "xmpp_front_ledger_stanzas_total", lane="s2c",
                         exit="entered") >= 5
            b.raw.send("<inactive xmlns='urn:xmpp:csi:0'/>")  # bob's phone is pocketed
            a.abort()  # alice's phone drops: her session hibernates
            await asyncio.sleep(0.5)
            text = (await get(port, "/metrics"))[1]
            assert value(text, "xmpp_front_sessions", state="hibernating") == 1
            assert value(text, "xmpp_front_sessions", state="inactive") == 1
            assert value(text, "xmpp_front_upstream_restores_total") == 0
            server.kill()
            await asyncio.sleep(5.5)  # past the readiness cache
            status, body = await get(port, "/readyz")
            assert status == 503 and "not ready" in body
            assert (await get(port, "/healthz"))[0] == 200  # the proxy itself is fine
            text = (await get(port, "/metrics"))[1]
            assert value(text, "xmpp_front_sessions", state="reconnecting") == 2
            server.start()
            await asyncio.sleep(5.5)
            assert (await get(port, "/readyz"))[0] == 200
            for _ in range(100):  # both sessions restored (each after its own backoff)
                text = (await get(port, "/metrics"))[1]
                if value(text, "xmpp_front_upstream_restores_total") == 2:
                    break
                await asyncio.sleep(0.1)
            assert value(text, "xmpp_front_upstream_restores_total") == 2
            assert value(text, "xmpp_front_upstream_outage_seconds_total") >= 2 * 5.5
            assert value(text, "xmpp_front_sessions", state="reconnecting") == 0
            assert (await get(port, "/nope"))[0] == 404
            b.abort()

        run(scenario(), 60)
    finally:
        proxy.stop()
        server.stop()


def test_counters_move_with_logins_resumes_handshakes_and_stanzas(
        make_proxy: MakeProxy, accounts: MakeAccount) -> None:
    port = free_port()
    proxy = make_proxy(metrics={"listen": f"{LOCALHOST}:{port}"})
    alice, alice_pw = accounts("alice")
    bob, bob_pw = accounts("bob")

    async def scenario() -> None:
        before = (await get(port, "/metrics"))[1]
        assert value(before, "xmpp_front_relay_seconds_count") == 0
        a = await SmPeer.login(proxy.host, proxy.port, alice.split("@")[0], alice_pw, "phone")
        b = await SmPeer.login(proxy.host, proxy.direct_tls_port, bob.split("@")[0], bob_pw,
                               "pc", direct_tls=True)
        for n in range(5):
            a.message(f"{bob}/pc", f"m{n}")
        await a.wait_acked(6)
        await b.wait_bodies(5)
        with pytest.raises(RawAuthError):
            await raw_login(proxy.host, proxy.port, alice.split("@")[0], "wrong",
                            direct_tls=False)
        # A resumption that works and one that does not.
        assert a.sm_id
        a.abort()
        await asyncio.sleep(0.3)
        back = await RawClient.connect(proxy.host, proxy.port, direct_tls=False)
        await back.login_plain(alice.split("@")[0], alice_pw)
        back.send(f"<resume xmlns='urn:xmpp:sm:3' previd='{a.sm_id}' h='{a.handled}'/>")
        assert (await back.read_until("{urn:xmpp:sm:3}resumed", 10)) is not None
        stray = await RawClient.connect(proxy.host, proxy.port, direct_tls=False)
        await stray.login_plain(bob.split("@")[0], bob_pw)
        stray.send("<resume xmlns='urn:xmpp:sm:3' previd='nothing-like-it' h='0'/>")
        assert (await stray.read_until("{urn:xmpp:sm:3}failed", 10)) is not None
        # Handshakes that fail, one per listener kind.
        _, writer = await asyncio.open_connection(proxy.host, proxy.direct_tls_port)
        writer.write(b"GET / HTTP/1.0\r\n\r\n")
        await writer.drain()
        raw = await RawClient.connect(proxy.host, proxy.port, direct_tls=False)
        await raw.open_stream()
        raw.send(f"<starttls xmlns='{NS_TLS}'/>")
        await raw.read_element(5)  # <proceed/>
        raw.send(b"\x16\x03\x01\x00\x05hello, not TLS")
        await raw.expect_closed(10, reply=False)
        failed = proxy.wait_event("tls_handshake_failed", lambda e: e["listener"] == "starttls")
        assert failed["peer"].startswith(f"{LOCALHOST}:") and failed["reason"]
        failed = proxy.wait_event("tls_handshake_failed", lambda e: e["listener"] == "direct_tls")
        assert failed["reason"]
        writer.close()

        text = (await get(port, "/metrics"))[1]
        assert value(text, "xmpp_front_logins_total", result="ok") == 4
        assert value(text, "xmpp_front_logins_total", result="not-authorized") == 1
        assert value(text, "xmpp_front_resumes_total", result="ok") == 1
        assert value(text, "xmpp_front_resumes_total", result="failed") == 1
        for kind, ok in (("starttls", 4), ("direct_tls", 1)):
            assert value(text, "xmpp_front_tls_handshakes_total", listener=kind,
                         result="ok") == ok
            assert value(text, "xmpp_front_tls_handshakes_total", listener=kind,
                         result="failed") == 1
        assert value(text, "xmpp_front_stanzas_total", direction="c2s", kind="message") == 5
        assert value(text, "xmpp_front_stanzas_total", direction="s2c", kind="message") >= 5
        assert value(text, "xmpp_front_stanzas_total", direction="c2s", kind="presence") == 2
        sent = value(text, "xmpp_front_stanza_bytes_total", direction="c2s", kind="message")
        assert 5 * len("<message>m0</message>") < sent < 5 * 1000
        assert value(text, "xmpp_front_stanza_bytes_total", direction="s2c",
                     kind="message") >= sent  # bob got them, stamped by the server
        assert value(text, "xmpp_front_stanza_bytes_total", direction="s2c",
                     kind="other") > 0  # features, acks
        relayed = value(text, "xmpp_front_relay_seconds_count")
        stanzas = sum(value(text, "xmpp_front_stanzas_total", direction=d, kind=k)
                      for d in ("c2s", "s2c") for k in ("message", "presence", "iq"))
        assert relayed == stanzas > 0
        assert value(text, "xmpp_front_relay_seconds_bucket", le="+Inf") == relayed
        assert value(text, "xmpp_front_relay_seconds_bucket", le="1") == relayed  # loopback
        assert 0 < value(text, "xmpp_front_relay_seconds_sum") < relayed
        for client in (back, stray):
            client.abort()
        b.abort()

    run(scenario(), 60)
    proxy.stop()
    # Every event of a session names its session, account and connection; every event
    # of a bound connection names its session.
    events = proxy.events()
    of_sessions = [e for e in events if "session" in e]
    assert {"sm_enabled", "hibernating", "resumed", "session_ended", "ledger", "bound",
            "closed"} <= {e["event"] for e in of_sessions}
    for e in of_sessions:
        assert e.get("conn") and e.get("account"), e
    bound_conns = {e["conn"] for e in events if e["event"] == "bound"}
    for e in events:
        if e.get("conn") in bound_conns and e["event"] == "closed":
            assert e.get("session"), e
