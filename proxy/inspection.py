"""Traffic inspection: one structured log event per stanza, and optional per-session XML
transcripts readable as an XML console.

Events carry metadata only (direction, connection, session, account, kind, type, id, from,
to, size,
the rules that matched, the time the stanza spent inside the proxy), never content. The
transcripts do carry content: what ``log.redact`` names is masked there, and SASL never
reaches them (they start after binding).
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lxml import etree

from .config import LogConfig
from .xmpp import codec, ns
from .xmpp import stanza as st
from .xmpp.stanza import Element

REDACTED = "[redacted]"
_BODY = ns.qname(ns.CLIENT, "body")


def redact(el: Element, names: Sequence[str]) -> Element:
    """A copy of ``el`` with the text of the named elements (local names, e.g. ``body``,
    ``subject``; ``body`` also covers message bodies) replaced, at any depth."""
    if not names:
        return el
    wanted = set(names)
    masked = copy.deepcopy(el)
    for node in masked.iter():
        if isinstance(node.tag, str) and etree.QName(node).localname in wanted:
            for child in list(node):
                node.remove(child)
            node.text = REDACTED
    return masked


def make_private_dirs(folder: Path) -> None:
    """``mkdir -p`` where each folder created is owner-only (0700); existing ones are left
    as they are."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            pass  # created meanwhile by someone else


class Transcript:
    """One session's XML console file, bounded in size."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.written = 0
        self.full = False

    def write(self, direction: str, data: bytes, forwarded: bool = True,
              made: bool = False) -> None:
        if self.full:
            return
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        arrow = "client → server" if direction == "c2s" else "server → client"
        fate = ", kept by the proxy" if not forwarded else ", made by the proxy" if made else ""
        entry = f"<!-- {stamp} {direction} ({arrow}{fate}) -->\n".encode() + data + b"\n"
        if self.written + len(entry) > self.max_bytes:
            entry = f"<!-- {stamp} transcript truncated at {self.max_bytes} bytes -->\n".encode()
            self.full = True
        # Owner-only (0600): a transcript holds what the users wrote.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "ab") as f:
            f.write(entry)
        self.written += len(entry)


class Inspector:
    """What the shell calls for every stanza when ``log.stanzas`` or ``log.capture_dir``
    is set; absent otherwise (no per-stanza cost)."""

    def __init__(self, config: LogConfig, capture_dir: Path | None, log: Any) -> None:
        self.events = config.stanzas
        self.redact = list(config.redact)
        self.capture_dir = capture_dir
        self.capture_max_bytes = config.capture_max_bytes
        self.log = log
        if capture_dir is not None:
            make_private_dirs(capture_dir)

    @classmethod
    def from_config(cls, config: LogConfig, capture_dir: Path | None,
                    log: Any) -> Inspector | None:
        if not config.stanzas and capture_dir is None:
            return None
        return cls(config, capture_dir, log)

    def transcript(self, account: str, session_id: str) -> Transcript | None:
        if self.capture_dir is None:
            return None
        safe = "".join(c if c.isalnum() or c in "@.-_" else "_" for c in account)
        return Transcript(self.capture_dir / f"{safe}-{session_id}.xml", self.capture_max_bytes)

    def stanza(self, direction: str, el: Element, *, started: float, conn: str | None,
               session: str, account: str, forwarded: bool, matched: Sequence[str],
               transcript: Transcript | None, origin: str = "peer") -> None:
        """``origin``: ``peer`` for a stanza the client or the server sent, ``proxy`` for
        one the proxy made itself (answers, pushes, bounces)."""
        data = codec.serialize(el)
        if self.events:
            self.log.info(
                "stanza", direction=direction, conn=conn, session=session, account=account,
                kind=st.kind(el), type=el.get("type"), id=el.get("id"),
                **{"from": el.get("from"), "to": el.get("to")}, size=len(data),
                rules=list(matched), forwarded=forwarded, origin=origin,
                proxy_ms=round((time.perf_counter() - started) * 1000, 3))
        if transcript is not None:
            shown = codec.serialize(redact(el, self.redact)) if self.redact else data
            transcript.write(direction, shown, forwarded, made=origin == "proxy")
