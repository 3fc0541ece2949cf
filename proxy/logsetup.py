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


_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "warn": logging.WARNING, "error": logging.ERROR, "exception": logging.ERROR,
           "critical": logging.CRITICAL, "fatal": logging.CRITICAL}


class LevelFilter:
    """The log level in force, as the first processor: a reload sets it, and every logger
    already bound (each session holds its own) goes through this same filter."""

    def __init__(self, level: str) -> None:
        self.level = level
        self.threshold = _LEVELS[level]

    def set(self, level: str) -> None:
        self.level, self.threshold = level, _LEVELS[level]

    def __call__(self, _logger: Any, method: str,
                 event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        if _LEVELS.get(method, logging.INFO) < self.threshold:
            raise structlog.DropEvent
        return event


def setup_logging(config: LogConfig, stream: TextIO | None = None) -> LevelFilter:
    level = LevelFilter(config.level)
    renderer: Any = (structlog.processors.JSONRenderer() if config.format == "json"
                     else structlog.dev.ConsoleRenderer(colors=False))
    structlog.configure(
        processors=[
            level,
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _drop_secrets,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),  # see level
        # One write per event, its newline included: print() writes the text and the newline
        # apart, and with several workers on one unbuffered stdout (PYTHONUNBUFFERED, as in
        # containers) another process's line could land between them (two events on one
        # line, neither parseable).
        logger_factory=structlog.WriteLoggerFactory(stream or sys.stdout),
        cache_logger_on_first_use=False,
    )
    return level


def get_logger(**bound: Any) -> Any:
    return structlog.get_logger("xmpp-front").bind(**bound)
