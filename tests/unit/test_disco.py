"""Service discovery and entity caps: the hash, the augmented answers, the outage answers."""

from __future__ import annotations

from lxml import etree

from proxy.config import emulates
from proxy.features.disco import CAPS_NODE, Discovery, DiscoveryFactory, caps_for
from proxy.session import DiscoShare, FeatureFactory, Outputs, SessionCore
from proxy.xmpp import disco
from proxy.xmpp.disco import Additions, DiscoInfo, Identity, ServerInfo
from proxy.xmpp.jid import Jid

DISCO = "http://jabber.org/protocol/disco#info"


def el(xml: str) -> etree._Element:
    return etree.fromstring(xml.replace("<iq", "<iq xmlns='jabber:client'", 1))


def test_caps_ver_matches_the_xep_0115_examples() -> None:
    # XEP-0115 §5.2, the simple example.
    simple = DiscoInfo((Identity("client", "pc", "Exodus 0.9.1"),), frozenset((
        "http://jabber.org/protocol/caps", "http://jabber.org/protocol/disco#info",
        "http://jabber.org/protocol/disco#items", "http://jabber.org/protocol/muc")))
    assert disco.caps_ver(simple) == "QgayPKawpkPSDYmwT/WM94uAlu0="
    # §5.3, the complex example: two identities with languages and an extension form.
    form = (b"<x xmlns='jabber:x:data' type='result'>"
            b"<field var='FORM_TYPE' type='hidden'><value>urn:xmpp:dataforms:softwareinfo"
            b"</value></field>"
            b"<field var='ip_version'><value>ipv4</value><value>ipv6</value></field>"
            b"<field var='os'><value>Mac</value></field>"
            b"<field var='os_version'><value>10.5.1</value></field>"
            b"<field var='software'><value>Psi</value></field>"
            b"<field var='software_version'><value>0.11</value></field></x>")
    complex_ = DiscoInfo((Identity("client", "pc", "Psi 0.11", "en"),
                          Identity("client", "pc", "\u03a8 0.11", "el")), frozenset((
                              "http://jabber.org/protocol/caps",
                              "http://jabber.org/protocol/disco#info",
                              "http://jabber.org/protocol/disco#items",
                              "http://jabber.org/protocol/muc")), (form,))
    assert disco.caps_ver(complex_) == "q07IKJEyjvHSyhy//CH0CxmKi8w="


def test_parse_and_fill_round_trip() -> None:
    reply = el(f"<iq type='result' id='1' from='x'><query xmlns='{DISCO}'>"
               "<identity category='server' type='im' name='Prosody'/>"
               "<feature var='urn:xmpp:ping'/><feature var='jabber:iq:version'/></query></iq>")
    info = disco.parse_info(reply)
    assert info is not None and info.has("urn:xmpp:ping") and not info.has("urn:xmpp:carbons:2")
    query = etree.Element(f"{{{DISCO}}}query")
    disco.fill_query(query, info)
    assert disco.parse_info(el("<iq type='result' id='2'/>")) is None
    again = el("<iq type='result' id='1'/>")
    again.append(query)
    assert disco.parse_info(again) == info
    assert disco.parse_info(el("<iq type='error' id='1'/>")) is None


def test_emulates_by_mode_and_what_the_server_has() -> None:
    assert emulates("auto", server_has=False) and not emulates("auto", server_has=True)
    assert emulates("on", server_has=True) and not emulates("off", server_has=False)


class Adds(FeatureFactory):
    """A feature that provides carbons when the server lacks them, and an account var."""

    def disco(self, server: ServerInfo, additions: Additions) -> None:
        if not server.has("urn:xmpp:carbons:2"):
            additions.domain.add("urn:xmpp:carbons:2")
        additions.account.add("urn:xmpp:mam:2")

    def create(self, session: SessionCore) -> Discovery:
        return Discovery("x")


PROSODY = DiscoInfo((Identity("server", "im", "Prosody"),),
                    frozenset(("urn:xmpp:ping", "jabber:iq:version")))
ACCOUNT = DiscoInfo((Identity("account", "registered"),), frozenset())


def session(server: ServerInfo) -> tuple[SessionCore, Discovery]:
    core = SessionCore(Jid.parse("me@x/phone"), [Adds(), DiscoveryFactory()], server)
    feature = core.features[1]
    assert isinstance(feature, Discovery)
    return core, feature


def features_of(reply: etree._Element) -> set[str]:
    return {f.get("var") for f in reply.iter(f"{{{DISCO}}}feature")}


def test_caps_pass_through_while_nothing_is_added_else_recomputed() -> None:
    theirs = etree.Element("{http://jabber.org/protocol/caps}c", ver="abc", node="n")
    with_carbons = ServerInfo(domain=PROSODY.with_features(["urn:xmpp:carbons:2"]))
    assert caps_for(with_carbons, {"urn:xmpp:carbons:2"}, theirs) is theirs
    assert caps_for(ServerInfo(), set(), theirs) is theirs
    assert caps_for(ServerInfo(), {"urn:xmpp:carbons:2"}, theirs) is None  # not known yet
    ours = caps_for(ServerInfo(domain=PROSODY), {"urn:xmpp:carbons:2"}, theirs)
    assert ours is not None and ours.get("node") == CAPS_NODE
    assert ours.get("ver") == disco.caps_ver(PROSODY.with_features(["urn:xmpp:carbons:2"]))
    assert ours.get("ver") != disco.caps_ver(PROSODY)


