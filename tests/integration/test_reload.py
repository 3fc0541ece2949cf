"""SIGHUP with a renewed certificate: a new connection gets the new one, a live session goes
on; a broken pair is refused and the old one stays."""

from __future__ import annotations

import asyncio
import shutil
import signal
import ssl
from pathlib import Path

import pytest

from tests.integration.proxyproc import ProxyProcess
from tests.peers.certs import make_cert
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
            await asyncio.to_thread(proxy.wait_event, "tls_reloaded")
            assert await served_cert(proxy) == der_of(new_cert)
            a.message(bob[0] + "/pc", "still here")  # the live session goes on
            await b.wait_bodies(1)
            # A broken renewal (a key that is not the certificate's) is refused.
            shutil.copy(old_key, live / "key.pem")
            proxy.proc.send_signal(signal.SIGHUP)
            await asyncio.to_thread(proxy.wait_event, "tls_reload_refused")
            assert await served_cert(proxy) == der_of(new_cert)
            a.abort()
            b.abort()

        run(scenario(), 60)
    finally:
        proxy.stop()
