"""Matching one stanza fast: JID patterns, XPath guards, and the per-stanza facts that all
rules share (read once, not once per rule)."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from typing import Any, NoReturn


from ..xmpp import ns
from ..xmpp import stanza as st
from ..xmpp.jid import InvalidJid, Jid
from ..xmpp.stanza import Element


IMPLICIT_TYPE = {st.MESSAGE: "normal", st.PRESENCE: "available", st.IQ: ""}
_BODY = ns.qname(ns.CLIENT, "body")
_GLOB_CHARS = frozenset("*?[")


class JidMatcher:
    """JID patterns: a full JID (exactly that), a bare JID (it and its full JIDs), a domain
    (it and every JID at it), or a glob (matched against the bare JID, or against the full JID
    when the glob has a '/'); case-insensitive except for resources in exact patterns."""

    __slots__ = ("bare", "bare_glob", "domains", "full", "full_glob")

    def __init__(self, patterns: list[str], fail: Callable[[str], NoReturn]) -> None:
        self.full: set[str] = set()
        self.bare: set[str] = set()
        self.domains: set[str] = set()
        bare_globs: list[str] = []
        full_globs: list[str] = []
        for pattern in patterns:
            if _GLOB_CHARS.intersection(pattern):
                globs = full_globs if "/" in pattern else bare_globs
                globs.append(fnmatch.translate(pattern))
                continue
            try:
                jid = Jid.parse(pattern)
            except InvalidJid as exc:
                fail(f"bad JID pattern {pattern!r}: {exc}")
            if jid.resource:
                self.full.add(str(jid))
            elif jid.local:
                self.bare.add(str(jid))
            else:
                self.domains.add(jid.domain)
        self.bare_glob = re.compile("|".join(bare_globs), re.I) if bare_globs else None
        self.full_glob = re.compile("|".join(full_globs), re.I) if full_globs else None

    def matches(self, parts: tuple[str, str, str | None] | None) -> bool:
        """``parts``: see :meth:`StanzaFacts.jid`."""
        if parts is None:
            return False
        bare, domain, full = parts
        if bare in self.bare or domain in self.domains:
            return True
        if self.bare_glob is not None and self.bare_glob.match(bare):
            return True
        if full is None:
            return False
        return full in self.full or bool(self.full_glob is not None
                                         and self.full_glob.match(full))


def truthy(result: Any) -> bool:
    """XPath 1.0 boolean() of any result."""
    if isinstance(result, float):
        return result == result and result != 0  # NaN is false
    return bool(result)


_NAME = r"[A-Za-z_][\w.-]*"
# A location path (after _skeleton) whose first step is a prefixed child element.
_GUARDED_PATH = re.compile(
    rf"(?:child::)?({_NAME}):(?:{_NAME}|\*)(?:\[\])*"
    rf"(?:/{{1,2}}(?:[a-z-]+::)?@?(?:(?:{_NAME}:)?(?:{_NAME}|\*)(?:\(\))?|\.\.?)(?:\[\])*)*")
_OR = re.compile(r"(?<![\w.-])or(?![\w.-])")
_AND = re.compile(r"\s+and\s+")


def _skeleton(expr: str) -> str | None:
    """``expr`` with string literals and the insides of [...] and (...) taken out."""
    out, depth, quote = [], 0, ""
    for ch in expr:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
            if depth == 0:
                out.append("''")
        elif ch in "[(":
            depth += 1
            if depth == 1:
                out.append(ch)
        elif ch in "])":
            depth -= 1
            if depth == 0:
                out.append(ch)
        elif depth == 0:
            out.append(ch)
    return "".join(out) if depth == 0 and not quote else None


def xpath_guard(expr: str, namespaces: dict[str, str]) -> frozenset[str] | None:
    """Namespaces of which the stanza needs a child element for ``expr`` to be true, or None
    when that cannot be told. Conservative: only for a location path (or a union of them, or
    a conjunction with one) whose first step is a prefixed child element, e.g. ``cs:*``,
    ``x:html | y:body``, ``j:jingle[@action='x']/j:content and not(z:y)``."""
    skel = _skeleton(expr)
    if skel is None or _OR.search(skel):
        return None
    for conjunct in _AND.split(skel.strip()):
        uris: set[str] = set()
        for alt in conjunct.split("|"):
            m = _GUARDED_PATH.fullmatch(alt.strip())
            uri = namespaces.get(m.group(1)) if m else None
            if uri is None:
                break
            uris.add(uri)
        else:
            return frozenset(uris)
    return None


class StanzaFacts:
    """What rules ask of one stanza, computed when first asked and kept until an action may
    have changed the stanza (:meth:`reset`), so that fifty rules read it once."""

    __slots__ = ("_bodies", "_children", "_jids", "_type", "el", "guards")

    def __init__(self, el: Element, guards: bool) -> None:
        self.el = el
        self.guards = guards  # worth computing the children's namespaces for XPath guards
        self.reset()

    def reset(self) -> None:
        self._type: str | None = None
        self._jids: dict[str, tuple[str, str, str | None] | None] = {}
        self._bodies: list[str] | None = None
        self._children: set[str] | None = None

    def type(self) -> str:
        if self._type is None:
            self._type = self.el.get("type") or IMPLICIT_TYPE[self.el.tag]
        return self._type

    def jid(self, attr: str) -> tuple[str, str, str | None] | None:
        """(bare JID lowercased, its domain, the full JID or None), None when absent."""
        jids = self._jids
        if attr in jids:  # (no try/except: the first lookup would raise every time)
            return jids[attr]
        value = self.el.get(attr)
        parts = None
        if value:
            bare, slash, resource = value.partition("/")
            bare = bare.lower()
            parts = (bare, bare.rpartition("@")[2], f"{bare}/{resource}" if slash else None)
        jids[attr] = parts
        return parts

    def bodies(self) -> list[str]:
        bodies = self._bodies
        if bodies is None:
            if self.guards:  # the children's namespaces will be wanted too: one pass
                bodies = self._scan()
            else:
                bodies = self._bodies = [b.text for b in self.el.iterchildren(_BODY) if b.text]
        return bodies

    def children(self) -> set[str] | None:
        """The namespaces of the stanza's child elements (None: guards are not used)."""
        if self._children is None and self.guards:
            self._scan()
        return self._children

    def _scan(self) -> list[str]:
        """The children's namespaces and the body texts, in one pass over the children."""
        found: set[str] = set()
        bodies: list[str] = []
        for c in self.el:
            tag = c.tag
            if isinstance(tag, str) and tag[0] == "{":
                if tag == _BODY:
                    text = c.text
                    if text:
                        bodies.append(text)
                found.add(tag[1:tag.index("}")])
        self._children, self._bodies = found, bodies
        return bodies
