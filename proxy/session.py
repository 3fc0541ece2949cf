"""Where the client side and the upstream side meet: the per-session relay core.

Sans-IO: it takes stanzas and returns what to send where. The feature pipeline (stream
management, roster versioning, rules, ...) plugs in here; each feature may pass, change,
answer or drop a stanza.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from lxml import etree

from .xmpp.jid import Jid

Element = etree._Element


@dataclass
class Outputs:
    """What one input produced, in order, per direction."""

    to_client: list[Element] = field(default_factory=list)
    to_upstream: list[Element] = field(default_factory=list)


class Feature(Protocol):
    """A value-add in the pipeline. Return the stanza (maybe changed) to pass it on, or None
    when the feature consumed it; answers go into ``out``."""

    def from_client(self, session: SessionCore, el: Element, out: Outputs) -> Element | None:
        ...

    def from_upstream(self, session: SessionCore, el: Element, out: Outputs) -> Element | None:
        ...


class SessionCore:
    """One logged-in client resource, as the relay sees it."""

    def __init__(self, jid: Jid, features: Sequence[Feature] = ()) -> None:
        self.jid = jid
        self.features = list(features)
        self._jid_text = str(jid)

    def from_client(self, el: Element) -> Outputs:
        out = Outputs()
        # RFC 6120 §8.1.2.1: the server stamps the sender's full JID; a client cannot
        # speak as anybody else, whatever it wrote.
        el.set("from", self._jid_text)
        result: Element | None = el
        for feature in self.features:
            result = feature.from_client(self, result, out)
            if result is None:
                return out
        out.to_upstream.append(result)
        return out

    def from_upstream(self, el: Element) -> Outputs:
        out = Outputs()
        result: Element | None = el
        for feature in reversed(self.features):
            result = feature.from_upstream(self, result, out)
            if result is None:
                return out
        out.to_client.append(result)
        return out
