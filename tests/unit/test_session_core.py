"""The session core's pipeline: which feature hooks a stanza passes, in which order."""

from __future__ import annotations

from lxml import etree

from proxy.session import Feature, FeatureFactory, Outputs, SessionCore
from proxy.xmpp import stanza as st
from proxy.xmpp.jid import Jid


class Recorder(Feature):
    """Notes every stanza its hooks see; ``client_tags``/``upstream_tags`` per instance."""

    def __init__(self, name: str, seen: list[tuple[str, str, str]]) -> None:
        self.name = name
        self.seen = seen

    def from_client(self, session: SessionCore, el: st.Element, out: Outputs) -> st.Element:
        self.seen.append(("c2s", self.name, etree.QName(el).localname))
        return el

    def from_upstream(self, session: SessionCore, el: st.Element, out: Outputs) -> st.Element:
        self.seen.append(("s2c", self.name, etree.QName(el).localname))
        return el


class IqOnly(Recorder):
    client_tags = frozenset((st.IQ,))
    upstream_tags = frozenset((st.IQ,))


class MessagesFromServer(Recorder):
    upstream_tags = frozenset((st.MESSAGE,))


class Made(FeatureFactory):
    def __init__(self, kind: type[Recorder], name: str,
                 seen: list[tuple[str, str, str]]) -> None:
        self.kind, self.name, self.seen = kind, name, seen

    def create(self, session: SessionCore) -> Feature:
        return self.kind(self.name, self.seen)


def stanza(tag: str) -> st.Element:
    return st.element(tag, {"to": "b@x", "id": "1"})


def test_a_hook_sees_only_the_stanza_tags_it_is_about_in_pipeline_order() -> None:
    seen: list[tuple[str, str, str]] = []
    core = SessionCore(Jid.parse("a@x/r"), [Made(Recorder, "all", seen),
                                           Made(IqOnly, "iq", seen),
                                           Made(MessagesFromServer, "msg", seen)])
    for tag in ("message", "presence", "iq"):
        out = core.from_client(stanza(tag))
        assert [el.tag for el in out.to_upstream] == [f"{{jabber:client}}{tag}"]
    assert seen == [("c2s", "all", "message"), ("c2s", "msg", "message"),
                    ("c2s", "all", "presence"), ("c2s", "msg", "presence"),
                    ("c2s", "all", "iq"), ("c2s", "iq", "iq"), ("c2s", "msg", "iq")]
    seen.clear()
    for tag in ("message", "presence", "iq"):
        assert len(core.from_upstream(stanza(tag)).to_client) == 1
    # server stanzas go through the features last to first
    assert seen == [("s2c", "msg", "message"), ("s2c", "all", "message"),
                    ("s2c", "all", "presence"),
                    ("s2c", "iq", "iq"), ("s2c", "all", "iq")]


def test_an_element_that_is_no_stanza_passes_every_hook() -> None:
    """Only the three stanza tags are sorted; anything else (a test's, a feature's own)
    goes through all of them, as before the hooks were sorted by tag."""
    seen: list[tuple[str, str, str]] = []
    core = SessionCore(Jid.parse("a@x/r"), [Made(IqOnly, "iq", seen),
                                           Made(MessagesFromServer, "msg", seen)])
    core.from_upstream(st.element("x", namespace="urn:other"))
    assert seen == [("s2c", "msg", "x"), ("s2c", "iq", "x")]
