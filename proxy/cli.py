"""Command line: ``xmpp-front run -c FILE``, ``xmpp-front check -c FILE``,
``xmpp-front sessions -c FILE [--json]``, ``xmpp-front kick JID -c FILE``,
``xmpp-front rules test [PATH...]`` and ``xmpp-front --version``."""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sqlite3
import ssl
import sys
from pathlib import Path
from typing import Any, TextIO, cast

import structlog

from .admin_protocol import encode, sessions_table, socket_path
from .config import Config, ConfigError, LogConfig, load_config
from .logsetup import get_logger, setup_logging
from .preflight import Finding, errors, preflight
from .version import package_version

EXIT_INVALID_CONFIG = 2
EXIT_NOT_REACHED = 3  # the admin socket: no proxy running, or the socket is unusable
ADMIN_TIMEOUT = 15.0  # seconds for the proxy to answer on its admin socket


class _Stdout:
    """Writes to whatever ``sys.stdout`` is at the time (the log must not hold on to a
    stream that was swapped, as a test's capture is)."""

    def write(self, text: str) -> int:
        return sys.stdout.write(text)

    def flush(self) -> None:
        sys.stdout.flush()


def _load(path: str, *, bind_ports: bool) -> tuple[Config | None, list[Finding]]:
    """The configuration (None if it does not load) and every finding about it."""
    try:
        config = load_config(path)
    except ConfigError as exc:
        return None, [Finding.parse(str(exc))]
    return config, preflight(config, bind_ports=bind_ports)


def _check(path: str) -> int:
    _config, findings = _load(path, bind_ports=True)
    for finding in findings:
        kind = "warning" if finding.warning else "invalid configuration"
        print(f"xmpp-front: {kind}: {finding}", file=sys.stderr)
    if errors(findings):
        return EXIT_INVALID_CONFIG
    print(f"{path}: OK")
    return 0


def _refuse(log: Any, path: str, problems: list[Finding]) -> int:
    for problem in problems:
        print(f"xmpp-front: invalid configuration: {problem}", file=sys.stderr)
        log.error(problem.event, key=problem.key, problem=problem.message, config=path)
    return EXIT_INVALID_CONFIG


def _worker_role(args: argparse.Namespace, config: Config) -> Any:
    """The role a supervisor gave this process (``--worker I/N``), or None."""
    if args.worker is None:
        return None
    from .workers import WorkerRole, worker_paths

    index, count = (int(x) for x in args.worker.split("/"))
    return WorkerRole(index=index, count=count, paths=worker_paths(config),
                      listen_fds=tuple(int(fd) for fd in args.listen_fds.split(",")),
                      clean_start=args.clean_start, ready_fd=args.ready_fd,
                      lifeline_fd=args.lifeline_fd)


def _run(path: str, args: argparse.Namespace | None = None) -> int:
    config, findings = _load(path, bind_ports=False)  # run binds them for real
    level = setup_logging(config.log if config is not None else LogConfig(),
                          stream=cast(TextIO, _Stdout()))
    log = get_logger()
    if config is None or errors(findings):
        return _refuse(log, path, errors(findings))
    role = _worker_role(args, config) if args is not None else None
    if role is not None:  # every event of this process names its worker
        structlog.contextvars.bind_contextvars(worker=role.index)
    else:
        from .workers import resolve_workers

        workers = resolve_workers(config.workers)
        # The first line an operator reads: what runs, from which file.
        log.info("starting", version=package_version(), config=str(Path(path).resolve()),
                 durability=config.durability.mode, workers=workers)
        for warning in findings:
            log.warning(warning.event, key=warning.key, problem=warning.message, config=path)
        if workers > 1:
            from .supervisor import supervise

            try:
                return asyncio.run(supervise(config, Path(path), workers, log))
            except OSError as exc:  # e.g. the listen port is taken
                print(f"xmpp-front: cannot start: {exc}", file=sys.stderr)
                log.error("cannot_start", error=str(exc), config=path)
                return 1
    from .admin import AdminSocketError
    from .server import serve  # imported late: `check` needs no network code

    try:
        asyncio.run(serve(config, source=Path(path), log_level=level, worker=role))
    except AdminSocketError as exc:
        return _refuse(log, path, [Finding("admin.socket", str(exc))])
    except ssl.SSLError as exc:  # what the preflight did not foresee, still one line
        return _refuse(log, path, [Finding("tls", f"cannot load: {exc}")])
    except sqlite3.Error as exc:
        return _refuse(log, path, [Finding("store.path", f"{config.path(config.store.path)}: "
                                                         f"{exc}")])
    except OSError as exc:  # e.g. the listen port is taken
        print(f"xmpp-front: cannot start: {exc}", file=sys.stderr)
        log.error("cannot_start", error=str(exc), config=path)
        return 1
    return 0


class AdminUnreachable(Exception):
    """The proxy's admin socket cannot be used; the message says why, in one line."""


