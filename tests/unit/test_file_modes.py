"""What the proxy creates is owner-only: the store and its -wal/-shm files and transcripts
0600, capture folders 0700 (issue 15, "Packaging")."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.config import LogConfig
from proxy.inspection import Inspector
from proxy.store import Store
from proxy.rules_cli import parse_stanza
from proxy.xmpp.stanza import Element


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(autouse=True)
def usual_umask() -> Iterator[None]:
    """The common 022: without the proxy's care, files would come out 0644."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_a_new_store_and_its_wal_and_shm_files_are_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite3"
    store = Store(str(path))
    try:
        store.pending.put("a@localhost", [b"<message/>"], expires_at=1e12)
        assert mode(path) == 0o600
        for suffix in ("-wal", "-shm"):
            side = tmp_path / f"store.sqlite3{suffix}"
            assert side.exists(), suffix
            assert mode(side) == 0o600, suffix
    finally:
        store.close()


def test_an_existing_store_keeps_the_mode_its_owner_gave_it(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite3"
    Store(str(path)).close()
    path.chmod(0o640)
    Store(str(path)).close()
    assert mode(path) == 0o640


class _Log:
    def info(self, *args: object, **kwargs: object) -> None:
        pass


def test_capture_folders_are_0700_and_transcripts_0600(tmp_path: Path) -> None:
    capture = tmp_path / "var" / "captures"
    inspector = Inspector(LogConfig(capture_dir=str(capture)), capture, _Log())
    assert mode(tmp_path / "var") == 0o700 and mode(capture) == 0o700
    transcript = inspector.transcript("alice@localhost", "s1")
    assert transcript is not None
    stanza: Element = parse_stanza("<message to='b@localhost'><body>hi</body></message>")
    inspector.stanza("c2s", stanza, started=0.0, conn="c1", session="s1",
                     account="alice@localhost", forwarded=True, matched=[],
                     transcript=transcript)
    assert transcript.path.exists() and mode(transcript.path) == 0o600
    assert b"[redacted]" in transcript.path.read_bytes()


def test_an_existing_capture_folder_is_left_as_it_is(tmp_path: Path) -> None:
    capture = tmp_path / "captures"
    capture.mkdir(mode=0o750)
    capture.chmod(0o750)
    Inspector(LogConfig(capture_dir=str(capture)), capture, _Log())
    assert mode(capture) == 0o750
