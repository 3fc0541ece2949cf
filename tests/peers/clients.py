"""slixmpp helpers for async integration tests: connect, inbox, disconnect, failed logins.

slixmpp facts these helpers rely on (read from slixmpp 1.17.0's xmlstream.py):
- `connect(host, port)` returns a Future on the *first* connection attempt only; when it
  fails, slixmpp silently reschedules another attempt with backoff (1, 3, 7 ... 300 s)
  forever. Only `cancel_connection_attempt()` ends that loop, so every failure path here
  calls it.
- A dropped connection does not reconnect by itself (only the xep_0199 keepalive, off by
  default, and see-other-host call `reconnect()`).
- On a SASL <failure/>, slixmpp fires `failed_auth` and at once tries the next mechanism
  (e.g. SCRAM-SHA-1 then PLAIN); when none is left it fires `failed_all_auth` and
  disconnects. A server therefore sees several auth attempts for one bad login.
- `connect()` starts a background send-queue task (`_run_out_filters`) that only
  `__del__` cancels; `disconnect()` below cancels it so asyncio.run() ends cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable, Sequence
from typing import Any

import slixmpp
from slixmpp.stanza import Message


class ClientError(RuntimeError):
    """A slixmpp client could not reach session_start."""


class AuthFailed(ClientError):
    """SASL failed; `condition` is the first <failure/> condition (e.g. not-authorized)."""

    def __init__(self, condition: str, text: str = "") -> None:
        super().__init__(f"SASL failure: {condition}" + (f" ({text})" if text else ""))
        self.condition = condition
        self.text = text


def make_client(
    jid: str,
    password: str,
    *,
    direct_tls: bool,
    plugins: Sequence[str] = ("xep_0030", "xep_0199"),
    sasl_mech: str | None = None,
) -> slixmpp.ClientXMPP:
    """A configured but unconnected ClientXMPP (for tests that drive connect() themselves).

    `sasl_mech` pins one SASL mechanism (e.g. "PLAIN"); by default slixmpp picks the
    strongest offered (SCRAM-SHA-1 against Prosody's internal_hashed).
    """
    client = slixmpp.ClientXMPP(jid, password, sasl_mech=sasl_mech)
    for plugin in plugins:
        client.register_plugin(plugin)
    # Self-signed test certificates.
    client.ssl_context.check_hostname = False
    client.ssl_context.verify_mode = ssl.CERT_NONE
    # Given an explicit port, slixmpp would try direct TLS then STARTTLS on it: pick one.
    client.enable_direct_tls = direct_tls
    client.enable_starttls = not direct_tls
    client.enable_plaintext = False
    # No surprise bytes on the wire mid-test (a single space every 300 s by default).
    client.whitespace_keepalive = False
    return client


async def _attempt(client: slixmpp.ClientXMPP, host: str, port: int, timeout: float) -> None:
    """Connect and wait for session_start; raise ClientError/AuthFailed otherwise."""
    loop = asyncio.get_running_loop()
    outcome: asyncio.Future[None] = loop.create_future()
    failures: list[tuple[str, str]] = []
    stream_errors: list[str] = []

    def fail(exc: ClientError) -> None:
        if not outcome.done():
            outcome.set_exception(exc)

    def on_session_start(_: Any) -> None:
        if not outcome.done():
            outcome.set_result(None)

    def on_failed_auth(stanza: Any) -> None:
        # Keep the first condition: slixmpp goes on with other mechanisms after it.
        cond = stanza["condition"] if stanza is not None else ""
        text = stanza["text"] if stanza is not None else ""
        failures.append((str(cond), str(text)))
        fail(AuthFailed(str(cond), str(text)))

    def on_failed_all_auth(_: Any) -> None:
        fail(AuthFailed(*(failures[0] if failures else ("no-acceptable-mechanism", ""))))

    def on_connection_failed(err: Any) -> None:
        fail(ClientError(f"connection to {host}:{port} failed: {err}"))

    def on_stream_error(err: Any) -> None:
        stream_errors.append(f"{err['condition']} {err['text']}".strip())

    def on_disconnected(reason: Any) -> None:
        extra = f"; stream error: {stream_errors}" if stream_errors else ""
        fail(ClientError(f"disconnected from {host}:{port} before session_start: "
                         f"{reason!r}{extra}"))

    handlers: list[tuple[str, Callable[[Any], None]]] = [
        ("session_start", on_session_start),
        ("failed_auth", on_failed_auth),
        ("failed_all_auth", on_failed_all_auth),
        ("connection_failed", on_connection_failed),
        ("stream_error", on_stream_error),
        ("disconnected", on_disconnected),
    ]
    for name, handler in handlers:
        client.add_event_handler(name, handler)
    try:
        client.connect(host, port)
        try:
            await asyncio.wait_for(asyncio.shield(outcome), timeout)
        except TimeoutError:
            raise ClientError(
                f"no session_start from {host}:{port} within {timeout}s "
                f"(auth failures: {failures}, stream errors: {stream_errors})"
            ) from None
    except BaseException:
        outcome.cancel()  # later events (our own teardown's) must not set it
        await _teardown(client, 0.5)
        raise
    finally:
        for name, handler in handlers:
            client.del_event_handler(name, handler)
        if outcome.done() and not outcome.cancelled():
            outcome.exception()  # mark retrieved: no "exception never retrieved" noise


async def connect_client(
    jid: str,
    password: str,
    host: str,
    port: int,
    *,
    direct_tls: bool,
    plugins: Sequence[str] = ("xep_0030", "xep_0199"),
    presence: bool = True,
    sasl_mech: str | None = None,
    timeout: float = 15.0,
) -> slixmpp.ClientXMPP:
    """A logged-in client (session_start reached). Raises ClientError / AuthFailed.

    `presence=True` sends initial presence; without it the server does not route messages
    addressed to the bare JID to this resource (send to `client.boundjid.full` to be safe,
    as presence and a peer's message race on the server).
    """
    client = make_client(jid, password, direct_tls=direct_tls, plugins=plugins,
                         sasl_mech=sasl_mech)
    await _attempt(client, host, port, timeout)
    if presence:
        client.send_presence()
    return client


async def login_fails(
    jid: str,
    password: str,
    host: str,
    port: int,
    *,
    direct_tls: bool,
    sasl_mech: str | None = None,
    timeout: float = 15.0,
) -> str:
    """Try to log in, expecting SASL to fail; returns the first <failure/> condition.

    Raises AssertionError if the login succeeds, ClientError on other failures.
    """
    client = make_client(jid, password, direct_tls=direct_tls, plugins=(),
                         sasl_mech=sasl_mech)
    try:
        await _attempt(client, host, port, timeout)
    except AuthFailed as exc:
        return exc.condition
    await disconnect(client)
    raise AssertionError(f"login as {jid} unexpectedly succeeded")


async def _teardown(client: slixmpp.ClientXMPP, timeout: float) -> None:
    client.cancel_connection_attempt()  # ends slixmpp's hidden reconnect loop
    if client.transport is not None:
        try:
            await asyncio.wait_for(asyncio.shield(client.disconnect(wait=timeout)), timeout + 1)
        except (TimeoutError, ConnectionError, OSError):
            pass
        if client.transport is not None:
            client.abort()
    client.cancel_connection_attempt()
    out_filters = getattr(client, "_run_out_filters", None)
    if out_filters is not None:
        out_filters.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await out_filters


async def disconnect(client: slixmpp.ClientXMPP, timeout: float = 5.0) -> None:
    """Close the stream (</stream:stream>, wait for the peer's), abort after `timeout`."""
    await _teardown(client, timeout)


async def wait_disconnected(client: slixmpp.ClientXMPP, timeout: float = 10.0) -> None:
    """Wait until the connection is gone (server closed it or it dropped)."""
    if client.transport is None:
        return
    await asyncio.wait_for(asyncio.shield(client.disconnected), timeout)


class Inbox:
    """Collects a client's events (default: every received message) into a queue."""

    def __init__(
        self,
        client: slixmpp.ClientXMPP,
        event: str = "message",
        predicate: Callable[[Any], bool] | None = None,
    ) -> None:
        self.client = client
        self.event = event
        self.predicate = predicate
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        client.add_event_handler(event, self._on_event)

    def _on_event(self, stanza: Any) -> None:
        if self.predicate is None or self.predicate(stanza):
            self.queue.put_nowait(stanza)

    async def get(self, timeout: float = 5.0) -> Message:
        """The next collected stanza; TimeoutError if none arrives within `timeout`."""
        try:
            return await asyncio.wait_for(self.queue.get(), timeout)
        except TimeoutError:
            raise TimeoutError(
                f"{self.client.boundjid}: no '{self.event}' within {timeout}s"
            ) from None

    async def expect_none(self, timeout: float = 1.0) -> None:
        """Assert nothing arrives within `timeout` (for 'must not be delivered' checks)."""
        try:
            stanza = await asyncio.wait_for(self.queue.get(), timeout)
        except TimeoutError:
            return
        raise AssertionError(f"{self.client.boundjid}: unexpected {self.event}: {stanza}")

    def drain(self) -> list[Any]:
        """Everything collected so far, without waiting."""
        items = []
        while not self.queue.empty():
            items.append(self.queue.get_nowait())
        return items

    def close(self) -> None:
        self.client.del_event_handler(self.event, self._on_event)
