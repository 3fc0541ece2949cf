"""The indexed RuleSet.apply gives exactly what trying every rule in order gives."""

from __future__ import annotations

import copy
import random
import re

import pytest
from lxml import etree

from proxy.rules import RuleSet
from proxy.rules.index import combine_regexes
from proxy.rules_cli import parse_stanza

NS = {"cs": "http://jabber.org/protocol/chatstates", "x": "urn:x", "y": "urn:y"}
JIDS = ["alice@localhost/phone", "bob@localhost", "Bob@LocalHost/pc", "bad.example",
        "u@bad.example/r", "u@sub.bad.example", "old@localhost", "new@localhost",
        "bot1@bots.localhost/x", None]
PATTERNS = ["bob@localhost", "bob@localhost/pc", "bad.example", "*.bad.example",
            "*@bots.localhost", "*@localhost/ph*", "old@localhost", "u@BAD.example",
            "localhost"]
BODIES = [r"(?i)\bsecret\b", r"\bSecret\b", "(?s)a.b", r"(?i)(\d)\1", r"^x|y$",
          r"(?P<n>k)(?P=n)", r"(?im)^hello", r"[0-9]{3}"]
TEXTS = ["hello world", "a secret here", "SECRET", "a\nb", "x marks", "nothing y", "11",
         "kk", "call 555", "HeLLo", ""]
KIDS = ["<active xmlns='http://jabber.org/protocol/chatstates'/>", "<a xmlns='urn:x'/>",
        "<b xmlns='urn:y'><c/></b>", "<request xmlns='urn:xmpp:receipts'/>"]
XPATHS = ["cs:*", "x:a | y:b", "y:b and not(client:body)", "count(*) > 1", "client:body",
          "@type='chat'"]
ACTIONS = ["drop", "stop", {"error": "not-allowed"}, {"redirect": "new@localhost"},
           {"set_attr": {"name": "type", "value": "headline"}},
           {"set_attr": {"name": "to", "value": "bob@localhost"}}, {"remove": "cs:*"},
           {"remove_attr": "from"}, {"log": "hit"}, {"add": "<a xmlns='urn:x'/>"},
           {"replace": {"pattern": "secret", "with": "11"}}]


def random_rule(rng: random.Random, i: int) -> dict:
    match: dict = {}
    kind = rng.choice([None, "message", "presence", "iq", ["message", "presence"]])
    if kind:
        match["kind"] = kind
    if kind == "message" and rng.random() < 0.5:
        match["type"] = rng.choice(["chat", ["chat", "normal"], "headline", "groupchat"])
    for key in ("from", "to"):
        if rng.random() < 0.35:
            match[key] = rng.sample(PATTERNS, rng.randint(1, 3))
    if rng.random() < 0.35:
        match["body"] = rng.choice(BODIES)
    if rng.random() < 0.3:
        match["xpath"] = rng.choice(XPATHS)
    rule = {"name": f"r{i}", "match": match,
            "direction": rng.choice(["both", "c2s", "s2c"])}
    actions = rng.sample(ACTIONS, rng.randint(0, 2))
    ends = [a for a in actions if a in ("drop", "stop") or (isinstance(a, dict) and "error" in a)]
    rule["actions"] = [a for a in actions if a not in ends] + ends[:1]
    return rule


def random_stanza(rng: random.Random) -> str:
    tag = rng.choice(["message", "message", "presence", "iq"])
    attrs = ""
    for key in ("from", "to"):
        jid = rng.choice(JIDS)
        if jid:
            attrs += f" {key}='{jid}'"
    types = {"message": ["chat", "normal", "headline", None, "error"],
             "presence": [None, "subscribe", "unavailable"], "iq": ["get", "set", "result"]}
    t = rng.choice(types[tag])
    if t:
        attrs += f" type='{t}'"
    kids = "".join(f"<body>{rng.choice(TEXTS)}</body>" for _ in range(rng.randint(0, 2)))
    kids += "".join(rng.sample(KIDS, rng.randint(0, 3)))
    return f"<{tag} id='i'{attrs}>{kids}</{tag}>"


