"""Service discovery through the proxy against the real legacy Prosody: the server's own
disco#info, with only what the proxy provides added, and answers while the server is away."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.proxyproc import ProxyProcess
from tests.integration.test_durability import wait_for
from tests.integration.test_outages import make_setup
from tests.peers.prosody import LegacyProsody
from tests.peers.rawclient import RawClient, q, raw_login
from tests.peers.util import run

pytestmark = pytest.mark.integration

DISCO = "http://jabber.org/protocol/disco#info"
# Everything the proxy can add to a disco#info answer (features it emulates).
PROXY_VARS = {"urn:xmpp:carbons:2", "urn:xmpp:blocking", "urn:xmpp:mam:2",
              "urn:xmpp:mam:2#extended", "urn:xmpp:push:0"}
ALL_OFF = {"carbons": "off", "archive": "off", "blocking": "off", "push": "off"}


def features(reply) -> set[str]:
    assert reply.get("type") == "result", reply
    return {f.get("var") for f in reply.iter(q(DISCO, "feature"))}


async def disco_both(client: RawClient, account: str) -> tuple[set[str], set[str]]:
    query = f"<query xmlns='{DISCO}'/>"
    domain = await client.iq(query, to="localhost")
    own = await client.iq(query, to=account)
    return features(domain), features(own)


Answers = tuple[set[str], set[str]]  # the domain's features, the account's


def direct_and_proxied(prosody: LegacyProsody, proxy: ProxyProcess, account: str,
                       password: str) -> tuple[Answers, Answers]:
    user = account.split("@")[0]

    async def go() -> tuple[Answers, Answers]:
        direct = await raw_login(prosody.host, prosody.c2s_port, user, password,
                                 direct_tls=False)
        proxied = await raw_login(proxy.host, proxy.port, user, password, direct_tls=False,
                                  resource="via-proxy")
        try:
            return await disco_both(direct, account), await disco_both(proxied, account)
        finally:
            await direct.close()
            await proxied.close()
    return run(go())


def test_the_servers_disco_passes_with_only_what_the_proxy_provides(
        prosody: LegacyProsody, make_proxy, accounts) -> None:
    account, password = accounts("disco")
    (d_domain, d_account), (p_domain, p_account) = direct_and_proxied(
        prosody, make_proxy(), account, password)
    assert "urn:xmpp:ping" in d_domain and d_domain <= p_domain and d_account <= p_account
    # What the proxy added is what it provides, and only for what Prosody lacks.
    assert p_domain - d_domain <= PROXY_VARS - d_domain
    assert p_account - d_account <= PROXY_VARS - d_account


def test_with_every_emulation_off_the_answers_are_the_servers_own(
        prosody: LegacyProsody, make_proxy, accounts) -> None:
    account, password = accounts("discooff")
    direct, proxied = direct_and_proxied(prosody, make_proxy(features=ALL_OFF), account,
                                         password)
    assert proxied == direct


def test_while_the_server_is_away_ping_and_disco_are_answered(tmp_path: Path, certs) -> None:
    with make_setup(tmp_path, certs, stream_management={"resume_timeout": 60}) as s:
        _, password = s.account("away")

        async def go() -> None:
            client = await raw_login(s.proxy.host, s.proxy.port, "away", password,
                                     direct_tls=False)
            try:
                before = await client.iq(f"<query xmlns='{DISCO}'/>", to="localhost")
                s.relay.refuse()
                s.relay.reset()  # the server is gone; the proxy notices and reconnects
                await wait_for(lambda: s.proxy.events("upstream_down"), 10, "upstream_down")
                pong = await client.iq("<ping xmlns='urn:xmpp:ping'/>", to="localhost",
                                       timeout=3)
                assert pong.get("type") == "result" and pong.get("from") == "localhost"
                during = await client.iq(f"<query xmlns='{DISCO}'/>", to="localhost",
                                         timeout=3)
                assert features(during) == features(before)
            finally:
                client.abort()
        run(go())


def test_the_caps_hash_clients_see_is_the_hash_of_the_disco_they_get(
        prosody: LegacyProsody, make_proxy, accounts) -> None:
    """With something added to the domain's disco#info (carbons, which this Prosody lacks),
    the stream features carry the proxy's own caps: its ver is the XEP-0115 hash of the
    answer the client then gets, and NODE#VER is answered with that very answer."""
    from proxy.features.disco import CAPS_NODE
    from proxy.xmpp import disco as xdisco

    account, password = accounts("caps")
    proxy = make_proxy(features={"carbons": "on"})
    user = account.split("@")[0]

    async def go() -> None:
        first = await raw_login(proxy.host, proxy.port, user, password, direct_tls=False)
        await first.close()  # the proxy now knows the domain's answer
        client = await raw_login(proxy.host, proxy.port, user, password, direct_tls=False,
                                 resource="second")
        try:
            assert client.features is not None
            caps = client.features.find(q("http://jabber.org/protocol/caps", "c"))
            assert caps is not None and caps.get("node") == CAPS_NODE
            answer = await client.iq(f"<query xmlns='{DISCO}'/>", to="localhost")
            assert "urn:xmpp:carbons:2" in features(answer)
            assert xdisco.caps_ver(xdisco.parse_info(answer)) == caps.get("ver")
            node = f"{CAPS_NODE}#{caps.get('ver')}"
            by_node = await client.iq(f"<query xmlns='{DISCO}' node='{node}'/>", to="localhost")
            assert features(by_node) == features(answer)
            assert xdisco.caps_ver(xdisco.parse_info(by_node)) == caps.get("ver")
        finally:
            await client.close()
    run(go())