def test_the_servers_answers_get_what_the_proxy_adds_and_node_ver_is_answered() -> None:
    core, feature = session(ServerInfo(domain=PROSODY, account=ACCOUNT))
    assert core.disco_features() == ["urn:xmpp:carbons:2"]
    out = Outputs()
    ask = el(f"<iq type='get' id='q1' to='x'><query xmlns='{DISCO}'/></iq>")
    assert feature.from_client(core, ask, out) is ask  # relayed to the server
    answer = el(f"<iq type='result' id='q1' from='x'><query xmlns='{DISCO}'>"
                "<feature var='urn:xmpp:ping'/></query></iq>")
    assert feature.from_upstream(core, answer, out) is answer
    assert features_of(answer) == {"urn:xmpp:ping", "urn:xmpp:carbons:2"}
    # The account's own (no 'to'): the account's additions.
    ask = el(f"<iq type='get' id='q2'><query xmlns='{DISCO}'/></iq>")
    feature.from_client(core, ask, out)
    answer = el(f"<iq type='result' id='q2'><query xmlns='{DISCO}'/></iq>")
    feature.from_upstream(core, answer, out)
    assert features_of(answer) == {"urn:xmpp:mam:2"}
    # An answer nobody asked the proxy to augment passes untouched.
    other = el(f"<iq type='result' id='q3' from='x'><query xmlns='{DISCO}'/></iq>")
    feature.from_upstream(core, other, out)
    assert features_of(other) == set()

    ver = disco.caps_ver(PROSODY.with_features(["urn:xmpp:carbons:2"]))
    ask = el(f"<iq type='get' id='q4' to='x'><query xmlns='{DISCO}' "
             f"node='{CAPS_NODE}#{ver}'/></iq>")
    assert feature.from_client(core, ask, out) is None
    reply = out.to_client[-1]
    assert reply.get("type") == "result" and reply.get("from") == "x"
    assert reply[0].get("node") == f"{CAPS_NODE}#{ver}"
    assert disco.caps_ver(disco.parse_info(reply)) == ver  # the hash verifies
    stale = el(f"<iq type='get' id='q5' to='x'><query xmlns='{DISCO}' "
               f"node='{CAPS_NODE}#bogus'/></iq>")
    assert feature.from_client(core, stale, out) is None
    assert out.to_client[-1].get("type") == "error"


def test_sessions_whose_server_said_the_same_share_one_frozen_server_info() -> None:
    """One ServerInfo and one set of additions per domain, not per session: a second bind
    that found the same answers gets the very objects, which nothing can change, and its
    answers are augmented as a session of its own would be."""
    factories = [Adds(), DiscoveryFactory()]
    share = DiscoShare(factories)
    first_seen = ServerInfo(domain=PROSODY, account=ACCOUNT)
    again = ServerInfo(domain=disco.parse_info(el(
        f"<iq type='result' id='1'><query xmlns='{DISCO}'>"
        "<identity category='server' type='im' name='Prosody'/>"
        "<feature var='jabber:iq:version'/><feature var='urn:xmpp:ping'/></query></iq>")),
        account=ACCOUNT)
    assert again == first_seen and again is not first_seen
    server_a, additions_a = share.share("x", first_seen)
    server_b, additions_b = share.share("x", again)
    assert server_b is server_a and additions_b is additions_a
    a = SessionCore(Jid.parse("a@x/phone"), factories, server_a, additions_a)
    b = SessionCore(Jid.parse("b@x/phone"), factories, server_b, additions_b)
    assert a.server is b.server and a.additions is b.additions
    assert isinstance(a.additions.domain, frozenset)
    assert isinstance(a.additions.account, frozenset)
    # The same as a session computing its own.
    alone = SessionCore(Jid.parse("c@x/phone"), factories, again)
    assert alone.additions == a.additions
    # A session's augmented answer leaves the shared sets as they were.
    feature = b.features[1]
    assert isinstance(feature, Discovery)
    out = Outputs()
    feature.from_client(b, el(f"<iq type='get' id='q1' to='x'><query xmlns='{DISCO}'/></iq>"),
                        out)
    answer = el(f"<iq type='result' id='q1' from='x'><query xmlns='{DISCO}'>"
                "<feature var='urn:xmpp:ping'/><feature var='urn:other'/></query></iq>")
    feature.from_upstream(b, answer, out)
    assert features_of(answer) == {"urn:xmpp:ping", "urn:other", "urn:xmpp:carbons:2"}
    assert a.additions.domain == {"urn:xmpp:carbons:2"}
    assert a.server.domain is not None and "urn:other" not in a.server.domain.features
    # A server that says something else is not shared.
    other, other_additions = share.share("x", ServerInfo(domain=PROSODY))
    assert other is not server_a and other_additions.account == {"urn:xmpp:mam:2"}
    assert share.share("y", first_seen)[0] is first_seen  # per domain


def test_while_the_server_is_away_disco_and_ping_are_answered_from_what_it_said() -> None:
    core, feature = session(ServerInfo(domain=PROSODY))
    core.upstream_lost()
    out = Outputs()
    ask = el(f"<iq type='get' id='d' to='x'><query xmlns='{DISCO}'/></iq>")
    assert feature.from_client(core, ask, out) is None
    assert features_of(out.to_client[-1]) == {"urn:xmpp:ping", "jabber:iq:version",
                                              "urn:xmpp:carbons:2"}
    ping = el("<iq type='get' id='p' to='x'><ping xmlns='urn:xmpp:ping'/></iq>")
    assert feature.from_client(core, ping, out) is None
    assert out.to_client[-1].get("type") == "result" and out.to_client[-1].get("id") == "p"
    # The account's disco#info was never answered: it waits for the server.
    ask = el(f"<iq type='get' id='a'><query xmlns='{DISCO}'/></iq>")
    assert feature.from_client(core, ask, out) is ask
    core.upstream_restored()
    ping = el("<iq type='get' id='p2' to='x'><ping xmlns='urn:xmpp:ping'/></iq>")
    assert feature.from_client(core, ping, out) is ping  # relayed again
