"""Several served domains (issue 15): one proxy in front of one Prosody with two virtual
hosts, ``localhost`` (the default: ``upstream:`` and ``tls:``) and ``beta.test``
(``domains:``, with its own upstream CA and its own certificate toward clients).

The stream header's ``to`` picks the domain's server (the login, the bind, a restore after
an outage); an unknown ``to`` gets ``host-unknown``; the TLS server name (SNI) picks the
certificate on both listener kinds, the default one without SNI or for an unknown name; a
reload with a renewed certificate for beta.test gives new connections its new serial."""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.proxyproc import REPO, ProxyProcess
from tests.peers.certs import make_cert
from tests.peers.prosody import LegacyProsody
from tests.peers.rawclient import (NS_STREAM, RawAuthError, RawClient, q, raw_login,
                                   stream_error_condition)
from tests.peers.smpeer import SmPeer
from tests.peers.util import free_port, run

pytestmark = pytest.mark.integration

BETA = "beta.test"
CAPS = "{http://jabber.org/protocol/caps}c"


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LegacyProsody]:
    server = LegacyProsody(tmp_path_factory.mktemp("prosody-two"), extra_hosts=[BETA])
    server.start()
    try:
        yield server
    finally:
        server.stop()


def account(server: LegacyProsody, prefix: str, host: str | None = None) -> tuple[str, str]:
    user = f"{prefix}{secrets.token_hex(4)}"
    password = secrets.token_urlsafe(12)
    return server.register(user, password, host), password


def domains_config(server: LegacyProsody, cert: Path, key: Path) -> dict[str, Any]:
    return {"domains": [{"domain": BETA,
                         # Prosody's beta.test certificate is its own: verified with it.
                         "upstream": {"ca": str(server.host_certs[BETA][0])},
                         "tls": {"cert": str(cert), "key": str(key)}}]}


@pytest.fixture
def proxy_certs(tmp_path: Path) -> dict[str, tuple[Path, Path]]:
    return {"localhost": make_cert(tmp_path / "default", "localhost"),
            BETA: make_cert(tmp_path / "beta", BETA)}


def start_proxy(tmp_path: Path, server: LegacyProsody, certs: dict[str, tuple[Path, Path]],
                **overrides: Any) -> ProxyProcess:
    proxy = ProxyProcess(tmp_path / "proxy", server, *certs["localhost"],
                         **domains_config(server, *certs[BETA]), **overrides)
    return proxy.start()


def serial_of(path: Path) -> str:
    done = subprocess.run(["openssl", "x509", "-noout", "-serial", "-in", str(path)],
                          capture_output=True, text=True, check=True, timeout=10)
    return done.stdout.strip().removeprefix("serial=").upper()


def der_of(path: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(path.read_text())


async def peer_certificate(port: int, server_name: str | None, *,
                           expect: Path | None = None) -> bytes:
    """The certificate a direct-TLS handshake gets, with this SNI (None: no server name).
    With ``expect``: the handshake verifies against that certificate alone and its name."""
    context = ssl.create_default_context()
    if expect is None:
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    else:
        context.load_verify_locations(cafile=str(expect))
    _, writer = await asyncio.wait_for(asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname=server_name or ""), 10)
    sslobj = writer.get_extra_info("ssl_object")
    der: bytes = sslobj.getpeercert(binary_form=True)
    if expect is not None:
        seen = sslobj.getpeercert()
        assert dict(x[0] for x in seen["subject"])["commonName"] == server_name
        assert seen["serialNumber"] == serial_of(expect)
    writer.close()
    return der


async def starttls_certificate(port: int, to: str) -> bytes:
    """The certificate the STARTTLS listener presents to a client of ``to`` (SNI = to)."""
    client = await RawClient.connect("127.0.0.1", port, direct_tls=False, server_hostname=to)
    try:
        await client.secure(to)
        der: bytes = client.writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        return der
    finally:
        client.abort()


def user(jid: str) -> str:
    return jid.split("@")[0]


