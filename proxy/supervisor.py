"""``workers: N`` (N > 1): ``xmpp-front run`` as a supervisor of N worker processes.

The supervisor binds the listening sockets once and starts the workers with them inherited:
all of them accept from the same sockets (no SO_REUSEPORT, whose closing listener would
drop the connections queued on it). Each account lives in one worker
(``proxy.workers.home_of``); a worker that accepts a connection of another's account hands
it over after the SASL ``<auth/>`` and relays it (``proxy/net/worker_link.py``).

Before the workers start, the supervisor opens the store and the archive once (migrations
run in one process) and settles every journal an earlier run left (the store's own tables
from a single-process run, every worker's file whatever N was then). It restarts a worker that
dies (that worker settles its own journal as it starts), forwards SIGHUP to every worker,
and on SIGTERM or SIGINT stops them all (each one's own graceful stop) and exits when they
have. ``/metrics`` sums the workers' figures, the admin socket lists every worker's
sessions and a kick reaches the account's home.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sqlite3
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .admin import AdminSocketError, bind_admin_socket
from .admin_protocol import (MAX_REQUEST_BYTES, BadRequest, KickRequest, MetricsRequest,
                             encode, error, parse_request)
from .archive_store import open_archive_connection
from .config import Config, Listener
from .journal import recover
from .metrics import MetricsServer, parse_listen, prometheus
from .net.worker_link import private_folder
from .server import archive_file, upstream_addresses
from .store import Store
from .workers import merge_metrics, worker_paths

READY_TIMEOUT = 60.0  # seconds a worker gets to open its store and start accepting
WORKER_ASK_TIMEOUT = 10.0  # seconds a worker gets to answer an admin or metrics request
RESTART_DELAY_FIRST = 0.5  # after a worker died; doubled while it keeps dying young
RESTART_DELAY_MAX = 30.0
STABLE_AFTER = 30.0  # a worker that ran this long starts the doubling over
STOP_GRACE = 15.0  # beyond shutdown.drain_timeout, before a worker that will not stop is killed
LISTEN_BACKLOG = 1024


def bind_listener(listener: Listener) -> socket.socket:
    """One listening socket the workers inherit and all accept from."""
    info = socket.getaddrinfo(listener.host, listener.port, type=socket.SOCK_STREAM,
                              flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(info[0], socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
        sock.listen(LISTEN_BACKLOG)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    sock.set_inheritable(True)
    return sock


@dataclass
class Worker:
    index: int
    process: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    restarts: int = 0
    delay: float = RESTART_DELAY_FIRST
    crashed: bool = False  # it died since the start: its next start is not a clean one
    lifeline: int | None = None  # our end of the worker's lifeline pipe
    exit_codes: list[int] = field(default_factory=list)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None


class Supervisor:
    def __init__(self, config: Config, source: Path, count: int, log: Any) -> None:
        self.config = config
        self.source = source
        self.count = count
        self.log = log.bind(role="supervisor")
        self.paths = worker_paths(config)
        self.sockets: list[socket.socket] = []
        self.workers = [Worker(i) for i in range(count)]
        self.stopping = False
        self.clean_start = False
        self.metrics: MetricsServer | None = None
        self.admin_path: Path | None = None
        self.admin_server: asyncio.Server | None = None
        self._stop = asyncio.Event()

    # Start ----------------------------------------------------------------------------------

    def prepare_store(self) -> None:
        """Migrations once, in this process; every ledger an earlier run left settled."""
        private_folder(self.paths.folder)
        path = self.config.store.path
        if path == ":memory:":
            self.clean_start = True
            return
        store = Store(str(self.config.path(path)), log=self.log, mark_clean=False)
        try:
            # A store just made is a clean start too (only a run that did not close the
            # store leaves changes its writer may not have committed).
            self.clean_start = not store.unclean
            settle = {"now": time.time(), "domain": self.config.upstream.domain,
                      "stored_ttl": self.config.stream_management.stored_ttl, "log": self.log}
            recover(store, **settle)  # a single-process run's journal
            for journal in self.paths.journals():
                recover(store, journal_path=str(journal), **settle)
        finally:
            store.close()
        if self.config.features.archive != "off":
            # The archive's file too: an older version is rebuilt here, once, not by every
            # worker at the same time (each would wait for the first one's lock).
            archive = archive_file(self.config)
            if archive != ":memory:":
                open_archive_connection(archive, self.log).close()

    def mark_clean_stop(self) -> None:
        path = self.config.store.path
        if path == ":memory:":
            return
        conn = sqlite3.connect(str(self.config.path(path)), isolation_level=None)
        try:
            conn.execute("PRAGMA busy_timeout=5000")
            conn.execute("PRAGMA user_version = 1")
        finally:
            conn.close()

    async def start_worker(self, worker: Worker) -> None:
        read_fd, write_fd = os.pipe()
        life_read, life_write = os.pipe()  # the worker sees EOF when we are gone
        fds = [s.fileno() for s in self.sockets]
        args = [sys.executable, "-m", "proxy", "run", "-c", str(self.source.resolve()),
                "--worker", f"{worker.index}/{self.count}",
                "--listen-fds", ",".join(map(str, fds)), "--ready-fd", str(write_fd),
                "--lifeline-fd", str(life_read)]
        if self.clean_start and not worker.crashed:
            args.append("--clean-start")
        if worker.lifeline is not None:
            os.close(worker.lifeline)  # the previous run's
        worker.lifeline = life_write
        try:
            worker.process = await asyncio.create_subprocess_exec(
                *args, pass_fds=(*fds, write_fd, life_read), env=_same_code_env())
        finally:
            os.close(write_fd)
            os.close(life_read)
        worker.started_at = time.monotonic()
        try:
            await asyncio.wait_for(self._read_ready(read_fd), READY_TIMEOUT)
        finally:
            os.close(read_fd)
        self.log.info("worker_started", worker=worker.index, pid=worker.process.pid,
                      restarts=worker.restarts)

    async def _read_ready(self, fd: int) -> None:
        """The worker writes one byte once it accepts; EOF first means it died."""
        loop = asyncio.get_running_loop()
        got: asyncio.Future[bytes] = loop.create_future()

        def readable() -> None:
            if not got.done():
                got.set_result(os.read(fd, 1))

        loop.add_reader(fd, readable)
        try:
            if not await got:
                raise RuntimeError("the worker exited before it was ready")
        finally:
            loop.remove_reader(fd)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        # From the first moment: a SIGHUP while the workers start must not end us.
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.forward, signal.SIGHUP)
        self.prepare_store()
        for listener in self.config.listen:
            self.sockets.append(bind_listener(listener))
        try:
            await asyncio.gather(*(self.start_worker(w) for w in self.workers))
        except (RuntimeError, TimeoutError) as exc:
            self.log.error("cannot_start", error=f"a worker did not start: {exc}")
            await self._stop_workers()
            return 1
        for listener, sock in zip(self.config.listen, self.sockets, strict=True):
            self.log.info("listening", host=listener.host, port=sock.getsockname()[1],
                          mode="direct_tls" if listener.direct_tls else "starttls",
                          proxy_protocol=listener.proxy_protocol, workers=self.count)
        await self._start_admin()
        if self.config.metrics.listen:
            host, port = parse_listen(self.config.metrics.listen)
            self.metrics = MetricsServer(host, port, gather=self.gather_metrics,
                                         healthy=self.healthy,
                                         upstreams=upstream_addresses(self.config),
                                         log=self.log)
            await self.metrics.start()
        watchers = [asyncio.create_task(self._watch(w)) for w in self.workers]
        await self._stop.wait()
        self.stopping = True
        self.log.info("stopping", workers=self.count)
        for task in watchers:
            task.cancel()
        for sock in self.sockets:  # the listeners close as the workers close theirs
            sock.close()
        if self.admin_server is not None:
            self.admin_server.close()
            if self.admin_path is not None:
                with contextlib.suppress(FileNotFoundError):
                    self.admin_path.unlink()
        clean = await self._stop_workers()
        if self.metrics is not None:
            await self.metrics.stop()
        if clean:
            self.mark_clean_stop()
        self.log.info("stopped", clean=clean)
        return 0

    # Running --------------------------------------------------------------------------------

    async def _watch(self, worker: Worker) -> None:
        """Restart the worker whenever it dies, sooner if it had been up a while."""
        while not self.stopping:
            assert worker.process is not None
            code = await worker.process.wait()
            if self.stopping:
                return
            worker.exit_codes.append(code)
            worker.crashed = True
            lived = time.monotonic() - worker.started_at
            worker.delay = (RESTART_DELAY_FIRST if lived >= STABLE_AFTER
                            else min(worker.delay * 2, RESTART_DELAY_MAX))
            self.log.error("worker_exited", worker=worker.index, code=code,
                           lived=round(lived, 1), restart_in=worker.delay)
            await asyncio.sleep(worker.delay)
            if self.stopping:
                return
            worker.restarts += 1
            try:
                await self.start_worker(worker)
            except (RuntimeError, TimeoutError, OSError) as exc:
                self.log.error("worker_restart_failed", worker=worker.index, error=str(exc))

    def forward(self, sig: signal.Signals) -> None:
        self.log.info("signal_forwarded", signal=sig.name, workers=self.count)
        for worker in self.workers:
            if worker.running:
                assert worker.process is not None
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(sig)

    async def _stop_workers(self) -> bool:
        """Every worker's own graceful stop; True when all of them stopped cleanly."""
        self.stopping = True
        self.forward(signal.SIGTERM)
        limit = self.config.shutdown.drain_timeout + STOP_GRACE
        # One deadline for all: they stop at the same time, so N workers wait `limit` once.
        deadline = asyncio.get_running_loop().time() + limit
        running = [w for w in self.workers if w.process is not None]
        clean = all(not w.crashed for w in self.workers)
        for worker in running:
            assert worker.process is not None
            try:
                code = await asyncio.wait_for(
                    worker.process.wait(),
                    max(0.0, deadline - asyncio.get_running_loop().time()))
            except TimeoutError:
                self.log.error("worker_killed", worker=worker.index,
                               reason=f"not stopped after {limit:g} s")
                with contextlib.suppress(ProcessLookupError):
                    worker.process.kill()
                code = await worker.process.wait()
            clean = clean and code == 0
        return clean

    def healthy(self) -> bool:
        return not self.stopping and all(w.running for w in self.workers)

    # Asking the workers ---------------------------------------------------------------------

    async def ask(self, index: int, request: dict[str, Any]) -> dict[str, Any]:
        """One request on a worker's own admin socket."""
        path = self.paths.admin(index)
        try:
            async with asyncio.timeout(WORKER_ASK_TIMEOUT):
                reader, writer = await asyncio.open_unix_connection(str(path),
                                                                    limit=1 << 24)
                writer.write(encode(request))
                await writer.drain()
                line = await reader.readline()
                writer.close()
            answer = json.loads(line)
        except (OSError, TimeoutError, ValueError) as exc:
            return error(f"worker {index}: {exc or type(exc).__name__}")
        return answer if isinstance(answer, dict) else error(f"worker {index}: no answer")

    async def ask_all(self, request: dict[str, Any]) -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(self.ask(w.index, request) for w in self.workers)))

    async def gather_metrics(self) -> list[str]:
        answers = await self.ask_all({"command": "metrics"})
        lines = merge_metrics(a["metrics"] for a in answers if a.get("ok"))
        lines += prometheus("xmpp_front_workers", "gauge", "worker processes running",
                            [({}, sum(1 for w in self.workers if w.running))])
        lines += prometheus("xmpp_front_worker_restarts_total", "counter",
                            "worker processes started again after they died",
                            [({"worker": str(w.index)}, w.restarts) for w in self.workers])
        return lines

    async def _start_admin(self) -> None:
        from .admin_protocol import socket_path

        path = socket_path(self.config)
        if path is None:
            return
        try:
            sock = bind_admin_socket(path)
        except AdminSocketError as exc:
            self.log.error("admin_socket_failed", error=str(exc))
            return
        self.admin_path = path
        self.admin_server = await asyncio.start_unix_server(self._admin, sock=sock,
                                                            limit=MAX_REQUEST_BYTES)
        self.log.info("admin_listening", path=str(path))

    async def _admin(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                line = await asyncio.wait_for(reader.readline(), WORKER_ASK_TIMEOUT)
                response = await self.answer(line)
            except BadRequest as exc:
                response = error(str(exc))
            except ValueError:
                response = error(f"a request is one line of at most {MAX_REQUEST_BYTES} bytes")
            writer.write(encode(response))
            await asyncio.wait_for(writer.drain(), WORKER_ASK_TIMEOUT)
        except (ConnectionError, TimeoutError, OSError):
            pass
        except Exception:
            self.log.exception("admin_request_failed")
        finally:
            writer.close()

    async def answer(self, line: bytes) -> dict[str, Any]:
        request = parse_request(line)
        if isinstance(request, MetricsRequest):
            return {"ok": True, "metrics": "".join(f"{x}\n" for x in
                                                   await self.gather_metrics())}
        if isinstance(request, KickRequest):
            # Only the account's home has its sessions; the others answer "none".
            answers = await self.ask_all({"command": "kick", "jid": str(request.jid)})
            kicked = [jid for a in answers if a.get("ok") for jid in a.get("kicked", [])]
            if not kicked:
                return error(f"no live session of {request.jid}")
            return {"ok": True, "kicked": kicked,
                    "still_ending": sum(a.get("still_ending", 0) for a in answers
                                        if a.get("ok"))}
        answers = await self.ask_all({"command": "sessions"})
        rows: list[dict[str, Any]] = []
        for index, answer in enumerate(answers):
            if not answer.get("ok"):
                return error(answer.get("error", f"worker {index} did not answer"))
            rows += [{**row, "worker": index} for row in answer.get("sessions", [])]
        return {"ok": True, "sessions": rows}


def _same_code_env() -> dict[str, str]:
    """The workers run the code this supervisor runs, whatever else is on the path."""
    here = str(Path(__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": here + (os.pathsep + path if path else "")}


async def supervise(config: Config, source: Path, count: int, log: Any) -> int:
    return await Supervisor(config, source, count, log).run()
