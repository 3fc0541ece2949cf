"""Several worker processes (``workers: N``): the pure parts. Socket-free.

- ``home_of``: each account has one home worker, a stable hash of its bare JID mod N (not
  Python's ``hash()``, which is salted per process), so every session of an account, its
  resumptions and takeovers meet in one process.
- ``Handoff``: the first message on the local link from the worker that accepted a client's
  connection to the account's home: what the home needs to continue the negotiation from
  the client's SASL ``<auth/>`` as if it had read it itself. The decrypted client bytes
  follow it on the same link, both ways.
- ``merge_metrics``: the supervisor's ``/metrics`` from the workers' own texts.
- ``WorkerPaths``: where a run's per-worker sockets and journal files are.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import Config

HANDOFF_VERSION = 1
HANDOFF_HEADER = struct.Struct(">I")  # the message's length, then that many JSON bytes
MAX_HANDOFF_BYTES = 1 << 21  # the <auth/> is bounded by limits.max_stanza_bytes (64 MiB max)

# Store-wide figures every worker reads from the one shared file: shown once, not summed.
SHARED_GAUGES = frozenset(("xmpp_front_stored_messages", "xmpp_front_pending_outbound"))


def resolve_workers(value: int | str, cpu_count: int | None = None) -> int:
    """``workers`` from the configuration: a number, or ``auto`` (the machine's CPUs)."""
    if value == "auto":
        return max(1, cpu_count if cpu_count is not None else (os.cpu_count() or 1))
    assert isinstance(value, int)
    return value


def home_of(account: str, workers: int) -> int:
    """The worker (0 .. workers-1) that holds every session of ``account`` (a bare JID,
    compared without case: the node and domain as the proxy normalises them)."""
    if workers <= 1:
        return 0
    digest = hashlib.blake2b(account.lower().encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % workers


class BadHandoff(ValueError):
    """The local link's first message is not a handoff this version understands."""


@dataclass(frozen=True)
class Handoff:
    """A client connection handed to its account's home worker, just after its ``<auth/>``."""

    conn: str  # the accepting worker's connection id, so both logs can be joined
    accepted_by: int  # the worker that accepted it (terminates TLS, relays the bytes)
    listener: int  # index into ``listen``: the listener the client connected to
    remote: tuple[str, int] | None  # the client: the socket's peer or the PROXY header's
    local: tuple[str, int] | None  # the address it connected to
    tls: Mapping[str, str | None]  # the TLS facts for logs and metrics (version, cipher)
    header: Mapping[str, str]  # the attributes of the client's current stream header
    auth: str  # the <auth/> element, serialized: the home continues from it
    domain: str = ""  # the served domain the client's header chose ("": the default)
    failures: int = 0  # SASL attempts that failed before it (three end the stream)
    after: str = ""  # complete elements the client sent behind the <auth/>, serialized
    version: int = field(default=HANDOFF_VERSION)

    def encode(self) -> bytes:
        body = json.dumps({
            "version": self.version, "conn": self.conn, "accepted_by": self.accepted_by,
            "listener": self.listener, "remote": self.remote, "local": self.local,
            "tls": dict(self.tls), "header": dict(self.header), "auth": self.auth,
            "domain": self.domain, "failures": self.failures, "after": self.after,
        }, separators=(",", ":")).encode()
        return HANDOFF_HEADER.pack(len(body)) + body

    @staticmethod
    def length(header: bytes) -> int:
        """The body's length from the first HANDOFF_HEADER.size bytes."""
        (size,) = HANDOFF_HEADER.unpack(header)
        if not 0 < size <= MAX_HANDOFF_BYTES:
            raise BadHandoff(f"a handoff of {size} bytes")
        return int(size)

    @staticmethod
    def decode(body: bytes) -> Handoff:
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadHandoff(f"not JSON: {exc}") from exc
        if not isinstance(data, dict) or data.get("version") != HANDOFF_VERSION:
            raise BadHandoff(f"not a version {HANDOFF_VERSION} handoff")
        try:
            return Handoff(
                conn=str(data["conn"]), accepted_by=int(data["accepted_by"]),
                listener=int(data["listener"]), remote=_address(data["remote"]),
                local=_address(data["local"]),
                tls={str(k): (None if v is None else str(v)) for k, v in data["tls"].items()},
                header={str(k): str(v) for k, v in data["header"].items()},
                auth=str(data["auth"]), domain=str(data.get("domain", "")),
                failures=int(data["failures"]),
                after=str(data.get("after", "")))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BadHandoff(f"a field is missing or wrong: {exc!r}") from exc


def _address(value: Any) -> tuple[str, int] | None:
    if value is None:
        return None
    host, port = value
    return str(host), int(port)


@dataclass(frozen=True)
class WorkerPaths:
    """A run's per-worker files, in one private folder beside the store."""

    folder: Path

    @staticmethod
    def beside(store_path: Path | None, base_dir: Path) -> WorkerPaths:
        """``<store name>-workers`` beside the store (beside the configuration file for a
        ":memory:" store)."""
        if store_path is None:
            return WorkerPaths(base_dir / "xmpp-front-workers")
        return WorkerPaths(store_path.parent / f"{store_path.stem}-workers")

    def handoff(self, index: int) -> Path:
        return self.folder / f"w{index}.sock"

    def admin(self, index: int) -> Path:
        return self.folder / f"w{index}.admin"

    def journal(self, index: int) -> Path:
        """The worker's own ledger journal (SQLite): what it holds changes no other."""
        return self.folder / f"w{index}.journal"

    def journals(self) -> list[Path]:
        """Every worker journal in the folder, whatever N was when it was written."""
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.glob("w*.journal") if p.is_file())


def worker_paths(config: Config) -> WorkerPaths:
    """Where the workers of a run with ``config`` keep their sockets and journals."""
    store = config.store.path
    return WorkerPaths.beside(None if store == ":memory:" else config.path(store),
                              config.base_dir)


def merge_metrics(texts: Iterable[str]) -> list[str]:
    """One Prometheus text from the workers': each sample summed across them (counters,
    gauges, histogram buckets and sums alike), except the store-wide gauges every worker
    reads from the same file (``SHARED_GAUGES``), shown once. Comments and the order of
    first appearance are kept."""
    order: list[str] = []
    values: dict[str, float] = {}
    comments: set[str] = set()
    for text in texts:
        for line in text.splitlines():
            if not line:
                continue
            if line.startswith("#"):
                if line not in comments:
                    comments.add(line)
                    order.append(line)
                continue
            key, _, value = line.rpartition(" ")
            try:
                number = float(value)
            except ValueError:
                continue
            if key not in values:
                order.append(key)
                values[key] = number
            elif key.split("{", 1)[0] not in SHARED_GAUGES:
                values[key] += number
    return [line if line.startswith("#") else f"{line} {_number(values[line])}"
            for line in order]


def _number(value: float) -> str:
    return str(int(value)) if value.is_integer() else repr(value)


@dataclass(frozen=True)
class WorkerRole:
    """What a worker process is told by its supervisor."""

    index: int
    count: int
    paths: WorkerPaths
    listen_fds: tuple[int, ...]  # the supervisor's listening sockets, one per listener
    clean_start: bool  # the last run stopped cleanly and this worker did not crash since
    ready_fd: int | None = None  # written to once this worker accepts connections
    # The read end of a pipe whose other end only the supervisor holds: EOF means the
    # supervisor is gone (killed), and the worker stops instead of running on orphaned.
    lifeline_fd: int | None = None

    def home_of(self, account: str) -> int:
        return home_of(account, self.count)
