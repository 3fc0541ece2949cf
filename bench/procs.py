"""The processes a benchmark runs: xmpp-front, the fast upstream, the byte relay.

Each is a child in its own process group, started on a free loopback port and stopped by its
PID (SIGTERM, then SIGKILL). Also: RSS and CPU time of a process from /proc.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from tests.integration.proxyproc import merge_config
from tests.peers.util import LOCALHOST, free_port, wait_port_sync

REPO = Path(__file__).resolve().parents[1]
CLK_TCK = os.sysconf("SC_CLK_TCK")

_live: list[Child] = []


def rss_bytes(pid: int) -> int:
    """Resident set size from /proc/PID/status (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time used so far by the process (its threads included)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class Child:
    """A child process listening on ``port``, in its own process group."""

    def __init__(self, name: str, argv: list[str], port: int, workdir: Path) -> None:
        self.name = name
        self.argv = argv
        self.port = port
        self.host = LOCALHOST
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.killed = False  # it did not stop on SIGTERM within the timeout

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 20.0) -> Child:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        _live.append(self)
        try:
            wait_port_sync(self.host, self.port, timeout, alive=lambda: self.running)
        except (TimeoutError, RuntimeError) as exc:
            self.stop()
            raise RuntimeError(f"{self.name} did not start ({exc}):\n{self.log_tail()}") from exc
        return self

    def stop(self, timeout: float = 8.0, sig: int = signal.SIGTERM) -> int | None:
        """SIGTERM (graceful), SIGKILL after ``timeout``; ``self.killed`` says which."""
        proc = self.proc
        if proc is None:
            return None
        try:
            if proc.poll() is None:
                proc.send_signal(sig)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.killed = True
                    proc.kill()
                    proc.wait(10)
        finally:
            self.proc = None
            if self in _live:
                _live.remove(self)
        return proc.returncode

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def rss(self) -> int:
        return rss_bytes(self.pid)

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def __enter__(self) -> Child:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def stop_all() -> None:
    """Stop every child still running (on the way out, whatever happened)."""
    for child in list(_live):
        child.stop(timeout=5)


def fast_upstream(workdir: Path, *, cert: Path | None = None, key: Path | None = None,
                  domain: str = "localhost") -> Child:
    port = free_port()
    argv = [sys.executable, "-m", "bench.fastupstream", "--port", str(port), "--domain", domain]
    if cert is not None and key is not None:
        argv += ["--cert", str(cert), "--key", str(key)]
    return Child("fastupstream-tls" if cert else "fastupstream", argv, port, workdir)


def byte_relay(workdir: Path, target_port: int, *, cert: Path | None = None,
               key: Path | None = None) -> Child:
    port = free_port()
    argv = [sys.executable, "-m", "bench.byterelay", "--port", str(port),
            "--target-port", str(target_port)]
    if cert is not None and key is not None:
        argv += ["--cert", str(cert), "--key", str(key)]
    return Child("byterelay-tls" if cert else "byterelay", argv, port, workdir)


class Proxy(Child):
    """xmpp-front (``python -m proxy run``) with a STARTTLS listener, log level warning.

    ``upstream``: the ``upstream:`` section (host, port, domain, tls, ...); ``overrides``
    are merged into the rest of the configuration.
    """

    def __init__(self, workdir: Path, cert: Path, key: Path, upstream: dict[str, Any], *,
                 name: str = "proxy", log_level: str = "warning",
                 **overrides: Any) -> None:
        port = free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        self.config: dict[str, Any] = merge_config({
            "listen": [{"host": LOCALHOST, "port": port}],
            "tls": {"cert": str(cert), "key": str(key)},
            "upstream": {"host": LOCALHOST, "domain": "localhost", "connect_timeout": 30,
                         **upstream},
            "log": {"format": "json", "level": log_level},
            "store": {"path": str(workdir / f"{name}.sqlite3")},
            # Every bench client comes from 127.0.0.1: the per-address and total connection
            # limits would cap the capacity and memory cases, not measure the relay.
            "abuse": {"max_connections": 0, "max_connections_per_address": 0},
        }, overrides)
        self.config_path = workdir / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config))
        super().__init__(name, [sys.executable, "-m", "proxy", "run", "-c",
                                str(self.config_path)], port, workdir)

    def events(self, name: str) -> list[str]:
        """Raw JSON log lines of the events called ``name``."""
        marker = f'"event": "{name}"'
        return [line for line in self.log_path.read_text(errors="replace").splitlines()
                if marker in line]


def wait_until(predicate: Any, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True
