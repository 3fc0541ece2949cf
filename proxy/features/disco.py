"""Service discovery toward the client (XEP-0030, XEP-0115, XEP-0199).

- The server domain's and the account's disco#info answers are relayed with the feature
  vars the proxy adds (``SessionCore.additions``: what the pipeline emulates for a server
  that lacks it), never with what it does not provide.
- When the proxy changed the domain's disco#info, the entity caps in the stream features
  carry the recomputed hash under the proxy's node (``caps_for``), and a disco#info query for
  ``NODE#VER`` is answered here, consistently.
- While the server is unreachable, the domain's and the account's disco#info are answered
  from what the server said at the bind, and a ping to the domain (or the account) gets its
  result: the client sees a server that is there, whose stanzas wait in the outbox.
"""

from __future__ import annotations

from collections.abc import Set as AbstractSet

from ..session import Feature, FeatureFactory, Outputs, SessionCore
from ..xmpp import disco, ns
from ..xmpp import stanza as st
from ..xmpp.disco import DiscoInfo, ServerInfo
from ..xmpp.stanza import Element

CAPS_NODE = "urn:xmpp-front:caps"  # XEP-0115 node of a disco#info the proxy changed
_QUERY = ns.qname(ns.DISCO_INFO, "query")
_PING = ns.qname(ns.PING, "ping")
MAX_ASKED = 64  # disco#info questions of a session awaiting the server's answer


def caps_for(server: ServerInfo, additions: AbstractSet[str],
             server_caps: Element | None) -> Element | None:
    """The ``<c/>`` for the post-authentication stream features: the server's own while the
    proxy adds nothing to the domain's disco#info; else one computed from the augmented
    answer (None while the server's answer is not known yet: no hash beats a wrong one)."""
    if server.domain is None:
        return server_caps if not additions else None
    if additions <= server.domain.features:
        return server_caps
    info = server.domain.with_features(additions)
    return disco.caps_element(CAPS_NODE, disco.caps_ver(info))


class Discovery(Feature):
    __slots__ = ("_asked", "domain")

    client_tags = frozenset((st.IQ,))
    upstream_tags = frozenset((st.IQ,))

    def __init__(self, domain: str) -> None:
        self.domain = domain
        self._asked: dict[str, str] = {}  # iq id -> "domain" | "account", awaiting the server

    def _target(self, session: SessionCore, el: Element) -> str | None:
        to = el.get("to")
        if to is None or to == str(session.account):
            return "account"
        return "domain" if to == self.domain else None

    def _augmented(self, session: SessionCore, target: str) -> DiscoInfo | None:
        server = session.server
        info = server.domain if target == "domain" else server.account
        if info is None:
            return None
        extra = session.additions.domain if target == "domain" else session.additions.account
        return info.with_features(extra)

    def from_client(self, session: SessionCore, el: Element, out: Outputs) -> Element | None:
        if el.tag != st.IQ or el.get("type") != "get" or len(el) != 1:
            return el
        target = self._target(session, el)
        if target is None:
            return el
        payload = el[0]
        if payload.tag == _QUERY:
            node = payload.get("node")
            if node is not None:
                return self._node_query(session, el, node, out)
            if session.upstream_up:
                if len(self._asked) >= MAX_ASKED:  # answers that never came (bounced)
                    del self._asked[next(iter(self._asked))]
                self._asked[el.get("id", "")] = target
                return el
            info = self._augmented(session, target)
            if info is None:
                return el  # not known: it waits for the server with everything else
            out.to_client.append(self._answer(el, info))
            return None
        if payload.tag == _PING and not session.upstream_up:
            out.to_client.append(_own_reply(st.iq_result(el), el))
            return None
        return el

    def _node_query(self, session: SessionCore, el: Element, node: str,
                    out: Outputs) -> Element | None:
        if not node.startswith(CAPS_NODE + "#") or el.get("to") != self.domain:
            return el
        info = self._augmented(session, "domain")
        if info is None or node != f"{CAPS_NODE}#{disco.caps_ver(info)}":
            out.to_client.append(_own_reply(st.error_reply(el, "item-not-found"), el))
        else:
            out.to_client.append(self._answer(el, info, node))
        return None

    @staticmethod
    def _answer(request: Element, info: DiscoInfo, node: str | None = None) -> Element:
        query = st.element("query", namespace=ns.DISCO_INFO)
        if node is not None:
            query.set("node", node)
        disco.fill_query(query, info)
        return _own_reply(st.iq_result(request, query), request)

    def from_upstream(self, session: SessionCore, el: Element, out: Outputs) -> Element | None:
        if el.tag != st.IQ or not self._asked:
            return el
        target = self._asked.pop(el.get("id", ""), None)
        if target is None or el.get("type") != "result":
            return el
        query = el.find(_QUERY)
        if query is not None and query.get("node") is None:
            extra = (session.additions.domain if target == "domain"
                     else session.additions.account)
            disco.add_features(query, extra)
        return el



def _own_reply(reply: Element, request: Element) -> Element:
    """An answer on the server's behalf: from the entity asked (none for the account's own
    bare JID asked without a ``to``), to the client."""
    if request.get("to") is None:
        reply.attrib.pop("from", None)
    return reply


class DiscoveryFactory(FeatureFactory):
    def create(self, session: SessionCore) -> Feature:
        # The session's own server domain: with several served domains, each its own.
        return Discovery(session.account.domain)
