"""Playbook-style tests of the proxy's asyncio shell, in process.

The real ``proxy.server.Proxy`` runs in the test's own event loop on a free 127.0.0.1 port,
in front of a ScriptedServer (plain TCP upstream); clients are raw XML clients (STARTTLS,
PLAIN, bind, XEP-0198) driven step by step. Only public entry points and the wire are used,
so the cases survive a refactor of the shell's insides.

    @playbook(stream_management={"ack_timeout": 0.3})
    async def test_something(h: Harness) -> None:
        alice = await h.client("alice", sm=True)
        alice.message("bob@localhost", "1")
        await h.server.expect_stanza(kind="message", body="1")
        h.server.push_message(alice.jid, "hi")
        await alice.expect(kind="message", body="hi")

Steps (every wait has a short timeout and fails with what was seen instead; the whole case
is bounded too, ``playbook(timeout=)``):

- harness ``h``: ``await h.client(user, resource=, sm=, max=, auto_ack=)`` logged in and
  bound; ``await h.login(user)`` only authenticated; ``await h.resume(old, h=)`` returns
  the new client and the ``<resumed/>`` or ``<failed/>``; ``await h.confirmed(client)``
  until a barrier covering what it sent was answered; ``await h.restart_proxy()``;
  ``await h.logged(event)`` only for what no peer can see.
- client: ``message()``, ``presence()``, ``iq()``, ``send(raw)``, ``ack()``,
  ``await request_ack()``, ``await expect(kind=, body=, id=, type=, tag=, error=, where=)``,
  ``await expect_message(body)``, ``await expect_stream_error(condition)``,
  ``await expect_closed()``, ``await close()`` (clean), ``cut()`` (network drop);
  ``received``, ``handled``, ``sent``.
- server (``h.server``, see scripted_server.py): ``push()``, ``push_message()``,
  ``await expect_stanza(...)``, ``await expect_bind(resource, after=)``,
  ``await expect_nonza()``, ``await wait_open_connections(n)``, ``messages()``,
  ``bodies()``; faults ``await cut()``, ``await refuse()``, ``await blackhole()``,
  ``await come_back()``; knobs ``answer_pings``, ``sm_acks``, ``bind_as``, ``before_close``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import sqlite3
import sys
import tempfile
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

import structlog
from lxml import etree

from proxy.config import parse_config
from proxy.logsetup import setup_logging
from proxy.server import Proxy
from tests.integration.proxyproc import merge_config
from tests.peers.rawclient import RawClient, StreamClosed
from tests.peers.util import LOCALHOST, free_port

from .scripted_server import ScriptedServer
from .xmlpeer import (NS_CLIENT, NS_SM, NS_STREAM, Changes, Element, criteria, describe,
                      is_ping, kind, matches, q, tostring)

DOMAIN = "localhost"
PASSWORD = "secret"

# Fast timings: an outage is noticed, retried and restored in milliseconds. Cases that
# test a timer lower it themselves. Units as in proxy/config.py (seconds).
FAST: dict[str, Any] = {
    "upstream": {"host": LOCALHOST, "domain": DOMAIN, "tls": "none", "connect_timeout": 0.5,
                 "ping_idle": 5, "ping_timeout": 0.5},
    "reconnect": {"first_delay_max": 0, "base": 0.01, "cap": 0.05, "max_outage": 5},
    "stream_management": {"resume_timeout": 5, "ack_timeout": 5},
    "limits": {"negotiation_timeout": 3},
    "log": {"format": "json", "level": "debug"},
}


class LogLines:
    """Where the proxy's structlog output goes: kept in memory, parsed on demand."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.changes = Changes()

    def write(self, text: str) -> int:
        self.lines.extend(line for line in text.splitlines() if line)
        self.changes.notify()
        return len(text)

    def flush(self) -> None:
        pass

    async def confirmed(self, client: Client) -> None:
        """Until the proxy has read the server's answer to a barrier covering what
        ``client`` sent so far: the server answers the barrier ping, then pushes a marker
        behind it on the same stream; the client getting the marker means the answer was
        read (the proxy reads one stream in order)."""
        await self.server.expect_stanza(kind="iq", pings=True, where=is_ping)
        marker = self.server.push_message(client.jid, "marker", frm="bob@localhost/desk")
        await client.expect(kind="message", id=marker)

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        out = []
        for line in self.lines:
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if name is None or event.get("event") == name:
                    out.append(event)
        return out


