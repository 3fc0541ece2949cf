"""Rule-based stanza rewriting, end to end: raw clients in front of the proxy, the legacy
Prosody behind it, and (to see what the server really got, or to send what the proxy must
rewrite on its way to the client) raw clients connected straight to Prosody.

Both directions with one pattern: for c2s the sender logs in through the proxy and the
receiver straight to Prosody (what arrives is what the rules made of the client's stanza);
for s2c the sender logs in straight to Prosody and the receiver through the proxy (what the
client gets is what the rules made of the server's stanza).

One proxy with one rule file serves most tests (``env``): each test has its own accounts and
the rules are scoped to them, so they do not interfere. Most match rules only add a marker
child ``<hit xmlns='urn:xf:test' r='...'/>``, so the receiver can read which rules matched.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from lxml import etree

from tests.integration.proxyproc import REPO, ProxyProcess
from tests.peers.prosody import LegacyProsody
from tests.peers.rawclient import RawClient, raw_login
from tests.peers.util import run

pytestmark = pytest.mark.integration

CLIENT = "jabber:client"
MESSAGE, PRESENCE, IQ = f"{{{CLIENT}}}message", f"{{{CLIENT}}}presence", f"{{{CLIENT}}}iq"
BODY, SUBJECT = f"{{{CLIENT}}}body", f"{{{CLIENT}}}subject"
STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"
T = "urn:xf:test"         # the marker namespace (prefix t in the rule file)
F = "urn:xf:test:flag"    # a payload namespace (prefix f in the rule file)
HINTS = "urn:xmpp:hints"
KIND = f"{{{T}}}kind"     # the attribute the kind rule sets
DISCO_INFO = "http://jabber.org/protocol/disco#info"

# Roles: every test has its own accounts; the rules below name them as {{role}}. Accounts
# whose name must match a glob get the prefix given here.
ROLES = {
    "ks": "ks", "kr": "kr",                          # kind
    "ys": "ys", "yr": "yr",                          # type
    "fs": "fs", "fg": "fglob", "fr": "fr",           # from patterns
    "ts": "ts", "tr": "tr", "tg": "tglob",           # to patterns
    "xs": "xs", "xr": "xr",                          # xpath
    "bs": "bs", "br": "br",                          # body
    "as": "as", "ar": "ar", "ao": "ao",              # all conditions
    "ds": "ds", "dr": "dr",                          # direction
    "dps": "dps", "dpr": "dpr",                      # drop
    "es": "es", "er": "er",                          # error
    "ats": "ats", "atr": "atr",                      # set_attr / remove_attr
    "rms": "rms", "rmr": "rmr",                      # remove / add
    "rps": "rps", "rpr": "rpr",                      # replace
    "rds": "rds", "rd1": "rd1", "rd2": "rd2",        # redirect
    "ls": "ls", "lr": "lr",                          # log
    "ss": "ss", "sr": "sr",                          # stop
    "ms": "ms", "mr": "mr", "mx": "mx",              # several actions
}

RULES = r"""
description: xmpp-front end-to-end tests (tests/integration/test_rules.py)
namespaces:
  t: urn:xf:test
  f: urn:xf:test:flag