def _admin_request(path: Path, request: dict[str, Any]) -> dict[str, Any]:
    """One request on the admin socket, one answer."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(ADMIN_TIMEOUT)
    try:
        try:
            sock.connect(str(path))
        except FileNotFoundError as exc:
            raise AdminUnreachable(f"no admin socket at {path}: is the proxy running?") from exc
        except ConnectionRefusedError as exc:
            raise AdminUnreachable(f"nothing answers on {path}: the proxy is not running "
                                   "(the socket is left from an earlier run)") from exc
        except PermissionError as exc:
            raise AdminUnreachable(f"{path}: permission denied: run this as the proxy's "
                                   "user") from exc
        except OSError as exc:
            raise AdminUnreachable(f"{path}: cannot connect: {exc.strerror or exc}") from exc
        sock.sendall(encode(request))
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    except TimeoutError as exc:
        raise AdminUnreachable(f"{path}: the proxy did not answer within "
                               f"{ADMIN_TIMEOUT:g} s") from exc
    except OSError as exc:
        raise AdminUnreachable(f"{path}: {exc.strerror or exc}") from exc
    finally:
        sock.close()
    try:
        response = json.loads(answer)
    except ValueError as exc:
        raise AdminUnreachable(f"{path}: not an answer from xmpp-front: {answer[:80]!r}") from exc
    if not isinstance(response, dict):
        raise AdminUnreachable(f"{path}: not an answer from xmpp-front")
    return response


def _admin(args: argparse.Namespace, request: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """(exit code, answer): 0 and the answer, or the exit code after one line on stderr."""
    if args.socket:
        path: Path | None = Path(args.socket)
    else:
        try:
            path = socket_path(load_config(args.config))
        except ConfigError as exc:
            print(f"xmpp-front: invalid configuration: {exc}", file=sys.stderr)
            return EXIT_INVALID_CONFIG, {}
    if path is None:
        print(f"xmpp-front: the admin socket is off in {args.config} (admin.socket: null)",
              file=sys.stderr)
        return EXIT_NOT_REACHED, {}
    try:
        response = _admin_request(path, request)
    except AdminUnreachable as exc:
        print(f"xmpp-front: {exc}", file=sys.stderr)
        return EXIT_NOT_REACHED, {}
    if not response.get("ok"):
        print(f"xmpp-front: {response.get('error', 'the proxy refused the request')}",
              file=sys.stderr)
        return 1, response
    return 0, response


def _sessions(args: argparse.Namespace) -> int:
    code, response = _admin(args, {"command": "sessions"})
    if code == 0:
        rows = response.get("sessions", [])
        print(json.dumps(rows, indent=2) if args.json else sessions_table(rows))
    return code


def _kick(args: argparse.Namespace) -> int:
    code, response = _admin(args, {"command": "kick", "jid": args.jid})
    if code == 0:
        for jid in response.get("kicked", []):
            print(f"kicked {jid}")
    return code


def _admin_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", default="xmpp-front.yaml",
                        help="the proxy's YAML configuration file (default: %(default)s); "
                             "it says where the admin socket is")
    parser.add_argument("--socket", help="the admin socket itself, instead of -c")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="xmpp-front", description="A modern face for a legacy XMPP server.")
    parser.add_argument("--version", action="version",
                        version=f"xmpp-front {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the proxy")
    run.add_argument("-c", "--config", required=True, help="YAML configuration file")
    # Given by the supervisor to its workers (workers: N), not by people.
    run.add_argument("--worker", help=argparse.SUPPRESS)
    run.add_argument("--listen-fds", help=argparse.SUPPRESS)
    run.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    run.add_argument("--lifeline-fd", type=int, help=argparse.SUPPRESS)
    run.add_argument("--clean-start", action="store_true", help=argparse.SUPPRESS)
    check = commands.add_parser(
        "check", help="validate a configuration (files, names, folders, settings) and exit")
    check.add_argument("-c", "--config", required=True, help="YAML configuration file")
    sessions = commands.add_parser(
        "sessions", help="list the running proxy's live sessions (over its admin socket)")
    _admin_options(sessions)
    sessions.add_argument("--json", action="store_true", help="as JSON, one object each")
    kick = commands.add_parser(
        "kick", help="end a live session (a full JID) or all of an account's (a bare JID)")
    kick.add_argument("jid", help="user@domain/resource or user@domain")
    _admin_options(kick)
    rules = commands.add_parser("rules", help="rule files")
    rules_commands = rules.add_subparsers(dest="rules_command", required=True)
    rules_test = rules_commands.add_parser(
        "test", help="run the test vectors of rule files (default: the shipped packs)")
    rules_test.add_argument("paths", nargs="*", help="rule files or folders of them")
    args = parser.parse_args(argv)

    if args.command == "rules":
        from .rules_cli import rules_test_main

        return rules_test_main(args.paths)

    if args.command == "check":
        return _check(args.config)
    if args.command == "sessions":
        return _sessions(args)
    if args.command == "kick":
        return _kick(args)
    return _run(args.config, args)


if __name__ == "__main__":
    sys.exit(main())
