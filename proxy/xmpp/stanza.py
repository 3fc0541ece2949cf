"""Stanza helpers: what kind a top-level element is, building elements, error replies."""

from __future__ import annotations

from typing import TypeAlias

from lxml import etree

from . import ns

Element: TypeAlias = etree._Element

MESSAGE = ns.qname(ns.CLIENT, "message")
PRESENCE = ns.qname(ns.CLIENT, "presence")
IQ = ns.qname(ns.CLIENT, "iq")
STANZA_TAGS = frozenset((MESSAGE, PRESENCE, IQ))

# RFC 6120 §8.3.3: the error type that goes with each defined condition by default.
DEFAULT_ERROR_TYPE = {
    "bad-request": "modify",
    "conflict": "cancel",
    "feature-not-implemented": "cancel",
    "forbidden": "auth",
    "gone": "cancel",
    "internal-server-error": "cancel",
    "item-not-found": "cancel",
    "jid-malformed": "modify",
    "not-acceptable": "modify",
    "not-allowed": "cancel",
    "not-authorized": "auth",
    "policy-violation": "modify",
    "recipient-unavailable": "wait",
    "redirect": "modify",
    "registration-required": "auth",
    "remote-server-not-found": "cancel",
    "remote-server-timeout": "wait",
    "resource-constraint": "wait",
    "service-unavailable": "cancel",
    "subscription-required": "auth",
    "undefined-condition": "cancel",
    "unexpected-request": "wait",
}


def element(tag: str, attrib: dict[str, str] | None = None, *, text: str | None = None,
            namespace: str = ns.CLIENT) -> Element:
    """An element in ``namespace`` declared as the default one (never an ``ns0:`` prefix)."""
    el = etree.Element(ns.qname(namespace, tag), attrib or {}, nsmap={None: namespace})
    if text is not None:
        el.text = text
    return el


def sub(parent: Element, tag: str, attrib: dict[str, str] | None = None, *,
        text: str | None = None, namespace: str | None = None) -> Element:
    """A child; in the parent's namespace unless another is given (then declared default)."""
    if namespace is None:
        parent_ns = etree.QName(parent).namespace
        child = etree.SubElement(parent, ns.qname(parent_ns, tag) if parent_ns else tag,
                                 attrib or {})
    else:
        child = etree.SubElement(parent, ns.qname(namespace, tag), attrib or {},
                                 nsmap={None: namespace})
    if text is not None:
        child.text = text
    return child


def kind(el: Element) -> str | None:
    """``message``, ``presence`` or ``iq`` for a stanza; None for anything else (nonzas)."""
    if el.tag in STANZA_TAGS:
        return el.tag[len(ns.CLIENT) + 2:]
    return None


def is_stanza(el: Element) -> bool:
    return el.tag in STANZA_TAGS


def child(el: Element, namespace: str, local: str) -> Element | None:
    return el.find(ns.qname(namespace, local))


def error_reply(stanza: Element, condition: str, *, error_type: str | None = None,
                text: str | None = None, by: str | None = None) -> Element:
    """The error reply to ``stanza`` (RFC 6120 §8.3.1): same kind and id, addresses swapped.

    Only the error child is sent back: echoing the original payload is optional and would
    bounce large or sensitive content.
    """
    reply = _reply(stanza, "error")
    err = sub(reply, "error", {"type": error_type or DEFAULT_ERROR_TYPE.get(condition, "cancel")})
    if by:
        err.set("by", by)
    sub(err, condition, namespace=ns.STANZA_ERRORS)
    if text:
        t = sub(err, "text", namespace=ns.STANZA_ERRORS, text=text)
        t.set("{http://www.w3.org/XML/1998/namespace}lang", "en")
    return reply


def _reply(request: Element, reply_type: str) -> Element:
    """A stanza of the request's kind and id going back: ``to`` and ``from`` swapped."""
    reply = element(etree.QName(request).localname, {"type": reply_type})
    for source, target in (("id", "id"), ("from", "to"), ("to", "from")):
        value = request.get(source)
        if value is not None and (value or source == "id"):
            reply.set(target, value)
    return reply


def iq_result(request: Element, payload: Element | None = None) -> Element:
    reply = _reply(request, "result")
    if payload is not None:
        reply.append(payload)
    return reply


def error_condition(el: Element) -> str | None:
    """The defined condition of a stanza's error, or of a stream error / SASL or SM failure."""
    err = el.find(ns.qname(ns.CLIENT, "error")) if is_stanza(el) else el
    if err is None:
        return None
    for c in err:
        if isinstance(c.tag, str) and etree.QName(c).localname != "text":
            return etree.QName(c).localname
    return None
