"""The stream layer under attack, on the wire: STARTTLS injection on both legs, clients that
never read, encodings, a header mid-session, deep nesting and the negotiation timeout.

Each case checks the RFC condition the attacker gets, the proxy's log event, and that a
concurrent session keeps working.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from lxml import etree

from tests.integration.proxyproc import ProxyProcess
from tests.peers.rawclient import (
    NS_SASL,
    NS_SM,
    NS_STREAM,
    NS_TLS,
    RawAuthError,
    RawClient,
    q,
    raw_login,
    stream_error_condition,
)
from tests.peers.util import LOCALHOST, run

pytestmark = pytest.mark.integration

PING = "<ping xmlns='urn:xmpp:ping'/>"
R = b"<r xmlns='urn:xmpp:sm:3'/>"


def user(jid: str) -> str:
    return jid.split("@")[0]


def header(to: str = "localhost", decl: bytes = b"<?xml version='1.0'?>") -> bytes:
    return decl + (f"<stream:stream xmlns='jabber:client' xmlns:stream='{NS_STREAM}' "
                   f"to='{to}' version='1.0' xml:lang='en'>").encode()


def plain_auth(username: str, password: str) -> bytes:
    token = base64.b64encode(f"\0{username}\0{password}".encode()).decode()
    return f"<auth xmlns='{NS_SASL}' mechanism='PLAIN'>{token}</auth>".encode()


def errors_seen(raw: RawClient) -> list[str | None]:
    return [stream_error_condition(e) for e in raw.seen_before_close
            if e.tag == q(NS_STREAM, "error")]


async def ping_time(raw: RawClient, timeout: float = 10.0) -> float:
    started = time.monotonic()
    reply = await raw.iq(PING, to="localhost", timeout=timeout)
    assert reply.get("type") == "result"
    return time.monotonic() - started


@contextlib.asynccontextmanager
async def canary(proxy: ProxyProcess, accounts) -> AsyncIterator[RawClient]:
    """A concurrent, well-behaved session whose pings must keep answering."""
    jid, password = accounts("canary")
    raw = await raw_login(proxy.host, proxy.port, user(jid), password, direct_tls=False,
                          resource="canary")
    try:
        assert await ping_time(raw) < 2.0
        yield raw
        assert await ping_time(raw) < 2.0
    finally:
        raw.abort()


async def read_to_eof(host: str, port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Write ``data`` on a fresh TCP connection and return everything read until EOF."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(data)
        received = b""
        async with asyncio.timeout(timeout):
            with contextlib.suppress(ConnectionError):
                while chunk := await reader.read(65536):
                    received += chunk
        return received
    finally:
        writer.transport.abort()


async def event_soon(proxy: ProxyProcess, name: str, timeout: float = 15.0) -> dict:
    """wait_event without blocking the loop (the test's own clients must keep moving)."""
    return await asyncio.to_thread(proxy.wait_event, name, timeout=timeout)


def proxy_rss(proxy: ProxyProcess) -> int:
    assert proxy.proc is not None
    for line in Path(f"/proc/{proxy.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


# ---------------------------------------------------------------- 1. STARTTLS injection

@pytest.mark.parametrize("injected", ["header-and-auth", "auth-only"])
def test_plaintext_after_starttls_is_refused_not_run_over_tls(proxy, accounts,
                                                              injected: str) -> None:
    """A man in the middle appends a stream header and a PLAIN login to the victim's
    <starttls/>: none of it may be taken as if it had come over TLS."""
    jid, password = accounts("victim")
    tail = (header() if injected == "header-and-auth" else b"") + plain_auth(user(jid),
                                                                               password)

    async def scenario() -> list[str | None]:
        async with canary(proxy, accounts):
            raw = await RawClient.connect(proxy.host, proxy.port, direct_tls=False)
            try:
                await raw.open_stream()
                raw.send(f"<starttls xmlns='{NS_TLS}'/>".encode() + tail)  # one write
                proceed = await raw.read_element(10)
                assert proceed.tag == q(NS_TLS, "proceed")
                assert await raw.expect_closed(10), "the proxy kept the connection"
                assert not any(e.tag == q(NS_SASL, "success") for e in raw.seen_before_close)
                return errors_seen(raw)
            finally:
                raw.abort()

    assert run(scenario(), 40) == ["not-authorized"]
    event = proxy.wait_event("starttls_injection")
    assert event["side"] == "client" and event["bytes"] + event["elements"] > 0
    assert not [e for e in proxy.events("auth_ok") if e.get("account") == jid]
    assert proxy.running


def _listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((LOCALHOST, 0))
    sock.listen(8)
    return sock


async def _read_until(reader: asyncio.StreamReader, marker: bytes, timeout: float) -> bytes:
    data = b""
    async with asyncio.timeout(timeout):
        while marker not in data or not data.rstrip().endswith(b">"):
            chunk = await reader.read(4096)
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
    return data


def test_plaintext_after_proceed_from_the_server_fails_the_login_cleanly(
        tmp_path: Path, prosody, certs, accounts) -> None:
    """A hostile path to the legacy server answers <proceed/> and, in the same write, a
    forged stream offering PLAIN: the proxy must not run SASL over it."""
    jid, password = accounts("alice")
    listener = _listening_socket()
    served: list[bytes] = []

    async def fake_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await _read_until(reader, b"<stream:stream", 10)
            writer.write(b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
                         b"xmlns:stream='http://etherx.jabber.org/streams' from='localhost' "
                         b"id='fake' version='1.0'><stream:features>"
                         b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/>"
                         b"</starttls></stream:features>")
            await _read_until(reader, b"starttls", 10)
            writer.write(b"<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
                         b"<stream:stream xmlns='jabber:client' "
                         b"xmlns:stream='http://etherx.jabber.org/streams' from='localhost' "
                         b"id='forged' version='1.0'><stream:features>"
                         b"<mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>"
                         b"<mechanism>PLAIN</mechanism></mechanisms></stream:features>")
            # Whatever comes next: an <auth/> here would be the proxy falling for it.
            with contextlib.suppress(TimeoutError, ConnectionError):
                async with asyncio.timeout(3):
                    while chunk := await reader.read(4096):
                        served.append(chunk)
        finally:
            writer.transport.abort()

    with ProxyProcess(tmp_path / "proxy", prosody, *certs,
                      upstream_port=listener.getsockname()[1]) as proxy:
        async def scenario() -> str:
            server = await asyncio.start_server(fake_server, sock=listener)
            try:
                raw = await RawClient.connect(proxy.host, proxy.port, direct_tls=False)
                try:
                    with pytest.raises(RawAuthError) as failure:
                        await raw.login_plain(user(jid), password, timeout=15)
                    return failure.value.condition
                finally:
                    raw.abort()
            finally:
                server.close()

        assert run(scenario(), 40) == "temporary-auth-failure"
        failed = proxy.wait_event("auth_failed")
        assert failed["reason"] == "upstream-unavailable"
        assert "starttls_injection" in failed["detail"]
        injection = proxy.wait_event("starttls_injection")
        assert injection["side"] == "upstream"
        assert injection["bytes"] + injection["elements"] > 0
        assert proxy.running
    assert b"auth" not in b"".join(served)


# ---------------------------------------------------------------- 2. clients that never read

FLOOD = 200_000  # <r/> elements, 5.2 MB: the figure


async def _flood(raw: RawClient, count: int, element: bytes = R) -> asyncio.Task[None]:
    async def write() -> None:
        raw.writer.write(element * count)
        with contextlib.suppress(Exception):
            await raw.writer.drain()  # blocks once the proxy stops reading: that is the point
    return asyncio.create_task(write())


@pytest.mark.parametrize("phase", ["before-sasl", "after-bind"])
def test_a_client_that_never_reads_is_held_to_the_soft_limit(proxy, accounts,
                                                            phase: str) -> None:
    jid, password = accounts("flooder")

    async def scenario() -> tuple[int, float]:
        async with canary(proxy, accounts) as good:
            if phase == "before-sasl":
                raw = await RawClient.connect(proxy.host, proxy.port, direct_tls=False)
                await raw.secure()
            else:
                raw = await raw_login(proxy.host, proxy.port, user(jid), password,
                                      direct_tls=False)
                raw.send(f"<enable xmlns='{NS_SM}'/>")
                await raw.read_until(q(NS_SM, "enabled"), 10)
            try:
                base = proxy_rss(proxy)
                # Before SASL each <r/> gets a <failed/>; after bind a second <enable/>
                # does (an <a/> per <r/> is small enough for the kernel's buffers to hide).
                writer = await _flood(raw, FLOOD, R if phase == "before-sasl" else
                                      f"<enable xmlns='{NS_SM}'/>".encode())
                await event_soon(proxy, "output_backpressure")
                worst = 0.0
                peak = base
                for _ in range(6):  # 3 s of a blocked, never-reading client
                    await asyncio.sleep(0.5)
                    peak = max(peak, proxy_rss(proxy))
                    worst = max(worst, await ping_time(good))
                writer.cancel()
                return peak - base, worst
            finally:
                raw.abort()

    growth, worst_ping = run(scenario(), 90)
    # Before the limit the same floods added about 30 MiB (bench/output_flood.py); now the
    # answers wait in the kernel's socket buffers and at most output_soft_bytes of ours.
    assert growth < 16 * 2 ** 20, f"the proxy grew by {growth / 2 ** 20:.1f} MiB"
    assert worst_ping < 1.0, f"a concurrent ping took {worst_ping:.2f} s"
    assert proxy.running


def test_past_the_hard_limit_the_client_is_cut_off_with_policy_violation(
        make_proxy, accounts) -> None:
    # Soft == hard: reading never stops first, so the hard limit is what holds.
    proxy = make_proxy(limits={"output_soft_bytes": 65536, "output_hard_bytes": 65536})
    jid, password = accounts("flooder")

    async def scenario() -> tuple[bool, list[str | None]]:
        async with canary(proxy, accounts):
            raw = await raw_login(proxy.host, proxy.port, user(jid), password,
                                  direct_tls=False)
            try:
                raw.send(f"<enable xmlns='{NS_SM}'/>")
                await raw.read_until(q(NS_SM, "enabled"), 10)
                writer = await _flood(raw, 2 * FLOOD)
                await event_soon(proxy, "output_overflow", 20)
                writer.cancel()
                # Read now: what was queued, then the error, then the end (or a reset).
                closed = await raw.expect_closed(20, reply=False)
                return closed, errors_seen(raw)
            finally:
                raw.abort()

    closed, errors = run(scenario(), 90)
    assert closed
    assert errors in (["policy-violation"], [])  # [] if the reset beat the last bytes
    overflow = proxy.wait_event("output_overflow")
    assert overflow["hard"] == 65536
    assert proxy.running


# ---------------------------------------------------------------- 3. encodings

def test_a_utf_16_stream_gets_unsupported_encoding_in_a_well_formed_reply(proxy) -> None:
    data = header().decode().encode("utf-16")  # with a BOM
    reply = run(read_to_eof(proxy.host, proxy.port, data), 20)
    root = etree.fromstring(reply)
    assert root.tag == q(NS_STREAM, "stream")
    assert [stream_error_condition(e) for e in root] == ["unsupported-encoding"]


def test_a_restart_declaring_iso_8859_1_gets_unsupported_encoding(proxy, accounts) -> None:
    jid, password = accounts("latin")

    async def scenario() -> list[str | None]:
        async with canary(proxy, accounts):
            raw = await RawClient.connect(proxy.host, proxy.port, direct_tls=False)
            try:
                await raw.secure()
                raw.send(plain_auth(user(jid), password))
                assert (await raw.read_element(15)).tag == q(NS_SASL, "success")
                raw._new_parser()
                raw.send(header(decl=b"<?xml version='1.0' encoding='ISO-8859-1'?>")
                         + "<presence><status>caf\u00e9</status></presence>".encode("latin-1"))
                assert await raw.expect_closed(10)
                return errors_seen(raw)
            finally:
                raw.abort()

    assert run(scenario(), 40) == ["unsupported-encoding"]


# Sent by a logged-in client mid-session: (payload, condition).
MID_SESSION = {
    "invalid-utf-8": (b"<message to='localhost'><body>caf\xe9</body></message>",
                      "unsupported-encoding"),
    "utf-16-smuggled": ("<!-- x --><message/>".encode("utf-16-le"), "not-well-formed"),
    "second-stream-header": (header(decl=b""), "unsupported-stanza-type"),
    "depth-129": (b"<message to='localhost'>" + b"<x>" * 128 + b"</x>" * 128 + b"</message>",
                  "policy-violation"),
    "depth-100k": (b"<message>" + b"<x>" * 100_000, "policy-violation"),
}


@pytest.mark.parametrize("case", sorted(MID_SESSION))
def test_mid_session_violations_end_the_session_with_their_error(proxy, accounts,
                                                                case: str) -> None:
    payload, condition = MID_SESSION[case]
    jid, password = accounts("mallory")

    async def scenario() -> list[str | None]:
        async with canary(proxy, accounts):
            raw = await raw_login(proxy.host, proxy.port, user(jid), password,
                                  direct_tls=False)
            try:
                raw.send(payload)
                assert await raw.expect_closed(10), "the proxy did not close the stream"
                return errors_seen(raw)
            finally:
                raw.abort()

    assert run(scenario(), 40) == [condition]
    closed = proxy.wait_event("closed", lambda e: e.get("phase") == "session"
                              and e.get("jid", "").startswith(jid))
    assert condition in closed["reason"]
    assert proxy.running


def test_depth_at_the_limit_is_relayed(proxy, accounts) -> None:
    (alice_jid, alice_pw), (bob_jid, bob_pw) = accounts("alice"), accounts("bob")
    inner = 127  # the message is depth 1, so the deepest <x> is at 128: the limit
    payload = (f"<message to='{bob_jid}/deep' type='chat'><body>deep</body>".encode()
               + b"<x xmlns='urn:example:deep'>" * inner + b"</x>" * inner + b"</message>")

    async def scenario() -> int:
        alice = await raw_login(proxy.host, proxy.port, user(alice_jid), alice_pw,
                                direct_tls=False, resource="a")
        bob = await raw_login(proxy.host, proxy.port, user(bob_jid), bob_pw,
                              direct_tls=False, resource="deep")
        try:
            alice.send(payload)
            msg = await bob.read_until("{jabber:client}message", 10)
            return max(len(list(el.iterancestors())) for el in msg.iter()) + 1
        finally:
            alice.abort()
            bob.abort()

    assert run(scenario(), 40) == 128


# ---------------------------------------------------------------- 5b. negotiation timeout

def test_negotiation_timeout_before_the_header_is_complete_is_well_formed(make_proxy) -> None:
    # (login delays must fit in a negotiation: the preflight checks it)
    proxy = make_proxy(limits={"negotiation_timeout": 1.0}, abuse={"login_delay_max": 0.5,
                                                                 "login_delay": 0.25})
    partial = b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:str"
    reply = run(read_to_eof(proxy.host, proxy.port, partial, timeout=10), 20)
    root = etree.fromstring(reply)  # one complete document, the stream: prefix bound
    assert root.tag == q(NS_STREAM, "stream") and root.get("from") == "localhost"
    assert [stream_error_condition(e) for e in root] == ["connection-timeout"]
