"""Command line: ``xmpp-front run -c FILE`` and ``xmpp-front check -c FILE``."""

from __future__ import annotations

import argparse
import asyncio
import sys

from .config import ConfigError, check_files, load_config
from .logsetup import setup_logging
from .loopcheck import upstream_loop_problems

EXIT_INVALID_CONFIG = 2


def _load(path: str):  # type: ignore[no-untyped-def]
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"xmpp-front: invalid configuration: {exc}", file=sys.stderr)
        return None
    problems = check_files(config) + upstream_loop_problems(config)
    if config.rules:
        from .rules_cli import check_rule_files

        missing = [p for p in config.rules if not config.path(p).is_file()]
        problems += [f"rules: no such file: {config.path(p)}" for p in missing]
        if not missing:
            problems += [f"rules: {p}" for p in check_rule_files(
                [config.path(p) for p in config.rules])]
    for problem in problems:
        print(f"xmpp-front: invalid configuration: {problem}", file=sys.stderr)
    return None if problems else config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="xmpp-front", description="A modern face for a legacy XMPP server.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the proxy")
    run.add_argument("-c", "--config", required=True, help="YAML configuration file")
    check = commands.add_parser("check", help="validate a configuration and exit")
    check.add_argument("-c", "--config", required=True, help="YAML configuration file")
    rules = commands.add_parser("rules", help="rule files")
    rules_commands = rules.add_subparsers(dest="rules_command", required=True)
    rules_test = rules_commands.add_parser(
        "test", help="run the test vectors of rule files (default: the shipped packs)")
    rules_test.add_argument("paths", nargs="*", help="rule files")
    args = parser.parse_args(argv)

    if args.command == "rules":
        from .rules_cli import rules_test_main

        return rules_test_main(args.paths)

    config = _load(args.config)
    if config is None:
        return EXIT_INVALID_CONFIG
    if args.command == "check":
        print(f"{args.config}: OK")
        return 0
    setup_logging(config.log)
    from .server import serve  # imported late: `check` needs no network code

    try:
        asyncio.run(serve(config))
    except OSError as exc:  # e.g. the listen port is taken
        print(f"xmpp-front: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