rules:
  # -- kind
  - name: kind-presence-or-iq
    match: {kind: [presence, iq], from: "{{ks}}"}
    actions: [{set_attr: {name: "t:kind", value: hit}}]   # an iq get takes one child only

  # -- type (a message without type is normal, a presence without type available)
  - name: type-normal
    match: {kind: message, type: normal, from: "{{ys}}"}
    actions: [{add: "<t:hit r='normal'/>"}]
  - name: type-chat-or-headline
    match: {type: [chat, headline], from: "{{ys}}"}
    actions: [{add: "<t:hit r='chat-or-headline'/>"}]
  - name: type-available
    match: {kind: presence, type: available, from: "{{ys}}"}
    actions: [{add: "<t:hit r='available'/>"}]
  - name: type-unavailable
    match: {kind: presence, type: unavailable, from: "{{ys}}"}
    actions: [{add: "<t:hit r='unavailable'/>"}]

  # -- from: exact full, bare, domain, globs, a list
  - name: from-full
    match: {to: "{{fr}}", from: "{{fs}}/res-one"}
    actions: [{add: "<t:hit r='full'/>"}]
  - name: from-bare
    match: {to: "{{fr}}", from: "{{fs}}"}
    actions: [{add: "<t:hit r='bare'/>"}]
  - name: from-domain
    match: {to: "{{fr}}", from: localhost}
    actions: [{add: "<t:hit r='domain'/>"}]
  - name: from-subdomains
    match: {to: "{{fr}}", from: "*.localhost"}
    actions: [{add: "<t:hit r='subdomains'/>"}]
  - name: from-glob
    match: {to: "{{fr}}", from: "FGLOB*@LocalHost"}
    actions: [{add: "<t:hit r='glob'/>"}]
  - name: from-glob-resource
    match: {to: "{{fr}}", from: "*@localhost/gres-*"}
    actions: [{add: "<t:hit r='glob-resource'/>"}]
  - name: from-list
    match: {to: "{{fr}}", from: [nobody@localhost, "{{fg}}/res-one"]}
    actions: [{add: "<t:hit r='list'/>"}]

  # -- to: exact full, bare, domain, globs
  - name: to-full
    match: {from: "{{ts}}", to: "{{tr}}/res-one"}
    actions: [{add: "<t:hit r='full'/>"}]
  - name: to-bare
    match: {from: "{{ts}}", to: "{{tr}}"}
    actions: [{add: "<t:hit r='bare'/>"}]
  - name: to-domain
    match: {from: "{{ts}}", to: localhost}
    actions: [{add: "<t:hit r='domain'/>"}]
  - name: to-other-domain
    match: {from: "{{ts}}", to: [conference.localhost, "*.localhost"]}
    actions: [{add: "<t:hit r='other-domain'/>"}]
  - name: to-glob
    match: {from: "{{ts}}", to: "tglob*@localhost"}
    actions: [{add: "<t:hit r='glob'/>"}]
  - name: to-glob-resource
    match: {from: "{{ts}}", to: "*@localhost/gres-*"}
    actions: [{add: "<t:hit r='glob-resource'/>"}]

  # -- xpath, with the match's own namespace map
  - name: xpath-high-flag
    match:
      from: "{{xs}}"
      namespaces: {fl: "urn:xf:test:flag"}
      xpath: "fl:flag[@level = 'high']"
    actions: [{add: "<t:hit r='xpath'/>"}]

  # -- body regex
  - name: body-code
    match: {from: "{{bs}}", body: '(?i)\bcode-\d{3}\b'}
    actions: [{add: "<t:hit r='body'/>"}]

  # -- several conditions: all must hold
  - name: all-conditions
    match:
      kind: message
      type: chat
      from: "{{as}}"
      to: "{{ar}}"
      body: "^all"
      xpath: "f:flag"
    actions: [{add: "<t:hit r='all'/>"}]

  # -- direction
  - name: only-c2s
    direction: c2s
    match: {from: "{{ds}}"}
    actions: [{add: "<t:hit r='c2s'/>"}]
  - name: only-s2c
    direction: s2c
    match: {from: "{{ds}}"}
    actions: [{add: "<t:hit r='s2c'/>"}]
  - name: both-directions
    match: {from: "{{ds}}"}
    actions: [{add: "<t:hit r='both'/>"}]

  # -- drop
  - name: drop-it
    match: {from: "{{dps}}", body: "^drop"}
    actions: [drop]

  # -- error
  - name: refuse-message
    match: {kind: message, from: "{{es}}", body: "^refuse"}
    actions:
      - error: {condition: policy-violation, type: modify, text: "No refusals here."}
  - name: refuse-iq
    match: {kind: iq, type: get, from: "{{es}}"}
    actions: [{error: service-unavailable}]
  - name: refuse-error
    match: {kind: message, type: error, from: "{{es}}"}
    actions: [{error: not-allowed}]

  # -- set_attr, remove_attr
  - name: set-attrs
    match: {from: "{{ats}}", body: "^setattr"}
    actions:
      - set_attr: {name: "xml:lang", value: de}
      - set_attr: {xpath: "f:flag", name: level, value: 42}
      - set_attr: {xpath: "f:flag", name: "f:mark", value: "marked"}
  - name: remove-attrs
    match: {from: "{{ats}}", body: "^rmattr"}
    actions:
      - remove_attr: {name: id}
      - remove_attr: {xpath: "f:flag", name: level}

  # -- remove, add
  - name: remove-elements
    match: {from: "{{rms}}", body: "^strip"}
    actions:
      - remove: "f:junk"
      - remove: "f:flag/@level"
  - name: add-elements
    match: {from: "{{rms}}", body: "^add"}
    actions:
      - add: "<no-store xmlns='urn:xmpp:hints'/>"
      - add: "<subject>Added subject</subject>"
      - add: {xml: "<t:inner n='1'><t:deep/></t:inner>", xpath: "f:box"}

  # -- replace
  - name: replace-card
    match: {from: "{{rps}}"}
    actions:
      - replace: {pattern: '\b(\d{4})-\d{4}-\d{4}-(\d{4})\b', with: '\1-****-****-\2'}
  - name: replace-subject
    match: {from: "{{rps}}", xpath: "client:subject"}
    actions:
      - replace: {pattern: "(?s).+", with: "[subject hidden]", xpath: "client:subject"}

  # -- redirect
  - name: redirect-it
    match: {kind: message, from: "{{rds}}", to: "{{rd1}}", body: "^redirect"}
    actions: [{redirect: "{{rd2}}"}]
  - name: after-redirect
    match: {kind: message, from: "{{rds}}", to: "{{rd2}}"}
    actions: [{add: "<t:hit r='saw-new-to'/>"}]

  # -- log
  - name: log-it
    match: {from: "{{ls}}", body: "^logme"}
    actions:
      - log:
          event: xf_test_logged
          fields:
            constant: hello
            number: 7
            yes_no: true
            nothing: null
            lvl: {xpath: "string(f:flag/@level)"}
            bodies: {xpath: "count(client:body)"}
            first_body: {xpath: "client:body"}
            absent: {xpath: "f:absent"}

  # -- stop
  - name: stop-here
    match: {from: "{{ss}}", body: "^stop"}
    actions: [{add: "<t:hit r='before-stop'/>"}, stop]
  - name: after-stop
    match: {from: "{{ss}}"}
    actions: [{add: "<t:hit r='after-stop'/>"}]

  # -- several actions, in order; later rules see what earlier ones did
  - name: multi-step
    match: {from: "{{ms}}", body: "^multi"}
    actions:
      - replace: {pattern: "^multi", with: "MULTI"}
      - add: "<t:step n='1'/>"
      - set_attr: {xpath: "t:step", name: n, value: 2}
      - add: {xml: "<t:child/>", xpath: "t:step"}
      - remove: "f:junk"
  - name: multi-sees-rewrite
    match: {from: "{{ms}}", body: "^MULTI", xpath: "t:step[@n = '2']/t:child"}
    actions: [{add: "<t:hit r='saw-rewrite'/>"}]
  - name: redirect-then-refuse
    match: {kind: message, from: "{{ms}}", body: "^bounce"}
    actions:
      - redirect: "{{mx}}"
      - log: {event: xf_test_bounced, fields: {new_to: {xpath: "string(@to)"}}}
      - error: {condition: recipient-unavailable, text: "Redirected, then refused."}