# Client -----------------------------------------------------------------------------------


class Client:
    """A logged-in raw XML client with Playbook-style steps.

    Everything it reads goes to ``backlog`` until an ``expect`` takes it, so the order of
    unrelated elements (the proxy's ``<r/>``, say) does not matter. With ``auto_ack`` it
    answers the proxy's ``<r/>`` as it reads them, with ``handled``: the stanzas it received
    since ``<enabled/>`` (carried over by a resumption).
    """

    def __init__(self, raw: RawClient, *, auto_ack: bool = True) -> None:
        self.raw = raw
        self.jid = ""
        self.auto_ack = auto_ack
        self.sm = False  # stream management enabled on this connection
        self.sm_id: str | None = None
        self.sm_max: int | None = None
        self.handled = 0  # stanzas received since <enabled/> (the client's h)
        self.sent = 0  # stanzas sent since <enable/> (what the proxy's h should reach)
        self.acks: list[int] = []  # every <a h/> the proxy sent, in order
        self.received: list[Element] = []  # every stanza received, in order
        self.backlog: list[Element] = []
        self.closed = False  # the stream or the connection ended

    # Sending --------------------------------------------------------------------------------

    def send(self, xml: str) -> None:
        """Raw XML (stanzas are counted for stream management)."""
        wrapper = etree.fromstring(f"<w xmlns='{NS_CLIENT}'>{xml}</w>")
        if self.sm:
            self.sent += sum(kind(el) is not None for el in wrapper)
        self.raw.send(xml)

    def message(self, to: str, body: str, *, id: str | None = None, type: str = "chat",
                extra: str = "") -> str:
        mid = id or self.raw.next_id("m")
        self.send(f"<message to={quoteattr(to)} type='{type}' id='{mid}'>"
                  f"<body>{escape(body)}</body>{extra}</message>")
        return mid

    def presence(self, *, show: str | None = None, to: str | None = None,
                 type: str | None = None) -> None:
        attrs = (f" to={quoteattr(to)}" if to else "") + (f" type='{type}'" if type else "")
        inner = f"<show>{show}</show>" if show else ""
        self.send(f"<presence{attrs}>{inner}</presence>")

    def iq(self, payload: str, *, type: str = "get", to: str | None = None,
           id: str | None = None) -> str:
        iq_id = id or self.raw.next_id("iq")
        to_attr = f" to={quoteattr(to)}" if to else ""
        self.send(f"<iq type='{type}' id='{iq_id}'{to_attr}>{payload}</iq>")
        return iq_id

    def ack(self) -> None:
        """``<a h/>`` with what was handled (as if answering an ``<r/>``)."""
        self.raw.send(f"<a xmlns='{NS_SM}' h='{self.handled}'/>")

    async def request_ack(self, timeout: float = 1.0) -> int:
        """``<r/>``; returns the ``h`` of the proxy's answer."""
        self.backlog = [el for el in self.backlog if el.tag != q(NS_SM, "a")]  # stale ones
        self.raw.send(f"<r xmlns='{NS_SM}'/>")
        answer = await self.expect(tag=q(NS_SM, "a"), timeout=timeout)
        return int(answer.get("h", "-1"))

    async def close(self) -> None:
        """A clean close: ``</stream:stream>``, the proxy's close awaited, TCP closed."""
        self.raw.send("</stream:stream>")
        with contextlib.suppress(Exception):
            await self.raw.drain(1.0)
        await self.expect_closed()

    def cut(self) -> None:
        """The network drops: the connection ends without a stream close."""
        self.closed = True
        self.raw.abort()

    # Reading ------------------------------------------------------------------------------

    def _take(self, el: Element) -> None:
        if el.tag == q(NS_SM, "r") and self.auto_ack:
            self.ack()
            return
        if el.tag == q(NS_SM, "a"):
            self.acks.append(int(el.get("h", "-1")))
        if kind(el) is not None:
            self.received.append(el)
            if self.sm:
                self.handled = (self.handled + 1) % 2 ** 32
        self.backlog.append(el)

    async def _read(self, timeout: float) -> bool:
        """Read one more element into the backlog; False when the stream has ended."""
        if self.closed:
            return False
        try:
            el = await self.raw.read_element(timeout)
        except StreamClosed:
            self.closed = True
            return False
        self._take(el)
        return True

    async def expect(self, *, timeout: float = 1.0, **kw: Any) -> Element:
        """The first element (stanza or nonza) read that matches and was not taken yet.
        Criteria: kind, type, body, id, to, from_, error, child, tag, where."""
        crit = criteria(kw)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for i, el in enumerate(self.backlog):
                if matches(el, **crit):
                    del self.backlog[i]
                    return el
            remaining = deadline - loop.time()
            try:
                if remaining <= 0 or not await self._read(remaining):
                    raise TimeoutError
            except TimeoutError:
                ended = " (its stream ended)" if self.closed else ""
                raise AssertionError(
                    f"client {self.jid or '?'}: no {describe(kw)} within {timeout}s{ended}; "
                    f"unclaimed: {[tostring(e) for e in self.backlog]}") from None

    async def expect_message(self, body: str, timeout: float = 1.0, **kw: Any) -> Element:
        return await self.expect(kind="message", body=body, timeout=timeout, **kw)

    async def expect_stream_error(self, condition: str, timeout: float = 1.0) -> Element:
        return await self.expect(tag=q(NS_STREAM, "error"), error=condition, timeout=timeout)

    async def expect_closed(self, timeout: float = 1.0) -> None:
        """Until the proxy ends the stream or the connection (elements go to the backlog)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while await self._read(max(0.0, deadline - loop.time())):
                pass
        except TimeoutError:
            raise AssertionError(f"client {self.jid}: still open after {timeout}s") from None
        with contextlib.suppress(Exception):
            await self.raw.close(end_stream=False, timeout=0.5)

    # Stream management ----------------------------------------------------------------------

    async def enable(self, *, resume: bool = True, max: int | None = None) -> Element:
        attrs = (" resume='true'" if resume else "") + (f" max='{max}'" if max else "")
        self.raw.send(f"<enable xmlns='{NS_SM}'{attrs}/>")
        self.sm, self.sent, self.handled = True, 0, 0  # counting starts with <enable/>
        enabled = await self.expect(tag=q(NS_SM, "enabled"))
        self.sm_id = enabled.get("id")
        self.sm_max = int(enabled.get("max", "0")) or None
        return enabled


# The harness ------------------------------------------------------------------------------


class Harness:
    """A scripted server, the real proxy in front of it, and the clients a case opens;
    everything is closed on the way out, also after a failure."""

    def __init__(self, cert: Path, key: Path, *, accounts: dict[str, str] | None = None,
                 server_sm: bool = False, **config: Any) -> None:
        self.cert, self.key = cert, key
        self.server = ScriptedServer(accounts or {"alice": PASSWORD, "bob": PASSWORD},
                                     domain=DOMAIN, sm=server_sm)
        self.overrides = config
        self.log = LogLines()
        self.clients: list[Client] = []
        self.proxy: Proxy | None = None
        self.port = 0
        self.workdir = Path(tempfile.mkdtemp(prefix="xf-shell-"))  # the store lives here
        self._logging: dict[str, Any] | None = None

    async def __aenter__(self) -> Harness:
        try:
            await self.server.start()
            await self._start_proxy()
        except BaseException:
            await self._close()
            raise
        return self

    async def _start_proxy(self, port: int | None = None) -> None:
        for _attempt in range(3):  # a free port can be taken between the look and the bind
            self.port = port or free_port()
            data = merge_config(merge_config(FAST, {
                "listen": [{"host": LOCALHOST, "port": self.port}],
                "tls": {"cert": str(self.cert), "key": str(self.key)},
                "upstream": {"port": self.server.port},
                "store": {"path": str(self.workdir / "store.sqlite3")},
            }), self.overrides)
            config = parse_config(data, self.workdir)
            if self._logging is None:
                self._logging = structlog.get_config()  # put back when the case ends
            setup_logging(config.log, stream=self.log)  # type: ignore[arg-type]
            proxy = Proxy(config)
            try:
                await proxy.start()
            except OSError:
                await proxy.stop()
                continue
            self.proxy = proxy
            return
        raise RuntimeError("no free port for the proxy")

    async def restart_proxy(self) -> None:
        """A graceful stop (what SIGTERM does), then a new proxy on the same port and store."""
        assert self.proxy is not None
        proxy, self.proxy = self.proxy, None
        await proxy.stop()
        await self._start_proxy(self.port)

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        await self._close()
        if exc_type is not None:
            # pytest shows a failed test's stdout: the proxy's log and the server's view.
            print("--- proxy log ---", *self.log.lines[-150:], sep="\n", file=sys.stdout)
            print("--- server received ---", self.server.transcript(), sep="\n")

    async def _close(self) -> None:
        for conn in self.server.conns:
            conn.dead = False  # so it answers the proxy's stream closes
        if self.proxy is not None:
            with contextlib.suppress(Exception):
                await self.proxy.stop()
        for client in self.clients:
            client.closed = True
            with contextlib.suppress(Exception):
                client.raw.abort()
        await self.server.close()
        shutil.rmtree(self.workdir, ignore_errors=True)
        if self._logging is not None:
            structlog.configure(**self._logging)

    # Clients --------------------------------------------------------------------------------

    async def connect(self, *, auto_ack: bool = True, port: int | None = None) -> Client:
        """A TCP connection to the proxy, nothing negotiated yet."""
        raw = await RawClient.connect(LOCALHOST, port or self.port, direct_tls=False,
                                      server_hostname=DOMAIN, timeout=1.0)
        client = Client(raw, auto_ack=auto_ack)
        self.clients.append(client)
        return client

    async def login(self, user: str, *, password: str = PASSWORD, auto_ack: bool = True,
                    port: int | None = None) -> Client:
        """STARTTLS and SASL PLAIN done; not bound."""
        client = await self.connect(auto_ack=auto_ack, port=port)
        await client.raw.login_plain(user, password, to=DOMAIN, timeout=2.0)
        return client

    async def client(self, user: str, *, resource: str = "phone", sm: bool = False,
                     resume: bool = True, max: int | None = None, auto_ack: bool = True,
                     port: int | None = None) -> Client:
        """Logged in, bound to ``resource`` and (with ``sm``) stream management enabled."""
        client = await self.login(user, auto_ack=auto_ack, port=port)
        client.jid = await client.raw.bind(resource, timeout=2.0)
        if sm:
            await client.enable(resume=resume, max=max)
        return client

    async def resume(self, old: Client, *, h: int | None = None,
                     auto_ack: bool = True) -> tuple[Client, Element]:
        """A new connection that sends ``<resume previd h/>`` for ``old``'s session (``h``:
        what ``old`` handled, unless given). Returns it and the ``<resumed/>`` or
        ``<failed/>``. After ``<resumed/>`` it counts on from ``h``."""
        user = old.jid.split("@", 1)[0]
        client = await self.login(user, auto_ack=auto_ack)
        handled = old.handled if h is None else h
        client.raw.send(f"<resume xmlns='{NS_SM}' previd='{old.sm_id}' h='{handled}'/>")
        answer = await client.expect(where=lambda el: el.tag in (q(NS_SM, "resumed"),
                                                                 q(NS_SM, "failed")))
        if answer.tag == q(NS_SM, "resumed"):
            client.jid, client.sm, client.sm_id = old.jid, True, old.sm_id
            client.handled, client.sent = handled, int(answer.get("h", "0"))
        return client, answer

    async def confirmed(self, client: Client) -> None:
        """Until the proxy has read the server's answer to a barrier covering what
        ``client`` sent so far: the server answers the barrier ping, then pushes a marker
        behind it on the same stream; the client getting the marker means the answer was
        read (the proxy reads one stream in order)."""
        await self.server.expect_stanza(kind="iq", pings=True, where=is_ping)
        marker = self.server.push_message(client.jid, "marker", frm="bob@localhost/desk")
        await client.expect(kind="message", id=marker)

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The proxy's log events so far (for diagnostics and messages)."""
        return self.log.events(name)

    async def logged(self, name: str, timeout: float = 1.0) -> dict[str, Any]:
        """The first log event called ``name``, waiting for it. Only for what the wire
        cannot show (a timer that fired while no peer was connected)."""
        found: list[dict[str, Any]] = await self.log.changes.until(
            lambda: self.log.events(name) or None, timeout, f"log event {name!r}")
        return found[0]


