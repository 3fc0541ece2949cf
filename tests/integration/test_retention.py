"""The running proxy keeps its transcript folder within the configured retention."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.integration.test_durability import wait_for
from tests.peers.util import run

pytestmark = pytest.mark.integration


def test_old_transcripts_are_removed_at_start(tmp_path: Path, make_proxy) -> None:
    captures = tmp_path / "captures"
    captures.mkdir(mode=0o700)
    old, recent = captures / "old@localhost-1.xml", captures / "new@localhost-2.xml"
    for path, age_days in ((old, 10), (recent, 1)):
        path.write_text("<!-- a transcript -->\n")
        stamp = time.time() - age_days * 86400
        os.utime(path, (stamp, stamp))
    proxy = make_proxy(log={"format": "json", "level": "debug", "capture_dir": str(captures),
                            "capture_max_age_days": 7})
    run(wait_for(lambda: proxy.events("transcripts_pruned"), 10, "transcripts_pruned"))
    event = proxy.events("transcripts_pruned")[0]
    assert (event["files"], event["kept"]) == (1, 1)
    assert not old.exists() and recent.exists()
