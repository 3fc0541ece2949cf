"""Fixtures for integration tests against real peers (see tests/peers/)."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.proxyproc import ProxyProcess
from tests.peers.certs import make_cert
from tests.peers.prosody import LegacyProsody

MakeAccount = Callable[..., tuple[str, str]]


@pytest.fixture(scope="session")
def prosody(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LegacyProsody]:
    """The shared legacy server. Do not stop/kill it in a test: use `own_prosody`."""
    server = LegacyProsody(
        tmp_path_factory.mktemp("prosody"), muc=True, allow_registration=True
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def own_prosody(tmp_path: Path) -> Iterator[LegacyProsody]:
    """A private legacy server for tests that stop, kill or restart it (~0.1 s to start)."""
    server = LegacyProsody(tmp_path / "prosody")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(cert, key) for the proxy under test: self-signed, CN/SAN localhost."""
    return make_cert(tmp_path_factory.mktemp("proxy-certs"), "localhost")


@pytest.fixture
def accounts(prosody: LegacyProsody) -> MakeAccount:
    """make_account(prefix="u") -> (bare_jid, password): a fresh user on `prosody`."""

    def make_account(prefix: str = "u") -> tuple[str, str]:
        user = f"{prefix}{secrets.token_hex(5)}"
        password = secrets.token_urlsafe(12)
        return prosody.register(user, password), password

    return make_account


MakeProxy = Callable[..., ProxyProcess]


@pytest.fixture
def make_proxy(tmp_path: Path, prosody: LegacyProsody,
               certs: tuple[Path, Path]) -> Iterator[MakeProxy]:
    """make_proxy(**config_overrides) -> a started xmpp-front in front of `prosody`;
    every proxy made is stopped at the end of the test."""
    started: list[ProxyProcess] = []

    def make(**overrides: Any) -> ProxyProcess:
        proxy = ProxyProcess(tmp_path / f"proxy{len(started)}", prosody, *certs, **overrides)
        started.append(proxy)
        return proxy.start()

    yield make
    for proxy in started:
        proxy.stop()


@pytest.fixture
def proxy(make_proxy: MakeProxy) -> ProxyProcess:
    """xmpp-front with the default configuration in front of the shared `prosody`."""
    return make_proxy()