Case = Callable[[Harness], Awaitable[None]]


def run_bounded(coro: Coroutine[Any, Any, None], timeout: float) -> None:
    """``asyncio.run`` with a bound on the case and on the clean-up after it: a task the
    proxy left behind that swallows its cancellation must not hang the test run."""
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(asyncio.wait_for(coro, timeout))
    finally:
        try:
            for _round in range(10):
                left = [t for t in asyncio.all_tasks(loop) if not t.done()]
                if not left:
                    break
                for task in left:
                    task.cancel()
                loop.run_until_complete(asyncio.wait(left, timeout=0.2))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()


def playbook(*, timeout: float = 8.0, accounts: dict[str, str] | None = None,
             server_sm: bool = False,
             **config: Any) -> Callable[[Case], Callable[[tuple[Path, Path]], None]]:
    """Turn ``async def test_x(h: Harness)`` into a plain pytest test (no pytest-asyncio):
    its own event loop, a Harness configured with ``config`` laid over FAST (``server_sm``:
    the scripted server offers XEP-0198), and a bound on the whole case. Put pytest marks
    above this decorator."""
    def decorate(case: Case) -> Callable[[tuple[Path, Path]], None]:
        def test(shell_certs: tuple[Path, Path]) -> None:
            async def main() -> None:
                async with Harness(*shell_certs, accounts=accounts, server_sm=server_sm,
                                   **config) as h:
                    await case(h)
            run_bounded(main(), timeout)
        test.__name__, test.__qualname__ = case.__name__, case.__qualname__
        test.__doc__, test.__module__ = case.__doc__, case.__module__
        return test
    return decorate


@contextlib.contextmanager
def inserts_refused(h: Harness, table: str) -> Iterator[None]:
    """Fault injection: every insert into ``table`` of the harness's store fails (as a full
    disk would); the store's writer keeps trying until the trigger goes."""
    path = str(h.workdir / "store.sqlite3")
    with sqlite3.connect(path, isolation_level=None) as other:
        other.execute(f"CREATE TRIGGER refuse BEFORE INSERT ON {table}"
                      " BEGIN SELECT RAISE(ABORT, 'refused by the test'); END")
    try:
        yield
    finally:
        with sqlite3.connect(path, isolation_level=None) as other:
            other.execute("DROP TRIGGER IF EXISTS refuse")

