"""``workers: 2`` against the real legacy Prosody: the supervisor, the home hash and the
handoff of a connection accepted by the worker that is not the account's home.

Which worker accepts a connection is the kernel's choice, so the tests connect until the
case they need happened (each login's ``accepted`` event names the worker that accepted
it, its ``auth_ok`` the account's home; both carry the connection's id), within a bound.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from typing import Any

import pytest

from proxy.workers import home_of
from tests.integration.proxyproc import ProxyProcess
from tests.peers import clients
from tests.peers.rawclient import RawClient, q, raw_login
from tests.peers.util import run

pytestmark = pytest.mark.integration

NS_CLIENT = "jabber:client"
NS_SM = "urn:xmpp:sm:3"
WORKERS = 2
TRIES = 40  # logins before a case that depends on the kernel's accept is given up


def user(jid: str) -> str:
    return jid.split("@")[0]


def where(proxy: ProxyProcess, account: str, after: int = 0) -> tuple[int, int]:
    """(accepting worker, home worker) of the last login of ``account`` after the
    ``after``-th event in the log."""
    events = proxy.events()[after:]
    ok = [e for e in events if e.get("event") == "auth_ok" and e.get("account") == account]
    assert ok, f"no auth_ok for {account}"
    conn = ok[-1]["conn"]
    accepted = [e for e in events if e.get("event") == "accepted" and e.get("conn") == conn]
    assert accepted, f"no accepted event for connection {conn}"
    return accepted[-1]["worker"], ok[-1]["worker"]


async def message(sender: RawClient, receiver: RawClient, body: str) -> None:
    assert receiver.jid is not None
    sender.send(f"<message to='{receiver.jid}' type='chat' id='{sender.next_id()}'>"
                f"<body>{body}</body></message>")
    got = await receiver.read_until(q(NS_CLIENT, "message"), timeout=10)
    assert got.findtext(q(NS_CLIENT, "body")) == body
    assert got.get("from") == sender.jid


@pytest.fixture
def workers_proxy(make_proxy: Any) -> ProxyProcess:
    return make_proxy(workers=WORKERS)


def test_the_home_hash_is_stable_and_spreads() -> None:
    # Independent of the process (Python's hash() is salted) and of the JID's case.
    assert home_of("Alice@Localhost", 2) == home_of("alice@localhost", 2)
    homes = {home_of(f"user{i}@localhost", 2) for i in range(40)}
    assert homes == {0, 1}


def test_a_login_accepted_by_the_other_worker_is_relayed_to_the_home(
        workers_proxy: ProxyProcess, accounts: Any) -> None:
    proxy = workers_proxy
    bob_jid, bob_pw = accounts("bob")
    seen: dict[str, str] = {}

    async def scenario() -> None:
        bob = await raw_login(proxy.host, proxy.port, user(bob_jid), bob_pw, direct_tls=False,
                              resource="desk")
        try:
            for attempt in range(TRIES):
                direct_tls = attempt % 2 == 1
                jid, pw = accounts("alice")
                alice = await raw_login(proxy.host, proxy.direct_tls_port if direct_tls
                                        else proxy.port, user(jid), pw,
                                        direct_tls=direct_tls, resource="phone")
                try:
                    accepted, home = where(proxy, jid)
                    assert home == home_of(jid, WORKERS)
                    await message(alice, bob, f"hello bob from {attempt}")
                    await message(bob, alice, f"hello alice {attempt}")
                    kind = "relayed" if accepted != home else "local"
                    seen.setdefault(kind, jid)
                finally:
                    await alice.close()
                if len(seen) == 2:
                    return
        finally:
            await bob.close()

    run(scenario(), timeout=120)
    assert set(seen) == {"relayed", "local"}, seen
    relayed = seen["relayed"]
    handed = [e for e in proxy.events("handed_over") if e.get("home") == home_of(relayed, 2)]
    assert handed, "the accepting worker logged no handover"
    assert proxy.events("taken_over"), "the home logged no connection taken over"
