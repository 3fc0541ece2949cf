"""RFC 3921 ``<session/>``: old clients still ask for it after binding. The proxy already
opened the upstream session during bind when the server wanted one, so it answers itself."""

from __future__ import annotations


from ..session import Feature, FeatureFactory, Outputs, SessionCore
from ..xmpp import ns
from ..xmpp import stanza as st
from ..xmpp.stanza import Element

_SESSION = ns.qname(ns.SESSION, "session")


class LegacySession(Feature):
    __slots__ = ()

    client_tags = frozenset((st.IQ,))

    def from_client(self, session: SessionCore, el: Element, out: Outputs) -> Element | None:
        if el.tag == st.IQ and el.get("type") == "set" and el.find(_SESSION) is not None:
            reply = st.iq_result(el)
            reply.attrib.pop("to", None)  # the answer comes from the server itself
            out.to_client.append(reply)
            return None
        return el


class LegacySessionFactory(FeatureFactory):
    def create(self, session: SessionCore) -> Feature:
        return LegacySession()
