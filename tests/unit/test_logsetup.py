"""The log's lines: each event reaches the stream in one write, its newline included. With
several workers on one stdout (unbuffered, as with PYTHONUNBUFFERED in containers) a line
written in two parts can have another process's line land between them: two events on one
line, neither parseable (a worker test's ``accepted`` event went missing that way)."""

from __future__ import annotations

import io
import json

import structlog

from proxy.config import parse_config
from proxy.logsetup import get_logger, setup_logging


class Writes(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def write(self, text: str) -> int:
        self.calls.append(text)
        return super().write(text)


def test_each_event_is_one_write_with_its_newline() -> None:
    kept = structlog.get_config()
    out = Writes()
    try:
        setup_logging(parse_config({"log": {"format": "json", "level": "info"}}).log,
                      stream=out)
        log = get_logger(conn="c1")
        log.info("accepted", worker=1)
        log.warning("auth_ok", account="alice@localhost")
    finally:
        structlog.configure(**kept)
    assert len(out.calls) == 2, out.calls
    assert all(call.endswith("\n") and call.count("\n") == 1 for call in out.calls)
    assert [json.loads(call)["event"] for call in out.calls] == ["accepted", "auth_ok"]