"""


# -- the shared proxy ------------------------------------------------------------------------


@dataclass
class Env:
    proxy: ProxyProcess
    prosody: LegacyProsody
    accounts: dict[str, tuple[str, str]]  # role -> (bare JID, password)

    def jid(self, role: str) -> str:
        return self.accounts[role][0]


@pytest.fixture(scope="module")
def env(prosody: LegacyProsody, certs: tuple[Path, Path],
        tmp_path_factory: pytest.TempPathFactory) -> Any:
    accounts = {}
    for role, prefix in ROLES.items():
        user = f"{prefix}{secrets.token_hex(4)}"
        password = secrets.token_urlsafe(12)
        accounts[role] = (prosody.register(user, password), password)
    text = re.sub(r"\{\{(\w+)\}\}", lambda m: accounts[m[1]][0], RULES)
    workdir = tmp_path_factory.mktemp("rules-proxy")
    rule_file = workdir / "e2e-rules.yaml"
    rule_file.write_text(text)
    proxy = ProxyProcess(workdir / "proxy", prosody, *certs, rules=[str(rule_file)],
                         log={"level": "info"})
    proxy.start()
    try:
        yield Env(proxy, prosody, accounts)
    finally:
        proxy.stop()


# -- helpers ---------------------------------------------------------------------------------


def user(jid: str) -> str:
    return jid.split("@")[0]


def hits(el: etree._Element) -> list[str]:
    """The markers the rules added to a stanza, in order."""
    return [h.get("r") for h in el.findall(f"{{{T}}}hit")]


def condition(el: etree._Element) -> tuple[str | None, str, str | None]:
    """(error type, defined condition, text) of an error stanza."""
    err = el.find(f"{{{CLIENT}}}error")
    assert err is not None, etree.tostring(el)
    cond = next(etree.QName(c).localname for c in err
                if etree.QName(c).namespace == STANZAS and etree.QName(c).localname != "text")
    return err.get("type"), cond, err.findtext(f"{{{STANZAS}}}text")


class Peers:
    """Raw clients for one scenario, all dropped at the end."""

    def __init__(self, env: Env) -> None:
        self.env = env
        self.clients: list[RawClient] = []

    async def proxied(self, role: str, resource: str = "r") -> RawClient:
        jid, password = self.env.accounts[role]
        proxy = self.env.proxy
        client = await raw_login(proxy.host, proxy.port, user(jid), password,
                                 direct_tls=False, resource=resource)
        self.clients.append(client)
        return client

    async def direct(self, role: str, resource: str = "r") -> RawClient:
        jid, password = self.env.accounts[role]
        server = self.env.prosody
        client = await raw_login(server.host, server.c2s_port, user(jid), password,
                                 direct_tls=False, resource=resource)
        self.clients.append(client)
        return client

    async def pair(self, direction: str, sender: str, receiver: str, *,
                   s_res: str = "s", r_res: str = "r") -> tuple[RawClient, RawClient]:
        """c2s: the sender through the proxy, the receiver straight to the server;
        s2c: the other way round."""
        if direction == "c2s":
            return await self.proxied(sender, s_res), await self.direct(receiver, r_res)
        return await self.direct(sender, s_res), await self.proxied(receiver, r_res)

    def close(self) -> None:
        for client in self.clients:
            client.abort()
        self.clients.clear()


@contextlib.asynccontextmanager
async def peers(env: Env) -> AsyncIterator[Peers]:
    group = Peers(env)
    try:
        yield group
    finally:
        group.close()


_sentinels = itertools.count(1)


async def sentinel(sender: RawClient, receiver: RawClient, tag: str = MESSAGE,
                   timeout: float = 10) -> etree._Element:
    """Send a plain message after whatever was sent before and return the next ``tag``
    element the receiver gets: when that is the sentinel itself, nothing sent before it
    (on the same path) was delivered."""
    sid = f"sentinel-{next(_sentinels)}"
    sender.send(f"<message to='{receiver.jid}' id='{sid}'><body>{sid}</body></message>")
    return await receiver.read_until(tag, timeout)


async def receive(raw: RawClient, tag: str = MESSAGE, timeout: float = 10,
                  **attrs: str) -> etree._Element:
    return await raw.read_until(tag, timeout, **attrs)


async def round_trip(raw: RawClient, timeout: float = 10) -> list[etree._Element]:
    """Ping the server and return every element that came before the answer."""
    pid = f"rt-{secrets.token_hex(3)}"
    raw.send(f"<iq type='get' id='{pid}' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>")
    seen = []
    while True:
        el = await raw.read_element(timeout)
        if el.tag == IQ and el.get("id") == pid:
            return seen
        seen.append(el)


async def nothing_for(raw: RawClient, timeout: float = 10) -> None:
    """No stanza (other than presence) reached ``raw`` before a ping round trip."""
    seen = [el for el in await round_trip(raw, timeout) if el.tag != PRESENCE]
    assert not seen, [etree.tostring(el) for el in seen]


DIRECTIONS = ("c2s", "s2c")


# -- match conditions ------------------------------------------------------------------------


def test_match_kind_in_both_directions(env: Env) -> None:
    async def scenario() -> None:
        for direction in DIRECTIONS:
            async with peers(env) as p:
                s, r = await p.pair(direction, "ks", "kr")
                s.send(f"<message to='{r.jid}' id='k1'><body>kind</body></message>")
                assert (await receive(r)).get(KIND) is None, direction
                s.send(f"<presence to='{r.jid}' id='k2'/>")
                assert (await receive(r, PRESENCE, id="k2")).get(KIND) == "hit", direction
                s.send(f"<iq to='{r.jid}' type='get' id='k3'><query xmlns='{DISCO_INFO}'/></iq>")
                assert (await receive(r, IQ, id="k3")).get(KIND) == "hit", direction

    run(scenario(), 40)


def test_match_type_with_implicit_normal_and_available(env: Env) -> None:
    async def scenario() -> None:
        for direction in DIRECTIONS:
            async with peers(env) as p:
                s, r = await p.pair(direction, "ys", "yr")
                to = r.jid
                s.send(f"<message to='{to}' id='y1'><body>no type</body></message>")
                assert hits(await receive(r)) == ["normal"], direction
                s.send(f"<message to='{to}' id='y2' type='normal'><body>normal</body></message>")
                assert hits(await receive(r)) == ["normal"], direction
                s.send(f"<message to='{to}' id='y3' type='chat'><body>chat</body></message>")
                assert hits(await receive(r)) == ["chat-or-headline"], direction
                s.send(f"<message to='{to}' id='y4' type='headline'><body>news</body></message>")
                assert hits(await receive(r)) == ["chat-or-headline"], direction
                s.send(f"<presence to='{to}' id='y5'/>")
                assert hits(await receive(r, PRESENCE, id="y5")) == ["available"], direction
                s.send(f"<presence to='{to}' id='y6' type='unavailable'/>")
                assert hits(await receive(r, PRESENCE, id="y6")) == ["unavailable"], direction

    run(scenario(), 40)


def test_match_from_full_bare_domain_and_globs(env: Env) -> None:
    expected = {  # (sender role, resource) -> markers
        ("fs", "res-one"): ["full", "bare", "domain"],
        ("fs", "gres-7"): ["bare", "domain", "glob-resource"],
        ("fg", "res-one"): ["domain", "glob", "list"],
        ("fg", "other"): ["domain", "glob"],
    }

    async def scenario() -> None:
        for direction in DIRECTIONS:
            async with peers(env) as p:
                if direction == "c2s":
                    r = await p.direct("fr")
                    senders = {k: await p.proxied(*k) for k in expected}
                else:
                    r = await p.proxied("fr")
                    senders = {k: await p.direct(*k) for k in expected}
                for key, markers in expected.items():
                    senders[key].send(f"<message to='{r.jid}'><body>{key}</body></message>")
                    assert hits(await receive(r)) == markers, (direction, key)
                if direction == "s2c":
                    # Stanzas from the server itself and from a subdomain's component:
                    # 'localhost' is the domain and its JIDs, not its subdomains.
                    for domain, markers in (("localhost", ["domain"]),
                                            ("conference.localhost", ["subdomains"])):
                        r.send(f"<iq type='get' id='d-{domain}' to='{domain}'>"
                               f"<query xmlns='{DISCO_INFO}'/></iq>")
                        answer = await receive(r, IQ, id=f"d-{domain}")
                        assert answer.get("from") == domain
                        assert hits(answer) == markers, domain

    run(scenario(), 40)


def test_match_to_full_bare_domain_and_globs(env: Env) -> None:
    expected = {  # (receiver role, resource) -> markers
        ("tr", "res-one"): ["full", "bare", "domain"],
        ("tr", "gres-1"): ["bare", "domain", "glob-resource"],
        ("tg", "other"): ["domain", "glob"],
    }

    async def scenario() -> None:
        for direction in DIRECTIONS:
            async with peers(env) as p:
                if direction == "c2s":
                    s = await p.proxied("ts")
                    receivers = {k: await p.direct(*k) for k in expected}
                else:
                    s = await p.direct("ts")
                    receivers = {k: await p.proxied(*k) for k in expected}
                for key, markers in expected.items():
                    r = receivers[key]
                    s.send(f"<message to='{r.jid}'><body>{key}</body></message>")
                    assert hits(await receive(r)) == markers, (direction, key)

    run(scenario(), 40)


def test_match_xpath_with_a_namespace_map(env: Env) -> None:
    cases = [
        (f"<flag xmlns='{F}' level='high'/>", ["xpath"]),
        (f"<flag xmlns='{F}' level='low'/>", []),
        ("<flag xmlns='urn:other' level='high'/>", []),  # same name, other namespace
        (f"<x xmlns='urn:other'><flag xmlns='{F}' level='high'/></x>", []),  # not a child
        ("", []),
    ]

    async def scenario() -> None:
        for direction in DIRECTIONS:
            async with peers(env) as p:
                s, r = await p.pair(direction, "xs", "xr")
                for payload, markers in cases:
                    s.send(f"<message to='{r.jid}'><body>x</body>{payload}</message>")
                    assert hits(await receive(r)) == markers, (direction, payload)

    run(scenario(), 40)


def test_match_body_regex(env: Env) -> None:
    cases = [
        ("<body>the CODE-123 is here</body>", ["body"]),
        ("<body>code-12</body>", []),
        ("<body>xcode-123</body>", []),
        ("<body xml:lang='en'>nothing</body><body xml:lang='de'>Code-456</body>", ["body"]),
        ("<subject>code-123</subject>", []),  # only bodies are searched
    ]

    async def scenario() -> None:
        for direction in DIRECTIONS:
            async with peers(env) as p:
                s, r = await p.pair(direction, "bs", "br")
                for payload, markers in cases:
                    s.send(f"<message to='{r.jid}'>{payload}</message>")
                    assert hits(await receive(r)) == markers, (direction, payload)

    run(scenario(), 40)


def test_match_all_conditions_must_hold(env: Env) -> None:
    flag = f"<flag xmlns='{F}'/>"

    async def scenario() -> None:
        for direction in DIRECTIONS:
            async with peers(env) as p:
                s, r = await p.pair(direction, "as", "ar")
                other = await (p.direct("ao") if direction == "c2s" else p.proxied("ao"))
                to = r.jid
                cases = [
                    (r, f"<message to='{to}' type='chat'><body>all</body>{flag}</message>",
                     ["all"]),
                    (r, f"<message to='{to}'><body>all</body>{flag}</message>", []),  # type
                    (r, f"<message to='{to}' type='chat'><body>not all</body>{flag}</message>",
                     []),                                                          # body
                    (r, f"<message to='{to}' type='chat'><body>all</body></message>", []),
                    (other, f"<message to='{other.jid}' type='chat'><body>all</body>{flag}"
                            "</message>", []),                                     # to
                ]
                # from: the same stanza from another account
                stranger = await (p.proxied("ao", "o2") if direction == "c2s"
                                  else p.direct("ao", "o2"))
                cases.append((r, cases[0][1], []))
                for n, (receiver, xml, markers) in enumerate(cases):
                    (stranger if n == len(cases) - 1 else s).send(xml)
                    assert hits(await receive(receiver)) == markers, (direction, n, xml)
                s.send(f"<presence to='{to}' id='all-p'>{flag}</presence>")  # kind
                assert hits(await receive(r, PRESENCE, id="all-p")) == []

    run(scenario(), 40)


def test_direction_filters(env: Env) -> None:
    async def scenario() -> None:
        async with peers(env) as p:
            # Through the proxy on both ends: the message is c2s in the sender's session,
            # then s2c in the receiver's; a 'both' rule runs in each.
            s, r = await p.proxied("ds", "s1"), await p.proxied("dr", "r1")
            s.send(f"<message to='{r.jid}'><body>both ends proxied</body></message>")
            assert hits(await receive(r)) == ["c2s", "both", "s2c", "both"]
        for direction, markers in (("c2s", ["c2s", "both"]), ("s2c", ["s2c", "both"])):
            async with peers(env) as p:
                s, r = await p.pair(direction, "ds", "dr")
                s.send(f"<message to='{r.jid}'><body>{direction} only</body></message>")
                assert hits(await receive(r)) == markers, direction

    run(scenario(), 40)


# -- actions ---------------------------------------------------------------------------------


def test_drop_is_silent_in_both_directions(env: Env) -> None:
    async def scenario() -> None:
        for direction in DIRECTIONS:
            async with peers(env) as p:
                s, r = await p.pair(direction, "dps", "dpr")
                s.send(f"<message to='{r.jid}' id='dropped'><body>drop me</body></message>")
                got = await sentinel(s, r)
                assert got.get("id", "").startswith("sentinel"), etree.tostring(got)
                s.send(f"<presence to='{r.jid}' id='kept'/>")  # no body: not dropped
                assert (await receive(r, PRESENCE)).get("id") == "kept"
                await nothing_for(s)  # and the sender hears nothing about it

    run(scenario(), 40)


def test_error_reply_to_the_client_c2s(env: Env) -> None:
    async def scenario() -> None:
        async with peers(env) as p:
            s, r = await p.pair("c2s", "es", "er")
            s.send(f"<message to='{r.jid}' id='e1' type='chat'><body>refuse me</body>"
                   f"<flag xmlns='{F}'/></message>")
            error = await receive(s, MESSAGE, id="e1")
            assert error.get("type") == "error"
            assert error.get("from") == r.jid and error.get("to") == s.jid
            assert condition(error) == ("modify", "policy-violation", "No refusals here.")
            text = error.find(f"{{{CLIENT}}}error/{{{STANZAS}}}text")
            assert text.get(XML_LANG) == "en"
            assert error.find(BODY) is None and error.find(f"{{{F}}}flag") is None  # no echo

            s.send(f"<iq to='{r.jid}' type='get' id='e2'><query xmlns='{DISCO_INFO}'/></iq>")
            error = await receive(s, IQ, id="e2")
            assert error.get("type") == "error" and error.get("from") == r.jid
            assert condition(error) == ("cancel", "service-unavailable", None)

            # An error stanza is never answered with an error: it is just not forwarded.
            s.send(f"<message to='{r.jid}' id='e3' type='error'><error type='cancel'>"
                   f"<item-not-found xmlns='{STANZAS}'/></error></message>")
            got = await sentinel(s, r)
            assert got.get("id", "").startswith("sentinel"), etree.tostring(got)
            await nothing_for(s)

    run(scenario(), 40)


def test_error_reply_goes_back_through_the_server_s2c(env: Env) -> None:
    async def scenario() -> None:
        async with peers(env) as p:
            s, r = await p.pair("s2c", "es", "er")  # the sender is straight on Prosody
            s.send(f"<message to='{r.jid}' id='e1' type='chat'><body>refuse you</body>"
                   "</message>")
            error = await receive(s, MESSAGE, id="e1")
            assert error.get("type") == "error"
            assert error.get("from") == r.jid and error.get("to") == s.jid
            assert condition(error) == ("modify", "policy-violation", "No refusals here.")

            s.send(f"<iq to='{r.jid}' type='get' id='e2'><query xmlns='{DISCO_INFO}'/></iq>")
            error = await receive(s, IQ, id="e2")
            assert error.get("type") == "error" and error.get("from") == r.jid
            assert condition(error) == ("cancel", "service-unavailable", None)

            # The client behind the proxy saw none of it.
            got = await sentinel(s, r, tag=MESSAGE)
            assert got.get("id", "").startswith("sentinel"), etree.tostring(got)
            seen = [el for el in await round_trip(r) if el.tag != PRESENCE]
            assert not seen, [etree.tostring(el) for el in seen]

    run(scenario(), 40)


def test_set_attr_and_remove_attr(env: Env) -> None:
    async def scenario() -> None:
        for direction in DIRECTIONS:
            async with peers(env) as p:
                s, r = await p.pair(direction, "ats", "atr")
                s.send(f"<message to='{r.jid}' id='a1' xml:lang='en'><body>setattr</body>"
                       f"<flag xmlns='{F}' level='1'/><flag xmlns='{F}'/></message>")
                got = await receive(r)
                assert got.get(XML_LANG) == "de", direction
                flags = got.findall(f"{{{F}}}flag")
                assert [f.get("level") for f in flags] == ["42", "42"]
                assert [f.get(f"{{{F}}}mark") for f in flags] == ["marked", "marked"]

                s.send(f"<message to='{r.jid}' id='a2'><body>rmattr</body>"
                       f"<flag xmlns='{F}' level='1' keep='yes'/></message>")
                got = await receive(r)
                assert got.get("id") is None, direction
                flag = got.find(f"{{{F}}}flag")
                assert flag.get("level") is None and flag.get("keep") == "yes"

                s.send(f"<message to='{r.jid}' id='a3'><body>untouched</body>"
                       f"<flag xmlns='{F}' level='1'/></message>")
                got = await receive(r)
                assert got.get("id") == "a3"
                assert got.find(f"{{{F}}}flag").get("level") == "1"

    run(scenario(), 40)


def test_remove_and_add(env: Env) -> None:
    async def scenario() -> None:
        for direction in DIRECTIONS:
            async with peers(env) as p:
                s, r = await p.pair(direction, "rms", "rmr")
                s.send(f"<message to='{r.jid}'><body>strip</body><junk xmlns='{F}'>1</junk>"
                       f"<keep xmlns='{F}'/><junk xmlns='{F}'><junk/></junk>"
                       f"<flag xmlns='{F}' level='9' other='o'/></message>")
                got = await receive(r)
                assert got.findall(f"{{{F}}}junk") == [], direction
                assert got.find(f"{{{F}}}keep") is not None
                flag = got.find(f"{{{F}}}flag")
                assert flag.get("level") is None and flag.get("other") == "o"
                assert got.findtext(BODY) == "strip"

                s.send(f"<message to='{r.jid}'><body>add</body><box xmlns='{F}'/>"
                       f"<box xmlns='{F}'><old/></box></message>")
                got = await receive(r)
                assert got.find(f"{{{HINTS}}}no-store") is not None, direction
                assert got.findtext(SUBJECT) == "Added subject"
                boxes = got.findall(f"{{{F}}}box")
                assert len(boxes) == 2
                for box in boxes:  # each selected element got its own copy, appended last
                    inner = box[-1]
                    assert inner.tag == f"{{{T}}}inner" and inner.get("n") == "1"
                    assert inner.find(f"{{{T}}}deep") is not None
                # appended in the order given, after the stanza's own children
                names = [etree.QName(c).localname for c in got]
                assert names[-2:] == ["no-store", "subject"], names

    run(scenario(), 40)


def test_replace_in_body_and_by_xpath(env: Env) -> None:
    async def scenario() -> None:
        for direction in DIRECTIONS:
            async with peers(env) as p:
                s, r = await p.pair(direction, "rps", "rpr")
                s.send(f"<message to='{r.jid}'><subject>card talk</subject>"
                       "<body>pay 1234-5678-9012-3456 or 1111-2222-3333-4444 now</body>"
                       "<body xml:lang='de'>Karte 9999-8888-7777-6666</body></message>")
                got = await receive(r)
                assert [b.text for b in got.findall(BODY)] == [
                    "pay 1234-****-****-3456 or 1111-****-****-4444 now",
                    "Karte 9999-****-****-6666"], direction
                assert got.findtext(SUBJECT) == "[subject hidden]"
                s.send(f"<message to='{r.jid}'><body>no card 1234-5678</body></message>")
                assert (await receive(r)).findtext(BODY) == "no card 1234-5678"

    run(scenario(), 40)


def test_redirect_c2s_delivers_to_another_user(env: Env) -> None:
    async def scenario() -> None:
        async with peers(env) as p:
            s = await p.proxied("rds")
            first = await p.direct("rd1")
            second = await p.direct("rd2")
            second.send("<presence/>")  # available: the server delivers to the bare JID
            await receive(second, PRESENCE)
            s.send(f"<message to='{env.jid('rd1')}' id='rd' type='chat'>"
                   "<body>redirect me</body></message>")
            got = await receive(second)
            assert got.get("id") == "rd" and got.findtext(BODY) == "redirect me"
            assert got.get("to") == env.jid("rd2")
            assert got.get("from") == s.jid
            assert hits(got) == ["saw-new-to"]  # a later rule saw the new address
            # and the original addressee got nothing
            first_got = await sentinel(s, first)
            assert first_got.get("id", "").startswith("sentinel"), etree.tostring(first_got)
            await nothing_for(s)  # no error for the sender either

    run(scenario(), 40)


def test_redirect_s2c_rewrites_to_before_the_client_and_later_rules(env: Env) -> None:
    async def scenario() -> None:
        async with peers(env) as p:
            s, r = await p.pair("s2c", "rds", "rd1")
            s.send(f"<message to='{r.jid}' id='rd' type='chat'><body>redirect it</body>"
                   "</message>")
            got = await receive(r)
            assert got.get("id") == "rd"
            assert got.get("to") == env.jid("rd2")
            assert hits(got) == ["saw-new-to"]
            s.send(f"<message to='{r.jid}' id='plain' type='chat'><body>stay</body></message>")
            assert (await receive(r)).get("to") == r.jid

    run(scenario(), 40)


def test_log_action_writes_an_event_with_its_fields(env: Env) -> None:
    sessions: dict[str, str] = {}

    async def scenario() -> None:
        for direction in DIRECTIONS:
            async with peers(env) as p:
                s, r = await p.pair(direction, "ls", "lr")
                sessions[direction] = (s if direction == "c2s" else r).jid
                s.send(f"<message to='{r.jid}' id='log-{direction}'><body>logme</body>"
                       f"<body xml:lang='de'>zwei</body><flag xmlns='{F}' level='up'/>"
                       "</message>")
                got = await receive(r)
                assert got.get("id") == f"log-{direction}"  # logged and forwarded
                s.send(f"<message to='{r.jid}'><body>not logged</body></message>")
                await receive(r)

    run(scenario(), 40)
    proxy = env.proxy
    for direction, jid in sessions.items():
        event = proxy.wait_event("xf_test_logged", lambda e, j=jid: e.get("jid") == j)
        assert event["rule"] == "log-it"
        assert event["level"] == "info"
        expected = {"constant": "hello", "number": 7, "yes_no": True, "nothing": None,
                    "lvl": "up", "bodies": 2, "first_body": "logme", "absent": None}
        assert {k: event.get(k, "MISSING") for k in expected} == expected, direction
        assert event.get("session")
    assert len([e for e in proxy.events("xf_test_logged")
                if e.get("jid") in sessions.values()]) == 2


def test_log_action_event_carries_direction_and_addresses(env: Env) -> None:
    senders: dict[str, tuple[str, str]] = {}

    async def scenario() -> None:
        for direction in DIRECTIONS:
            async with peers(env) as p:
                s, r = await p.pair(direction, "ls", "lr", s_res="addr-s", r_res="addr-r")
                senders[direction] = (s.jid, r.jid)
                s.send(f"<message to='{r.jid}' id='addr-{direction}'><body>logme too</body>"
                       "</message>")
                await receive(r)

    run(scenario(), 40)
    for direction, (frm, to) in senders.items():
        event = env.proxy.wait_event(
            "xf_test_logged", lambda e, d=direction: e.get("jid", "").endswith(
                "/addr-s" if d == "c2s" else "/addr-r"))
        assert event.get("direction") == direction
        assert event.get("from") == frm and event.get("to") == to


def test_stop_ends_the_rules_for_that_stanza(env: Env) -> None:
    async def scenario() -> None:
        for direction in DIRECTIONS:
            async with peers(env) as p:
                s, r = await p.pair(direction, "ss", "sr")
                s.send(f"<message to='{r.jid}'><body>stop now</body></message>")
                got = await receive(r)
                assert hits(got) == ["before-stop"], direction  # forwarded, later rule not run
                s.send(f"<message to='{r.jid}'><body>go on</body></message>")
                assert hits(await receive(r)) == ["after-stop"], direction

    run(scenario(), 40)


def test_several_actions_apply_in_order(env: Env) -> None:
    async def scenario() -> None:
        for direction in DIRECTIONS:
            async with peers(env) as p:
                s, r = await p.pair(direction, "ms", "mr")
                s.send(f"<message to='{r.jid}'><body>multi step</body>"
                       f"<junk xmlns='{F}'/></message>")
                got = await receive(r)
                assert got.findtext(BODY) == "MULTI step", direction
                step = got.find(f"{{{T}}}step")
                assert step is not None and step.get("n") == "2"  # set_attr ran after add
                assert step.find(f"{{{T}}}child") is not None
                assert got.find(f"{{{F}}}junk") is None
                assert hits(got) == ["saw-rewrite"]  # the next rule saw all of it

    run(scenario(), 40)


def test_redirect_then_log_then_error_in_one_rule(env: Env) -> None:
    async def scenario() -> None:
        for direction in DIRECTIONS:
            async with peers(env) as p:
                s, r = await p.pair(direction, "ms", "mr", s_res=f"b-{direction}")
                s.send(f"<message to='{r.jid}' id='bounce' type='chat'><body>bounce</body>"
                       "</message>")
                error = await receive(s, MESSAGE, id="bounce")
                assert error.get("type") == "error"
                # c2s: the proxy answers the client itself, from the new address. s2c: the
                # answer goes through the legacy server, which stamps the session's own JID
                # on whatever its client (here the proxy) sends.
                sender = env.jid("mx") if direction == "c2s" else r.jid
                assert error.get("from") == sender, (direction, etree.tostring(error))
                assert error.get("to") == s.jid
                assert condition(error) == ("wait", "recipient-unavailable",
                                            "Redirected, then refused.")
                got = await sentinel(s, r)
                assert got.get("id", "").startswith("sentinel"), etree.tostring(got)

    run(scenario(), 40)
    bounced = [e for e in env.proxy.events("xf_test_bounced") if e.get("rule")]
    assert len(bounced) == 2 and all(e["new_to"] == env.jid("mx") for e in bounced)


# -- loading, validation, reload -------------------------------------------------------------


BAD_RULES = {
    "bad-xpath": ("match: {xpath: 'client:body['}", "bad XPath"),
    "unknown-prefix": ("match: {xpath: 'cs:active'}", "undeclared namespace prefix 'cs'"),
    "bad-regex": ("match: {body: '(unclosed'}", "bad regex"),
    "unknown-action": ("actions: [explode]", "unknown action 'explode'"),
    "malformed-add": ("actions: [{add: '<a><b></a>'}]", "malformed XML"),
}


def write_config(folder: Path, certs: tuple[Path, Path], rules: list[str]) -> Path:
    config = folder / "front.yaml"
    config.write_text(yaml.safe_dump({
        "listen": [{"host": "127.0.0.1", "port": 0}],
        "tls": {"cert": str(certs[0]), "key": str(certs[1])},
        "rules": rules,
    }))
    return config


def front(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], cwd=REPO, text=True,
                          capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("kind", sorted(BAD_RULES))
def test_check_rejects_a_bad_rule_file(kind: str, tmp_path: Path,
                                       certs: tuple[Path, Path]) -> None:
    body, problem = BAD_RULES[kind]
    good = tmp_path / "good.yaml"
    good.write_text("- name: fine\n  match: {kind: message}\n")
    bad = tmp_path / f"{kind}.yaml"
    bad.write_text(f"rules:\n  - name: fine-too\n    match: {{kind: iq}}\n"
                   f"  - name: the-{kind}-rule\n    {body}\n")
    config = write_config(tmp_path, certs, ["good.yaml", f"{kind}.yaml"])
    done = front("check", "-c", str(config))
    assert done.returncode == 2, done
    lines = [line for line in done.stderr.splitlines() if problem in line]
    assert lines, done.stderr
    assert str(bad) in lines[0] and f"rule 'the-{kind}-rule'" in lines[0], lines[0]
    assert "good.yaml" not in done.stderr and "fine" not in done.stderr

    bad.write_text(f"rules:\n  - name: the-{kind}-rule\n    match: {{kind: iq}}\n")
    done = front("check", "-c", str(config))
    assert done.returncode == 0, done.stderr


def test_run_with_a_bad_rule_file_exits_2_without_starting(tmp_path: Path,
                                                           certs: tuple[Path, Path]) -> None:
    (tmp_path / "bad.yaml").write_text(
        "- name: broken\n  match: {body: '(unclosed'}\n")
    config = write_config(tmp_path, certs, ["bad.yaml"])
    done = front("run", "-c", str(config))
    assert done.returncode == 2, done
    assert "listening" not in done.stdout
    assert "bad.yaml" in done.stderr and "rule 'broken'" in done.stderr


def reload_rules(marker: str) -> str:
    return ("- name: reloadable\n"
            "  match: {body: '^reload'}\n"
            f"  actions: [{{replace: {{pattern: '^reload', with: '{marker}'}}}}]\n")


def test_reload_on_change_and_sighup_keeps_the_old_rules_on_a_bad_file(
        make_proxy: Callable[..., ProxyProcess], accounts: Callable[..., tuple[str, str]],
        prosody: LegacyProsody, tmp_path: Path) -> None:
    rule_file = tmp_path / "live.yaml"
    rule_file.write_text(reload_rules("v1"))
    proxy = make_proxy(rules=[str(rule_file)], log={"level": "info"})
    alice, bob = accounts("alice"), accounts("bob")

    def wait_count(name: str, count: int, timeout: float = 10) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while len(events := proxy.events(name)) < count:
            assert time.monotonic() < deadline, f"no {name} #{count}:\n{proxy.log_tail()}"
            time.sleep(0.05)
        return events[count - 1]

    async def scenario() -> None:
        a = await raw_login(proxy.host, proxy.port, user(alice[0]), alice[1],
                            direct_tls=False, resource="live")
        b = await raw_login(prosody.host, prosody.c2s_port, user(bob[0]), bob[1],
                            direct_tls=False, resource="live")
        loop = asyncio.get_running_loop()

        async def says() -> str:
            a.send(f"<message to='{b.jid}'><body>reload test</body></message>")
            return (await receive(b)).findtext(BODY)

        def rewrite(text: str, *, keep_stamp: bool = False) -> None:
            """Replace the file at once (the watcher never sees it half written); with
            ``keep_stamp`` (same size needed) the watcher cannot see the change at all."""
            stat = rule_file.stat()
            fresh = rule_file.with_suffix(".new")
            fresh.write_text(text)
            if keep_stamp:
                assert fresh.stat().st_size == stat.st_size
                os.utime(fresh, ns=(stat.st_atime_ns, stat.st_mtime_ns))
            os.replace(fresh, rule_file)

        try:
            assert await says() == "v1 test"

            rewrite(reload_rules("v2"), keep_stamp=True)  # same size, same mtime
            os.kill(proxy.proc.pid, signal.SIGHUP)
            # SIGHUP reloads the whole configuration, the rule files with it.
            event = await loop.run_in_executor(None, wait_count, "config_reloaded", 1)
            assert event["why"] == "SIGHUP" and event["rules"] == 1
            assert await says() == "v2 test"

            rewrite(reload_rules("v3 (watched)"))
            event = await loop.run_in_executor(None, wait_count, "rules_reloaded", 1)
            assert event["why"] != "SIGHUP" and event["names"] == ["reloadable"]
            assert await says() == "v3 (watched) test"

            rewrite(reload_rules("v4").replace("'^reload'", "'(unclosed'"))
            event = await loop.run_in_executor(None, wait_count, "rules_reload_refused", 1)
            assert "live.yaml" in event["error"] and "reloadable" in event["error"]
            assert event["level"] == "error" and event["rules_in_force"] == 1
            assert await says() == "v3 (watched) test"  # the old rules are still in force

            os.kill(proxy.proc.pid, signal.SIGHUP)  # a SIGHUP on the bad file: refused too
            event = await loop.run_in_executor(None, wait_count, "config_reload_refused", 1)
            assert event["why"] == "SIGHUP"
            assert any("live.yaml" in p for p in event["problems"]), event
            assert await says() == "v3 (watched) test"

            rewrite("- name: fixed\n  match: {body: '^reload'}\n  actions: [drop]\n")
            await loop.run_in_executor(None, wait_count, "rules_reloaded", 2)
            a.send(f"<message to='{b.jid}'><body>reload dropped</body></message>")
            got = await sentinel(a, b)
            assert got.get("id", "").startswith("sentinel"), etree.tostring(got)
        finally:
            a.abort()
            b.abort()

    run(scenario(), 60)
    assert proxy.running
    assert len(proxy.events("rules_reloaded")) == 2


def test_rules_test_passes_on_the_shipped_packs() -> None:
    done = front("rules", "test")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.strip().splitlines()
    passed = re.fullmatch(r"(\d+) passed, 0 failed", lines[-1])
    assert passed, lines[-1]
    assert int(passed[1]) == sum(line.startswith("PASS ") for line in lines) > 0
    packs = sorted(p.name for p in (REPO / "rules").glob("*.yaml"))
    assert {line.split()[1].rstrip(":").split("/")[-1] for line in lines[:-1]} == set(packs)

