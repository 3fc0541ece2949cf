"""The processes a benchmark runs: xmpp-front, the fast upstream, the byte relay.

Each is a child in its own process group, started on a free loopback port and stopped by its
PID (SIGTERM, then SIGKILL). Also: RSS and CPU time of a process from /proc.
"""

from __future__ import annotations

import json
import os
import resource
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


def cpu_seconds(pid: int, process: int | None = None) -> float:
    """User + system CPU time used so far by the process (its threads included); with
    ``process``, ``pid`` is one of its threads and only that thread's time counts."""
    where = f"/proc/{process}/task/{pid}/stat" if process is not None else f"/proc/{pid}/stat"
    stat = Path(where).read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _children_cpu() -> float:
    """User + system CPU seconds of every child this process has reaped so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def write_bytes(pid: int) -> int | None:
    """Bytes the process caused to be written to storage (/proc/PID/io), if readable."""
    try:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def family(pid: int) -> list[int]:
    """The processes ``pid`` started (its children, e.g. a supervisor's workers)."""
    out: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return out
    for task in tasks:
        try:
            out += [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


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
        # The last stop: seconds from the signal to the exit, and the CPU seconds the
        # process (and the workers it reaped) used meanwhile; None if not measured.
        self.stop_seconds: float | None = None
        self.stop_cpu: float | None = None
        self.env: dict[str, str] = {}  # added to the environment it starts with
        self.start_timeout = 20.0  # seconds until it must accept connections

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float | None = None) -> Child:
        timeout = self.start_timeout if timeout is None else timeout
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env})
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
                # CPU before the signal, then what the reaped child used in all: the rest
                # is the stop's (a loaded machine stretches its seconds, not its CPU).
                reaped = _children_cpu()
                try:
                    used = sum(cpu_seconds(p) for p in [proc.pid, *family(proc.pid)])
                except OSError:
                    used = None
                began = time.monotonic()
                proc.send_signal(sig)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.killed = True
                    proc.kill()
                    proc.wait(10)
                self.stop_seconds = time.monotonic() - began
                cpu = (_children_cpu() - reaped - used) if used is not None else None
                # A killed supervisor does not reap its workers: their CPU is not counted.
                self.stop_cpu = cpu if cpu is not None and cpu >= 0 else None
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
    are merged into the rest of the configuration. ``stats``: run it as
    ``python -m bench.proxystats`` so that :meth:`journal_stats` can read its journal's
    counters. The store is always a file in ``workdir`` (the journal needs one).
    """

    def __init__(self, workdir: Path, cert: Path, key: Path, upstream: dict[str, Any], *,
                 name: str = "proxy", log_level: str = "warning", stats: bool = False,
                 memtrace: Path | None = None, **overrides: Any) -> None:
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
        self.store_path = Path(self.config["store"]["path"])
        module = ("bench.memtrace" if memtrace is not None
                  else "bench.proxystats" if stats else "proxy")
        super().__init__(name, [sys.executable, "-m", module, "run", "-c",
                                str(self.config_path)], port, workdir)
        self.memtrace = memtrace
        self._memtrace_seq = 0
        if memtrace is not None:
            memtrace.mkdir(parents=True, exist_ok=True)
            self.env["BENCH_MEMTRACE_DIR"] = str(memtrace)
            self.start_timeout = 120.0  # tracemalloc slows the imports down
        self.stats_path = workdir / f"{name}.stats.json" if stats else None
        if self.stats_path is not None:
            self.env["BENCH_STATS_FILE"] = str(self.stats_path)
        self._stats_seq = 0

    def journal_stats(self, timeout: float = 2.0) -> dict[str, Any]:
        """The journal's counters now (SIGUSR1, then the file it writes), with the writer
        thread's CPU seconds, the process's bytes written to disk and the WAL file's size.
        Only for a proxy started with ``stats=True``; ``{}`` if it did not answer."""
        if self.stats_path is None or not self.running:
            return {}
        self._stats_seq += 1
        os.kill(self.pid, signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        stats: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                stats = json.loads(self.stats_path.read_text())
            except (OSError, ValueError):
                stats = {}
            if stats.get("seq", 0) >= self._stats_seq:
                break
            time.sleep(0.002)
        else:
            return {}
        self._stats_seq = stats["seq"]
        cpu = 0.0
        for tid in stats.get("tids") or ():
            if tid is not None:
                try:
                    cpu += cpu_seconds(tid, self.pid)
                except OSError:
                    pass
        out = {"commits": stats["commits"], "rows_written": stats["rows_written"],
               "in_flight": stats.get("in_flight", 0), "journal_thread_cpu": cpu}
        written = write_bytes(self.pid)
        if written is not None:
            out["disk_write_bytes"] = written
        wal = Path(f"{self.store_path}-wal")
        out["wal_bytes"] = wal.stat().st_size if wal.exists() else 0
        return out

    def memory_snapshot(self, timeout: float = 120.0) -> tuple[Path, dict[str, Any]]:
        """A tracemalloc snapshot and the C heap's figures now (SIGUSR2; only for a proxy
        started with ``memtrace``): the snapshot's path and the heap figures."""
        assert self.memtrace is not None
        self._memtrace_seq += 1
        os.kill(self.pid, signal.SIGUSR2)
        heap = self.memtrace / f"heap-{self._memtrace_seq}.json"
        if not wait_until(heap.exists, timeout):
            raise RuntimeError(f"{self.name}: no memory snapshot within {timeout:g} s")
        return self.memtrace / f"snap-{self._memtrace_seq}.pickle", json.loads(heap.read_text())

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
