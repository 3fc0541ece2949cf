"""A real Prosody 0.12 configured as a LEGACY XMPP server, run from a temp dir for tests.

Legacy means: no XEP-0198 (smacks), no CSI, no roster versioning and no subscription
pre-approval (both native in Prosody 0.12; our Lua modules in prosody_plugins/ hide them;
`preapproval=True` keeps Prosody's own), no bandwidth limits, no s2s. Prosody listens on
127.0.0.1 only, on two free ports: `c2s_port` (STARTTLS required) and `direct_tls_port`
(XEP-0368 direct TLS).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Literal, Self

from .certs import make_cert
from .util import LOCALHOST, free_port, wait_port_sync

PLUGIN_DIR = Path(__file__).resolve().parent / "prosody_plugins"

Auth = Literal["internal_hashed", "internal_plain"]
# start() reads Prosody's own "Activated service" info lines: nothing above info.
LogLevel = Literal["debug", "info"]

_INSTALL_HINT = (
    "Prosody is required for the integration tests: apt-get install -y prosody "
    "(.ci/run installs it on a fresh machine)"
)


def _lua_str(value: str | Path) -> str:
    """A Lua string literal (paths from tmp dirs are plain, but quote defensively)."""
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


class ProsodyError(RuntimeError):
    """Prosody could not be started, stopped or driven."""


class LegacyProsody:
    """One Prosody process in `workdir` (config, data, certs, logs all live there)."""

    def __init__(
        self,
        workdir: Path,
        *,
        domain: str = "localhost",
        auth: Auth = "internal_hashed",
        muc: bool = False,
        allow_registration: bool = False,
        preapproval: bool = False,
        disabled_sasl_mechanisms: Sequence[str] = (),
        extra_config: str = "",
        tls_tickets: bool = False,
        smacks: bool = False,
        carbons: bool = False,
        blocklist: bool = False,
        log_level: LogLevel = "info",
        close_timeout: float | None = None,
        mam: bool = False,
        pubsub_component: str | None = None,
        extra_hosts: Sequence[str] = (),
    ) -> None:
        """`pubsub_component`: a pubsub service at that address (a XEP-0357 app server
        stand-in; only server admins, `admins` in `extra_config`, create nodes).
        `disabled_sasl_mechanisms` adds to Prosody's (DIGEST-MD5), e.g. ["SCRAM-SHA-1"]
        to leave PLAIN; `extra_config` is raw Lua appended to the global section.
        `extra_hosts`: more VirtualHosts beside `domain`, each with its own certificate
        (`host_certs[host]`), for a proxy serving several domains."""
        for tool in ("prosody", "prosodyctl"):
            if shutil.which(tool) is None:
                raise ProsodyError(f"`{tool}` not found on PATH. {_INSTALL_HINT}")
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.domain = domain
        self.muc_domain: str | None = f"conference.{domain}" if muc else None
        self.auth = auth
        self.allow_registration = allow_registration
        self.preapproval = preapproval
        self.disabled_sasl_mechanisms = ["DIGEST-MD5", *disabled_sasl_mechanisms]
        self.extra_config = extra_config
        # Prosody turns TLS session tickets off by default; on, clients can resume sessions.
        self.tls_tickets = tls_tickets
        # A less legacy server: XEP-0198 on (the proxy then uses its acks upstream).
        self.smacks = smacks
        # Modern IM modules (XEP-0280 carbons, XEP-0191 blocking): off by default, and then
        # listed in modules_disabled too, so the server is legacy whatever Prosody loads.
        self.carbons = carbons
        self.blocklist = blocklist
        self.mam = mam  # XEP-0313 (mod_mam, its archive in the internal storage)
        self.log_level = log_level
        self.close_timeout = close_timeout
        self.pubsub_component = pubsub_component
        self.host = LOCALHOST
        # Ports are fixed for the object's life so restart() comes back on the same ones.
        self.c2s_port = free_port()
        self.direct_tls_port = free_port()
        while self.direct_tls_port == self.c2s_port:
            self.direct_tls_port = free_port()
        self.data_dir = self.workdir / "data"
        self.data_dir.mkdir(exist_ok=True)
        self.cert_dir = self.workdir / "certs"
        self.cert, self.key = make_cert(self.cert_dir, domain)
        self.extra_hosts = list(extra_hosts)
        self.host_certs = {domain: (self.cert, self.key), **{
            host: make_cert(self.cert_dir, host) for host in self.extra_hosts}}
        if muc:
            make_cert(self.cert_dir, f"conference.{domain}")
        self.config_path = self.workdir / "prosody.cfg.lua"
        self.pidfile = self.workdir / "prosody.pid"
        self._log_path = self.workdir / "prosody.log"
        self._console_path = self.workdir / "prosody.console"
        self._proc: subprocess.Popen[bytes] | None = None
        self._console: IO[bytes] | None = None
        self.config_path.write_text(self._config())

    # -- configuration -------------------------------------------------------------------

    def _config(self) -> str:
        modules = [
            "roster", "saslauth", "tls", "disco", "ping", "private", "vcard",
            "version", "time", "uptime", "posix", "legacy_norosterver",
        ]
        if self.smacks:
            modules.append("smacks")
        if not self.preapproval:
            modules.append("legacy_nopreapproval")
        if self.allow_registration:
            modules.append("register")
        modern = {"carbons": self.carbons, "blocklist": self.blocklist, "mam": self.mam}
        modules.extend(name for name, on in modern.items() if on)
        disabled = "".join(f'"{name}"; ' for name, on in modern.items() if not on)
        lua_modules = "; ".join(_lua_str(m) for m in modules)
        lines = [
            "-- generated by tests/peers/prosody.py: a legacy server for tests",
            "run_as_root = true",
            "daemonize = false",
            f"pidfile = {_lua_str(self.pidfile)}",
            f"data_path = {_lua_str(self.data_dir)}",
            f"plugin_paths = {{ {_lua_str(PLUGIN_DIR)} }}",
            'interfaces = { "127.0.0.1" }',
            'local_interfaces = { "127.0.0.1" }',
            f"c2s_ports = {{ {self.c2s_port} }}",
            f"c2s_direct_tls_ports = {{ {self.direct_tls_port} }}",
            "s2s_ports = { }",
            "http_ports = { }",
            "https_ports = { }",
            "component_ports = { }",
            f"certificates = {_lua_str(self.cert_dir)}",
            f"ssl = {{ certificate = {_lua_str(self.cert)}; key = {_lua_str(self.key)}"
            + ("; options = { no_ticket = false }" if self.tls_tickets else "") + " }",
            "c2s_require_encryption = true",
            f'authentication = "{self.auth}"',
            'storage = "internal"',
            f"allow_registration = {'true' if self.allow_registration else 'false'}",
            f"modules_enabled = {{ {lua_modules} }}",
            # The legacy part: no SM, no CSI, no 10 kB/s throttle, no federation.
            "modules_disabled = { " + ("" if self.smacks else '"smacks"; ') + disabled
            + '"csi_simple"; "csi"; "limits"; "s2s" }',
            (
                f'log = {{ {{ levels = {{ min = "{self.log_level}" }}, to = "file", '
                f"filename = {_lua_str(self._log_path)} }} }}"
            ),
        ]
        lines.append(
            "disable_sasl_mechanisms = { "
            + "; ".join(_lua_str(m) for m in self.disabled_sasl_mechanisms) + " }"
        )
        if self.close_timeout is not None:
            lines.append(f"c2s_close_timeout = {self.close_timeout}")
        if self.mam:  # mod_mam keeps its archive in the internal storage
            lines += ['archive_expires_after = "1w"', "default_archive_policy = true"]
        if self.extra_config:
            lines.append(self.extra_config)
        lines.append(f"VirtualHost {_lua_str(self.domain)}")
        if self.muc_domain:
            lines.append(f"Component {_lua_str(self.muc_domain)} \"muc\"")
        for host in self.extra_hosts:
            cert, key = self.host_certs[host]
            lines.append(f"VirtualHost {_lua_str(host)}")
            lines.append(f"  ssl = {{ certificate = {_lua_str(cert)}; key = {_lua_str(key)} }}")
        if self.pubsub_component:
            lines.append(f"Component {_lua_str(self.pubsub_component)} \"pubsub\"")
        return "\n".join(lines) + "\n"

    # -- state ---------------------------------------------------------------------------

    @property
    def log_path(self) -> Path:
        return self._log_path

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        """Last lines of the Prosody log and its console output (for failure messages)."""
        out: list[str] = []
        for path in (self._console_path, self._log_path):
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {path.name} (last {len(tail)} lines) ---")
                out.extend(tail)
        return "\n".join(out) if out else "(no log output)"

    # -- lifecycle -----------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> None:
        """Start Prosody in the foreground, in its own process group; wait for both ports."""
        if self.running:
            return
        self._close_console()
        log_offset = self._log_path.stat().st_size if self._log_path.exists() else 0
        # Kept open while Prosody runs (it writes to it), closed by _terminate().
        self._console = open(self._console_path, "ab")
        self._proc = subprocess.Popen(
            ["prosody", "--config", str(self.config_path), "-F"],
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=self._console,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: stopped by PID, never by name
        )
        proc = self._proc
        try:
            deadline = time.monotonic() + timeout
            self._wait_activation(proc, log_offset, deadline)
            for port in (self.c2s_port, self.direct_tls_port):
                wait_port_sync(
                    self.host, port, max(0.1, deadline - time.monotonic()),
                    alive=lambda: proc.poll() is None,
                )
        except (TimeoutError, RuntimeError) as exc:
            rc = proc.poll()
            self._terminate(signal.SIGKILL, 5.0)
            raise ProsodyError(
                f"Prosody did not start on {self.host}:{self.c2s_port}/{self.direct_tls_port}"
                f" ({exc}; exit code {rc}).\nconfig: {self.config_path}\n{self.log_tail()}"
            ) from exc

    def _wait_activation(
        self, proc: subprocess.Popen[bytes], log_offset: int, deadline: float
    ) -> None:
        """Wait for Prosody to log that it listens on our ports.

        A port that merely accepts is not enough: if another program holds it, Prosody
        logs an error, listens on "no ports" and keeps running.
        """
        wanted = [
            f"Activated service 'c2s' on [{self.host}]:{self.c2s_port}",
            f"Activated service 'c2s_direct_tls' on [{self.host}]:{self.direct_tls_port}",
        ]
        while True:
            text = ""
            if self._log_path.exists():
                with open(self._log_path, "rb") as log:
                    log.seek(log_offset)
                    text = log.read().decode(errors="replace")
            for failure in ("Failed to open server port", "Error binding encrypted port"):
                if failure in text:
                    raise RuntimeError(f"Prosody could not listen: {failure!r} in its log")
            if all(line in text for line in wanted):
                return
            if proc.poll() is not None:
                raise RuntimeError("Prosody exited during startup")
            if time.monotonic() >= deadline:
                raise TimeoutError("Prosody did not report listening on its ports")
            time.sleep(0.02)

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful stop (SIGTERM): clients get <system-shutdown/>; SIGKILL if it lingers.

        Prosody closes client connections itself right after the stream error; the
        whole stop takes ~1 s with clients connected.

        Prosody 0.12 race: SIGTERM is handled from a Lua hook, so when it lands while
        Prosody is still finishing a write to a client (within a few ms of sending it
        something) that connection's <stream:error/> and </stream:stream> can be lost:
        the client sees a clean EOF only. Tests that assert the stream error should let
        the server go idle first (~0.1 s); code under test must cope with either.
        """
        self._terminate(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """Simulate a crash: SIGKILL, TCP connections just drop."""
        self._terminate(signal.SIGKILL, 5.0)

    def restart(self, timeout: float = 10.0) -> None:
        """Stop (gracefully if still running) and start again on the same data and ports."""
        self.stop(timeout)
        self.start(timeout)

    def _terminate(self, sig: signal.Signals, timeout: float) -> None:
        proc = self._proc
        if proc is None:
            return
        try:
            if proc.poll() is None:
                self._signal_group(proc.pid, sig)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self._signal_group(proc.pid, signal.SIGKILL)
                    proc.wait(5.0)
            # No group-wide kill after the reap: Prosody forks nothing, and a reaped
            # leader's PID (and so the group id) may belong to someone else by then.
        finally:
            self._proc = None
            self._close_console()

    @staticmethod
    def _signal_group(pgid: int, sig: signal.Signals) -> None:
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass

    def _close_console(self) -> None:
        if self._console is not None:
            self._console.close()
            self._console = None

    # -- accounts ------------------------------------------------------------------------

    def _prosodyctl(self, *args: str, timeout: float = 20.0) -> None:
        cmd = ["prosodyctl", "--config", str(self.config_path), *args]
        proc = subprocess.run(
            cmd, check=False, capture_output=True, text=True, timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if proc.returncode != 0:
            shown = " ".join([*cmd[:-1], "***"]) if args[0] == "register" else " ".join(cmd)
            raise ProsodyError(
                f"{shown} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
            )

    def register(self, user: str, password: str, host: str | None = None) -> str:
        """Create an account with prosodyctl (works while Prosody runs) on `host` (default:
        `domain`); returns the bare JID."""
        host = host or self.domain
        self._prosodyctl("register", user, host, password)
        return f"{user}@{host}"

    def unregister(self, user: str) -> None:
        """Delete an account (prosodyctl deluser)."""
        self._prosodyctl("deluser", f"{user}@{self.domain}")

    # -- context manager -----------------------------------------------------------------

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (
            f"LegacyProsody(domain={self.domain!r}, c2s={self.host}:{self.c2s_port}, "
            f"direct_tls={self.direct_tls_port}, pid={self.pid})"
        )
