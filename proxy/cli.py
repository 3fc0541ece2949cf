"""Command line: ``xmpp-front run -c FILE``, ``xmpp-front check -c FILE``,
``xmpp-front rules test [PATH...]`` and ``xmpp-front --version``."""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import ssl
import sys
from pathlib import Path
from typing import Any, TextIO, cast

from .config import Config, ConfigError, LogConfig, load_config
from .logsetup import get_logger, setup_logging
from .preflight import Finding, errors, preflight
from .version import package_version

EXIT_INVALID_CONFIG = 2


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


def _run(path: str) -> int:
    config, findings = _load(path, bind_ports=False)  # run binds them for real
    setup_logging(config.log if config is not None else LogConfig(), stream=cast(TextIO, _Stdout()))
    log = get_logger()
    if config is None or errors(findings):
        return _refuse(log, path, errors(findings))
    # The first line an operator reads: what runs, from which file.
    log.info("starting", version=package_version(), config=str(Path(path).resolve()),
             durability=config.durability.mode)
    for warning in findings:
        log.warning(warning.event, key=warning.key, problem=warning.message, config=path)
    from .server import serve  # imported late: `check` needs no network code

    try:
        asyncio.run(serve(config))
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="xmpp-front", description="A modern face for a legacy XMPP server.")
    parser.add_argument("--version", action="version",
                        version=f"xmpp-front {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the proxy")
    run.add_argument("-c", "--config", required=True, help="YAML configuration file")
    check = commands.add_parser(
        "check", help="validate a configuration (files, names, folders, settings) and exit")
    check.add_argument("-c", "--config", required=True, help="YAML configuration file")
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
    return _run(args.config)


if __name__ == "__main__":
    sys.exit(main())
