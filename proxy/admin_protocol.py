"""The admin socket's protocol and views, pure: what a request means, what state a session
is shown in, which sessions a kick ends, how the list is printed. The socket itself is
``proxy/admin.py``; the command line is ``proxy/cli.py``.

One JSON object per line each way: ``{"command": "sessions"}`` or
``{"command": "kick", "jid": "user@example.org[/resource]"}`` in; ``{"ok": true, ...}`` or
``{"ok": false, "error": "..."}`` out.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Config
from .xmpp.jid import InvalidJid, Jid

MAX_REQUEST_BYTES = 65536  # one request line; anything longer is refused
SOCKET_NAME = "admin.sock"

# RFC 6120 §4.9.3.18: a local service policy (here: an administrator's decision) ends the
# stream. Not <reset/> (§4.9.3.20): that asks the client to reconnect at once.
KICK_CONDITION = "policy-violation"
KICK_TEXT = "the session was ended by an administrator"


def socket_path(config: Config) -> Path | None:
    """Where the admin socket is for ``config``, or None when it is off."""
    value = config.admin.socket
    if value is None:
        return None
    if value != "auto":
        return config.path(value)
    store = config.store.path
    if store == ":memory:":
        return config.base_dir / "xmpp-front-admin" / SOCKET_NAME
    store_path = config.path(store)
    return store_path.parent / f"{store_path.stem}-admin" / SOCKET_NAME


@dataclass(frozen=True)
class SessionsRequest:
    pass


@dataclass(frozen=True)
class KickRequest:
    jid: Jid


@dataclass(frozen=True)
class MetricsRequest:
    """The process's /metrics text (a worker's, asked by its supervisor)."""


Request = SessionsRequest | KickRequest | MetricsRequest


class BadRequest(ValueError):
    """A request line the admin socket does not understand; the message says why."""


def parse_request(line: bytes) -> Request:
    try:
        data = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"not a JSON line: {exc}") from exc
    if not isinstance(data, dict):
        raise BadRequest("a request is a JSON object")
    command = data.get("command")
    if command == "sessions":
        return SessionsRequest()
    if command == "metrics":
        return MetricsRequest()
    if command == "kick":
        text = data.get("jid")
        if not isinstance(text, str) or not text:
            raise BadRequest("kick needs a jid")
        try:
            jid = Jid.parse(text)
        except InvalidJid as exc:
            raise BadRequest(f"not a JID: {text!r}: {exc}") from exc
        if not jid.local:
            raise BadRequest(f"not an account's JID: {text!r}")
        return KickRequest(jid)
    raise BadRequest(f"unknown command {command!r} (known: sessions, kick, metrics)")


def encode(response: dict[str, Any]) -> bytes:
    return json.dumps(response, separators=(",", ":")).encode() + b"\n"


def error(message: str) -> dict[str, Any]:
    return {"ok": False, "error": message}


@dataclass(frozen=True)
class SessionSnapshot:
    """What the shell reads off one session for the list."""

    jid: str
    edge_state: str  # the client edge's: active, hibernating, ended
    upstream_state: str  # the server edge's: up, down, gone
    csi_inactive: bool  # the client said <inactive/> (XEP-0352)
    finishing: bool  # ended, the server still owes confirmations
    client_address: str | None  # the connection now, or the last one
    since: float  # wall-clock time the session was bound
    sm_queue: int  # stanzas for the client not yet acknowledged (XEP-0198)
    outbox: int  # client stanzas the server has not yet confirmed


def shown_state(s: SessionSnapshot) -> str:
    """One word per session, the most pressing first: ``finishing`` (ended, the server still
    owes), ``reconnecting`` (the server is away), ``hibernating`` (the client is away),
    ``inactive`` (CSI), ``active``."""
    if s.finishing or s.edge_state == "ended":
        return "finishing"
    if s.upstream_state != "up":
        return "reconnecting"
    if s.edge_state == "hibernating":
        return "hibernating"
    return "inactive" if s.csi_inactive else "active"


def session_row(s: SessionSnapshot) -> dict[str, Any]:
    jid = Jid.parse(s.jid)
    return {"jid": s.jid, "account": str(jid.bare), "resource": jid.resource,
            "state": shown_state(s), "client": s.client_address, "since": round(s.since, 3),
            "sm_queue": s.sm_queue, "outbox": s.outbox}


def kick_targets(target: Jid, live: list[str]) -> list[str]:
    """The live sessions' JIDs a kick of ``target`` ends: a full JID, that one; a bare
    JID, every resource of the account."""
    if not target.is_bare:
        return [j for j in live if Jid.parse(j) == target]
    return [j for j in live if Jid.parse(j).bare == target]


_COLUMNS = ("account", "resource", "state", "client", "since", "queued")


def sessions_table(rows: list[dict[str, Any]]) -> str:
    """The list for a person: one line per session; ``queued`` is the SM queue and the
    outbox (``sm/outbox``); times in UTC."""
    if not rows:
        return "no live sessions"
    lines = [list(_COLUMNS)]
    for row in sorted(rows, key=lambda r: (r["account"], r["resource"])):
        since = datetime.datetime.fromtimestamp(row["since"], datetime.UTC)
        lines.append([row["account"], row["resource"], row["state"], row["client"] or "-",
                      since.strftime("%Y-%m-%d %H:%M:%SZ"),
                      f"{row['sm_queue']}/{row['outbox']}"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(_COLUMNS))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True))
                     .rstrip() for line in lines)
