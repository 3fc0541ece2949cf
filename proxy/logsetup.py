"""structlog set-up: JSON lines or a console rendering, to stdout, filtered by level."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

from .config import LogConfig

# Keys that must never reach the log, whatever a caller passes by mistake.
_SECRET_KEYS = frozenset(("password", "sasl", "payload", "credentials"))


def _drop_secrets(_logger: Any, _name: str,
                  event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in _SECRET_KEYS & event.keys():
        event[key] = "***"
    return event


def setup_logging(config: LogConfig, stream: TextIO | None = None) -> None:
    renderer: Any = (structlog.processors.JSONRenderer() if config.format == "json"
                     else structlog.dev.ConsoleRenderer(colors=False))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _drop_secrets,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            getattr(logging, config.level.upper())),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stdout),
        cache_logger_on_first_use=False,
    )


def get_logger(**bound: Any) -> Any:
    return structlog.get_logger("xmpp-front").bind(**bound)