def test_two_domains_log_in_at_their_own_server_and_message_each_other(
        tmp_path: Path, two_hosts: LegacyProsody, proxy_certs) -> None:
    alice = account(two_hosts, "alice")
    bob = account(two_hosts, "bob", BETA)
    carol = account(two_hosts, "carol", BETA)
    proxy = start_proxy(tmp_path, two_hosts, proxy_certs)
    try:
        async def scenario() -> None:
            a = await SmPeer.login(proxy.host, proxy.port, user(alice[0]), alice[1], "pc")
            assert a.raw.jid == alice[0] + "/pc"
            # beta.test's first login: its discovery cache is its own, so after alice's
            # bind on localhost it still has no caps hash to offer (none beats a wrong one).
            fresh = await RawClient.connect(proxy.host, proxy.port, direct_tls=False,
                                            server_hostname=BETA)
            features = await fresh.login_plain(user(bob[0]), bob[1], to=BETA)
            assert features.find(CAPS) is None
            again = await raw_login(proxy.host, proxy.port, user(alice[0]), alice[1],
                                    direct_tls=False, resource="again")
            assert again.features is not None and again.features.find(CAPS) is not None
            fresh.abort()
            again.abort()

            b = await SmPeer.login(proxy.host, proxy.port, user(bob[0]), bob[1], "phone",
                                   to=BETA)
            assert b.raw.jid == bob[0] + "/phone"
            c = await SmPeer.login(proxy.host, proxy.direct_tls_port, user(carol[0]),
                                   carol[1], "tablet", to=BETA, direct_tls=True)
            assert c.raw.jid == carol[0] + "/tablet"
            a.message(bob[0] + "/phone", "from localhost")  # Prosody routes between hosts
            b.message(alice[0] + "/pc", "from beta")
            c.message(bob[0] + "/phone", "beta to beta")
            await a.wait_bodies(1)
            await b.wait_bodies(2)
            assert a.bodies == ["from beta"]
            assert sorted(b.bodies) == ["beta to beta", "from localhost"]

            # The SASL check is the chosen domain's server's: alice is no user of beta.test.
            stranger = await RawClient.connect(proxy.host, proxy.port, direct_tls=False,
                                               server_hostname=BETA)
            with pytest.raises(RawAuthError) as refused:
                await stranger.login_plain(user(alice[0]), alice[1], to=BETA)
            assert refused.value.condition == "not-authorized"
            stranger.abort()

            rows = json.loads((await asyncio.to_thread(
                subprocess.run, [sys.executable, "-m", "proxy", "sessions", "-c",
                                 str(proxy.config_path), "--json"], cwd=REPO, text=True,
                capture_output=True, timeout=30)).stdout)
            assert {(r["account"], r["resource"]) for r in rows} == {
                (alice[0], "pc"), (bob[0], "phone"), (carol[0], "tablet")}
            for peer in (a, b, c):
                await peer.close()

        run(scenario(), 90)
        auth_ok = {e["account"] for e in proxy.events("auth_ok")}
        assert {alice[0], bob[0], carol[0]} <= auth_ok
    finally:
        proxy.stop()