def outcome_key(out) -> tuple:
    return (None if out.stanza is None else etree.tostring(out.stanza),
            [etree.tostring(r) for r in out.replies], out.matched, out.log_events)


@pytest.mark.parametrize("seed", range(300))
def test_indexed_apply_is_plain_apply(seed: int) -> None:
    rng = random.Random(seed)
    rules = [random_rule(rng, i) for i in range(rng.randint(1, 25))]
    rs = RuleSet.from_rules(rules, namespaces=NS)
    for _ in range(40):
        el = parse_stanza(random_stanza(rng))
        for d in ("c2s", "s2c"):
            a, b = copy.deepcopy(el), copy.deepcopy(el)
            assert outcome_key(rs.apply(d, a)) == outcome_key(rs._apply_linear(d, b))


def test_bench_rules_same_results() -> None:
    from bench.rules50 import fifty_rules
    data = fifty_rules()
    rs = RuleSet.from_rules(data["rules"], namespaces=data["namespaces"])
    for xml in ["<message from='a@localhost/x' to='u@x.bad0.example' type='chat'>"
                "<body>hi</body></message>",
                "<message from='a@bad3.example/x' to='old2@localhost' type='chat'>"
                "<body>CodeWord4 !</body>"
                "<e xmlns='urn:example:bench:ext2'/></message>",
                "<message to='z@bots1.localhost' type='headline'/>",
                "<presence from='z@a.spam2.example' type='subscribe'/>",
                "<iq type='get' id='1'><query xmlns='urn:example:bench:query3'/></iq>"]:
        el = parse_stanza(xml)
        for d in ("c2s", "s2c"):
            a, b = copy.deepcopy(el), copy.deepcopy(el)
            ka, kb = outcome_key(rs.apply(d, a)), outcome_key(rs._apply_linear(d, b))
            assert ka == kb
    assert rs.apply("c2s", parse_stanza(
        "<message to='old2@localhost' type='chat'><body>codeword4</body></message>")).matched \
        == ["keyword-4", "redirect-old2"]


def test_stop_ends_the_rules() -> None:
    rs = RuleSet.from_rules([
        {"name": "a", "match": {"from": "bob@localhost"}, "actions": ["stop"]},
        {"name": "b", "match": {"from": "localhost"}, "actions": ["drop"]}])
    out = rs.apply("s2c", parse_stanza("<message from='bob@localhost/x'/>"))
    assert out.matched == ["a"] and out.stanza is not None
    out = rs.apply("s2c", parse_stanza("<message from='eve@localhost/x'/>"))
    assert out.matched == ["b"] and out.stanza is None


def test_type_change_switches_plan() -> None:
    rs = RuleSet.from_rules([
        {"name": "mk", "match": {"type": "chat"}, "actions": [
            {"set_attr": {"name": "type", "value": "headline"}}]},
        {"name": "chat", "match": {"type": "chat"}},
        {"name": "head", "match": {"kind": "message", "type": "headline"}}])
    assert rs.apply("c2s", parse_stanza("<message type='chat'/>")).matched == ["mk", "head"]


def test_combine_regexes() -> None:
    pats = [(0, re.compile(r"(?i)\bfoo\b")), (1, re.compile("bar")), (2, re.compile("(?i)baz|q"))]
    combined = combine_regexes(pats)
    assert combined is not None and len(combined) == 2
    for text in ["FOO", "xbar", "BAZ", "Q", "nothing", "foox"]:
        any_single = any(p.search(text) for _, p in pats)
        assert any_single == any(rx.search(text) for rx, _ in combined)
    assert combine_regexes([(0, re.compile(r"(a)\1"))]) is None
    assert combine_regexes([(0, re.compile(r"(?x) a b"))]) is None
