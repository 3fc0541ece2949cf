"""Service discovery (XEP-0030 disco#info) and entity capabilities (XEP-0115). Socket-free.

The proxy learns what the legacy server offers (its domain's and the account's disco#info,
asked once after each bind), adds what it provides itself, and recomputes the caps hash of
the result, so a client's view of the server is true: nothing the proxy does not provide is
listed, and nothing it provides is missing.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from lxml import etree

from . import ns
from . import stanza as st
from .stanza import Element

DATA_FORMS = "jabber:x:data"
_QUERY = ns.qname(ns.DISCO_INFO, "query")
_IDENTITY = ns.qname(ns.DISCO_INFO, "identity")
_FEATURE = ns.qname(ns.DISCO_INFO, "feature")
_FORM = ns.qname(DATA_FORMS, "x")
_XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"


@dataclass(frozen=True, slots=True)
class Identity:
    category: str
    type: str
    name: str = ""
    lang: str = ""


@dataclass(frozen=True)
class DiscoInfo:
    """One entity's disco#info answer: identities, feature vars and extension forms (kept
    as serialized XML, for XEP-0128 service discovery extensions and the caps hash)."""

    identities: tuple[Identity, ...] = ()
    features: frozenset[str] = frozenset()
    forms: tuple[bytes, ...] = ()

    def has(self, var: str) -> bool:
        return var in self.features

    def with_features(self, extra: Iterable[str]) -> DiscoInfo:
        added = frozenset(extra) - self.features
        return replace(self, features=self.features | added) if added else self


@dataclass(frozen=True)
class ServerInfo:
    """What the legacy server said about itself after a bind: its domain's disco#info and
    the account's (bare JID). None where it did not answer (or answered an error)."""

    domain: DiscoInfo | None = None
    account: DiscoInfo | None = None

    def domain_has(self, var: str) -> bool:
        return self.domain is not None and self.domain.has(var)

    def account_has(self, var: str) -> bool:
        return self.account is not None and self.account.has(var)

    def has(self, var: str) -> bool:
        """Provided by the server for this account, on either entity."""
        return self.domain_has(var) or self.account_has(var)


@dataclass
class Additions:
    """What the proxy adds to each entity's disco#info, from the features that emulate
    something (filled by the pipeline at each discovery)."""

    domain: set[str] = field(default_factory=set)
    account: set[str] = field(default_factory=set)

    def frozen(self) -> FrozenAdditions:
        return FrozenAdditions(frozenset(self.domain), frozenset(self.account))


@dataclass(frozen=True, slots=True)
class FrozenAdditions:
    """``Additions`` once the pipeline has filled them: what a session keeps, shared by
    every session whose server said the same of itself, so never changed."""

    domain: frozenset[str] = frozenset()
    account: frozenset[str] = frozenset()


def info_query(to: str, iq_id: str, node: str | None = None) -> Element:
    iq = st.element("iq", {"type": "get", "to": to, "id": iq_id})
    query = st.sub(iq, "query", namespace=ns.DISCO_INFO)
    if node:
        query.set("node", node)
    return iq


def parse_info(reply: Element) -> DiscoInfo | None:
    """The disco#info in an iq result, or None for an error or an empty answer."""
    if reply.get("type") != "result":
        return None
    query = reply.find(_QUERY)
    if query is None:
        return None
    identities = tuple(
        Identity(el.get("category", ""), el.get("type", ""), el.get("name", ""),
                 el.get(_XML_LANG, ""))
        for el in query.iter(_IDENTITY))
    features = frozenset(v for el in query.iter(_FEATURE) if (v := el.get("var")))
    forms = tuple(etree.tostring(el) for el in query.iter(_FORM))
    return DiscoInfo(identities, features, forms)


def fill_query(query: Element, info: DiscoInfo) -> None:
    """Write ``info`` into an (empty) ``<query xmlns=disco#info/>``."""
    for ident in info.identities:
        el = st.sub(query, "identity", {"category": ident.category, "type": ident.type})
        if ident.name:
            el.set("name", ident.name)
        if ident.lang:
            el.set(_XML_LANG, ident.lang)
    for var in sorted(info.features):
        st.sub(query, "feature", {"var": var})
    for form in info.forms:
        query.append(etree.fromstring(form))


def add_features(query: Element, extra: Iterable[str]) -> list[str]:
    """Add the feature vars the answer lacks; returns those it added."""
    present = {el.get("var") for el in query.iter(_FEATURE)}
    added = sorted(set(extra) - present)
    for var in added:
        st.sub(query, "feature", {"var": var})
    return added


def _form_fields(form: bytes) -> tuple[str, list[tuple[str, list[str]]]]:
    el = etree.fromstring(form)
    form_type, fields = "", []
    for f in el.iter(ns.qname(DATA_FORMS, "field")):
        values = [v.text or "" for v in f.iter(ns.qname(DATA_FORMS, "value"))]
        if f.get("var") == "FORM_TYPE":
            form_type = values[0] if values else ""
        else:
            fields.append((f.get("var", ""), values))
    return form_type, fields


def caps_ver(info: DiscoInfo) -> str:
    """XEP-0115 §5.1 verification string, SHA-1, base64."""
    parts: list[str] = []
    for ident in sorted(info.identities, key=lambda i: (i.category, i.type, i.lang, i.name)):
        parts.append(f"{ident.category}/{ident.type}/{ident.lang}/{ident.name}<")
    parts.extend(f"{var}<" for var in sorted(info.features))
    forms = sorted((_form_fields(f) for f in info.forms), key=lambda f: f[0])
    for form_type, fields in forms:
        if not form_type:  # §5.4: a form without FORM_TYPE is ignored
            continue
        parts.append(f"{form_type}<")
        for var, values in sorted(fields, key=lambda f: f[0]):
            parts.append(f"{var}<")
            parts.extend(f"{v}<" for v in sorted(values))
    digest = hashlib.sha1("".join(parts).encode("utf-8")).digest()
    return base64.b64encode(digest).decode("ascii")


def caps_element(node: str, ver: str) -> Element:
    return st.element("c", {"hash": "sha-1", "node": node, "ver": ver}, namespace=ns.CAPS)
