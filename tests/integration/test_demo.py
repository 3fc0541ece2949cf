"""The README's first command runs examples/demo.py (after installing what is missing): it
must keep working, so the test suite runs it as a new user would and reads what it prints."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.integration.proxyproc import REPO

pytestmark = pytest.mark.integration


def test_the_demo_runs_to_the_end() -> None:
    done = subprocess.run([sys.executable, "examples/demo.py"], cwd=REPO, capture_output=True,
                          text=True, timeout=180)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "demo | done" in out, out[-4000:]
    # Both clients logged in through the proxy and every ledger settled.
    assert out.count(" bound ") >= 2, out[-4000:]
    assert "'held': 0" in out and not re.search(r"'held': [1-9]", out), out[-4000:]
