"""Fixtures for the in-process shell tests (see playbook.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.peers.certs import make_cert


@pytest.fixture(scope="session")
def shell_certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(cert, key) for the proxy's client side: self-signed, CN/SAN localhost."""
    return make_cert(tmp_path_factory.mktemp("shell-certs"), "localhost")