def test_sni_chooses_the_certificate_on_both_listeners_and_unknown_to_is_host_unknown(
        tmp_path: Path, two_hosts: LegacyProsody, proxy_certs) -> None:
    proxy = start_proxy(tmp_path, two_hosts, proxy_certs)
    default_cert, beta_cert = proxy_certs["localhost"][0], proxy_certs[BETA][0]
    try:
        async def scenario() -> None:
            port = proxy.direct_tls_port
            assert await peer_certificate(port, BETA, expect=beta_cert) == der_of(beta_cert)
            assert await peer_certificate(port, "localhost", expect=default_cert) == der_of(
                default_cert)
            assert await peer_certificate(port, None) == der_of(default_cert)
            assert await peer_certificate(port, "BETA.test") == der_of(beta_cert)
            assert await peer_certificate(port, "unknown.test") == der_of(default_cert)
            assert await starttls_certificate(proxy.port, BETA) == der_of(beta_cert)
            assert await starttls_certificate(proxy.port, "localhost") == der_of(default_cert)

            # A 'to' the proxy does not serve: RFC 6120 §4.9.3.6.
            client = await RawClient.connect(proxy.host, proxy.port, direct_tls=False)
            client._new_parser()
            client.send(client.stream_header("nowhere.test"))
            error = await client.read_until(q(NS_STREAM, "error"))
            assert stream_error_condition(error) == "host-unknown"
            client.abort()
            # Nor may a restarted stream move to another served domain.
            client = await RawClient.connect(proxy.host, proxy.port, direct_tls=False,
                                             server_hostname=BETA)
            await client.open_stream(BETA)
            await client.starttls()
            client._new_parser()  # a fresh stream after TLS, as open_stream starts one
            client.send(client.stream_header("localhost"))
            error = await client.read_until(q(NS_STREAM, "error"))
            assert stream_error_condition(error) == "host-unknown"
            client.abort()

        run(scenario(), 60)
        unknown = proxy.wait_event("host_unknown")
        assert unknown["to"] == "nowhere.test"
    finally:
        proxy.stop()


def test_sighup_renews_one_domains_certificate_for_new_connections(
        tmp_path: Path, two_hosts: LegacyProsody, proxy_certs) -> None:
    bob = account(two_hosts, "bob", BETA)
    carol = account(two_hosts, "carol", BETA)
    live = tmp_path / "live"
    live.mkdir()
    shutil.copy(proxy_certs[BETA][0], live / "beta.crt")
    shutil.copy(proxy_certs[BETA][1], live / "beta.key")
    renewed_cert, renewed_key = make_cert(tmp_path / "renewed", BETA)
    proxy = start_proxy(tmp_path, two_hosts, {**proxy_certs,
                                              BETA: (live / "beta.crt", live / "beta.key")})
    try:
        async def scenario() -> None:
            port = proxy.direct_tls_port
            assert await peer_certificate(port, BETA) == der_of(proxy_certs[BETA][0])
            b = await SmPeer.login(proxy.host, proxy.port, user(bob[0]), bob[1], "phone",
                                   to=BETA)
            c = await SmPeer.login(proxy.host, proxy.port, user(carol[0]), carol[1], "pc",
                                   to=BETA)
            shutil.copy(renewed_cert, live / "beta.crt")  # the renewal, in place
            shutil.copy(renewed_key, live / "beta.key")
            assert proxy.proc is not None
            proxy.proc.send_signal(signal.SIGHUP)
            reloaded = await asyncio.to_thread(proxy.wait_event, "config_reloaded")
            assert reloaded["domain_certs"] == {BETA: str(live / "beta.crt")}
            assert serial_of(renewed_cert) != serial_of(proxy_certs[BETA][0])
            # The new serial, verified against the renewed certificate alone.
            assert await peer_certificate(port, BETA, expect=renewed_cert) == der_of(
                renewed_cert)
            assert await starttls_certificate(proxy.port, BETA) == der_of(renewed_cert)
            assert await peer_certificate(port, None) == der_of(proxy_certs["localhost"][0])
            b.message(carol[0] + "/pc", "still here")  # live sessions go on
            await c.wait_bodies(1)
            # A broken renewal (the old key with the new certificate) is refused whole.
            shutil.copy(proxy_certs[BETA][1], live / "beta.key")
            proxy.proc.send_signal(signal.SIGHUP)
            refused = await asyncio.to_thread(proxy.wait_event, "config_reload_refused")
            assert any(p.startswith("domains[0].tls.key") for p in refused["problems"]), refused
            assert await peer_certificate(port, BETA) == der_of(renewed_cert)
            b.abort()
            c.abort()

        run(scenario(), 90)
    finally:
        proxy.stop()


