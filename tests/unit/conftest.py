"""Fixtures shared by unit tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.peers.certs import make_cert


@pytest.fixture(scope="session")
def tls_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(cert, key): a real self-signed pair (openssl CLI), for configurations that must pass
    ``check``, which loads them."""
    return make_cert(tmp_path_factory.mktemp("unit-certs"))
