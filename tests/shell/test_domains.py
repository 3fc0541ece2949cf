"""Several served domains on different servers, in process: ``localhost`` on the harness's
scripted server, ``beta.test`` (``domains:``) on a second one. A beta.test session logs in,
binds, is discovered, is pinged and is restored at its own server only; what the proxy
answers for it while that server is away is that server's."""

from __future__ import annotations

from pathlib import Path

from tests.peers.rawclient import RawClient
from tests.peers.util import LOCALHOST

from .playbook import PASSWORD, Client, Harness, run_bounded
from .scripted_server import ScriptedServer
from .xmlpeer import NS_DISCO_INFO, q

BETA = "beta.test"


async def beta_client(h: Harness, user: str, resource: str) -> Client:
    raw = await RawClient.connect(LOCALHOST, h.port, direct_tls=False, server_hostname=BETA,
                                  timeout=1.0)
    client = Client(raw)
    h.clients.append(client)
    await raw.login_plain(user, PASSWORD, to=BETA, timeout=2.0)
    client.jid = await raw.bind(resource, timeout=2.0)
    return client


def test_a_domain_on_another_server_lives_there_only(shell_certs: tuple[Path, Path]) -> None:
    async def case() -> None:
        beta = await ScriptedServer({"carol": PASSWORD}, domain=BETA).start()
        beta.disco = {"domain": "<feature var='urn:example:beta-only'/>", "account": ""}
        try:
            async with Harness(*shell_certs, features={"carbons": "off", "blocking": "off"},
                               domains=[{"domain": BETA, "upstream": {"port": beta.port}}]
                               ) as h:
                await scenario(h, beta)
        finally:
            await beta.close()

    async def scenario(h: Harness, beta: ScriptedServer) -> None:
        alice = await h.client("alice")
        carol = await beta_client(h, "carol", "tablet")
        assert carol.jid == f"carol@{BETA}/tablet"
        conn = await beta.expect_bind("tablet")
        # Its discovery asked its own server about its own domain.
        assert [d.get("to") for d in conn.discovery] == [BETA, f"carol@{BETA}"]
        assert [c.user for c in h.server.conns] == ["alice"]  # carol never came here

        carol.message(f"alice@{LOCALHOST}", "from beta")
        await beta.expect_stanza(kind="message", body="from beta")
        await beta.expect_stanza(kind="iq", pings=True, to=BETA)  # its barrier: its domain
        assert h.server.bodies() == []

        await beta.cut()  # beta's server crashes; localhost's goes on
        down = await h.logged("upstream_down")  # nothing on the wire says so
        assert down["account"] == f"carol@{BETA}"
        asked = carol.iq(f"<query xmlns='{NS_DISCO_INFO}'/>", to=BETA)
        answer = await carol.expect(kind="iq", id=asked)  # from what beta's server said
        assert [f.get("var") for f in answer.iter(q(NS_DISCO_INFO, "feature"))] == [
            "urn:example:beta-only"]
        alice.message(f"carol@{BETA}", "localhost is fine")
        await h.server.expect_stanza(kind="message", body="localhost is fine")

        await beta.come_back()
        again = await beta.expect_bind("tablet", after=1, timeout=3)
        assert again.user == "carol"
        carol.message(f"alice@{LOCALHOST}", "restored")
        await beta.expect_stanza(kind="message", body="restored", timeout=2)
        assert [c.user for c in h.server.conns] == ["alice"]
        assert h.server.bodies() == ["localhost is fine"]

    run_bounded(case(), 15)
