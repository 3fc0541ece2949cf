"""The admin socket against a real proxy process, Prosody and real clients (issue 15):
``sessions`` lists who is logged in (a hibernated session too), ``kick`` ends one session
politely (a stream error, what it owed stored for its next login), the others go on; clear
one-line errors when no proxy answers."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from lxml import etree

from tests.integration.proxyproc import REPO, ProxyProcess
from tests.peers.clients import Inbox, connect_client, disconnect
from tests.peers.rawclient import stream_error_condition
from tests.peers.smpeer import SM, SmPeer
from tests.peers.util import run

pytestmark = pytest.mark.integration


class SilentPeer(SmPeer):
    """A client that never answers ``<r/>``: what it was sent stays unacknowledged."""

    def _handle(self, el: etree._Element) -> None:
        if el.tag != f"{{{SM}}}r":
            super()._handle(el)


def front(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], cwd=REPO, text=True,
                          capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)


async def sessions(proxy: ProxyProcess) -> list[dict[str, Any]]:
    done = await asyncio.to_thread(front, "sessions", "-c", str(proxy.config_path), "--json")
    assert done.returncode == 0, done
    rows: list[dict[str, Any]] = json.loads(done.stdout)
    return rows


def by_jid(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {f"{r['account']}/{r['resource']}": r for r in rows}


def admin_socket(proxy: ProxyProcess) -> Path:
    """The default place ("auto": beside the configuration, for a :memory: store), or the
    short folder ProxyProcess names when that would be too deep for a Unix socket."""
    configured = proxy.config.get("admin", {}).get("socket")
    if configured:
        return Path(configured)
    return proxy.workdir / "xmpp-front-admin" / "admin.sock"


def test_sessions_lists_and_kick_ends_one_session_politely(make_proxy, accounts) -> None:
    proxy = make_proxy()
    alice, bob, carol = accounts("alice"), accounts("bob"), accounts("carol")
    path = admin_socket(proxy)
    # Only the proxy's user can connect: the socket 0600 in a folder of its own, 0700.
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_ISSOCK(path.stat().st_mode)
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700

    async def scenario() -> None:
        a = await SilentPeer.login(proxy.host, proxy.port, alice[0].split("@")[0], alice[1],
                                   "phone")
        b = await connect_client(bob[0] + "/pc", bob[1], proxy.host, proxy.port,
                                 direct_tls=False, plugins=("xep_0030", "xep_0198"))
        bob_inbox = Inbox(b)
        c = await SmPeer.login(proxy.host, proxy.port, carol[0].split("@")[0], carol[1],
                               "tablet")
        c.abort()  # the network drops: carol's session hibernates
        await asyncio.to_thread(proxy.wait_event, "hibernating",
                                lambda e: e.get("jid", "").startswith(carol[0]))

        a.raw.send("<inactive xmlns='urn:xmpp:csi:0'/>")  # XEP-0352: a phone in a pocket
        await a.wait_acked(1)  # the proxy answered an <r/> sent after it: it is handled
        b.send_message(mto=alice[0] + "/phone", mbody="owed to alice", mtype="chat")
        await a.wait_bodies(1)  # received, never acknowledged

        rows = by_jid(await sessions(proxy))
        assert set(rows) == {alice[0] + "/phone", bob[0] + "/pc", carol[0] + "/tablet"}
        assert [rows[j]["state"] for j in sorted(rows)] == ["inactive", "active",
                                                            "hibernating"]
        assert rows[alice[0] + "/phone"]["client"].startswith("127.0.0.1:")
        assert rows[alice[0] + "/phone"]["sm_queue"] >= 1  # the message alice never acked
        assert rows[carol[0] + "/tablet"]["client"].startswith("127.0.0.1:")  # the last one
        table = await asyncio.to_thread(front, "sessions", "-c", str(proxy.config_path))
        assert table.returncode == 0 and len(table.stdout.splitlines()) == 4, table
        assert all(acct in table.stdout for acct in (alice[0], bob[0], carol[0]))

        kicked = await asyncio.to_thread(front, "kick", alice[0] + "/phone",
                                         "-c", str(proxy.config_path))
        assert kicked.returncode == 0, kicked
        assert kicked.stdout.splitlines() == [f"kicked {alice[0]}/phone"]
        await a.wait_closed()
        errors = [stream_error_condition(el) for el in a.other]
        assert "policy-violation" in errors, a.other
        event = await asyncio.to_thread(proxy.wait_event, "session_kicked")
        assert event["jid"] == alice[0] + "/phone" and event["by"] == "admin socket"
        ended = await asyncio.to_thread(proxy.wait_event, "session_ended",
                                        lambda e: e.get("jid") == alice[0] + "/phone")
        assert ended["reason"] == "kicked by an administrator"

        # A bare JID ends every session of the account (here the hibernating one).
        kicked = await asyncio.to_thread(front, "kick", carol[0], "--socket", str(path))
        assert kicked.returncode == 0 and carol[0] in kicked.stdout, kicked
        assert set(by_jid(await sessions(proxy))) == {bob[0] + "/pc"}  # bob untouched
        gone = await asyncio.to_thread(front, "kick", alice[0], "-c", str(proxy.config_path))
        assert gone.returncode == 1 and gone.stderr.strip() == (
            f"xmpp-front: no live session of {alice[0]}"), gone

        # What alice was owed was stored: her next login gets it; bob's session goes on.
        a2 = await SmPeer.login(proxy.host, proxy.port, alice[0].split("@")[0], alice[1],
                                "phone")
        await a2.wait_bodies(1)
        assert a2.bodies == ["owed to alice"]
        a2.message(bob[0] + "/pc", "alice is back")
        got = await bob_inbox.get(10)
        assert got["body"] == "alice is back"
        a2.abort()
        await disconnect(b)

    run(scenario(), 90)
    assert proxy.stop() == 0
    assert not path.exists()  # removed on stop
    done = front("sessions", "-c", str(proxy.config_path))
    assert done.returncode == 3 and done.stderr == (
        f"xmpp-front: no admin socket at {path}: is the proxy running?\n"), done


def test_clear_errors_when_no_proxy_answers(tmp_path: Path) -> None:
    config = tmp_path / "front.yaml"
    config.write_text(yaml.safe_dump({"store": {"path": "front.sqlite3"}}))
    path = tmp_path / "front-admin" / "admin.sock"
    path.parent.mkdir()
    left = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    left.bind(str(path))  # what a crashed proxy leaves: a socket nobody listens on
    left.close()
    done = front("sessions", "-c", str(config))
    assert done.returncode == 3 and done.stderr.splitlines() == [
        f"xmpp-front: nothing answers on {path}: the proxy is not running "
        "(the socket is left from an earlier run)"], done
    config.write_text(yaml.safe_dump({"admin": {"socket": None}}))
    done = front("kick", "a@localhost", "-c", str(config))
    assert done.returncode == 3 and done.stderr.splitlines() == [
        f"xmpp-front: the admin socket is off in {config} (admin.socket: null)"], done
    config.write_text(yaml.safe_dump({"admin": {"socket": 7}}))
    done = front("sessions", "-c", str(config))
    assert done.returncode == 2 and done.stderr.startswith(
        "xmpp-front: invalid configuration: admin.socket: "), done


def test_the_socket_answers_bad_requests_with_a_reason(make_proxy, prosody) -> None:
    proxy = make_proxy()
    path = admin_socket(proxy)

    def ask(line: bytes) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(path))
            sock.sendall(line)
            answer: dict[str, Any] = json.loads(sock.makefile("rb").readline())
            return answer

    assert ask(b'{"command": "sessions"}\n') == {"ok": True, "sessions": []}
    assert ask(b"hello\n")["error"].startswith("not a JSON line")
    assert ask(b'{"command": "kick", "jid": "nobody@localhost"}\n') == {
        "ok": False, "error": "no live session of nobody@localhost"}
    assert ask(b"x" * 70000 + b"\n")["ok"] is False
    assert proxy.running
    # A second proxy on the same socket refuses to start, naming the key, exit 2.
    second = ProxyProcess(proxy.workdir / "second", prosody,
                          Path(proxy.config["tls"]["cert"]), Path(proxy.config["tls"]["key"]),
                          admin={"socket": str(path)})
    done = front("run", "-c", str(second.config_path))
    assert done.returncode == 2, done
    assert done.stderr.splitlines() == [
        f"xmpp-front: invalid configuration: admin.socket: {path}: another running proxy "
        "uses this admin socket"], done
    assert ask(b'{"command": "sessions"}\n')["ok"] is True  # the first one's is untouched
    assert os.path.exists(path)

