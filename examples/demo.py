"""The xmpp-front demo: a legacy Prosody, the proxy in front of it, two real clients.

Run it with ``bash examples/demo.sh`` (which installs what is missing first). Everything it
starts listens on 127.0.0.1 only, lives in a temporary folder, and is stopped at the end.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.integration.proxyproc import ProxyProcess
from tests.peers import clients
from tests.peers.certs import make_cert
from tests.peers.prosody import LegacyProsody


def say(text: str) -> None:
    print(f"demo | {text}", flush=True)


async def conversation(proxy: ProxyProcess, alice: tuple[str, str], bob: tuple[str, str]) -> None:
    say(f"alice logs in through xmpp-front (STARTTLS, port {proxy.port})")
    a = await clients.connect_client(alice[0] + "/laptop", alice[1], proxy.host, proxy.port,
                                     direct_tls=False)
    say(f"  bound as {a.boundjid.full}")
    say(f"bob logs in through xmpp-front (direct TLS, port {proxy.direct_tls_port})")
    b = await clients.connect_client(bob[0] + "/phone", bob[1], proxy.host,
                                     proxy.direct_tls_port, direct_tls=True)
    say(f"  bound as {b.boundjid.full}")
    try:
        bob_inbox, alice_inbox = clients.Inbox(b), clients.Inbox(a)
        a.send_message(mto=b.boundjid.full, mbody="Hello Bob, this went through xmpp-front.",
                       mtype="chat")
        msg = await bob_inbox.get(10)
        say(f"bob got from {msg['from']}: {msg['body']}")
        b.send_message(mto=a.boundjid.full, mbody="Hi Alice, the legacy server never knew.",
                       mtype="chat")
        msg = await alice_inbox.get(10)
        say(f"alice got from {msg['from']}: {msg['body']}")
        roster = await a.get_roster(timeout=10)
        say(f"alice fetched her roster ({len(roster['roster']['items'])} items)")
        rtt = await a.plugin["xep_0199"].ping(jid="localhost", timeout=10)
        say(f"alice pinged the server: {rtt * 1000:.1f} ms round trip")
    finally:
        await clients.disconnect(a)
        await clients.disconnect(b)
    say("both clients logged out")


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="xmpp-front-demo-") as tmp:
        work = Path(tmp)
        say("starting Prosody as a legacy server (no stream management, no roster versioning)")
        server = LegacyProsody(work / "prosody")
        server.start()
        try:
            alice = (server.register("alice", "alice-secret"), "alice-secret")
            bob = (server.register("bob", "bob-secret"), "bob-secret")
            say(f"  Prosody pid {server.pid} on 127.0.0.1:{server.c2s_port}; "
                f"accounts {alice[0]}, {bob[0]}")
            cert, key = make_cert(work / "proxy-certs")
            proxy = ProxyProcess(work / "proxy", server, cert, key,
                                 log={"format": "console", "level": "info"})
            say("starting xmpp-front in front of it")
            with proxy:
                say(f"  xmpp-front pid {proxy.proc.pid if proxy.proc else '?'}")
                asyncio.run(asyncio.wait_for(conversation(proxy, alice, bob), 60))
            say("xmpp-front stopped; its log of the session:")
            for line in proxy.log_tail(40).splitlines():
                print(f"     {line}")
        finally:
            server.stop()
            say("Prosody stopped")
    say("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
