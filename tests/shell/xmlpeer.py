"""Shared bits of the scripted peers: an incremental reader of one XML stream, element
matching for the Playbook-style waits, and a "wait until" helper.

Self-contained on purpose (like tests/peers/rawclient.py): nothing here imports the
`proxy` package, so the scripted peers do not share the code they test.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Callable
from typing import Any, TypeAlias

from lxml import etree

NS_STREAM = "http://etherx.jabber.org/streams"
NS_CLIENT = "jabber:client"
NS_SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
NS_BIND = "urn:ietf:params:xml:ns:xmpp-bind"
NS_SESSION = "urn:ietf:params:xml:ns:xmpp-session"
NS_STREAMS = "urn:ietf:params:xml:ns:xmpp-streams"
NS_STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
NS_PING = "urn:xmpp:ping"
NS_DISCO_INFO = "http://jabber.org/protocol/disco#info"
NS_SM = "urn:xmpp:sm:3"
NS_DELAY = "urn:xmpp:delay"
NS_ROSTER = "jabber:iq:roster"

Element: TypeAlias = etree._Element
STANZA_KINDS = ("message", "presence", "iq")


def q(ns: str, name: str) -> str:
    return f"{{{ns}}}{name}"


def tostring(el: Element) -> str:
    return etree.tostring(el, encoding="unicode")


def kind(el: Element) -> str | None:
    """'message', 'presence' or 'iq' for a stanza, else None."""
    qn = etree.QName(el)
    return qn.localname if qn.namespace == NS_CLIENT and qn.localname in STANZA_KINDS else None


def body(el: Element) -> str | None:
    return el.findtext(q(NS_CLIENT, "body"))


def error_condition(el: Element) -> str | None:
    """The defined condition of a stanza error or a stream error, if `el` carries one."""
    holder = el if etree.QName(el).localname == "error" else el.find(q(NS_CLIENT, "error"))
    if holder is None:
        return None
    for child in holder:
        qn = etree.QName(child)
        if qn.namespace in (NS_STANZAS, NS_STREAMS) and qn.localname != "text":
            return qn.localname
    return ""


def is_ping(el: Element) -> bool:
    return kind(el) == "iq" and el.get("type") == "get" and el.find(q(NS_PING, "ping")) is not None


def matches(el: Element, *, kind_: str | None = None, tag: str | None = None,
            type: str | None = None, body_: str | None = None, id: str | None = None,
            to: str | None = None, frm: str | None = None, error: str | None = None,
            child: str | None = None, where: Callable[[Element], bool] | None = None) -> bool:
    """Every given criterion holds. ``child`` is a Clark tag of a direct child."""
    if kind_ is not None and kind(el) != kind_:
        return False
    if tag is not None and el.tag != tag:
        return False
    for attr, want in (("type", type), ("id", id), ("to", to), ("from", frm)):
        if want is not None and el.get(attr) != want:
            return False
    if body_ is not None and body(el) != body_:
        return False
    if error is not None and error_condition(el) != error:
        return False
    if child is not None and el.find(child) is None:
        return False
    return where is None or bool(where(el))


def criteria(kw: dict[str, Any]) -> dict[str, Any]:
    """Playbook spelling (kind=, body=, from_=) to `matches` arguments."""
    out = dict(kw)
    for short, long in (("kind", "kind_"), ("body", "body_"), ("from_", "frm")):
        if short in out:
            out[long] = out.pop(short)
    return out


def describe(kw: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kw.items()) or "anything"


class Changes:
    """Wake waiters whenever something was recorded; every wait is bounded."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def until(self, check: Callable[[], Any], timeout: float, what: str) -> Any:
        """The first ``check()`` that is not None or False, re-checked after every change;
        TimeoutError
        naming ``what`` after ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            result = check()
            if result is not None and result is not False:
                return result
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
            event = self._event
            try:
                async with asyncio.timeout(remaining):
                    await event.wait()
            except TimeoutError:
                pass


class StreamReader:
    """Top-level children of one ``<stream:stream>``, fed bytes as they come.

    ``opened`` holds the peer's header attributes once seen; ``closed`` turns True at its
    ``</stream:stream>``. ``restart()`` starts a new document (after STARTTLS or SASL).
    """

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        self._parser = etree.XMLPullParser(events=("start", "end"), resolve_entities=False,
                                           no_network=True)
        self._depth = 0
        self.opened: dict[str, str] | None = None
        self.closed = False

    def feed(self, data: bytes) -> list[Element]:
        """The complete top-level elements in ``data`` (plus what came before)."""
        if self.closed:
            return []
        self._parser.feed(data)
        out = []
        for event, el in self._parser.read_events():
            if event == "start":
                if self._depth == 0:
                    self.opened = {str(k): str(v) for k, v in el.attrib.items()}
                self._depth += 1
            else:
                self._depth -= 1
                if self._depth == 0:
                    self.closed = True
                elif self._depth == 1:
                    out.append(copy.deepcopy(el))
                    while el.getprevious() is not None:  # keep the tree small
                        del el.getparent()[0]
        return out
