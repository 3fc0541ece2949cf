"""The admin socket's pure parts: requests, the state a session is shown in, kick targets,
the table, and where the socket is."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from proxy.admin_protocol import (BadRequest, KickRequest, SessionSnapshot, SessionsRequest,
                                  kick_targets, parse_request, session_row, sessions_table,
                                  shown_state, socket_path)
from proxy.config import parse_config
from proxy.xmpp.jid import Jid

BASE = SessionSnapshot(jid="alice@example.org/phone", edge_state="active", upstream_state="up",
                       csi_inactive=False, finishing=False, client_address="127.0.0.1:40000",
                       since=1_700_000_000.0, sm_queue=2, outbox=1)


def test_requests_parse() -> None:
    assert parse_request(b'{"command": "sessions"}\n') == SessionsRequest()
    kick = parse_request(b'{"command": "kick", "jid": "Alice@Example.org/phone"}')
    assert kick == KickRequest(Jid("alice", "example.org", "phone"))


@pytest.mark.parametrize("line,why", [
    (b"sessions", "not a JSON line"),
    (b"[1]", "JSON object"),
    (b'{"command": "reboot"}', "unknown command"),
    (b'{"command": "kick"}', "needs a jid"),
    (b'{"command": "kick", "jid": "a@/x"}', "not a JID"),
    (b'{"command": "kick", "jid": "example.org"}', "not an account"),
    (b"\xff\xfe", "not a JSON line"),
])
def test_bad_requests_say_why(line: bytes, why: str) -> None:
    with pytest.raises(BadRequest, match=why):
        parse_request(line)


@pytest.mark.parametrize("changes,state", [
    ({}, "active"),
    ({"csi_inactive": True}, "inactive"),
    ({"edge_state": "hibernating", "csi_inactive": True}, "hibernating"),
    ({"edge_state": "hibernating", "upstream_state": "down"}, "reconnecting"),
    ({"upstream_state": "down", "csi_inactive": True}, "reconnecting"),
    ({"edge_state": "ended", "finishing": True, "upstream_state": "down"}, "finishing"),
])
def test_the_most_pressing_state_is_shown(changes: dict[str, object], state: str) -> None:
    assert shown_state(replace(BASE, **changes)) == state  # type: ignore[arg-type]


def test_a_row_splits_the_jid_and_keeps_the_depths() -> None:
    row = session_row(BASE)
    assert (row["account"], row["resource"], row["state"], row["client"]) == (
        "alice@example.org", "phone", "active", "127.0.0.1:40000")
    assert (row["sm_queue"], row["outbox"]) == (2, 1)
    json.dumps(row)  # what the socket sends


def test_kick_a_full_jid_ends_that_one_a_bare_jid_every_resource() -> None:
    live = ["alice@example.org/phone", "alice@example.org/pc", "bob@example.org/phone",
            "alicia@example.org/phone"]
    assert kick_targets(Jid.parse("alice@example.org/pc"), live) == ["alice@example.org/pc"]
    assert kick_targets(Jid.parse("alice@example.org"), live) == [
        "alice@example.org/phone", "alice@example.org/pc"]
    assert kick_targets(Jid.parse("alice@example.org/tablet"), live) == []
    assert kick_targets(Jid.parse("carol@example.org"), live) == []


def test_the_table_has_a_line_per_session_in_account_order() -> None:
    rows = [session_row(replace(BASE, jid="bob@example.org/pc", client_address=None,
                                edge_state="hibernating")), session_row(BASE)]
    lines = sessions_table(rows).splitlines()
    assert lines[0].split() == ["account", "resource", "state", "client", "since", "queued"]
    assert lines[1].split() == ["alice@example.org", "phone", "active", "127.0.0.1:40000",
                                "2023-11-14", "22:13:20Z", "2/1"]
    assert lines[2].split()[:4] == ["bob@example.org", "pc", "hibernating", "-"]
    assert sessions_table([]) == "no live sessions"


def test_the_socket_is_beside_the_store_by_default(tmp_path: Path) -> None:
    config = parse_config({"store": {"path": "data/front.sqlite3"}}, tmp_path)
    assert socket_path(config) == tmp_path / "data" / "front-admin" / "admin.sock"
    memory = parse_config({"store": {"path": ":memory:"}}, tmp_path)
    assert socket_path(memory) == tmp_path / "xmpp-front-admin" / "admin.sock"
    chosen = parse_config({"admin": {"socket": "/run/xf/admin.sock"}}, tmp_path)
    assert socket_path(chosen) == Path("/run/xf/admin.sock")
    assert socket_path(parse_config({"admin": {"socket": None}}, tmp_path)) is None


def test_check_names_an_admin_socket_that_cannot_be(tmp_path: Path) -> None:
    from proxy.preflight import check_admin_socket

    def problems(socket: str | None) -> list[str]:
        config = parse_config({"admin": {"socket": socket}}, tmp_path)
        return [str(f) for f in check_admin_socket(config)]

    assert problems("admin/admin.sock") == []  # the folder is made at start
    assert problems(None) == []
    long = problems("x" * 120 + ".sock")
    assert len(long) == 1 and long[0].startswith("admin.socket: ") and "longer" in long[0]
    missing = problems("no/such/admin.sock")
    assert missing == [f"admin.socket: cannot create {tmp_path / 'no' / 'such'}: "
                       f"{tmp_path / 'no'} is not a folder"]
    deep = parse_config({"store": {"path": "d" * 100 + "/store.sqlite3"}}, tmp_path)
    assert [f.key for f in check_admin_socket(deep)] == ["admin.socket"]  # auto, too long