def test_a_beta_session_is_restored_at_its_own_server_after_an_outage(
        tmp_path: Path, proxy_certs) -> None:
    server = LegacyProsody(tmp_path / "prosody", extra_hosts=[BETA])
    server.start()
    proxy: ProxyProcess | None = None
    try:
        alice = account(server, "alice")
        bob = account(server, "bob", BETA)
        proxy = start_proxy(tmp_path, server, proxy_certs,
                            reconnect={"first_delay_max": 0.5, "base": 0.2, "cap": 1.0})

        async def scenario() -> None:
            assert proxy is not None
            a = await SmPeer.login(proxy.host, proxy.port, user(alice[0]), alice[1], "pc")
            b = await SmPeer.login(proxy.host, proxy.port, user(bob[0]), bob[1], "phone",
                                   to=BETA)
            await asyncio.to_thread(server.restart)
            deadline = asyncio.get_running_loop().time() + 30
            while {e.get("account") for e in proxy.events("upstream_restored")} < {
                    alice[0], bob[0]}:
                assert asyncio.get_running_loop().time() < deadline, proxy.log_tail()
                await asyncio.sleep(0.1)
            a.message(bob[0] + "/phone", "after the outage")
            await b.wait_bodies(1, timeout=20)
            assert b.bodies == ["after the outage"]
            a.abort()
            b.abort()

        run(scenario(), 90)
    finally:
        if proxy is not None:
            proxy.stop()
        server.stop()


def test_readyz_reports_each_domains_server(tmp_path: Path, two_hosts: LegacyProsody,
                                            proxy_certs) -> None:
    metrics_port, dead = free_port(), free_port()
    config = domains_config(two_hosts, *proxy_certs[BETA])
    config["domains"].append({"domain": "gamma.test", "upstream": {"port": dead}})
    proxy = ProxyProcess(tmp_path / "proxy", two_hosts, *proxy_certs["localhost"],
                         metrics={"listen": f"127.0.0.1:{metrics_port}"}, **config).start()
    try:
        async def readyz() -> tuple[int, str]:
            reader, writer = await asyncio.open_connection("127.0.0.1", metrics_port)
            writer.write(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
            data = await reader.read()
            writer.close()
            head, _, body = data.decode().partition("\r\n\r\n")
            return int(head.split()[1]), body

        status, body = run(readyz(), 20)
        lines = body.splitlines()
        assert status == 503, body
        assert lines[0].startswith("not ready: the legacy server of gamma.test")
        assert f"localhost 127.0.0.1:{two_hosts.c2s_port} ok" in lines
        assert f"{BETA} 127.0.0.1:{two_hosts.c2s_port} ok" in lines
        assert any(line.startswith(f"gamma.test 127.0.0.1:{dead} ") and not
                   line.endswith(" ok") for line in lines)
    finally:
        proxy.stop()


def test_check_names_the_key_of_a_domain_error(tmp_path: Path, two_hosts: LegacyProsody,
                                               proxy_certs) -> None:
    base = ProxyProcess(tmp_path / "proxy", two_hosts, *proxy_certs["localhost"],
                        **domains_config(two_hosts, *proxy_certs[BETA])).config

    def check(config: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        path = tmp_path / "check.yaml"
        path.write_text(yaml.safe_dump(config))
        return subprocess.run([sys.executable, "-m", "proxy", "check", "-c", str(path)],
                              cwd=REPO, text=True, capture_output=True, timeout=30,
                              stdin=subprocess.DEVNULL)

    good = check(base)
    assert good.returncode == 0, good.stdout + good.stderr
    twice = {**base, "domains": [*base["domains"], {"domain": "Beta.Test."}]}
    done = check(twice)
    assert done.returncode == 2 and "domains[1].domain" in done.stdout + done.stderr
    swapped = {**base, "domains": [{"domain": BETA, "tls": {
        "cert": str(proxy_certs[BETA][0]), "key": str(proxy_certs["localhost"][1])}}]}
    done = check(swapped)
    assert done.returncode == 2 and "domains[0].tls.key" in done.stdout + done.stderr
