"""xmpp-front under test: a real `python -m proxy run` process in front of a LegacyProsody."""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

import yaml

from tests.peers.prosody import LegacyProsody
from tests.peers.util import LOCALHOST, free_port

REPO = Path(__file__).resolve().parents[2]
# A listener's "listening" event: JSON, or the console format's "[info     ] listening".
_LISTENING = re.compile(r'"event": "listening"|\]\s+listening\s')


def merge_config(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` laid over it, mappings merged key by key."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_config(out[key], value)
        else:
            out[key] = value
    return out


class ProxyProcess:
    """One proxy process with a STARTTLS and a direct-TLS listener on free loopback ports."""

    def __init__(self, workdir: Path, server: LegacyProsody, cert: Path, key: Path, *,
                 upstream_port: int | None = None, **overrides: Any) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.host = LOCALHOST
        self.port = free_port()
        self.direct_tls_port = free_port()
        self.config: dict[str, Any] = merge_config({
            "listen": [{"host": LOCALHOST, "port": self.port},
                       {"host": LOCALHOST, "port": self.direct_tls_port, "direct_tls": True}],
            "tls": {"cert": str(cert), "key": str(key)},
            "upstream": {"host": LOCALHOST, "port": upstream_port or server.c2s_port,
                         "domain": server.domain, "tls": "starttls", "verify": True,
                         "ca": str(server.cert), "connect_timeout": 5},
            "log": {"format": "json", "level": "debug"},
        }, overrides)
        self.config_path = workdir / "xmpp-front.yaml"
        self._shorten_admin_socket()
        self.config_path.write_text(yaml.safe_dump(self.config))
        self.log_path = workdir / "xmpp-front.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> ProxyProcess:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "proxy", "run", "-c", str(self.config_path)],
                cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        # Wait for its "listening" events rather than probing the ports, which would put
        # a spurious connection in the log.
        deadline = time.monotonic() + timeout
        # The event itself, not "admin_listening" (a supervisor's workers have their own),
        # in either log format (the demo logs for people to read).
        while len(_LISTENING.findall(self.log_path.read_text(errors="replace"))) < len(
                self.config["listen"]):
            if not self.running or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"xmpp-front did not start:\n{self.log_tail()}")
            time.sleep(0.02)
        return self

    def _shorten_admin_socket(self) -> None:
        """The default admin socket sits beside the store, under the test's temporary
        folder; where that is too deep for a Unix socket path (pytest-xdist adds a level),
        the proxy would refuse its configuration. Such a test gets a short folder instead."""
        if "admin" in self.config:
            return
        store = str(self.config.get("store", {}).get("path", "xmpp-front.sqlite3"))
        if store == ":memory:":
            auto = self.workdir / "xmpp-front-admin" / "admin.sock"
        else:
            path = self.workdir / store
            auto = path.parent / f"{path.stem}-admin" / "admin.sock"
        if len(os.fsencode(auto)) <= 100:
            return
        folder = tempfile.mkdtemp(prefix="xf-admin-")
        atexit.register(shutil.rmtree, folder, True)
        self.config["admin"] = {"socket": str(Path(folder) / "admin.sock")}

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        code = self.proc.returncode
        self.proc = None
        return code

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 60) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The structured log so far, optionally only the events called ``name``."""
        return [e for e in self.read_events(self.log_path)
                if name is None or e.get("event") == name]

    @staticmethod
    def read_events(log_path: Path) -> list[dict[str, Any]]:
        """Every JSON event in a proxy's log file (also of a process that is gone)."""
        out = []
        for line in log_path.read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                out.append(event)
        return out

    def wait_event(self, name: str, predicate: Callable[[dict[str, Any]], bool] = lambda e: True,
                   timeout: float = 10.0) -> dict[str, Any]:
        """The first logged event called ``name`` that satisfies ``predicate``, waiting for
        it to be written (the proxy logs some only after closing gracefully)."""
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.events(name) if predicate(e)]
            if found:
                return found[0]
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {name!r} event in the proxy log within {timeout}s")
            time.sleep(0.05)

    def __enter__(self) -> ProxyProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
