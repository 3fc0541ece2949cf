"""The rule engine (proxy.rules): every match condition, every action, both directions,
rule and action order, error replies, and the rejection of bad rule files at load."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from proxy.rules import RuleError, RuleOutcome, RuleSet
from proxy.rules.match import xpath_guard
from proxy.rules_cli import canonical_lines, parse_stanza
from proxy.xmpp import ns
from proxy.xmpp.codec import serialize

CS = "http://jabber.org/protocol/chatstates"
CS_NS = {"cs": CS}
XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"
CHAT = ("<message from='alice@localhost/phone' to='bob@example.org/pc' type='chat' id='m1'>"
        "<body>Hello Bob</body><active xmlns='http://jabber.org/protocol/chatstates'/>"
        "</message>")


def ruleset(*rules: dict[str, Any], **kwargs: Any) -> RuleSet:
    return RuleSet.from_rules(list(rules), "test.yaml", **kwargs)


def run(rs: RuleSet, xml: str, direction: str = "c2s") -> RuleOutcome:
    return rs.apply(direction, parse_stanza(xml))  # type: ignore[arg-type]


def same(el: etree._Element | None, xml: str) -> bool:
    assert el is not None
    return canonical_lines(el) == canonical_lines(parse_stanza(xml))


def matches(match: dict[str, Any], xml: str, direction: str = "c2s", **kw: Any) -> bool:
    return run(ruleset({"name": "r", "match": match, **kw}), xml, direction).matched == ["r"]


def q(namespace: str, local: str) -> str:
    return ns.qname(namespace, local)


# ---------------------------------------------------------------- match: kind and type

@pytest.mark.parametrize("kind, xml, expected", [
    ("message", "<message to='a@b'/>", True),
    ("message", "<presence/>", False),
    ("presence", "<presence/>", True),
    ("iq", "<iq type='get' id='1'/>", True),
    ("iq", "<message/>", False),
    (["message", "iq"], "<iq type='set' id='1'/>", True),
    (["message", "iq"], "<presence/>", False),
])
def test_match_kind(kind: Any, xml: str, expected: bool) -> None:
    assert matches({"kind": kind}, xml) is expected


def test_empty_match_is_every_stanza_but_never_a_nonza() -> None:
    rs = ruleset({"name": "all", "actions": [{"set_attr": {"name": "x", "value": "1"}}]})
    for xml in ("<message/>", "<presence/>", "<iq type='get' id='1'/>"):
        out = run(rs, xml)
        assert out.matched == ["all"] and out.stanza is not None and out.stanza.get("x") == "1"
    nonza = etree.Element(q(ns.SM, "r"))
    out = rs.apply("c2s", nonza)
    assert out.matched == [] and out.stanza is nonza and nonza.get("x") is None


@pytest.mark.parametrize("types, xml, expected", [
    ("chat", "<message type='chat'/>", True),
    ("chat", "<message type='groupchat'/>", False),
    ("normal", "<message/>", True),  # no type attribute: a normal message
    ("normal", "<message type='normal'/>", True),
    ("chat", "<message/>", False),
    (["chat", "normal"], "<message/>", True),
    ("available", "<presence/>", True),  # no type attribute: available
    ("available", "<presence type='unavailable'/>", False),
    ("unavailable", "<presence type='unavailable'/>", True),
    ("subscribe", "<presence type='subscribe'/>", True),
    ("get", "<iq type='get' id='1'/>", True),
    ("get", "<iq type='set' id='1'/>", False),
    ("error", "<iq type='error' id='1'/>", True),
])
def test_match_type(types: Any, xml: str, expected: bool) -> None:
    assert matches({"type": types}, xml) is expected


def test_type_and_kind_combine() -> None:
    match = {"kind": "message", "type": "error"}
    assert matches(match, "<message type='error'/>")
    assert not matches(match, "<iq type='error' id='1'/>")


# ---------------------------------------------------------------- match: from and to

@pytest.mark.parametrize("pattern, jid, expected", [
    # exact bare JID: that account and all its resources
    ("bob@example.org", "bob@example.org", True),
    ("bob@example.org", "bob@example.org/pc", True),
    ("bob@example.org", "Bob@Example.ORG/pc", True),  # local and domain are caseless
    ("bob@example.org", "bobby@example.org", False),
    ("bob@example.org", "example.org", False),
    # exact full JID: only that session
    ("bob@example.org/pc", "bob@example.org/pc", True),
    ("bob@example.org/pc", "bob@example.org/phone", False),
    ("bob@example.org/pc", "bob@example.org", False),
    ("bob@example.org/pc", "bob@example.org/PC", False),  # resources are case-sensitive
    # a domain: the domain and every JID at it, not its subdomains nor lookalikes
    ("example.org", "example.org", True),
    ("example.org", "bob@example.org", True),
    ("example.org", "bob@example.org/pc", True),
    ("example.org", "example.org/admin", True),
    ("example.org", "room@conference.example.org", False),
    ("example.org", "bob@badexample.org", False),
    # globs: against the bare JID, or the full JID when the glob has a '/'
    ("*@example.org", "bob@example.org/pc", True),
    ("*@example.org", "example.org", False),
    ("*.example.org", "room@conference.example.org/nick", True),
    ("*.example.org", "example.org", False),
    ("b?b@example.org", "bob@example.org", True),
    ("*@example.org/pc*", "bob@example.org/pc-1", True),
    ("*@example.org/pc*", "bob@example.org/phone", False),
    ("*@example.org/pc*", "bob@example.org", False),
    ("[ab]*@example.org", "alice@example.org", True),
    ("[ab]*@example.org", "carol@example.org", False),
])
@pytest.mark.parametrize("attr", ["from", "to"])
def test_match_jid_patterns(pattern: str, jid: str, expected: bool, attr: str) -> None:
    assert matches({attr: pattern}, f"<message {attr}='{jid}'/>") is expected


def test_match_jid_list_is_any_of() -> None:
    match = {"to": ["carol@example.org", "*.example.net", "example.com"]}
    assert matches(match, "<message to='carol@example.org/x'/>")
    assert matches(match, "<message to='muc.example.net'/>")
    assert matches(match, "<message to='x@example.com'/>")
    assert not matches(match, "<message to='x@example.org'/>")


def test_match_jid_missing_attribute_never_matches() -> None:
    assert not matches({"to": "*"}, "<message/>")
    assert matches({"from": "*"}, "<message from='a@b'/>")


def test_from_and_to_together() -> None:
    match = {"from": "alice@localhost", "to": "example.org"}
    assert matches(match, CHAT)
    assert not matches(match, CHAT.replace("example.org", "example.net"))
    assert not matches(match, CHAT.replace("alice@", "mallory@"))


# ---------------------------------------------------------------- match: xpath and body

def test_match_xpath_with_rule_namespaces() -> None:
    assert matches({"xpath": "cs:active", "namespaces": CS_NS}, CHAT)
    assert not matches({"xpath": "cs:composing", "namespaces": CS_NS}, CHAT)
    assert matches({"xpath": "cs:active | cs:composing"}, CHAT, namespaces=CS_NS)


def test_match_xpath_default_client_prefix_and_file_namespaces() -> None:
    assert matches({"xpath": "client:body"}, CHAT)
    assert not matches({"xpath": "body"}, CHAT)  # XPath 1.0: no prefix means no namespace
    rs = ruleset({"name": "r", "match": {"xpath": "cs:*"}}, namespaces=CS_NS)
    assert run(rs, CHAT).matched == ["r"]


@pytest.mark.parametrize("xpath, expected", [
    ("count(*) = 2", True),  # a boolean
    ("count(*)", True),  # a number: true unless 0 or NaN
    ("count(client:subject)", False),
    ("string(@type)", True),  # a string: true unless empty
    ("string(@lang)", False),
    ("@id = 'm1' and client:body[contains(., 'Bob')]", True),
])
def test_match_xpath_results_are_booleans(xpath: str, expected: bool) -> None:
    assert matches({"xpath": xpath}, CHAT) is expected


def test_match_body_regex() -> None:
    assert matches({"body": "Bob"}, CHAT)
    assert matches({"body": "(?i)hello bob"}, CHAT)
    assert matches({"body": r"^Hello\b"}, CHAT)
    assert not matches({"body": "bob"}, CHAT)  # case-sensitive unless asked
    assert not matches({"body": "."}, "<message to='a@b'/>")  # no body: no match
    assert not matches({"body": "."}, "<message to='a@b'><body/></message>")


def test_match_body_any_of_several_bodies() -> None:
    xml = "<message><body xml:lang='en'>hi</body><body xml:lang='de'>passwort</body></message>"
    assert matches({"body": "passwort"}, xml)


def test_body_in_another_namespace_is_not_the_body() -> None:
    xml = ("<message><html xmlns='http://jabber.org/protocol/xhtml-im'>"
           "<body xmlns='http://www.w3.org/1999/xhtml'>secret</body></html></message>")
    assert not matches({"body": "secret"}, xml)


def test_all_conditions_must_hold() -> None:
    match = {"kind": "message", "type": "chat", "from": "localhost", "to": "*@example.org",
             "xpath": "cs:active", "namespaces": CS_NS, "body": "Hello"}
    assert matches(match, CHAT)
    for change in (("type='chat'", "type='normal'"), ("from='alice@localhost", "from='a@x"),
                   ("bob@example.org", "bob@example.net"), ("<active", "<paused"),
                   ("Hello Bob", "Bye")):
        assert not matches(match, CHAT.replace(*change)), change
    assert not matches({**match, "kind": "iq", "type": "error"}, CHAT)


# ---------------------------------------------------------------- directions

@pytest.mark.parametrize("direction, c2s, s2c", [
    ("c2s", True, False), ("s2c", False, True), ("both", True, True), (None, True, True)])
def test_direction_filtering(direction: str | None, c2s: bool, s2c: bool) -> None:
    rule: dict[str, Any] = {"name": "r", "match": {"kind": "message"}}
    if direction:
        rule["direction"] = direction
    rs = ruleset(rule)
    assert (run(rs, CHAT, "c2s").matched == ["r"]) is c2s
    assert (run(rs, CHAT, "s2c").matched == ["r"]) is s2c


def test_apply_refuses_an_unknown_direction() -> None:
    with pytest.raises(ValueError, match="direction"):
        ruleset({"name": "r"}).apply("both", parse_stanza(CHAT))  # type: ignore[arg-type]


def test_no_rules_passes_everything_untouched() -> None:
    stanza = parse_stanza(CHAT)
    before = canonical_lines(stanza)
    out = RuleSet.empty().apply("s2c", stanza)
    assert out == RuleOutcome(stanza, [], [], [])
    assert canonical_lines(stanza) == before


# ---------------------------------------------------------------- actions

@pytest.mark.parametrize("direction", ["c2s", "s2c"])
def test_drop(direction: str) -> None:
    rs = ruleset({"name": "d", "match": {"xpath": "cs:*"}, "actions": ["drop"]},
                 {"name": "later", "actions": [{"log": "never"}]}, namespaces=CS_NS)
    out = run(rs, CHAT, direction)
    assert out.stanza is None and out.replies == [] and out.matched == ["d"]
    assert out.log_events == []
    assert run(rs, "<message><body>x</body></message>", direction).stanza is not None


@pytest.mark.parametrize("direction", ["c2s", "s2c"])
def test_error_reply_swaps_addresses(direction: str) -> None:
    rs = ruleset({"name": "e", "actions": [
        {"error": {"condition": "policy-violation", "text": "not here"}}]})
    out = run(rs, CHAT, direction)
    assert out.stanza is None and out.matched == ["e"]
    (reply,) = out.replies
    assert same(reply, """
        <message type='error' id='m1' from='bob@example.org/pc' to='alice@localhost/phone'>
          <error type='modify'>
            <policy-violation xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>
            <text xmlns='urn:ietf:params:xml:ns:xmpp-stanzas' xml:lang='en'>not here</text>
          </error>
        </message>""")


def test_error_type_defaults_and_explicit_by() -> None:
    rs = ruleset({"name": "e", "actions": [{"error": "service-unavailable"}]})
    (reply,) = run(rs, "<iq type='get' id='q1' from='a@b/c' to='d@e'><ping xmlns='urn:xmpp:ping'/>"
                       "</iq>").replies
    assert same(reply, "<iq type='error' id='q1' to='a@b/c' from='d@e'><error type='cancel'>"
                       "<service-unavailable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>"
                       "</error></iq>")
    rs = ruleset({"name": "e", "actions": [
        {"error": {"condition": "forbidden", "type": "cancel", "by": "localhost"}}]})
    (reply,) = run(rs, "<presence type='subscribe' from='a@b' to='c@d'/>").replies
    err = reply.find(q(ns.CLIENT, "error"))
    assert reply.tag == q(ns.CLIENT, "presence") and reply.get("type") == "error"
    assert err is not None and err.get("type") == "cancel" and err.get("by") == "localhost"
    assert err.find(q(ns.STANZA_ERRORS, "forbidden")) is not None
    assert err.find(q(ns.STANZA_ERRORS, "text")) is None


@pytest.mark.parametrize("xml", [
    "<message type='error' from='a@b' to='c@d'><error type='cancel'>"
    "<item-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></message>",
    "<presence type='error' from='a@b' to='c@d'/>",
    "<iq type='error' id='1' from='a@b' to='c@d'/>",
    "<iq type='result' id='1' from='a@b' to='c@d'/>",
])
@pytest.mark.parametrize("direction", ["c2s", "s2c"])
def test_an_error_is_never_answered_with_an_error(xml: str, direction: str) -> None:
    rs = ruleset({"name": "e", "actions": [{"error": "not-allowed"}]})
    out = run(rs, xml, direction)
    assert out.stanza is None and out.replies == [] and out.matched == ["e"]


@pytest.mark.parametrize("direction", ["c2s", "s2c"])
def test_set_attr_on_the_stanza_and_on_selected_elements(direction: str) -> None:
    rs = ruleset({"name": "s", "actions": [
        {"set_attr": {"name": "xml:lang", "value": "en"}},
        {"set_attr": {"xpath": "client:body", "name": "hint", "value": 3}},
        {"set_attr": {"name": "x:flag", "value": "on"}}]}, namespaces={"x": "urn:example:x"})
    out = run(rs, CHAT, direction)
    assert out.stanza is not None
    assert out.stanza.get(XML_LANG) == "en"
    assert out.stanza.get("{urn:example:x}flag") == "on"
    body = out.stanza.find(q(ns.CLIENT, "body"))
    assert body is not None and body.get("hint") == "3"


@pytest.mark.parametrize("direction", ["c2s", "s2c"])
def test_remove_attr(direction: str) -> None:
    rs = ruleset({"name": "r", "actions": [
        {"remove_attr": "id"},
        {"remove_attr": {"name": "xml:lang", "xpath": "client:body"}},
        {"remove_attr": "absent"}]})
    out = run(rs, "<message id='1' to='a@b'><body xml:lang='de'>x</body></message>", direction)
    assert same(out.stanza, "<message to='a@b'><body>x</body></message>")


@pytest.mark.parametrize("direction", ["c2s", "s2c"])
def test_remove_elements_and_attributes(direction: str) -> None:
    rs = ruleset({"name": "r", "actions": [{"remove": "cs:*"}, {"remove": "client:body/@foo"}]},
                 namespaces=CS_NS)
    out = run(rs, "<message to='a@b'><body foo='1'>x</body><composing "
                  "xmlns='http://jabber.org/protocol/chatstates'/><paused "
                  "xmlns='http://jabber.org/protocol/chatstates'/></message>", direction)
    assert same(out.stanza, "<message to='a@b'><body>x</body></message>")


def test_remove_keeps_following_text_and_never_the_stanza() -> None:
    rs = ruleset({"name": "r", "actions": [{"remove": "client:b"}, {"remove": "."},
                                            {"remove": "/*"}]})
    out = run(rs, "<message><body>x</body><b/>tail<c/></message>")
    assert out.stanza is not None
    assert etree.tostring(out.stanza) == (b'<message xmlns="jabber:client"><body>x</body>tail'
                                          b"<c/></message>")


@pytest.mark.parametrize("direction", ["c2s", "s2c"])
def test_add(direction: str) -> None:
    rs = ruleset({"name": "a", "actions": [
        {"add": "<no-store xmlns='urn:xmpp:hints'/>"},
        {"add": "<subject>Note</subject>"},  # unprefixed: jabber:client, like on the stream
        {"add": {"xml": "<h:mark/>", "xpath": "cs:active"}}],
        "namespaces": {**CS_NS, "h": "urn:example:h"}})
    out = run(rs, CHAT, direction)
    assert same(out.stanza, """
        <message from='alice@localhost/phone' to='bob@example.org/pc' type='chat' id='m1'>
          <body>Hello Bob</body>
          <active xmlns='http://jabber.org/protocol/chatstates'>
            <mark xmlns='urn:example:h'/>
          </active>
          <no-store xmlns='urn:xmpp:hints'/>
          <subject>Note</subject>
        </message>""")


def test_added_elements_are_not_shared_between_stanzas() -> None:
    rs = ruleset({"name": "a", "actions": [{"add": "<x xmlns='urn:example:x'><y>1</y></x>"}]})
    first, second = run(rs, CHAT).stanza, run(rs, CHAT).stanza
    assert first is not None and second is not None
    x1, x2 = first.find("{urn:example:x}x"), second.find("{urn:example:x}x")
    assert x1 is not None and x2 is not None and x1 is not x2
    x1[0].text = "changed"
    x1.set("a", "b")
    assert x2[0].text == "1" and x2.get("a") is None
    third = run(rs, CHAT).stanza
    assert third is not None and third.findtext("{urn:example:x}x/{urn:example:x}y") == "1"


@pytest.mark.parametrize("direction", ["c2s", "s2c"])
def test_replace_in_body(direction: str) -> None:
    rs = ruleset({"name": "r", "actions": [
        {"replace": {"pattern": r"\bfoo(\d)\b", "with": r"bar\1", "in": "body"}}]})
    out = run(rs, "<message><body xml:lang='en'>foo1 food foo2</body><body>foo3</body>"
                  "<subject>foo4</subject></message>", direction)
    assert same(out.stanza, "<message><body xml:lang='en'>bar1 food bar2</body>"
                            "<body>bar3</body><subject>foo4</subject></message>")


def test_replace_with_an_xpath_target() -> None:
    rs = ruleset({"name": "r", "actions": [
        {"replace": {"pattern": "secret", "with": "***", "xpath": "client:subject | @to"}},
        {"replace": {"pattern": "^", "with": "> ", "xpath": "client:thread/text()"}}]})
    out = run(rs, "<message to='secret@x'><subject>a secret</subject><body>secret</body>"
                  "<thread>t</thread></message>")
    assert same(out.stanza, "<message to='***@x'><subject>a ***</subject><body>secret</body>"
                            "<thread>&gt; t</thread></message>")


@pytest.mark.parametrize("direction", ["c2s", "s2c"])
def test_redirect_and_later_rules_see_the_new_address(direction: str) -> None:
    rs = ruleset({"name": "r", "match": {"to": "bob@example.org"},
                  "actions": [{"redirect": "Archive@Localhost"}]},
                 {"name": "seen", "match": {"to": "archive@localhost"}})
    out = run(rs, CHAT, direction)
    assert out.stanza is not None and out.stanza.get("to") == "archive@localhost"
    assert out.matched == ["r", "seen"]


def test_log_events_static_and_computed_fields() -> None:
    rs = ruleset({"name": "l", "actions": [
        {"log": {"event": "rule_hit", "fields": {
            "tag": "chatstate", "n": 2, "ok": True, "none": None,
            "body": {"xpath": "client:body"}, "id": {"xpath": "string(@id)"},
            "count": {"xpath": "count(*)"}, "missing": {"xpath": "client:subject"},
            "has_body": {"xpath": "boolean(client:body)"}}}},
        {"log": "second"}]})
    out = run(rs, CHAT)
    assert out.log_events == [
        {"event": "rule_hit", "tag": "chatstate", "n": 2, "ok": True, "none": None,
         "body": "Hello Bob", "id": "m1", "count": 2, "missing": None, "has_body": True,
         "rule": "l"},
        {"event": "second", "rule": "l"}]
    again = run(rs, CHAT)
    assert again.log_events == out.log_events
    assert again.log_events[0] is not out.log_events[0]


def test_stop_ends_the_rules_after_its_own_actions() -> None:
    rs = ruleset({"name": "first", "actions": [{"set_attr": {"name": "a", "value": "1"}}]},
                 {"name": "stopper", "actions": [{"log": "x"}, "stop"]},
                 {"name": "never", "actions": [{"set_attr": {"name": "b", "value": "1"}}]})
    out = run(rs, CHAT)
    assert out.matched == ["first", "stopper"]
    assert out.stanza is not None and out.stanza.get("a") == "1" and out.stanza.get("b") is None
    assert [e["event"] for e in out.log_events] == ["x"]


def test_actions_run_in_order() -> None:
    rs = ruleset({"name": "r", "actions": [
        {"log": {"event": "before", "fields": {"body": {"xpath": "string(client:body)"}}}},
        {"replace": {"pattern": "Bob", "with": "Carol"}},
        {"log": {"event": "after", "fields": {"body": {"xpath": "string(client:body)"}}}},
        {"remove": "client:body"},
        {"add": "<body>new</body>"},
        {"replace": {"pattern": "new", "with": "newer"}}]})
    out = run(rs, CHAT)
    assert [e["body"] for e in out.log_events] == ["Hello Bob", "Hello Carol"]
    assert out.stanza is not None and out.stanza.findtext(q(ns.CLIENT, "body")) == "newer"


def test_rules_run_in_order_and_see_earlier_changes() -> None:
    rs = ruleset({"name": "strip", "match": {"xpath": "cs:*"}, "actions": [{"remove": "cs:*"}]},
                 {"name": "still-has-chatstate", "match": {"xpath": "cs:*"}},
                 {"name": "tag", "actions": [{"log": "tagged"}]},
                 {"name": "last", "match": {"kind": "message"}},
                 namespaces=CS_NS)
    out = run(rs, CHAT)
    assert out.matched == ["strip", "tag", "last"]
    assert out.log_events == [{"event": "tagged", "rule": "tag"}]


def test_log_then_drop_keeps_the_log_and_the_matches() -> None:
    rs = ruleset({"name": "a", "actions": [{"log": "one"}]},
                 {"name": "b", "actions": [{"log": "two"}, {"error": "forbidden"}]},
                 {"name": "c", "actions": [{"log": "three"}]})
    out = run(rs, CHAT)
    assert out.stanza is None and len(out.replies) == 1
    assert out.matched == ["a", "b"]
    assert [e["event"] for e in out.log_events] == ["one", "two"]


def test_a_rule_without_actions_only_matches() -> None:
    out = run(ruleset({"name": "mark", "match": {"kind": "message"}}), CHAT)
    assert out.matched == ["mark"] and out.stanza is not None and same(out.stanza, CHAT)


def test_hook_time_compiles_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    rs = ruleset({"name": "r", "match": {"xpath": "cs:*", "body": "Bob", "to": "*@example.org"},
                  "actions": [{"remove": "cs:*"}, {"replace": {"pattern": "Bob", "with": "B"}},
                              {"add": "<x xmlns='urn:x'/>"}, {"log": {"event": "e", "fields": {
                                  "id": {"xpath": "string(@id)"}}}}]}, namespaces=CS_NS)

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("compiled at hook time")

    monkeypatch.setattr(etree, "XPath", boom)
    monkeypatch.setattr(etree, "fromstring", boom)
    monkeypatch.setattr(re, "compile", boom)
    out = run(rs, CHAT)
    assert out.matched == ["r"] and out.log_events[0]["id"] == "m1"


# ---------------------------------------------------------------- loading

def write(tmp_path: Path, text: str, name: str = "pack.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_load_list_and_mapping_forms(tmp_path: Path) -> None:
    listed = write(tmp_path, "- name: a\n  match: {kind: message}\n", "a.yaml")
    mapped = write(tmp_path, "description: d\nnamespaces: {cs: '" + CS + "'}\nrules:\n"
                   "  - name: b\n    match: {xpath: 'cs:*'}\n    actions: [drop]\n"
                   "vectors: []\n", "b.yaml")
    rs = RuleSet.load([listed, str(mapped)])
    assert rs.names == ["a", "b"] and len(rs) == 2
    assert rs.sources == [str(listed), str(mapped)]
    out = run(rs, CHAT)
    assert out.matched == ["a", "b"] and out.stanza is None


def test_load_is_all_or_nothing(tmp_path: Path) -> None:
    good = write(tmp_path, "- name: a\n", "good.yaml")
    bad = write(tmp_path, "- name: b\n  actions: [explode]\n", "bad.yaml")
    with pytest.raises(RuleError, match=r"bad\.yaml: rule 'b': unknown action 'explode'"):
        RuleSet.load([good, bad])


BAD_RULES = [
    # (YAML of one rule named "broken", what the message must say)
    ("match: {xpath: 'cs:['}\n  namespaces: {cs: urn:x}", "bad XPath 'cs:['"),
    ("match: {xpath: 'cs:active'}", "undeclared namespace prefix 'cs'"),
    ("match: {xpath: 'true() or cs:active'}", "undeclared namespace prefix 'cs'"),
    ("match: {xpath: 'child::cs:active'}", "undeclared namespace prefix 'cs'"),
    ("actions: [{remove: 'x:y'}]", "undeclared namespace prefix 'x'"),
    ("match: {xpath: 'nosuch(.)'}", "Unregistered function"),
    ("match: {body: '(unclosed'}", "bad regex '(unclosed'"),
    ("actions: [{replace: {pattern: '[', with: x}}]", "bad regex '['"),
    ("actions: [{replace: {pattern: 'a', with: '\\2'}}]", "bad replacement '\\\\2'"),
    ("actions: [{replace: {pattern: 'a', with: '\\g<x>'}}]", "unknown group name 'x'"),
    ("actions: [{replace: {pattern: 'a', with: b, in: subject}}]", "'in' can only be 'body'"),
    ("actions: [{replace: {pattern: 'a'}}]", "missing 'with'"),
    ("actions: [explode]", "unknown action 'explode'"),
    ("actions: [{drop: true, stop: true}]", "an action is a name or a mapping with one key"),
    ("actions: [drop, {log: x}]", "action 'log' after 'drop' would never run"),
    ("actions: [stop, drop]", "action 'drop' after 'stop' would never run"),
    ("actions: [{drop: 3}]", "takes no argument"),
    ("match: {kinds: message}", "unknown match key 'kinds'"),
    ("matches: {kind: message}", "unknown key 'matches'"),
    ("match: {kind: messages}", "unknown kind 'messages'"),
    ("match: {type: chatty}", "unknown type 'chatty'"),
    ("match: {kind: iq, type: chat}", "unknown type 'chat'"),
    ("match: {kind: []}", "'kind' must be a non-empty string or list"),
    ("match: {to: 'a@b/'}", "bad JID pattern 'a@b/'"),
    ("match: [kind, message]", "'match' must be a mapping"),
    ("actions: [{add: '<a><b></a>'}]", "malformed XML in 'add'"),
    ("actions: [{add: '<a/><b/>'}]", "'add' must be exactly one element"),
    ("actions: [{add: 'text'}]", "'add' must be exactly one element"),
    ("actions: [{add: '<p:a/>'}]", "malformed XML in 'add'"),  # undeclared prefix
    ("actions: [{add: '<a>&ent;</a>'}]", "'add'"),
    ("actions: [{error: {condition: no-such-condition}}]", "unknown error condition"),
    ("actions: [{error: {condition: forbidden, type: fatal}}]", "bad error type 'fatal'"),
    ("actions: [{error: {type: cancel}}]", "missing 'condition'"),
    ("actions: [{error: {condition: forbidden, txt: x}}]", "unknown option 'txt'"),
    ("direction: inbound", "bad direction 'inbound'"),
    ("actions: [{redirect: '@localhost'}]", "bad JID '@localhost'"),
    ("actions: [{set_attr: {name: lang}}]", "missing 'value'"),
    ("actions: [{set_attr: {name: 'bad name', value: x}}]", "bad attribute name"),
    ("actions: [{set_attr: {name: 'p:x', value: x}}]", "undeclared namespace prefix 'p'"),
    ("actions: [{set_attr: {name: xmlns, value: x}}]", "namespace declarations"),
    ("actions: [{set_attr: {name: a, value: x, xpath: 'count(*)'}}]", "must select nodes"),
    ("actions: [{log: {event: e, fields: {rule: x}}}]", "bad field name 'rule'"),
    ("actions: [{log: {event: e, fields: {f: [1, 2]}}}]", "field 'f' must be a scalar"),
    ("actions: [{log: {fields: {a: 1}}}]", "missing 'event'"),
    ("namespaces: {'1x': urn:x}", "bad namespace prefix '1x'"),
    ("namespaces: {x: ''}", "the URI must be a non-empty string"),
]


@pytest.mark.parametrize("body, problem", BAD_RULES, ids=[p for _, p in BAD_RULES])
def test_bad_rules_are_rejected_naming_file_and_rule(tmp_path: Path, body: str,
                                                     problem: str) -> None:
    path = write(tmp_path, "- name: ok\n- name: broken\n  " + body + "\n")
    with pytest.raises(RuleError) as info:
        RuleSet.load([path])
    message = str(info.value)
    assert message.startswith(f"{path}: rule 'broken': "), message
    assert problem in message, message
    assert info.value.source == str(path) and info.value.rule == "broken"


@pytest.mark.parametrize("text, problem", [
    ("", "empty rule file"),
    ("# only a comment\n", "empty rule file"),
    ("[]\n", "no rules"),
    ("rules: []\n", "no rules"),
    ("- name: a\n  match: {kind: [message\n", "not valid YAML"),
    ("just a string\n", "a rule file is a list of rules or a mapping"),
    ("vectors: []\n", "no 'rules:' list"),
    ("rules: {name: a}\n", "'rules' must be a list"),
    ("rule: []\n", "unknown top-level key 'rule'"),
    ("rules: [{name: a}]\nvectors: {}\n", "'vectors' must be a list"),
    ("rules: [{name: a}]\nnamespaces: [a]\n", "'namespaces' must be a mapping"),
    ("- name: a\n  name: b\n", "duplicate key 'name'"),
])
def test_bad_files_are_rejected_naming_the_file(tmp_path: Path, text: str, problem: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(RuleError) as info:
        RuleSet.load([path])
    assert str(info.value).startswith(f"{path}: "), info.value
    assert problem in str(info.value)


def test_missing_name_names_the_rule_by_position(tmp_path: Path) -> None:
    path = write(tmp_path, "- name: a\n- match: {kind: message}\n")
    with pytest.raises(RuleError, match=re.escape(f"{path}: rule #2: missing 'name'")):
        RuleSet.load([path])
    path = write(tmp_path, "- name: a\n- just-a-string\n")
    with pytest.raises(RuleError, match="rule #2: a rule must be a mapping"):
        RuleSet.load([path])


def test_duplicate_names_within_and_across_files(tmp_path: Path) -> None:
    one = write(tmp_path, "- name: a\n- name: a\n", "one.yaml")
    with pytest.raises(RuleError, match=re.escape(f"{one}: rule 'a': duplicate rule name")):
        RuleSet.load([one])
    first = write(tmp_path, "- name: a\n", "first.yaml")
    second = write(tmp_path, "- name: b\n- name: a\n", "second.yaml")
    with pytest.raises(RuleError, match=re.escape(
            f"{second}: rule 'a': duplicate rule name (also in {first})")):
        RuleSet.load([first, second])


def test_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(RuleError, match=re.escape(f"{missing}: cannot read")):
        RuleSet.load([missing])


def test_from_rules_names_its_source() -> None:
    with pytest.raises(RuleError, match=r"^config: rule 'x': bad regex"):
        RuleSet.from_rules([{"name": "x", "match": {"body": "("}}], "config")
    with pytest.raises(RuleError, match="the rules must be a list"):
        RuleSet.from_rules({"name": "x"}, "config")  # type: ignore[arg-type]


# ---------------------------------------------------------------- cheap paths stay correct

X = "urn:example:x"
GUARD_NS = {"cs": CS, "x": X, "client": ns.CLIENT}


@pytest.mark.parametrize("expr, guard", [
    ("cs:*", {CS}),
    ("child::cs:active", {CS}),
    ("cs:active | x:y", {CS, X}),
    ("cs:* and not(client:body)", {CS}),
    ("not(client:body) and cs:*", {CS}),
    ("cs:a[@k = 'a or b' and . = \"]\"]/cs:b", {CS}),
    ("x:a/x:b[2]/text()", {X}),
    ("x:a//x:b/@c", {X}),
    ("x:a/..", {X}),
    ("cs:* or client:body", None),
    ("cs:a[1]or(true())", None),
    ("cs:a and x:b or client:c", None),
    ("count(cs:*) > 0", None),
    ("boolean(cs:x)", None),
    ("(cs:a | cs:b)", None),
    ("//cs:*", None),
    ("./cs:*", None),
    ("descendant::cs:*", None),
    ("@x:attr", None),
    ("cs:x = 'y'", None),
    ("cs:x | //x:y", None),
    ("*", None),
    ("body", None),
])
def test_xpath_guards_are_conservative(expr: str, guard: set[str] | None) -> None:
    assert xpath_guard(expr, GUARD_NS) == (None if guard is None else frozenset(guard))


GUARD_EXPRS = ["cs:*", "cs:active | x:y", "cs:* and not(client:body)", "x:y/x:z",
               "cs:* or client:body", "client:body[contains(., 'Bob')] and cs:active",
               "x:y[@a='1'] | cs:paused", "not(cs:*)", "count(*) > 1"]
GUARD_STANZAS = [CHAT, "<message><body>x</body></message>", "<message/>",
                 "<message><y xmlns='urn:example:x'><z/></y></message>",
                 "<message><y xmlns='urn:example:x' a='1'/><b:paused xmlns:b='" + CS + "'/>"
                 "</message>", "<presence><y xmlns='urn:example:x'/></presence>"]


@pytest.mark.parametrize("expr", GUARD_EXPRS)
def test_guarded_xpath_rules_match_exactly_like_plain_xpath(expr: str) -> None:
    # Two other guarded rules switch the children's-namespace pre-check on.
    rs = ruleset({"name": "probe", "match": {"xpath": expr}},
                 {"name": "g1", "match": {"xpath": "x:never"}},
                 {"name": "g2", "match": {"xpath": "cs:never"}}, namespaces=GUARD_NS)
    plain = etree.XPath(expr, namespaces=GUARD_NS)
    for xml in GUARD_STANZAS:
        el = parse_stanza(xml)
        result = plain(el)
        expected = bool(result) if not isinstance(result, float) else result != 0
        assert ("probe" in run(rs, xml).matched) is expected, (expr, xml)


def test_later_rules_see_changed_type_body_and_children() -> None:
    rs = ruleset(
        {"name": "retype", "match": {"type": "chat"},
         "actions": [{"set_attr": {"name": "type", "value": "normal"}}]},
        {"name": "now-normal", "match": {"type": "normal", "body": "Bob"},
         "actions": [{"replace": {"pattern": "Bob", "with": "Carol"}}]},
        {"name": "now-carol", "match": {"body": "Carol"}, "actions": [{"remove": "cs:*"}]},
        {"name": "no-chatstate-left", "match": {"xpath": "cs:*"}},
        {"name": "x-child", "match": {"xpath": "x:*"}},
        {"name": "add-x", "actions": [{"add": "<x:y/>"}]},
        {"name": "x-child-now", "match": {"xpath": "x:*"}},
        {"name": "still-chat", "match": {"type": "chat"}},
        namespaces=GUARD_NS)
    out = run(rs, CHAT)
    assert out.matched == ["retype", "now-normal", "now-carol", "add-x", "x-child-now"]


def test_added_elements_use_default_namespace_declarations_on_the_wire() -> None:
    rs = ruleset({"name": "a", "namespaces": {"h": "urn:example:h"}, "actions": [
        {"add": "<h:mark id='1'><h:x>t</h:x><subject/></h:mark>"},
        {"add": "<subject>s</subject>"}]})
    out = run(rs, "<message to='a@b'/>")
    assert out.stanza is not None
    assert serialize(out.stanza) == (
        b'<message to="a@b"><mark xmlns="urn:example:h" id="1"><x>t</x>'
        b'<subject xmlns="jabber:client"/></mark><subject>s</subject></message>')
